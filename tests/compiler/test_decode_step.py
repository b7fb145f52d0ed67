"""The decode step's rotary fold: a Llama decode entry calls decode_attention_append_rotary and no rotary, its
kernels (Triton's interpreter) match its plain-torch references, and the fold leaves alone what it must."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx

from kernl.compiler.decode_step import decode_attention_call
from kernl.compiler.lower_generation import GenerationSettings, lower_generation
from tests.kernels.helpers import rel_err
from tests.runtime.test_generation import tiny_lm

aten, kernl_ops = torch.ops.aten, torch.ops.kernl
FOLDED, PLAIN = "kernl.decode_attention_append_rotary", "kernl.decode_attention_append"


def targets(spec, entry: str) -> list[str]:
    return [node[1] for node in spec.functions[spec.entries[entry]["head"]]["nodes"]]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = tiny_lm("llama")  # 2 layers, 4 query / 2 kv heads of 16 dims
    return model, lower_generation(model, GenerationSettings(32, (1, 4), (8,)), device="cpu")


def test_llama_decode_folds_each_layers_rotary(llama):
    model, low = llama
    layers = model.config.num_hidden_layers
    decode, prefill = targets(low.spec, "decode"), targets(low.spec, "prefill")
    assert decode.count(FOLDED) == layers and PLAIN not in decode and "kernl.rotary" not in decode
    assert prefill.count("kernl.rotary") == layers  # the prompt still runs the rotary kernel
    assert "kernl_ops.decode_attention_append_rotary(" in low.source  # the readable program says so too


def test_folded_decode_kernels_match_their_references(llama, monkeypatch):
    """One decode step of 3 rows at different positions over a cache already holding each row's prompt: the
    kernels under Triton's interpreter against the unfolded plain-torch step (which the generation tests hold
    to transformers' tokens)."""
    _, low = llama
    program = low.spec.bind("decode")
    weights = [low.weights[name] for name in low.spec.weights]
    state = [torch.randn(s["shape"]) for s in low.spec.state]
    input_ids = torch.tensor([[5], [17], [42]])
    position_ids = torch.tensor([[4], [0], [20]])

    def step(interpret: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        caches = [t.clone() for t in state]
        (logits,) = program(torch.device("cpu"), *weights, *caches, input_ids, position_ids)
        return logits, caches

    logits, caches = step("1")
    want_logits, want_caches = step("0")
    assert logits.shape == (3, low.spec.outputs[0]["dims"][1])
    assert rel_err(logits, want_logits) < 1e-4
    for got, want, before in zip(caches, want_caches, state, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, before)  # the step wrote each layer's k and v


def _graph(extra_user: bool = False, two_rotaries: bool = False, cos_rank: int = 3):
    """placeholders → rotary(q, k, cos, sin) → getitem 0/1 → attention, as the rewritten decoder graph has it."""
    graph = torch.fx.Graph()
    names = ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "positions")
    q, k, v, cos, sin, k_cache, v_cache, positions = (graph.placeholder(n) for n in names)
    cos.meta["val"] = sin.meta["val"] = torch.empty([2, 1, 8][-cos_rank:])
    rotary = graph.call_function(kernl_ops.rotary.default, (q, k, cos, sin))
    q_rot = graph.call_function(operator.getitem, (rotary, 0))
    source = graph.call_function(kernl_ops.rotary.default, (q, k, cos, sin)) if two_rotaries else rotary
    k_rot = graph.call_function(operator.getitem, (source, 1))
    attention = graph.call_function(kernl_ops.attention.default, (q_rot, k_rot, v, None, True, 0.25))
    outputs = [attention]
    if extra_user:
        outputs.append(graph.call_function(aten.mul.Tensor, (q_rot, 2.0)))
    graph.output(tuple(outputs))
    with graph.inserting_before(attention):
        out = decode_attention_call(graph, q_rot, k_rot, v, k_cache, v_cache, positions, 0.25)
    return out, (q, k, v, cos, sin, k_cache, v_cache, positions)


@pytest.mark.parametrize("cos_rank", [3, 2])
def test_fold_takes_rotarys_inputs(cos_rank):
    out, (q, k, v, cos, sin, k_cache, v_cache, positions) = _graph(cos_rank=cos_rank)
    assert out.target is kernl_ops.decode_attention_append_rotary.default
    q3, kc, vc, k3, v3, pos, c, s, scale = out.args
    assert [(t.target, t.args) for t in (q3, k3, v3)] == [(aten.squeeze.dim, (x, 2)) for x in (q, k, v)]
    assert (kc, vc, pos, scale) == (k_cache, v_cache, positions, 0.25)
    if cos_rank == 3:  # [b|1, 1, rot] → [b|1, rot]
        assert (c.target, c.args, s.target, s.args) == (aten.squeeze.dim, (cos, 1), aten.squeeze.dim, (sin, 1))
    else:  # [1, rot] already one row
        assert (c, s) == (cos, sin)


@pytest.mark.parametrize("case", ["q read elsewhere", "q and k from two rotaries", "switched off"])
def test_no_fold(case, monkeypatch):
    if case == "switched off":
        monkeypatch.setenv("KERNL_DECODE_ROTARY_FOLD", "0")
    out, _ = _graph(extra_user=case == "q read elsewhere", two_rotaries=case == "q and k from two rotaries")
    assert out.target is kernl_ops.decode_attention_append.default
    q3, k3 = out.args[0], out.args[3]
    assert q3.args[0].target is operator.getitem and k3.args[0].target is operator.getitem  # the rotated q, k
