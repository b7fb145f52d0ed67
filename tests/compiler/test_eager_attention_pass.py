"""Hand-written (eager) attention → kernl.attention: T5's (no scaling, position bias + padding mask), a scaled GQA
one with a causal additive mask, and the shapes it must leave alone."""

import pytest
import torch

from tests.compiler.rewrite_utils import max_diff, rewrite_model, rewrite_module
from tests.encoder_models import t5_inputs, tiny_t5_encoder

pytestmark = pytest.mark.usefixtures("cpu_references")

aten = torch.ops.aten
SOFTMAX = (aten.softmax.int, aten._softmax.default)


def _softmaxes(program) -> list:
    return [n for n in program.gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX]


def test_t5_eager_attention_every_layer():
    """T5 v1.1 geometry (gated GELU) written with eager attention: no scaling, position bias + padding mask."""
    model = tiny_t5_encoder(feed_forward_proj="gated-gelu", attn_implementation="eager")
    program = rewrite_model(model, t5_inputs(2, 8))
    layers = model.config.num_layers
    assert program.report["eager_attention"] == layers
    calls = program.calls(torch.ops.kernl.attention.default)
    assert len(calls) == layers and all(c.args[5] == 1.0 for c in calls)  # T5 does not scale its scores
    assert not _softmaxes(program), "an aten softmax is left in the attention"
    # T5's norm (no mean, no bias) on kernl.rms_norm: two per layer and the final one.
    assert program.report.get("rms_norm", 0) + program.report.get("add_rms_norm", 0) == 2 * layers + 1
    assert program.report["gated_linear"] == layers  # gelu_new(wi_0 x) * wi_1 x
    fresh = t5_inputs(3, 13)  # another batch and length than the export's: the program is dynamic
    with torch.no_grad():
        want = model(**fresh).to_tuple()
    assert max_diff(program(**fresh), want) < 1e-5


class Eager(torch.nn.Module):
    """softmax(q k^T * scale + mask) v, written as HF's eager_attention_forward, with repeat_kv and variations."""

    def __init__(self, variant: str = "plain", heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.variant, self.n = variant, heads // kv_heads

    def forward(self, q, k, v, mask):
        b, hkv, s, d = k.shape
        k = k[:, :, None].expand(b, hkv, self.n, s, d).reshape(b, hkv * self.n, s, d)
        v = v[:, :, None].expand(b, hkv, self.n, s, d).reshape(b, hkv * self.n, s, d)
        scores = torch.matmul(q, k.transpose(2, 3))
        if self.variant == "scale_after_bias":
            scores = (scores + mask) * 0.25
        elif self.variant == "divided":
            scores = scores / 4.0 + mask
        else:
            scores = scores * 0.25 + mask
        dim = 2 if self.variant == "other_dim" else -1
        if self.variant == "fp32_softmax":
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            probs = torch.softmax(scores, dim=dim)
        if self.variant == "train_dropout":
            probs = torch.nn.functional.dropout(probs, p=0.5, training=True)
        out = torch.matmul(probs, v)
        if self.variant == "probs_returned":
            return out.transpose(1, 2).contiguous(), probs
        return out.transpose(1, 2).contiguous()


def _qkvm(batch=2, seq=7, heads=4, kv_heads=2, head_dim=16):
    q = torch.randn(batch, heads, seq, head_dim)
    k, v = torch.randn(batch, kv_heads, seq, head_dim), torch.randn(batch, kv_heads, seq, head_dim)
    causal = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)
    return q, k, v, causal[None, None].expand(batch, 1, seq, seq)


@pytest.mark.parametrize("variant", ["plain", "divided", "fp32_softmax"])
def test_scaled_gqa_causal_fires(variant):
    module, args = Eager(variant), _qkvm()
    program = rewrite_module(module, *args)
    assert program.report.get("eager_attention") == 1
    (call,) = program.calls(torch.ops.kernl.attention.default)
    assert call.args[5] == pytest.approx(0.25)
    assert fake_heads(call.args[1]) == 2, "repeat_kv is undone: the kernel reads the 2 kv heads"
    fresh = _qkvm()
    with torch.no_grad():
        want = module(*fresh)
    assert max_diff(program(*fresh), want) < 1e-5


def fake_heads(node) -> int:
    return node.meta["val"].shape[1]


@pytest.mark.parametrize("variant", ["scale_after_bias", "other_dim", "probs_returned"])
def test_does_not_fire_where_it_must_not(variant):
    module, args = Eager(variant), _qkvm()
    program = rewrite_module(module, *args)
    assert "eager_attention" not in program.report
    assert _softmaxes(program), "the softmax stays as aten"
    fresh = _qkvm()
    with torch.no_grad():
        want = module(*fresh)
    assert max_diff(program(*fresh), want) < 1e-5


def test_train_mode_dropout_is_left_alone():
    module, args = Eager("train_dropout").train(), _qkvm()
    ep = torch.export.export(module, args)
    from kernl.compiler.build import _weights
    from kernl.compiler.passes import run_passes

    report = run_passes(ep.graph_module, _weights(ep))
    assert "eager_attention" not in report


def test_odd_head_dim_is_left_alone():
    """A head dim above the kernel's limit stays as aten."""
    module, args = Eager(), _qkvm(head_dim=320, seq=3)
    program = rewrite_module(module, *args)
    assert "eager_attention" not in program.report
