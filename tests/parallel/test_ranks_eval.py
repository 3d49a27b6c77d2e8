"""evaluate, mine's pruned evaluations and fit-router on 2 CPU gloo ranks (torchrun) == on 1 rank; one-line
refusals of a missing GPU and of more ranks than windows.

Every 2-rank command runs in ONE torchrun launch (tests/fixtures/cli_ranks_worker.py): starting a rank costs
~10-25 s of imports on a loaded machine, the tiny commands themselves a second or two."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dive_ds.build.expert_plan import ReconstructConfig
from dive_ds.build.mine import read_matrix_csv
from dive_ds.build.reconstruct import run_reconstruct
from tests.fixtures.procs import cli, one_line_error, torchrun
from tests.fixtures.tiny import make_tiny_calibration

WORKER = Path(__file__).resolve().parents[1] / "fixtures" / "cli_ranks_worker.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 domains x (9 calibration + 3 held-out windows of 16 tokens), a dense model and a 3-expert MoE; and
    a 1-domain calibration with a single window of each kind (fewer windows than 2 ranks)."""
    root = tmp_path_factory.mktemp("ranks_eval")
    model_dir, calib = make_tiny_calibration(root, n_domains=4, windows=9, seq_len=16, n_eval=3)
    moe = run_reconstruct(calib, None, root / "moe", ReconstructConfig(num_experts=3, method="nomining"))
    _, small = make_tiny_calibration(root / "small", n_domains=1, windows=1, seq_len=8, n_eval=1)
    small_moe = run_reconstruct(
        small, None, root / "small_moe", ReconstructConfig(num_experts=1, method="nomining")
    )
    return {"calib": calib, "moe": moe, "small": small, "small_moe": small_moe}


def _commands(t: dict, out: Path) -> dict[str, list[str]]:
    return {
        "evaluate": ["evaluate", str(t["moe"]), "--calib", str(t["calib"]), "--device", "cpu",
                     "--out", str(out / "eval")],
        "mine": ["mine", "--calib", str(t["calib"]), "--experts", "2", "--eval-windows", "2", "--device", "cpu",
                 "--out", str(out / "mine")],
        # 8 of the 9 windows per domain: 32 windows, 16 per rank; every domain's 8th is held out of the fit
        "fit-router": ["fit-router", "--moe", str(t["moe"]), "--calib", str(t["calib"]), "--max-iter", "100",
                       "--no-progress", "--device", "cpu", "--windows-per-domain", "8", "--out", str(out / "fit")],
        "evaluate-1-window": ["evaluate", str(t["small_moe"]), "--calib", str(t["small"]), "--device", "cpu",
                              "--out", str(out / "eval-small")],
        "fit-router-1-window": ["fit-router", "--moe", str(t["small_moe"]), "--calib", str(t["small"]),
                                "--device", "cpu", "--out", str(out / "fit-small")],
    }  # fmt: skip


