"""compare's report from its JSON: which pairs are compared, the stronger FLAP, seeds, the README block."""

import math

import pytest

from dive_ds.build.compare_report import finish, markdown, update_readme

TPW = {"x": 9, "y": 9}


def _scored(shift: float) -> dict:
    nll = {"x": [20.0 + shift, 22.0 + shift, 21.0 + shift], "y": [30.0 + shift, 29.0 + shift]}
    tokens = 5 * 9
    ppl_tokens = math.exp((124.0 + 5 * shift) / tokens)
    ppl = {d: math.exp(sum(v) / (len(v) * 9)) for d, v in nll.items()}
    return {"nll": {"router": nll}, "tokens_per_window": TPW, "router": ppl, "router_tokens": ppl_tokens,
            "router_mean": sum(ppl.values()) / 2}  # fmt: skip


def _results() -> dict:
    models = {
        "flap": ("flap", "-", 0.0),
        "flap-adaptive": ("flap-adaptive", "-", -1.0),  # the stronger FLAP
        "dive-fitted": ("dive", "fitted", -3.0),
        "nomining-s1-fitted": ("nomining", "fitted", -2.0),
        "nomining-s2-fitted": ("nomining", "fitted", -4.0),
    }
    res = {"models": {}, "runs": {}, "config": {"steps": 2, "batch": 2, "seq_len": 10}, "complete": True,
           "command": ["dive-ds", "compare"], "commit": "abc"}  # fmt: skip
    for name, (method, treat, shift) in models.items():
        res["models"][name] = {"method": method, "treatment": treat, "params": {"total": 1e6, "activated": 5e5},
                               "before": {"seen": _scored(shift)}}  # fmt: skip
        for d in (1, 2):
            res["runs"][f"{name}-d{d}"] = {"model": name, "method": method, "treatment": treat, "data_seed": d,
                                           "after": {"seen": _scored(shift - d)}, "curve": [], "trainable": 10,
                                           "train_tokens_per_s": 1.0}  # fmt: skip
    return res


def test_pairs_stronger_flap_and_seed_spread():
    res = _results()
    finish(res, n_boot=50)
    before = {r["vs"]: r for r in res["ratios"] if r["when"] == "before"}
    assert before["stronger FLAP"]["b"] == "flap-adaptive"
    assert before["flap"]["ratio"] == pytest.approx(math.exp(-3 * 5 / 45))  # 3 nats less on each of 5 windows
    summ = {(s["vs"], s["when"]): s for s in res["ratio_summary"]}
    nomining = summ[("nomining", "before")]  # two grouping seeds: -3 vs -2 and -3 vs -4
    assert nomining["pairs"] == 2
    assert nomining["min"] == pytest.approx(math.exp(-5 / 45)) and nomining["max"] == pytest.approx(
        math.exp(5 / 45)
    )
    after = summ[("stronger FLAP", "after")]  # one pair per data seed, each of the same seed
    assert after["pairs"] == 2 and after["ratio"] == pytest.approx(math.exp(-2 * 5 / 45))
    md = markdown(res)
    assert "| dive-fitted | stronger FLAP |" in md and "n=2" in md and "commit `abc`" in md


def test_a_dive_variant_is_paired_with_dive_and_with_the_baselines():
    """A variant (here a shared expert, 1 nat less than DIVE on each window) gets its own rows: against DIVE of
    the same seed and treatment, and against every baseline; DIVE's own rows stay as they were."""
    res = _results()
    res["models"]["dive-shared0.25-fitted"] = res["models"]["dive-fitted"] | {
        "method": "dive-shared0.25", "before": {"seen": _scored(-4.0)}}  # fmt: skip
    finish(res, n_boot=50)
    rows = {(r["a"], r["vs"]): r for r in res["ratios"] if r["when"] == "before"}
    assert rows[("dive-shared0.25-fitted", "dive")]["ratio"] == pytest.approx(math.exp(-5 / 45))
    assert rows[("dive-shared0.25-fitted", "flap")]["ratio"] == pytest.approx(math.exp(-4 * 5 / 45))
    assert ("dive-fitted", "dive-shared0.25") not in rows  # a variant is never DIVE's baseline
    summ = {(x["a"], x["vs"], x["when"]) for x in res["ratio_summary"]}
    assert ("dive-shared0.25-fitted", "dive", "before") in summ and ("dive-fitted", "flap", "before") in summ


