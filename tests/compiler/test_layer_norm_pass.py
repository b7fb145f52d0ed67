"""The layer-norm pass: it fires (counters and program), outputs match, and it holds back where it must."""

import torch

from kernl.compiler.passes import run_passes
from kernl.compiler.trace import export_model
from tests.models import tiny_bert, token_inputs


def _export(module, inputs):
    return export_model(module, lambda b, s: {k: v[:b, :s] for k, v in inputs.items()}, [(2, 8)]).program


def test_fires_on_bert_and_matches():
    model = tiny_bert()
    inputs = token_inputs(2, 8)
    ep = _export(model, inputs)
    report = run_passes(ep.graph_module)
    # Each layer: two post-norm residual blocks; the embeddings' norm follows a broadcast add.
    assert report["add_layer_norm"] == 2 * model.config.num_hidden_layers
    assert report["layer_norm"] == 1
    assert report["dropout_removed"] >= 1
    code = ep.graph_module.code
    assert "aten.layer_norm" not in code and "kernl.add_layer_norm" in code
    with torch.no_grad():
        got = ep.module()(**inputs)
        want = model(**inputs)
    assert (got.last_hidden_state - want.last_hidden_state).abs().max() <= 1e-4


class _TwoDimNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm((4, 8))

    def forward(self, input_ids):
        x = input_ids.float().unsqueeze(-1).expand(-1, -1, 8).reshape(input_ids.shape[0], -1, 4, 8)
        return self.norm(x + 1.0)


class _ReusedSumBeforeNorm(torch.nn.Module):
    """Pre-norm block: the sum is both normalised and carried on as the residual stream."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        total = h + torch.sin(h)
        return self.norm(total) * 2 + total


def test_does_not_fire_on_multi_dim_normalized_shape():
    ids = torch.randint(0, 9, (2, 8))
    ep = _export(_TwoDimNorm(), {"input_ids": ids})
    report = run_passes(ep.graph_module)
    assert report.get("layer_norm", 0) == 0 and report.get("add_layer_norm", 0) == 0
    assert "aten.layer_norm" in ep.graph_module.code


def test_fused_sum_feeds_the_residual_stream():
    module = _ReusedSumBeforeNorm().eval()
    ids = torch.randint(0, 50, (2, 8))
    ep = _export(module, {"input_ids": ids})
    assert run_passes(ep.graph_module)["add_layer_norm"] == 1
    fresh = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.allclose(ep.module()(input_ids=fresh), module(fresh), atol=1e-5)