@pytest.fixture(scope="module")
def two(tiny, tmp_path_factory):
    """Every command on 2 gloo ranks in one torchrun launch -> (out folder, {command: (status rank 0, rank 1)},
    {command: its stderr})."""
    out = tmp_path_factory.mktemp("two_ranks")
    cmds = _commands(tiny, out)
    (out / "jobs.json").write_text(json.dumps(list(cmds.values())))
    run = torchrun([str(WORKER), str(out / "jobs.json"), str(out)], nproc=2, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    codes = [json.loads((out / f"codes{r}.json").read_text()) for r in (0, 1)]
    errs = {name: "" for name in cmds}  # the two ranks' lines may interleave: kept as text
    for chunk in run.stderr.split("=== job ")[1:]:  # a job's lines come after its markers (a barrier between)
        i, _, text = chunk.partition("\n")
        errs[list(cmds)[int(i)]] += text
    return out, {name: (codes[0][i], codes[1][i]) for i, name in enumerate(cmds)}, errs


@pytest.fixture
def one_thread():
    """The 1-rank reference with the ranks' 1 thread (the same float32 reductions)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_evaluate_on_two_ranks_equals_one_rank(tiny, two, tmp_path, one_thread, capsys):
    out2, codes, _ = two
    assert codes["evaluate"] == (0, 0)
    assert cli(_commands(tiny, tmp_path)["evaluate"], capsys) == 0
    one, two_ = (json.loads((d / "eval" / "eval.json").read_text()) for d in (tmp_path, out2))
    assert (one["ranks"], two_["ranks"]) == (1, 2)
    for key in ("router", "oracle"):
        assert one[key].keys() == two_[key].keys() == {"dom0", "dom1", "dom2", "dom3"}
        for d in one[key]:  # windows batched differently on 2 ranks: float32 logits differ in the last bits
            assert math.isclose(one[key][d], two_[key][d], rel_tol=1e-7), (key, d)
    load1, load2 = (np.array(list(r["expert_load"].values())) for r in (one, two_))
    np.testing.assert_allclose(load2, load1, rtol=0, atol=1e-12)  # the same routing decisions, counted
    assert one["routed_to_own_expert"] == pytest.approx(two_["routed_to_own_expert"], abs=1e-12)
    assert sorted(p.name for p in (out2 / "eval").iterdir()) == ["eval.json", "eval.md", "tb"]


def test_mining_on_two_ranks_equals_one_rank(tiny, two, tmp_path, one_thread, capsys):
    out2, codes, _ = two
    assert codes["mine"] == (0, 0)
    assert cli(_commands(tiny, tmp_path)["mine"], capsys) == 0
    ppl1, rows, _ = read_matrix_csv(tmp_path / "mine" / "pruned_ppl.csv")
    ppl2, rows2, _ = read_matrix_csv(out2 / "mine" / "pruned_ppl.csv")
    assert rows == rows2 and ppl1.shape == (4, 4)
    np.testing.assert_allclose(ppl2, ppl1, rtol=1e-7)
    groups = [json.loads((d / "mine" / "groups.json").read_text()) for d in (tmp_path, out2)]
    assert groups[0] == groups[1]


def _gates(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out |= {k: st.get_tensor(k) for k in st.keys() if k.endswith("mlp.gate.weight")}
    return out


def test_fit_router_on_two_ranks_equals_one_rank(tiny, two, tmp_path, one_thread, capsys):
    out2, codes, _ = two
    assert codes["fit-router"] == (0, 0)
    assert cli(_commands(tiny, tmp_path)["fit-router"], capsys) == 0
    g1, g2 = _gates(tmp_path / "fit"), _gates(out2 / "fit")
    assert g1.keys() == g2.keys() and len(g1) == 3
    for k in g1:
        # two ranks and one add the same float32 sums per calibration window in float64, in another order
        # (issue 23: no token rows leave their rank): equal to rounding
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5)
    rep1, rep2 = (json.loads((d / "fit" / "router_fit.json").read_text()) for d in (tmp_path, out2))
    assert (rep1["ranks"], rep2["ranks"]) == (1, 2)
    assert rep1["fit_tokens"] == rep2["fit_tokens"] == 4 * 7 * 16
    for a, b in zip(rep1["layers"], rep2["layers"]):
        for key in ("label_accuracy_fit", "label_accuracy_heldout", "label_share"):
            assert a[key] == b[key], (a["layer"], key)


@pytest.mark.parametrize("command", ["evaluate-1-window", "fit-router-1-window"])
def test_more_ranks_than_windows_is_refused_on_every_rank(two, command):
    out2, codes, errs = two
    assert codes[command] == (2, 2)  # both ranks refuse, neither waits for the other
    assert errs[command].count("dive-ds: error: 2 ranks but only 1 ") == 2
    assert errs[command].count("launch at most 1 ranks") == 2
    assert not (out2 / ("eval-small" if command.startswith("evaluate") else "fit-small")).exists()


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="checks the refusal of --device cuda where no GPU is visible; on a GPU machine cuda is valid",
)
@pytest.mark.parametrize("command", ["evaluate", "mine", "fit-router"])
def test_cuda_without_a_gpu_is_refused_in_one_line(tiny, tmp_path, capsys, command, monkeypatch):
    argv = [a for a in _commands(tiny, tmp_path)[command] if a != "cpu" and a != "--device"]
    assert cli([*argv, "--device", "cuda"], capsys) == 2
    assert "no CUDA device is visible" in one_line_error(capsys)
    monkeypatch.setattr("dive_ds.parallel.ranks.cpu_has_native_bf16", lambda: False)  # a CPU without bf16
    assert cli([*argv, "--dtype", "bf16", "--device", "cpu"], capsys) == 2
    assert "this CPU has no native bf16 matmuls" in one_line_error(capsys)
    assert not any(tmp_path.iterdir())


def test_fit_too_large_for_host_memory_is_refused_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    import dive_ds.build.router_pass

    monkeypatch.setattr(dive_ds.build.router_pass, "host_memory_per_rank", lambda: 100_000)  # bytes
    assert cli(_commands(tiny, tmp_path)["fit-router"], capsys) == 2
    line = one_line_error(capsys)
    assert "gathered on every rank" in line
    assert re.search(r"pass --fit-windows [12] \(or fewer\)", line)
    assert not (tmp_path / "fit").exists()
