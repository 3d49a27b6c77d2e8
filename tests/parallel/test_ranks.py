"""Ranks, device and precision of the streaming passes (dive_ds/parallel/ranks.py)."""

import json
import textwrap

import pytest
import torch

from dive_ds.parallel.ranks import Ranks, launched_world, resolve_device, resolve_dtype
from tests.fixtures.procs import torchrun


def test_shares_cover_every_item_once_and_are_balanced():
    for world in (1, 2, 3, 8):
        shares = [Ranks(r, world).share(10) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(10))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_bad_device_dtype_and_world_are_refused_in_one_line(monkeypatch):
    with pytest.raises(ValueError, match="choose one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible.*--device cpu"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr("dive_ds.parallel.ranks.cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="this CPU has no native bf16 matmuls.*--dtype fp32"):
        resolve_dtype("bf16", torch.device("cpu"))
    monkeypatch.setattr("dive_ds.parallel.ranks.cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="choose one of fp32, bf16"):
        resolve_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="2 ranks but only 1 windows"):
        Ranks(0, 2).check_items(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        launched_world()


def test_two_gloo_ranks_sum_gather_and_agree(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(
        textwrap.dedent("""
        import json
        import sys
        import torch
        from dive_ds.parallel.ranks import start_ranks
        torch.set_num_threads(1)
        with start_ranks("cpu") as r:
            t = torch.full((3,), 0.1 * (r.rank + 1), dtype=torch.float64)
            r.sum_(t)
            g = r.gather_rows(torch.arange(r.rank + 1, dtype=torch.float32)[:, None] + 10 * r.rank)
            b = r.broadcast_(torch.full((2,), float(r.rank + 7)))
            res = [r.world, t.tolist(), g.flatten().tolist(), r.any(r.rank == 1), b.tolist()]
            open(f"{sys.argv[1]}/rank{r.rank}.json", "w").write(json.dumps(res))
    """)
    )
    out = torchrun([str(script), str(tmp_path)])
    assert out.returncode == 0, out.stderr[-2000:]
    for rank in (0, 1):
        world, summed, gathered, anyone, broadcast = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert world == 2 and anyone is True
        assert summed == [0.1 + 0.2] * 3  # the exact float64 sum of both ranks' values, on both
        assert gathered == [0.0, 10.0, 11.0]  # rank 0's one row, then rank 1's two, on both
        assert broadcast == [7.0, 7.0]  # rank 0's values, on both


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from dive_ds.parallel.ranks import auto_dtype, cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n\n")
    assert not cpu_has_native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n\n")
    assert cpu_has_native_bf16(str(info))
    info.write_text("flags\t\t: fpu amx_bf16 amx_tile\n")  # Sapphire Rapids' AMX
    assert cpu_has_native_bf16(str(info))
    assert not cpu_has_native_bf16(str(tmp_path / "absent"))  # not Linux: no
    # auto on this machine's CPU: bf16 exactly when its flags say so
    assert auto_dtype(torch.device("cpu")) == ("bf16" if cpu_has_native_bf16() else "fp32")
