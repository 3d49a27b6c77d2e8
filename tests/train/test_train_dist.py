"""DIVE retraining on 2 CPU ranks (gloo): ZeRO-2 and ZeRO-3 reproduce the 1-rank losses, and a ZeRO-3
checkpoint consolidates to an HF model with the live engine's loss.

Each 2-rank run is a real launcher subprocess (`deepspeed --num_gpus 2` for ZeRO-2, `torchrun
--nproc_per_node 2` for ZeRO-3), one at a time, on a fresh port. The 1-rank reference runs in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dive_ds.train.config_load import read_mapping, run_config_from_dict
from dive_ds.train.data import ByteTokenizer
from tests.fixtures import REPO
from tests.fixtures.procs import free_port, subprocess_env
from tests.fixtures.train_setup import (
    ZERO2,
    ZERO3,
    base_run,
    make_tiny_setup,
    start_world,
    step_losses,
    write_ds,
    write_yaml,
)

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def world_1():
    import torch.distributed as dist

    from dive_ds.parallel.distributed import teardown_distributed

    made = not dist.is_initialized()
    start_world()  # a no-op when the session's `world` group (tests/conftest.py) is already up
    yield
    if made:  # the session's group stays up for the test files that run after this one
        teardown_distributed()


@pytest.fixture(scope="module")
def reference(world_1, tmp_path_factory) -> dict:
    """1 rank, ZeRO-2, global batch 4 (= micro 1 x accumulation 4): the losses 2 ranks must reproduce."""
    from dive_ds.train.retrain import train

    root = tmp_path_factory.mktemp("dist")
    setup = make_tiny_setup(root / "tiny")
    raw = base_run(setup, root / "ref")
    train(run_config_from_dict(raw), read_mapping(ZERO2), str(ZERO2))
    return {"root": root, "raw": raw, "losses": step_losses(root / "ref")}


def launch(cmd: list[str], out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert (out / "model" / "config.json").is_file()
    return proc


def assert_same_losses(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) == 10
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst < 2e-5, {k: (got[k], want[k]) for k in want}


def test_zero2_two_ranks_deepspeed_launcher_matches_one_rank(reference, tmp_path):
    raw = dict(reference["raw"], out_dir=str(tmp_path / "z2"))
    cfg = write_yaml(raw, tmp_path / "run.yaml")
    launch(
        [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            str(REPO / "launchers" / "retrain.py"),
            "--deepspeed",
            str(ZERO2),
            "--config",
            str(cfg),
        ],
        tmp_path / "z2",
    )
    assert_same_losses(step_losses(tmp_path / "z2"), reference["losses"])
    ds = json.loads((tmp_path / "z2" / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (1, 2)
    assert json.loads((tmp_path / "z2" / "run_info.json").read_text())["world_size"] == 2


def test_zero3_two_ranks_torchrun_matches_one_rank_and_consolidates(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    from dive_ds.train.evaluation import eval_windows, evaluate, summarise_eval
    from dive_ds.train.export import consolidate_checkpoint

    out = tmp_path / "z3"
    raw = dict(reference["raw"], out_dir=str(out))
    cfg = write_yaml(raw, tmp_path / "run.yaml")
    # persistence threshold 0: every parameter of the tiny model really is partitioned over the 2 ranks
    ds = write_ds(ZERO3, tmp_path / "zero3.json", stage3_param_persistence_threshold=0)
    launch(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(REPO / "launchers" / "retrain.py"),
            "--deepspeed",
            str(ds),
            "--config",
            str(cfg),
        ],
        out,
    )
    assert_same_losses(step_losses(out), reference["losses"])
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    start = [r for r in rows if r.get("event") == "stage_start"]
    assert all(r["zero_stage"] == 3 and r["world_size"] == 2 for r in start)
    assert all(r["param_stats"]["zero3_partitioned"] == r["param_stats"]["parameters"] for r in start)
    ckpt = out / "stages" / "experts" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert len(list((ckpt / tag).glob("*zero_pp_rank_*optim_states.pt"))) == 2

    run = run_config_from_dict(raw)
    windows = eval_windows(run, ByteTokenizer(), 260)
    live = json.loads((out / "stages" / "experts" / "summary.json").read_text())["final_eval"]

    def loss_of(folder: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert not any("lora" in n for n, _ in model.named_parameters())
        return summarise_eval(
            evaluate(lambda ids: model(input_ids=ids).logits, windows, 2, torch.device("cpu"))
        )["loss"]

    # gathered from the live engine (GatheredParameters) at the end of the stage, LoRA merged
    assert loss_of(out / "model") == pytest.approx(live["loss"], abs=1e-6)
    # offline, from the partitioned checkpoint files (zero_to_fp32), LoRA merged
    merged = consolidate_checkpoint(ckpt, tmp_path / "consolidated")
    assert loss_of(merged) == pytest.approx(live["loss"], abs=1e-6)


# --------------------------------------------------------------------------- expert parallelism


@pytest.fixture(scope="module")
def reference_ep(world_1, tmp_path_factory) -> dict:
    """1 rank, ZeRO-2, no expert parallelism, LoRA dropout 0: what ep_size 2 must reproduce.

    LoRA dropout is off because with expert parallelism an expert's dropout mask is drawn on the rank
    that holds the expert, over rows from every rank: a different (equally valid) random stream.
    """
    from dive_ds.train.retrain import train

    root = tmp_path_factory.mktemp("dist_ep")
    setup = make_tiny_setup(root / "tiny")
    raw = base_run(setup, root / "ref", stages={"experts": {"steps": 6, "lr": 1.0e-2, "lora_dropout": 0.0}})
    train(run_config_from_dict(raw), read_mapping(ZERO2), str(ZERO2))
    return {"root": root, "raw": raw, "losses": step_losses(root / "ref")}


def test_zero3_ep2_matches_one_rank_resumes_and_consolidates(reference_ep, tmp_path):
    """ZeRO-3 + expert parallelism 2 (ds_configs/zero3.json) on 2 ranks, killed after experts step 3 and
    relaunched: every step's loss equals the 1-rank run; the stage outputs are sharded (each rank wrote
    its own experts; the experts stage read the router stage's shards), and both the consolidated stage
    output and the offline consolidation of the last checkpoint give the live engine's held-out loss."""
    from transformers import AutoModelForCausalLM

    from dive_ds.io.shard_reader import consolidate_shards
    from dive_ds.io.shards import is_sharded
    from dive_ds.train.evaluation import eval_windows, evaluate, summarise_eval
    from dive_ds.train.export import consolidate_checkpoint
    from dive_ds.train.faults import CRASH_ENV

    out = tmp_path / "z3ep"
    raw = dict(reference_ep["raw"], out_dir=str(out))
    cfg = write_yaml(raw, tmp_path / "run.yaml")
    ds = write_ds(ZERO3, tmp_path / "zero3.json", ep=2, stage3_param_persistence_threshold=0)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launchers" / "retrain.py"), "--deepspeed", str(ds), "--config", str(cfg)]  # fmt: skip
    crashed = subprocess.run(
        cmd, env=subprocess_env(**{CRASH_ENV: "experts:3"}), capture_output=True, text=True, timeout=400
    )
    assert crashed.returncode != 0 and not (out / "model").exists()
    assert (out / "stages" / "experts" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    cmd[4] = str(free_port())
    proc = launch(cmd, out)
    assert "resumed from" in proc.stdout
    assert "expert parallel 2" in proc.stdout
    assert_same_losses(step_losses(out), reference_ep["losses"])
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["zero_stage"] for r in rows if r.get("event") == "stage_start"} == {3}

    ckpt = out / "stages" / "experts" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert sorted(p.name for p in (ckpt / tag).glob("ep_trainable_rank*.safetensors")) == [
        "ep_trainable_rank000.safetensors", "ep_trainable_rank001.safetensors"
    ]  # fmt: skip
    run = run_config_from_dict(raw)
    windows = eval_windows(run, ByteTokenizer(), 260)
    live = json.loads((out / "stages" / "experts" / "summary.json").read_text())["final_eval"]

    def loss_of(folder: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert model.config.num_local_experts == 4
        return summarise_eval(
            evaluate(lambda ids: model(input_ids=ids).logits, windows, 2, torch.device("cpu"))
        )["loss"]

    # the stage output is sharded: each rank wrote only the experts it holds, rank 0 the shared weights
    model_dir = out / "stages" / "experts" / "model"
    assert is_sharded(model_dir) and is_sharded(out / "stages" / "router" / "model")
    for rank, experts in ((0, [0, 1]), (1, [2, 3])):
        rec = json.loads((model_dir / "nodes" / f"node-{rank:05d}.json").read_text())
        assert rec["experts"] == experts
        assert {f.split("/")[0] for f in rec["files"] if "/" in f} == (
            {"experts", "shared"} if rank == 0 else {"experts"}
        )
    assert loss_of(consolidate_shards(out / "model", tmp_path / "from_shards")) == pytest.approx(
        live["loss"], abs=1e-6
    )
    merged = consolidate_checkpoint(ckpt, tmp_path / "consolidated")
    assert loss_of(merged) == pytest.approx(live["loss"], abs=1e-6)


def test_zero2_ep2_deepspeed_launcher_experts_stage_matches_one_rank(reference_ep, tmp_path):
    """ZeRO-2 + EP 2 (ds_configs/zero2_ep.json) runs the experts stage (from the reference's router
    output) with the 1-rank losses; the router stage (experts frozen) is refused with DeepSpeed's reason."""
    out = tmp_path / "z2ep"
    raw = dict(reference_ep["raw"], out_dir=str(out))
    cfg = write_yaml(raw, tmp_path / "run.yaml")
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launchers" / "retrain.py"), "--deepspeed", str(REPO / "ds_configs" / "zero2_ep.json"),
           "--config", str(cfg)]  # fmt: skip
    refused = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert refused.returncode != 0
    assert "stage router with ZeRO-2 and expert parallelism 2: the experts are frozen" in refused.stderr
    assert not (out / "stages").exists()
    router_out = Path(reference_ep["raw"]["out_dir"]) / "stages" / "router" / "model"
    cmd[4] = str(free_port())
    launch(cmd + ["--stages", "experts", "--set", f"stages.experts.init_from={router_out}"], out)
    want = {k: v for k, v in reference_ep["losses"].items() if k[0] == "experts"}
    got = step_losses(out)
    assert got.keys() == want.keys() and len(want) == 6
    assert max(abs(got[k] - want[k]) for k in want) < 2e-5, (got, want)
