"""The demo's compute precision (dive_ds/build/demo.py `_precision`): what `--dtype` picks, refused before work."""

import pytest
import torch

from dive_ds.build.demo import _precision


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="on a GPU machine `auto` follows the GPU's bf16 support, not the CPU flags this test sets",
)
@pytest.mark.parametrize("native", [True, False])
def test_auto_builds_in_fp32_and_scores_in_native_bf16_only(native, monkeypatch, capsys):
    monkeypatch.setattr("dive_ds.parallel.ranks.cpu_has_native_bf16", lambda: native)
    score = "bf16" if native else "fp32"
    assert _precision("auto") == ("fp32", score)
    said = capsys.readouterr().out
    assert f"calibration and router fitting fp32, mining and evaluation {score}" in said
    assert _precision("fp32") == ("fp32", "fp32")
    if native:
        assert _precision("bf16") == ("bf16", "bf16")
    else:
        with pytest.raises(ValueError, match="no native bf16 matmuls.*--dtype fp32"):
            _precision("bf16")
