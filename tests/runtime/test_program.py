"""Outputs left in a graph's memory are copied out; the tail's fresh outputs are handed over as they are."""

import torch

from kernl.runtime.program import ProgramSpec, own_outputs, storages


def test_only_outputs_in_graph_memory_are_copied():
    static, fresh = torch.randn(4, 6), torch.randn(4, 6)
    owned = own_outputs([static, fresh], storages([static]))
    assert owned[0].untyped_storage().data_ptr() != static.untyped_storage().data_ptr()
    assert torch.equal(owned[0], static)
    assert owned[1] is fresh


def test_several_outputs_in_graph_memory_are_each_copied():
    static = [torch.randn(4, 6), torch.randn(3), torch.randn(2, 5)]
    fresh = torch.randn(5)
    owned = own_outputs([static[0], fresh, static[1], static[2][:, :4]], storages(static))
    assert owned[1] is fresh
    for got, want in zip([owned[0], owned[2], owned[3]], [static[0], static[1], static[2][:, :4]]):
        assert got.untyped_storage().data_ptr() not in storages(static)
        assert got.is_contiguous() and torch.equal(got, want)


def test_sliced_outputs_come_out_compact():
    static, fresh = torch.randn(4, 6), torch.randn(4, 6)
    owned = own_outputs([static[:3, :5], fresh[:3, :5]], storages([static]))
    for got, base in zip(owned, (static, fresh)):
        assert got.is_contiguous() and torch.equal(got, base[:3, :5])


def test_a_program_without_a_tail_passes_the_head_values_on():
    head = {
        "params": ["target_device", "w", "x"],
        "nodes": [["y", "aten.mul.Tensor", [{"ref": "x"}, {"ref": "w"}], {}]],
        "output": [{"ref": "y"}],
    }
    inputs = [{"name": "x", "dtype": "float32", "rank": 1, "fill": "required"}]
    entries = {"forward": {"head": "f", "tail": None}}
    spec = ProgramSpec(["w"], inputs, [{"name": "y", "dims": [3]}], {"f": head}, entries)
    program = spec.bind()
    w, x = torch.randn(3), torch.randn(3)
    values = program.head("cpu", w, x)
    assert program.tail("cpu", w, *values) == values
    torch.testing.assert_close(program("cpu", w, x)[0], x * w)
