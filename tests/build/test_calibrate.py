"""The streaming pass equals a plain full forward with hooks; merges are exact."""

import pytest
import torch

from dive_ds.build.calib_pass import CalibConfig, streaming_stats
from dive_ds.stats import ChannelStats, mean_var
from tests.fixtures.tiny import save_tiny_llama


def _reference_stats(model, windows):
    """Full model forward, all layers resident, hooks on every down_proj (float64)."""
    cfg = model.config
    sums = torch.zeros(len(windows), cfg.num_hidden_layers, cfg.intermediate_size, dtype=torch.float64)
    sq = torch.zeros_like(sums)
    cur = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):

        def hook(_m, args, li=li):
            x = args[0].reshape(-1, cfg.intermediate_size).double()
            sums[cur["d"], li] += x.sum(0)
            sq[cur["d"], li] += (x * x).sum(0)

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        for d, w in enumerate(windows.values()):
            cur["d"] = d
            model(w)
    for h in hooks:
        h.remove()
    return sums, sq


def test_streaming_equals_full_forward(tmp_path):
    model = save_tiny_llama(tmp_path / "m", seed=1)
    g = torch.Generator().manual_seed(0)
    windows = {f"d{i}": torch.randint(0, 97, (5 + i, 16), generator=g) for i in range(3)}
    st, info = streaming_stats(tmp_path / "m", windows, CalibConfig(batch_size=2, progress=False))
    ref_sum, ref_sq = _reference_stats(model, windows)
    torch.testing.assert_close(st.sum_DLF, ref_sum, rtol=1e-9, atol=1e-4)
    torch.testing.assert_close(st.sumsq_DLF, ref_sq, rtol=1e-9, atol=1e-4)
    assert st.count_D.tolist() == [5 * 16, 6 * 16, 7 * 16]
    w_down = model.model.layers[2].mlp.down_proj.weight.double()
    torch.testing.assert_close(st.down_colsq_LF[2], (w_down**2).sum(0))
    assert info["passes_over_data"] == 1 and info["tokens"] == (5 + 6 + 7) * 16


def test_streaming_with_memmap_offload(tmp_path):
    save_tiny_llama(tmp_path / "m", seed=2)
    windows = {"a": torch.randint(0, 97, (4, 8)), "b": torch.randint(0, 97, (3, 8))}
    st1, _ = streaming_stats(tmp_path / "m", windows, CalibConfig(batch_size=3, progress=False))
    st2, _ = streaming_stats(
        tmp_path / "m",
        windows,
        CalibConfig(batch_size=3, progress=False, hidden_offload_dir=str(tmp_path / "off")),
    )
    torch.testing.assert_close(st1.sumsq_DLF, st2.sumsq_DLF, rtol=0, atol=0)
    assert not (tmp_path / "off").exists()


def test_merge_equals_union(tmp_path):
    save_tiny_llama(tmp_path / "m", seed=3)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 97, (4, 8), generator=g), torch.randint(0, 97, (6, 8), generator=g)
    st, _ = streaming_stats(tmp_path / "m", {"a": a, "b": b}, CalibConfig(batch_size=4, progress=False))
    union, _ = streaming_stats(
        tmp_path / "m", {"ab": torch.cat([a, b])}, CalibConfig(batch_size=4, progress=False)
    )
    merged = st.merged([0, 1])
    torch.testing.assert_close(merged.sum_DLF, union.sum_DLF, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.sumsq_DLF, union.sumsq_DLF, rtol=1e-12, atol=1e-9)
    m1, v1 = mean_var(merged.count_D, merged.sum_DLF, merged.sumsq_DLF)
    m2, v2 = mean_var(union.count_D, union.sum_DLF, union.sumsq_DLF)
    torch.testing.assert_close(v1, v2, rtol=1e-9, atol=1e-12)
    assert isinstance(merged, ChannelStats) and merged.count_D.item() == 80


def test_a_calibration_from_before_dtype_is_the_same_fp32_run(tmp_path):
    import json

    from dive_ds.build.calibrate import check_out_dir
    from dive_ds.io.calibration import MANIFEST

    identity = {"model": "m", "registry": "r", "domains": ["a"], "sampler": {"seed": 1}}
    (tmp_path / MANIFEST).write_text(json.dumps({"identity": identity}))
    assert check_out_dir(tmp_path, identity | {"dtype": "fp32"}, force=False) is True
    with pytest.raises(ValueError, match="holds a different run"):
        check_out_dir(tmp_path, identity | {"dtype": "bf16"}, force=False)
