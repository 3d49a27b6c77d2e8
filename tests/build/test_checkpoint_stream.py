"""The calibration checkpoint streams a rank's tensors to its file in bounded pieces (issue 23): the file is a
safetensors file that safetensors reads back bit for bit, and no piece copied to the host is larger than the
bound (on a GPU, the hidden-state buffer never has a whole copy in host memory)."""

import torch
from safetensors.torch import load_file

from dive_ds.build.calib_checkpoint import save_streamed


def test_streamed_file_reads_back_exactly_and_in_bounded_pieces(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "hidden": torch.randn(7, 5, 3, generator=g),
        "sum_LF": torch.randn(2, 9, generator=g, dtype=torch.float64),
        "bf16": torch.randn(13, generator=g).to(torch.bfloat16),
        "count": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
    }
    pieces = []
    real = torch.Tensor.to

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        if a and a[0] == "cpu":
            pieces.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    save_streamed(tensors, tmp_path / "x.safetensors", chunk_bytes=40)
    monkeypatch.undo()
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    assert pieces and max(pieces) <= 40  # 105 floats of `hidden` went in pieces of at most 40 bytes
    assert sum(pieces) == sum(t.numel() * t.element_size() for t in tensors.values())
