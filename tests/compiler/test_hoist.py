"""Values that depend only on weights and shapes move into invariants(), computed once per shape."""

import torch
from torch.export.graph_signature import InputKind

from kernl.compiler.codegen import bind_device, program_source
from kernl.compiler.hoist import hoist_invariants


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        table = (torch.arange(8, dtype=torch.float32) * self.w).cos()  # the same on every call
        return x * table + x.sum(-1, keepdim=True)


def _export(model, x):
    ep = torch.export.export(model, (x,))
    constants = {s.arg.name for s in ep.graph_signature.input_specs if s.kind != InputKind.USER_INPUT}
    bind_device(ep.graph_module.graph)  # as the compiler does: device literals become target_device
    ep.graph_module.recompile()
    return ep.graph_module, constants | {"target_device"}


def _bind(source: str):
    namespace: dict = {}
    exec(compile(source, "<program>", "exec"), namespace)
    return namespace


def test_weight_and_shape_only_values_are_computed_once():
    model = _Scaled().eval()
    gm, constants = _export(model, torch.randn(2, 8))
    hoisted = hoist_invariants(gm, constants)
    assert hoisted is not None
    hoisted_ops = {str(n.target) for n in hoisted.graph.nodes if n.op == "call_function"}
    assert "aten.cos.default" in hoisted_ops and "aten.mul.Tensor" in hoisted_ops
    forward_ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.cos.default" not in forward_ops and "aten.sum.dim_IntList" in forward_ops

    program = _bind(program_source(gm, model_name="m", version="0", outputs=["y"], report={}, invariants=hoisted))
    for _ in range(2):
        x = torch.randn(2, 8)
        (got,) = program["forward"](torch.device("cpu"), model.w.detach(), x)
        torch.testing.assert_close(got, model(x), rtol=1e-6, atol=1e-6)
    assert len(program["_invariant_cache"]) == 1  # one shape, computed on the first call only


def test_nothing_hoisted_when_everything_reads_the_input():
    class _Plain(torch.nn.Module):
        def forward(self, x):
            return (x * 2).cos()

    gm, constants = _export(_Plain(), torch.randn(2, 8))
    before = [str(n.target) for n in gm.graph.nodes]
    assert hoist_invariants(gm, constants) is None
    assert [str(n.target) for n in gm.graph.nodes] == before


def test_one_cache_entry_per_bucket(tiny_bert_bundle):
    import kernl
    from tests.models import token_inputs

    _, path = tiny_bert_bundle
    bundle = kernl.load(path)
    assert "def _compute_invariants(" in (path / "program.py").read_text()
    bundle(**token_inputs(2, 16))
    bundle(**token_inputs(3, 20))  # the 4x32 bucket
    bundle(**token_inputs(1, 9))  # 2x16 again
    from kernl.runtime.interpret import Memoized

    head = bundle._runner.program.head
    (invariants,) = {id(step[0]): step[0] for step in head._steps if isinstance(step[0], Memoized)}.values()
    assert len(invariants.cache) == 2
