"""Exports fall back to Dim.AUTO when torch's solver gives up on a guard (seq2seq halves, and the forward /
causal-LM export), and refuse a dim that came out as a constant."""

import pytest
import torch
from torch.export import Dim

from kernl.compiler import lower_seq2seq, trace
from kernl.errors import KernlError


class Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class FixedWidth(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 5) * 2  # only seq == 5 fits: the export specialises it


def flaky_export(monkeypatch, failures: int = 1) -> list:
    """torch.export.export failing `failures` times with the solver's message, as torch 2.11 does on Whisper's
    decoder and on GPT-2 with its position table."""
    real, calls = torch.export.export, []

    def export(*args, **kwargs):
        calls.append(kwargs["dynamic_shapes"])
        if len(calls) <= failures:
            raise RuntimeError("Constraints violated (seq)! For more information, run with TORCH_LOGS=...")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    return calls


def shapes() -> dict:
    return {"x": {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=1, max=16)}}


def test_retries_with_dynamic_dims(monkeypatch):
    calls = flaky_export(monkeypatch)
    ep = lower_seq2seq._export(Scale(), {"x": torch.randn(2, 5)}, shapes())
    assert len(calls) == 2 and calls[1]["x"] == {0: Dim.AUTO, 1: Dim.AUTO}
    x = torch.randn(3, 11)
    torch.testing.assert_close(ep.module()(x=x), x * 2 + 1)


def test_refuses_a_specialised_dim(monkeypatch):
    flaky_export(monkeypatch)
    with pytest.raises(KernlError, match="x dim 1 was specialised to 5"):
        lower_seq2seq._export(FixedWidth(), {"x": torch.randn(2, 5)}, shapes())


def test_other_export_errors_are_reported(monkeypatch):
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(ValueError("no luck")))
    with pytest.raises(KernlError, match="scale export failed: no luck"):
        lower_seq2seq._export(Scale(), {"x": torch.randn(2, 5)}, shapes())


def test_forward_export_retries_with_dynamic_dims(monkeypatch):
    calls = flaky_export(monkeypatch, failures=2)  # strict, then non-strict
    traced = trace.export_model(Scale(), lambda b, s: {"x": torch.randn(b, s)}, [(4, 16), (8, 32)])
    assert traced.mode == "nonstrict-dynamic" and calls[2]["x"] == {0: Dim.AUTO, 1: Dim.AUTO}
    x = torch.randn(7, 29)
    torch.testing.assert_close(traced.program.module()(x=x), x * 2 + 1)