def test_readme_block_needs_its_markers(tmp_path):
    res = _results()
    finish(res, n_boot=20)
    readme = tmp_path / "R.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- compare:begin -->"):
        update_readme(readme, res, "x.json")


def test_run_plan_seeds_and_order():
    from dive_ds.build.compare_plan import CompareConfig, run_names

    cfg = CompareConfig(methods=("dive", "nomining", "flap", "flap-adaptive", "flap-eqtrain"), treatments=("fitted",),
                        grouping_seeds=(1, 2, 3), data_seeds=(7, 8))  # fmt: skip
    names = [n for n, _, _ in run_names(cfg)]
    # the headline pair seed by seed, the mining ablation's grouping seeds at the first data seed,
    # eqtrain after dive-fitted, adaptive FLAP at both data seeds
    assert names == ["flap-d7", "dive-fitted-d7", "flap-d8", "dive-fitted-d8",
                     "nomining-s1-fitted-d7", "nomining-s2-fitted-d7", "nomining-s3-fitted-d7",
                     "flap-eqtrain-d7", "flap-adaptive-d7", "flap-adaptive-d8"]  # fmt: skip
    with pytest.raises(ValueError, match="add --treatments fitted"):
        CompareConfig(methods=("dive", "flap-eqtrain"), treatments=("random",))
    assert CompareConfig(steps=16, treatments=("fitted",)).router_steps == 16  # no router stage to fit in
    with pytest.raises(ValueError, match="router steps < steps"):
        CompareConfig(steps=16, treatments=("fitted", "random"))
    with pytest.raises(ValueError, match="not a whole number"):
        CompareConfig(methods=("dive", "llama-moe"), experts=5, prune_ratio=0.5)


def test_beyond_dive_methods_in_the_plan():
    """The shared-expert and token-cluster variants (issue 25): built like DIVE, trained after the headline."""
    from dive_ds.build.compare_plan import CompareConfig, builds, method_config, run_names

    cfg = CompareConfig(methods=("dive", "flap", "dive-shared0.125", "dive-shared0.25", "dive-clusters"),
                        treatments=("fitted",))  # fmt: skip
    assert [n for n, _, _ in run_names(cfg)] == ["flap-d1234", "dive-fitted-d1234", "dive-shared0.125-fitted-d1234",
                                                 "dive-shared0.25-fitted-d1234", "dive-clusters-fitted-d1234"]  # fmt: skip
    two = CompareConfig(methods=("dive", "flap", "dive-clusters"), treatments=("fitted",), data_seeds=(7, 8))
    # every variant on every data seed, like DIVE (each is judged against DIVE seed by seed)
    assert [n for n, _, _ in run_names(two)] == ["flap-d7", "dive-fitted-d7", "flap-d8", "dive-fitted-d8",
                                                 "dive-clusters-fitted-d7", "dive-clusters-fitted-d8"]  # fmt: skip
    rc = {b.name: method_config(b, cfg) for b in builds(cfg)}
    assert (rc["dive-shared0.25-fitted"].method, rc["dive-shared0.25-fitted"].shared_ratio) == ("dive", 0.25)
    assert rc["dive-fitted"].shared_ratio == 0.0 and rc["dive-shared0.125-fitted"].prune_ratio == 0.5
    assert (rc["dive-clusters-fitted"].groups_from, rc["dive-fitted"].groups_from) == ("clusters", "domains")
    with pytest.raises(ValueError, match=r"the shared ratio must be in \(0, 1 - r = 0.5\)"):
        CompareConfig(methods=("dive", "dive-shared0.5"))
    with pytest.raises(ValueError, match="write the shared ratio after it"):
        CompareConfig(methods=("dive", "dive-sharedx"))


def test_readme_gets_the_headline_and_the_docs_the_full_tables(tmp_path):
    from dive_ds.build.compare_report import HEAD_BEGIN, HEAD_END

    res = _results()
    finish(res, n_boot=20)
    readme = tmp_path / "R.md"
    readme.write_text(f"# guide\n{HEAD_BEGIN}\nold\n{HEAD_END}\n## after\n")
    update_readme(readme, res, "x.json")
    text = readme.read_text()
    assert "old" not in text and "| dive-fitted | stronger FLAP |" in text and text.endswith("## after\n")
    assert "## seen domains" not in text and "commit `abc`" in text  # the headline only
    docs = tmp_path / "results.md"
    docs.write_text("<!-- compare:begin -->\n<!-- compare:end -->\n")
    update_readme(docs, res, "x.json")
    assert "## seen domains, before any training" in docs.read_text()
