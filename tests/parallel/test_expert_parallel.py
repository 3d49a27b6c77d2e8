"""Expert parallelism of the DIVE block: placement and regrouping (exact), the DeepSpeed internals it
relies on (pinned), and 2 CPU ranks with ep_size 2 against the single-rank block (outputs and grads)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dive_ds.parallel.expert_parallel import ep_block_class, experts_of_ep_rank, group_by_local_expert
from tests.fixtures import REPO
from tests.fixtures.procs import free_port, subprocess_env


def test_experts_of_ep_rank():
    assert experts_of_ep_rank(8, 8, 3) == [3]
    assert experts_of_ep_rank(8, 2, 1) == [4, 5, 6, 7]
    assert experts_of_ep_rank(6, 1, 0) == list(range(6))
    with pytest.raises(ValueError, match="does not divide num_experts=6"):
        experts_of_ep_rank(6, 4, 0)
    with pytest.raises(ValueError, match="ep_rank=2 is outside"):
        experts_of_ep_rank(4, 2, 2)


def test_group_by_local_expert_exact():
    # 3 sources, 2 local experts; rows arrive source-major: s0:[e0 x2, e1 x0], s1:[e0 x1, e1 x3], s2:[e0 x0, e1 x1]
    counts = torch.tensor([[2, 0], [1, 3], [0, 1]])
    index, local = group_by_local_expert(counts)
    # received rows 0..6 are s0e0 s0e0 | s1e0 | s1e1 s1e1 s1e1 | s2e1
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    counts = torch.tensor([[1, 2], [2, 1]])
    index, local = group_by_local_expert(counts)
    # received: s0e0 | s0e1 s0e1 | s1e0 s1e0 | s1e1 -> e0 rows: 0, 3, 4; e1 rows: 1, 2, 5
    assert index.tolist() == [0, 3, 4, 1, 2, 5] and local.tolist() == [3, 3]
    index, local = group_by_local_expert(torch.zeros(2, 3, dtype=torch.long))
    assert index.numel() == 0 and local.tolist() == [0, 0, 0]


def test_deepspeed_autoep_internals():
    """Fails loudly when the pinned DeepSpeed internals the EP block composes change."""
    import deepspeed
    from deepspeed.module_inject import auto_ep_layer
    from deepspeed.runtime import engine
    from deepspeed.utils import groups

    assert deepspeed.__version__ == "0.19.8", "dive_ds.parallel.expert_parallel is written against 0.19.8"
    assert issubclass(ep_block_class(), auto_ep_layer.AutoEPMoELayer)
    params = inspect.signature(auto_ep_layer.compute_split_plan).parameters
    assert list(params) == [
        "selected_experts", "num_experts", "ep_size", "num_local_experts", "ep_group", "num_tokens_per_expert"
    ]  # fmt: skip
    assert auto_ep_layer.SplitPlan._fields == ("input_splits", "output_splits", "local_counts_by_source")
    assert list(inspect.signature(auto_ep_layer._AllToAllV.forward).parameters) == [
        "ctx", "group", "x", "input_splits", "output_splits"
    ]  # fmt: skip
    src = inspect.getsource(auto_ep_layer.AutoEPMoELayer.set_deepspeed_parallelism)
    for attr in ("self.ep_group_name", "self.ep_group", "_create_expert_and_data_parallel"):
        assert attr in src
    esrc = inspect.getsource(engine.DeepSpeedEngine)
    assert "isinstance(module, _AutoEPMoELayer)" in esrc  # how the engine finds EP layers
    assert '"autoep_expert"' in esrc  # ZeRO-3 placement family of expert parameters
    assert "Native DeepSpeed MoE is not supported with ZeRO Stage 3" in esrc
    assert callable(groups._get_expert_parallel_group) and callable(groups._get_expert_data_parallel_group)


@pytest.mark.dist
def test_ep2_layer_equals_single_rank_layer(tmp_path):
    env = subprocess_env(OUT=tmp_path)
    port = str(free_port())
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", port,
           str(REPO / "tests" / "fixtures" / "ep_layer_worker.py")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = set()
    for rank in (0, 1):
        for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines():
            case = json.loads(line)
            seen.add(case["case"])
            assert case["local_experts"] == ([0, 1] if rank == 0 else [2, 3])
            assert case["counts_ep"] == case["counts_ref"], case  # no token dropped, none duplicated
            assert sum(case["counts_ref"]) > 0 and case["y_absmax"] > 0.1
            worst = max(case["diffs"].items(), key=lambda kv: kv[1])
            assert worst[1] < 2e-5, (rank, case["case"], worst)
            if case["case"] != "dense_router_stage":
                assert case["counts_ref"][3] == 0  # an expert that receives no token
                assert len(set(case["counts_ref"][:3])) > 1 or case["case"] == "top1"  # uneven loads
            names = set(case["diffs"])
            assert {"y", "dx", "d_gate_up_proj", "d_down_proj", "d_bias", "d_gate.weight"} <= names
            if case["case"] == "top2_lora":
                assert {"d_lora_gate_up_A", "d_lora_down_B"} <= names
            if (
                case["case"] == "top1_shared_lora"
            ):  # the shared expert and its adapters, through the all-to-all
                assert {"d_shared.gate_up_proj", "d_shared.down_proj", "d_shared.lora_down_B"} <= names
    assert len(seen) == 7
