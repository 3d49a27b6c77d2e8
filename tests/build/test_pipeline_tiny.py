"""mine -> reconstruct -> evaluate on a tiny random model, through the real CLI entry."""

import json
import math

import numpy as np
import pytest

from dive_ds.build.mine import read_matrix_csv
from dive_ds.cli import main
from tests.fixtures.tiny import make_tiny_calibration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_calibration(tmp_path_factory.mktemp("tiny"), n_domains=4)


def test_mine_reconstruct_evaluate(tiny, tmp_path, capsys):
    model_dir, calib = tiny
    assert main(["mine", "--calib", str(calib), "--experts", "2", "--out", str(tmp_path / "mine")]) == 0
    ppl, rows, cols = read_matrix_csv(tmp_path / "mine" / "pruned_ppl.csv")
    assert rows == cols == ["dom0", "dom1", "dom2", "dom3"]
    assert np.isfinite(ppl).all() and (ppl > 1).all()
    aff, _, _ = read_matrix_csv(tmp_path / "mine" / "affinity.csv")
    np.testing.assert_allclose(np.diag(aff), 1.0)
    groups = json.loads((tmp_path / "mine" / "groups.json").read_text())
    assert sorted(sum(groups.values(), [])) == rows and len(groups) == 2
    rep = json.loads((tmp_path / "mine" / "mining.json").read_text())
    assert -1.0 <= rep["fast_vs_paper"]["pearson"] <= 1.0 and "family_recovery_ari" in rep
    assert (tmp_path / "mine" / "affinity.png").read_bytes()[:4] == b"\x89PNG"

    assert (
        main(
            [
                "reconstruct",
                "--calib",
                str(calib),
                "--groups",
                str(tmp_path / "mine" / "groups.json"),
                "--experts",
                "2",
                "--out",
                str(tmp_path / "moe"),
            ]
        )
        == 0
    )
    assert (
        main(["evaluate", str(tmp_path / "moe"), "--calib", str(calib), "--out", str(tmp_path / "ev")]) == 0
    )
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(res["oracle"]) == set(rows) and all(math.isfinite(v) for v in res["oracle"].values())
    assert res["params"]["activated"] < res["params"]["total"]
    # the (untrained) router's share of each domain's tokens sent to that domain's expert
    assert all(0.0 <= share <= 1.0 for share in res["routed_to_own_expert"].values())
    out = capsys.readouterr().out
    assert "| moe | oracle |" in out


def test_upcycled_single_expert_has_dense_perplexity(tiny, tmp_path):
    model_dir, calib = tiny
    assert (
        main(
            [
                "reconstruct",
                "--calib",
                str(calib),
                "--method",
                "upcycle",
                "--experts",
                "1",
                "--out",
                str(tmp_path / "up"),
            ]
        )
        == 0
    )
    assert main(["evaluate", str(tmp_path / "up"), "--calib", str(calib), "--out", str(tmp_path / "e1")]) == 0
    assert main(["evaluate", str(model_dir), "--calib", str(calib), "--out", str(tmp_path / "e2")]) == 0
    moe = json.loads((tmp_path / "e1" / "eval.json").read_text())
    dense = json.loads((tmp_path / "e2" / "eval.json").read_text())
    for d in dense["router"]:
        assert moe["router"][d] == pytest.approx(dense["router"][d], rel=1e-5)


@pytest.mark.parametrize(
    "argv,msg",
    [
        (
            ["mine", "--calib", "{calib}", "--experts", "5", "--out", "{tmp}/m"],
            "--experts 5 is larger than the 4 domains",
        ),
        (
            ["mine", "--calib", "{tmp}/nowhere", "--experts", "2", "--out", "{tmp}/m"],
            "is not a calibration folder",
        ),
        (["reconstruct", "--calib", "{calib}", "--experts", "2", "--out", "{tmp}/r"], "needs --groups FILE"),
        (
            [
                "reconstruct",
                "--calib",
                "{calib}",
                "--method",
                "nomining",
                "--experts",
                "2",
                "--top-k",
                "3",
                "--out",
                "{tmp}/r",
            ],
            "--top-k 3 must be between 1 and --experts 2",
        ),
        (
            [
                "reconstruct",
                "--calib",
                "{calib}",
                "--method",
                "nomining",
                "--prune-ratio",
                "1.5",
                "--out",
                "{tmp}/r",
            ],
            r"argument --prune-ratio: 1.5: use a ratio 0 <= r < 1",
        ),
        (
            ["calibrate", "--model", "{tmp}", "--domains", "{tmp}/none.yaml", "--out", "{tmp}/c"],
            "has no config.json",
        ),
    ],
)
def test_cli_errors_are_one_line(tiny, tmp_path, capsys, argv, msg):
    import re

    _, calib = tiny
    argv = [a.format(calib=calib, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dive-ds: error: ") and re.search(msg, err[0])
