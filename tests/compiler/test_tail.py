"""The kernels that write the outputs move to tail(), run after the graph replay; the rest stays in head()."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kernl.compiler.codegen import program_source
from kernl.compiler.lower import lower_model
from kernl.compiler.tail import MAX_TAIL_KERNELS, split_tail
from tests.compiler.test_hoist import _bind, _export
from tests.models import tiny_bert, token_inputs


def _tail_kernels(source: str) -> list[str]:
    tail = source[source.index("def tail(") : source.index("def forward(")]
    return [line.split("# ")[-1] for line in tail.splitlines() if "kernl_ops." in line]


def _check_against_model(model, low, batch, seq):
    inputs = token_inputs(batch, seq)
    program = low.bind()
    got = program(low.device, *low.weight_list(), *(inputs[n] for n in low.input_names))
    want = model(**inputs)
    for g, w in zip(got, [v for v in want.values() if isinstance(v, torch.Tensor)]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_lm_head_runs_in_the_tail():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=99, n_positions=64)).eval()
    low = lower_model(model, [(2, 16)], dtype=torch.float32, device="cpu")
    assert _tail_kernels(low.source) == ["lm_head"]
    _check_against_model(model, low, 2, 16)


def test_final_norm_and_pooler_run_in_the_tail():
    model = tiny_bert()
    low = lower_model(model, [(2, 16)], dtype=torch.float32, device="cpu")
    assert _tail_kernels(low.source) == ["encoder.layer.1.output.LayerNorm", "pooler.dense"]
    _check_against_model(model, low, 2, 16)


class _EveryLayer(torch.nn.Module):
    """Returns each layer's output: the first one's writer feeds every later kernel."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(layers))

    def forward(self, x):
        outs = []
        for layer in self.layers:
            x = layer(x).relu()
            outs.append(x)
        return tuple(outs)


def test_no_split_when_the_tail_would_be_long():
    model = _EveryLayer(MAX_TAIL_KERNELS + 1).eval()
    gm, constants = _export(model, torch.randn(2, 8))
    assert split_tail(gm, constants) is None


def test_outputs_the_head_computes_pass_through_the_tail():
    class _Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            return x, x * self.w  # the first output is the input itself: nothing writes it

    model = _Twice().eval()
    gm, constants = _export(model, torch.randn(2, 8))
    head, tail = split_tail(gm, constants)
    assert [str(n.target) for n in tail.graph.nodes if n.op == "call_function"] == ["aten.mul.Tensor"]
    source = program_source(
        gm, model_name="m", version="0", outputs=["x", "y"], report={}, split=(head, tail), weight_count=1
    )
    program = _bind(source)
    x = torch.randn(2, 8)
    got_x, got_y = program["forward"](torch.device("cpu"), model.w.detach(), x)
    assert got_x is x
    torch.testing.assert_close(got_y, x * model.w.detach())
