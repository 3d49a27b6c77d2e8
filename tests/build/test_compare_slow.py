"""`dive-ds compare --quick` with router fitting, on the real SmolLM2 model and demo text (marked slow)."""

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


def test_compare_quick_fitted_dive_beats_flap_on_the_same_windows(demo_calib, capsys):
    """DIVE with a fitted router, DIVE with the paper's random router (+ router stage) and FLAP, through
    the whole command (the other methods take the same code path with another --methods)."""
    root, calib, groups = demo_calib
    out = root / "compare"
    args = ["compare", "--calib", str(calib), "--groups", str(groups), "--experts", "3", "--quick", "--seq-len", "128",
            "--methods", "dive,flap", "--eval-domains", "demo-unseen", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "compare.json").read_text())
    runs, models = res["runs"], res["models"]
    assert set(models) == {"dive-fitted", "dive-random", "flap"}
    assert set(runs) == {"dive-fitted-d1234", "dive-random-d1234", "flap-d1234"}
    assert res["command"][:2] == ["dive-ds", "compare"] and res["complete"]
    # before training, token-weighted on the evaluation set (never calibrated, selected or fitted on):
    # the fitted router makes the experts a better model than FLAP at the same width
    before = {n: m["before"]["seen"]["router_tokens"] for n, m in models.items()}
    print(before, models["dive-random"]["before"]["seen"]["oracle_tokens"])
    assert before["dive-fitted"] < 0.93 * before["flap"]
    assert before["dive-fitted"] < before["dive-random"]
    rep = json.loads((out / "models" / "dive-fitted" / "router_fit.json").read_text())
    assert rep["mean_label_accuracy_heldout"] > 1 / 3 + 0.1  # far above chance among 3 experts
    # every ratio has a paired interval around it, on identical windows
    row = next(
        r
        for r in res["ratios"]
        if (r["when"], r["split"], r["a"], r["vs"]) == ("before", "seen", "dive-fitted", "flap")
    )
    assert row["lo"] <= row["ratio"] <= row["hi"] and row["windows"] == 2 * len(res["windows"]["seen"])
    assert row["ratio"] == pytest.approx(before["dive-fitted"] / before["flap"], rel=1e-9)
    assert {(s["when"], s["split"]) for s in res["ratio_summary"]} == {
        (w, s) for w in ("before", "after") for s in ("seen", "unseen", "lambada")
    }
    for split in ("seen", "unseen"):
        domains = {tuple(r["after"][split]["router"]) for r in runs.values()}
        assert len(domains) == 1  # the same domains for every run
    assert (
        set(res["windows"]["unseen"]).isdisjoint(DOMAINS) and len(res["windows"]["seen"]) == 12
    )  # the registry's
    # the evaluation windows come from the evaluation set: disjoint from calibration's recorded spans
    calib_ids = json.loads((calib / "split.json").read_text())
    eval_ids = json.loads((out / "eval_split.json").read_text())["ids"]
    for d in DOMAINS:
        used = set(calib_ids[d]["calib"]["ids"]) | set(calib_ids[d]["select"]["ids"])
        assert eval_ids["seen"][d]["ids"] and not used & set(eval_ids["seen"][d]["ids"]), d
    for r in runs.values():
        assert math.isfinite(r["after"]["seen"]["router_tokens"]) and r["train_tokens_per_s"] > 0
        assert [p["tokens"] for p in r["curve"]] == [0, 256, 512]  # an eval point per step of 2 x 128
        assert r["trainable"] > 0
    # the LAMBADA-style task: the same 8 items for every model and run, scored and paired
    lam = models["flap"]["before"]["lambada"]
    assert lam["n"] == 8 and 0 <= lam["acc"] <= 1 and lam["router_tokens"] > 1
    assert all(r["after"]["lambada"]["n"] == 8 for r in runs.values())
    assert any(r["split"] == "lambada" and r["vs"] == "stronger FLAP" for r in res["ratios"])
    assert eval_ids["lambada"]["items"] == 8
    md = (out / "compare.md").read_text()
    assert "unseen domains" in md and "stronger FLAP" in md and "[0." in md
    assert (out / "ppl_vs_tokens.png").stat().st_size > 10_000
    # the set of runs is not part of a comparison's identity: asking again for a subset (or, the same way,
    # for more methods or seeds) keeps every finished run and trains nothing; another budget is refused
    again = [a if a != "dive,flap" else "flap" for a in args]
    assert main(again) == 0
    res2 = json.loads((out / "compare.json").read_text())
    assert res2["runs"] == runs and res2["models"] == models and res2["complete"]
    assert main([*again, "--lr", "0.002"]) == 2  # (--quick sets the steps itself)
    assert "holds another run" in capsys.readouterr().err
    # the README block is generated from the JSON by a command
    readme = root / "README.md"
    readme.write_text("# x\n<!-- compare:begin -->\nSTALE-BLOCK\n<!-- compare:end -->\ntail\n")
    assert main(["compare-report", "--json", str(out / "compare.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert (
        "STALE-BLOCK" not in text
        and "stronger FLAP" in text
        and text.endswith("tail\n")
        and res["commit"] in text
    )
