"""`dive-ds compare --quick` and router fitting on the real SmolLM2 model and demo text (marked slow)."""

import json
import math

import pytest

from dive_ds.cli import main

pytestmark = pytest.mark.slow
DOMAINS = ["wiki_evals", "science_abstracts", "math_solutions", "drama_tragedies", "code_stdlib"]


@pytest.fixture(scope="module")
def demo_calib(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    calib = root / "calib"
    args = ["calibrate", "--model", "demo", "--domains", "demo", "--only", *DOMAINS, "--samples-per-domain", "8",
            "--seq-len", "128", "--eval-windows", "3", "--no-progress", "--out", str(calib)]  # fmt: skip
    assert main(args) == 0
    groups = root / "groups.json"
    groups.write_text(
        json.dumps(
            {
                "text": ["wiki_evals", "science_abstracts"],
                "math_code": ["math_solutions", "code_stdlib"],
                "drama": ["drama_tragedies"],
            }
        )  # fmt: skip
    )
    return root, calib, groups


def test_fitted_dive_beats_flap_before_training(demo_calib):
    """The fitted router turns good experts into a good MoE: clearly better than FLAP at the same width."""
    root, calib, groups = demo_calib
    common = ["--calib", str(calib), "--prune-ratio", "0.5"]
    assert (
        main(["reconstruct", *common, "--groups", str(groups), "--experts", "3", "--out", str(root / "dive")])
        == 0
    )
    assert main(["reconstruct", *common, "--method", "flap", "--out", str(root / "flap")]) == 0
    assert main(["fit-router", "--moe", str(root / "dive"), "--calib", str(calib), "--no-progress",
                 "--out", str(root / "dive-fitted")]) == 0  # fmt: skip
    from dive_ds.workflows import run_evaluate

    fitted = run_evaluate(str(root / "dive-fitted"), calib, oracle=False)
    rand = run_evaluate(str(root / "dive"), calib, oracle=True)
    flap = run_evaluate(str(root / "flap"), calib, oracle=False)
    print(fitted["router_mean"], rand["router_mean"], rand["oracle_mean"], flap["router_mean"])
    assert fitted["router_mean"] < 0.85 * flap["router_mean"]
    assert fitted["router_mean"] < rand["router_mean"]
    rep = json.loads((root / "dive-fitted" / "router_fit.json").read_text())
    assert rep["mean_label_accuracy_heldout"] > 1 / 3 + 0.1  # far above chance among 3 experts


def test_compare_quick_evaluates_every_method_on_the_same_windows(demo_calib):
    root, calib, groups = demo_calib
    out = root / "compare"
    args = ["compare", "--calib", str(calib), "--groups", str(groups), "--experts", "3", "--quick", "--seq-len", "128",
            "--eval-domains", "demo-unseen", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "compare.json").read_text())
    names = {"dive-fitted", "dive-random", "nomining-fitted", "nomining-random", "random-split-fitted",
             "random-split-random", "flap"}  # fmt: skip
    assert set(res["runs"]) == names
    for split in ("seen", "unseen"):
        domains = {tuple(r["after"][split]["router"]) for r in res["runs"].values()}
        assert len(domains) == 1  # the same domains for every run
    assert set(res["windows"]["unseen"]).isdisjoint(DOMAINS)
    for r in res["runs"].values():
        assert math.isfinite(r["after"]["seen"]["router_mean"]) and r["train_tokens_per_s"] > 0
        assert [p["tokens"] for p in r["curve"]] == [
            0,
            256,
            512,
        ]  # an eval point after each of 2 steps of 2 x 128
    md = (out / "compare.md").read_text()
    assert "unseen domains" in md and "flap" in md
    assert (out / "ppl_vs_tokens.png").stat().st_size > 10_000
    assert main(args) == 0  # the same run again: everything reused, the same table
    assert json.loads((out / "compare.json").read_text())["runs"].keys() == res["runs"].keys()
