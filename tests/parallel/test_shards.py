"""Sharded reconstruction (one task per node): placement, writer/reader, consolidation, CLI errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dive_ds.build.expert_plan import ReconstructConfig
from dive_ds.build.reconstruct import run_reconstruct
from dive_ds.cli import main
from dive_ds.io.placement import (
    NodePlacement,
    experts_of_ep_rank,
    experts_of_node,
    experts_written_by,
    shard_writer,
    writers,
)
from dive_ds.io.shard_reader import ShardedMoe, consolidate_shards, load_rank_state
from dive_ds.io.shards import ShardWriter, is_sharded
from dive_ds.models.moe import DiveMoeConfig
from tests.fixtures import REPO
from tests.fixtures.tiny import make_tiny_calibration

CFG = ReconstructConfig(num_experts=4, top_k=1, prune_ratio=0.5)
LAYERS = 3


# --------------------------------------------------------------------------- placement (exact)


@pytest.mark.parametrize(
    "E,P,nodes,G,held,written",
    [
        # E=8, P=8, 2 nodes x 8 GPUs: every node holds every expert; writers alternate
        (8, 8, 2, 8, [list(range(8))] * 2, [[0, 2, 4, 6], [1, 3, 5, 7]]),
        # E=4, P=2, 2 nodes x 1 GPU: one EP group across the two nodes
        (4, 2, 2, 1, [[0, 1], [2, 3]], [[0, 1], [2, 3]]),
        # E=16, P=16, 2 nodes x 8: each node holds its half
        (16, 16, 2, 8, [list(range(8)), list(range(8, 16))], [list(range(8)), list(range(8, 16))]),
        # E=8, P=2, 4 nodes x 1: nodes 0, 2 hold 0-3 and nodes 1, 3 hold 4-7
        (8, 2, 4, 1, [[0, 1, 2, 3], [4, 5, 6, 7]] * 2, [[0, 2], [4, 6], [1, 3], [5, 7]]),
        # E=2, P=2, 4 nodes x 1: nodes 1 and 2 write nothing
        (2, 2, 4, 1, [[0], [1]] * 2, [[0], [], [], [1]]),
    ],
)
def test_placement_exact(E, P, nodes, G, held, written):
    assert [experts_of_node(E, P, n, G) for n in range(nodes)] == held
    assert [experts_written_by(n, E, P, nodes, G) for n in range(nodes)] == written
    assert [shard_writer(e, E, P, nodes, G) for e in range(E)] == [
        next(n for n in range(nodes) if e in written[n]) for e in range(E)
    ]


def test_experts_of_ep_rank():
    assert [experts_of_ep_rank(8, 8, p) for p in range(8)] == [[p] for p in range(8)]
    assert [experts_of_ep_rank(8, 2, p) for p in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert experts_of_ep_rank(4, 1, 0) == [0, 1, 2, 3]


@pytest.mark.parametrize("E", [1, 2, 4, 8, 12])
@pytest.mark.parametrize("nodes,G", [(1, 1), (1, 4), (2, 1), (2, 2), (3, 4), (4, 8)])
def test_every_expert_has_one_writer_that_holds_it(E, nodes, G):
    for P in range(1, E + 1):
        if E % P or (nodes * G) % P:
            continue
        w = writers(E, P, nodes, G)
        assert sorted(w) == list(range(E))
        for e, n in w.items():
            assert e in experts_of_node(E, P, n, G)
        assert sorted(sum((experts_written_by(n, E, P, nodes, G) for n in range(nodes)), [])) == list(
            range(E)
        )


@pytest.mark.parametrize(
    "call,msg",
    [
        (lambda: writers(4, 3, 2, 1), r"--ep 3 does not divide the 4 experts per layer; use .*: 1, 2, 4"),
        (
            lambda: writers(8, 8, 1, 4),
            r"--ep 8 does not divide the 4 ranks \(--nodes 1 x --gpus-per-node 4\)",
        ),
        (lambda: writers(4, 2, 0, 1), r"--nodes 0"),
        (lambda: writers(4, 2, 2, 0), r"--gpus-per-node 0"),
        (lambda: experts_of_ep_rank(4, 2, 2), r"ep_rank=2 is outside \[0, 2\)"),
        (lambda: shard_writer(4, 4, 2, 2, 1), r"expert 4 is outside \[0, 4\)"),
        (
            lambda: NodePlacement(node=2, nodes=2, gpus_per_node=1, ep_size=2),
            r"--node-rank 2 is outside \[0, 2\)",
        ),
        (
            lambda: NodePlacement(node=0, nodes=1, gpus_per_node=1, ep_size=2).check(4),
            r"--ep 2 does not divide",
        ),
    ],
)
def test_placement_errors(call, msg):
    with pytest.raises(ValueError, match=msg) as e:
        call()
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- fixtures


def _hf_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    model_dir, calib_dir = make_tiny_calibration(root)
    groups = root / "groups.json"
    groups.write_text(json.dumps({f"g{i}": [f"dom{i}"] for i in range(4)}))
    ref = run_reconstruct(calib_dir, groups, root / "ref", CFG)  # write_moe, the reference
    return {"root": root, "model": model_dir, "calib": calib_dir, "groups": groups, "ref": ref}


def _argv(tiny, out, *extra):
    return [
        "reconstruct", "--calib", str(tiny["calib"]), "--groups", str(tiny["groups"]),
        "--experts", "4", "--top-k", "1", "--prune-ratio", "0.5", "--out", str(out), *map(str, extra),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_nodes(tiny):
    """E=4, P=2, 2 nodes x 1 GPU: two concurrent `launchers/reconstruct.py reconstruct --shards` tasks."""
    out = tiny["root"] / "sharded"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "launchers/reconstruct.py"),
                *_argv(
                    tiny, out, "--shards", "--node-rank", node, "--nodes", 2, "--gpus-per-node", 1, "--ep", 2
                ),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (_, se) in zip(procs, logs):
        assert p.returncode == 0, se[-2000:]
    return out, [so for so, _ in logs]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- two nodes, concurrently


def test_each_node_writes_only_what_its_ranks_hold(two_nodes):
    out, stdouts = two_nodes
    assert "node 0/2 wrote experts [0, 1]" in stdouts[0] and "node 1/2 wrote experts [2, 3]" in stdouts[1]
    recs = [json.loads((out / f"nodes/node-{n:05d}.json").read_text()) for n in (0, 1)]
    for n, rec in enumerate(recs):
        held = experts_of_node(4, 2, n, 1)
        assert rec["experts"] == held == [2 * n, 2 * n + 1]
        experts = [f for f in rec["files"] if f.startswith("experts/")]
        assert sorted(experts) == sorted(
            f"experts/layer-{layer:05d}/expert-{e:03d}.safetensors" for layer in range(LAYERS) for e in held
        )
        assert rec["tensor_bytes"] > 0 and rec["seconds"] >= 0
    shared = {f for f in recs[0]["files"] if not f.startswith("experts/")}
    assert {"shared/model-shared.safetensors", "config.json", "dive_experts.json"} <= shared
    assert {f"shared/layer-{layer:05d}.safetensors" for layer in range(LAYERS)} <= shared
    assert all(f.startswith("experts/") for f in recs[1]["files"])  # node 1: no shared file
    # the folder holds exactly what the two markers list, the manifest and the markers; no temp file
    listed = set(recs[0]["files"]) | set(recs[1]["files"])
    assert _files(out) == listed | {"dive_shards.json", "nodes/node-00000.json", "nodes/node-00001.json"}
    manifest = json.loads((out / "dive_shards.json").read_text())
    assert manifest["format"] == "dive_ds.shards/1"
    assert (manifest["num_layers"], manifest["num_experts"], manifest["ep_size"]) == (LAYERS, 4, 2)
    assert (manifest["nodes"], manifest["gpus_per_node"]) == (2, 1)
    assert manifest["writers"] == {"0": 0, "1": 0, "2": 1, "3": 1}
    assert is_sharded(out) and not is_sharded(out.parent / "ref")


def test_union_equals_write_moe(tiny, two_nodes):
    out, _ = two_nodes
    ref = _hf_state(tiny["ref"])
    moe = ShardedMoe(out)
    got = moe.shared_state()
    assert not any(".mlp.experts." in k for k in got)
    for layer in range(LAYERS):
        for k, v in moe.expert_tensors(layer, [0, 1, 2, 3]).items():
            got[f"model.layers.{layer}.mlp.experts.{k}"] = v
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert moe.config.to_dict() == DiveMoeConfig.from_pretrained(tiny["ref"]).to_dict()
    e2 = moe.expert_tensors(1, [2])
    assert e2["gate_up_proj"].shape == (1, 2 * 24, 32) and e2["down_proj"].shape == (1, 32, 24)
    assert e2["bias"].shape == (1, 32)


def test_load_rank_state_gives_the_exact_slices(tiny, two_nodes):
    out, _ = two_nodes
    ref = _hf_state(tiny["ref"])
    for experts in (experts_of_ep_rank(4, 2, 0), experts_of_ep_rank(4, 2, 1), [3, 0]):
        state = load_rank_state(out, experts)
        assert sorted(state) == sorted(ref)
        for k, v in state.items():
            want = ref[k][experts] if ".mlp.experts." in k else ref[k]
            assert torch.equal(v, want), (experts, k)
    with pytest.raises(ValueError, match=r"experts \[1, 1\]: pass distinct expert ids in \[0, 4\)"):
        load_rank_state(out, [1, 1])


def test_consolidate_equals_write_moe(tiny, two_nodes, tmp_path, capsys):
    out, _ = two_nodes
    hf = tmp_path / "hf"
    assert main(["consolidate", "--shards", str(out), "--out", str(hf)]) == 0
    assert "consolidated" in capsys.readouterr().out
    ref = tiny["ref"]
    assert sorted(p.name for p in hf.iterdir()) == sorted(p.name for p in ref.iterdir())
    a, b = _hf_state(hf), _hf_state(ref)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)
    # same files as write_moe, byte for byte (weights, index, experts metadata)
    for name in ["model.safetensors.index.json", "dive_experts.json"] + [
        p.name for p in ref.glob("*.safetensors")
    ]:
        assert (hf / name).read_bytes() == (ref / name).read_bytes(), name
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    m_hf = AutoModelForCausalLM.from_pretrained(hf).eval()
    m_ref = AutoModelForCausalLM.from_pretrained(ref).eval()
    with torch.no_grad():
        assert torch.equal(m_hf(ids).logits, m_ref(ids).logits)
    # the output must be new
    assert main(["consolidate", "--shards", str(out), "--out", str(hf)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_rerun_is_idempotent(tiny, two_nodes, capsys):
    out, _ = two_nodes
    before = {f: (out / f).stat().st_mtime_ns for f in _files(out)}
    for node in (1, 0):
        argv = _argv(
            tiny, out, "--shards", "--node-rank", node, "--nodes", 2, "--gpus-per-node", 1, "--ep", 2
        )
        assert main(argv) == 0
        assert f"node {node}/2: reused its complete shards" in capsys.readouterr().out
    assert {f: (out / f).stat().st_mtime_ns for f in _files(out)} == before


def test_another_plan_in_out_is_refused(tiny, two_nodes, capsys):
    out, _ = two_nodes
    before = {f: (out / f).stat().st_mtime_ns for f in _files(out)}
    for extra, why in (
        (["--seed", 7, "--node-rank", 1, "--gpus-per-node", 1, "--ep", 2], "fingerprint"),
        (["--node-rank", 0, "--gpus-per-node", 2, "--ep", 4], "ep_size 2 != 4"),
        (["--node-rank", 1, "--gpus-per-node", 2, "--ep", 4], "ep_size 2 != 4"),
    ):
        assert main(_argv(tiny, out, "--shards", "--nodes", 2, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"holds another sharded MoE ({why}" in err, err
        assert "use another --out or remove it" in err, err
    assert {f: (out / f).stat().st_mtime_ns for f in _files(out)} == before
    # an HF folder is not a shard folder
    argv = _argv(
        tiny, tiny["ref"], "--shards", "--node-rank", 0, "--nodes", 2, "--gpus-per-node", 1, "--ep", 2
    )
    assert main(argv) == 2
    assert "already holds something else" in capsys.readouterr().err


# --------------------------------------------------------------------------- in-process layouts


def _node(tiny, out, node, nodes, G, P, cfg=CFG, groups=True):
    placement = NodePlacement(node=node, nodes=nodes, gpus_per_node=G, ep_size=P)
    return run_reconstruct(tiny["calib"], tiny["groups"] if groups else None, out, cfg, shards=placement)


def test_overlapping_nodes_in_any_order(tiny, tmp_path):
    """E=4, P=2, 2 nodes x 2 GPUs: both nodes hold every expert; node 1 runs first (before the manifest)."""
    out = tmp_path / "ovl"
    _node(tiny, out, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="node 0 has not finished"):
        ShardedMoe(out)
    _node(tiny, out, 0, 2, 2, 2)
    recs = [json.loads((out / f"nodes/node-{n:05d}.json").read_text()) for n in (0, 1)]
    assert [r["experts"] for r in recs] == [[0, 2], [1, 3]]
    ref = _hf_state(tiny["ref"])
    state = load_rank_state(out, [0, 1, 2, 3])
    assert sorted(state) == sorted(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


def test_nodes_without_experts_still_finish(tiny, tmp_path):
    """E=2, P=2, 4 nodes x 1 GPU (random-halves): nodes 1 and 2 write nothing but their markers."""
    cfg = ReconstructConfig(num_experts=2, method="random-halves")
    ref = run_reconstruct(tiny["calib"], None, tmp_path / "ref2", cfg)
    out = tmp_path / "four"
    for node in (3, 2, 1, 0):
        _node(tiny, out, node, 4, 1, 2, cfg, groups=False)
    recs = [json.loads((out / f"nodes/node-{n:05d}.json").read_text()) for n in range(4)]
    assert [r["experts"] for r in recs] == [[0], [], [], [1]]
    assert recs[1]["files"] == recs[2]["files"] == [] and recs[1]["tensor_bytes"] == 0
    hf = consolidate_shards(out, tmp_path / "hf2")
    a, b = _hf_state(hf), _hf_state(ref)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_incomplete_folder_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "half"
    _node(tiny, out, 0, 2, 1, 2)
    msg = rf"{out} is incomplete: node 1 has not finished \(no nodes/node-00001.json\); rerun its reconstruct task"
    with pytest.raises(ValueError, match=msg):
        ShardedMoe(out)
    with pytest.raises(ValueError, match=msg):
        load_rank_state(out, [0, 1])
    assert main(["consolidate", "--shards", str(out), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "node 1 has not finished" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))
    _node(tiny, out, 1, 2, 1, 2)
    ShardedMoe(out)  # complete now
    (out / "experts/layer-00001/expert-002.safetensors").unlink()
    with pytest.raises(
        ValueError, match=r"incomplete: experts/layer-00001/expert-002.safetensors is missing"
    ):
        ShardedMoe(out)
    # the rerun of the node whose file went missing redoes its part
    _node(tiny, out, 1, 2, 1, 2)
    ShardedMoe(out)


def test_cli_flag_errors_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bad"
    for k in ("SLURM_NODEID", "SLURM_NNODES"):
        monkeypatch.delenv(k, raising=False)
    cases = [
        (["--shards", "--node-rank", 0, "--nodes", 2, "--gpus-per-node", 1, "--ep", 3],
         "--ep 3 does not divide the 4 experts per layer; use an expert-parallel size in: 1, 2, 4"),
        (["--shards", "--node-rank", 0, "--nodes", 1, "--gpus-per-node", 1, "--ep", 2],
         "--ep 2 does not divide the 1 ranks"),
        (["--shards", "--node-rank", 0, "--nodes", 2, "--gpus-per-node", 1], "--shards needs --ep"),
        (["--shards", "--nodes", 2, "--gpus-per-node", 1, "--ep", 2], "--shards needs --node-rank (or $SLURM_NODEID"),
        (["--shards", "--node-rank", 2, "--nodes", 2, "--gpus-per-node", 1, "--ep", 2], "--node-rank 2 is outside"),
        (["--ep", 2], "--ep only applies with --shards"),
    ]  # fmt: skip
    for extra, msg in cases:
        assert main(_argv(tiny, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("dive-ds: error: ") and msg in err and err.count("\n") == 1, err
        assert not out.exists()
    # SLURM's variables stand in for --node-rank / --nodes
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert main(_argv(tiny, out, "--shards", "--gpus-per-node", 1, "--ep", 3)) == 2
    assert "--ep 3 does not divide" in capsys.readouterr().err and not out.exists()
    assert main(_argv(tiny, out, "--shards", "--gpus-per-node", 1, "--ep", 2)) == 0
    assert json.loads((out / "nodes/node-00001.json").read_text())["experts"] == [2, 3]


def test_shard_writer_guards(tiny, tmp_path):
    config = DiveMoeConfig.from_pretrained(tiny["ref"])
    ref = _hf_state(tiny["ref"])
    w1 = ShardWriter(tmp_path / "w", config, 4, 2, 2, 1, 1)
    with pytest.raises(ValueError, match="only node 0 writes the shared tensors"):
        w1.write_shared({"model.norm.weight": ref["model.norm.weight"]})
    with pytest.raises(ValueError, match=r"node 1 does not write expert 0 \(it writes \[2, 3\]\)"):
        w1.write_expert(0, 0, {})
    with pytest.raises(ValueError, match="node 1 has not written experts/layer-00000/expert-002"):
        w1.finish()
    w0 = ShardWriter(tmp_path / "w", config, 4, 2, 2, 1, 0)
    with pytest.raises(ValueError, match="write_shared_layer"):
        w0.write_shared(
            {"model.layers.0.input_layernorm.weight": ref["model.layers.0.input_layernorm.weight"]}
        )
    with pytest.raises(ValueError, match="pass only non-expert tensors"):
        w0.write_shared_layer(0, {"model.layers.0.mlp.experts.bias": ref["model.layers.0.mlp.experts.bias"]})
    with pytest.raises(ValueError, match="num_local_experts=4"):
        ShardWriter(tmp_path / "w", config, 8, 2, 2, 1, 0)
