"""A program is data: bound by the runtime from JSON, every op checked against the allow-list, nothing executed."""

import copy
import json

import pytest
import torch

from kernl.compiler.lower import lower_model
from kernl.errors import BundleError
from kernl.runtime.program import ProgramSpec
from tests.models import tiny_bert, tiny_gpt2, tiny_llama, token_inputs


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def lowered(request):
    model = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]()
    return lower_model(model, [(1, 8), (2, 16)], device="cpu")


def _from_json(spec: ProgramSpec, data: dict) -> ProgramSpec:
    return ProgramSpec(spec.weights, spec.inputs, spec.outputs, data["functions"], data["entries"])


def _args(low, batch: int, seq: int) -> list:
    inputs = token_inputs(batch, seq)
    return [torch.device("cpu"), *low.weight_list(), *(inputs[n] for n in low.input_names)]


def test_program_data_matches_the_readable_program(lowered):
    """The data, through JSON and back, computes exactly what program.py (its readable view) computes."""
    data = json.loads(json.dumps(lowered.spec.data(), allow_nan=False))
    program = _from_json(lowered.spec, data).bind()
    view: dict = {}
    exec(compile(lowered.source, "program.py", "exec"), view)  # the test's reference, never the runtime's path
    for batch, seq in [(1, 5), (2, 16)]:
        args = _args(lowered, batch, seq)
        got, want = program(*args), view["forward"](*args)
        assert len(got) == len(want) == len(lowered.spec.outputs)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def _first_node(data: dict, prefix: str) -> list:
    return next(n for fn in data["functions"].values() for n in fn["nodes"] if n[1].startswith(prefix))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("aten.from_file.default", "aten.from_file.default"),
        ("builtins.eval", "builtins.eval"),
        ("os.system", "os.system"),
        ("aten.add_.Tensor", "aten.add_.Tensor"),
        ("aten.add.out", "mutates"),
        ("aten.nonexistent_op.default", "aten.nonexistent_op.default"),
    ],
)
def test_an_op_outside_the_allow_list_is_refused_by_name(lowered, target, message):
    data = copy.deepcopy(lowered.spec.data())
    _first_node(data, "aten.")[1] = target
    with pytest.raises(BundleError, match=message.replace(".", r"\.")):
        _from_json(lowered.spec, data).bind()


def test_arguments_that_do_not_fit_the_schema_are_refused(lowered):
    data = copy.deepcopy(lowered.spec.data())
    _first_node(data, "aten.")[3]["no_such_argument"] = 1
    with pytest.raises(BundleError, match="no_such_argument"):
        _from_json(lowered.spec, data).bind()
    data = copy.deepcopy(lowered.spec.data())
    _first_node(data, "kernl.")[2].extend([0] * 20)
    with pytest.raises(BundleError, match="kernl"):
        _from_json(lowered.spec, data).bind()


@pytest.mark.parametrize(
    "value", [{"ref": "defined_nowhere"}, {"py": "__import__('os')"}, {"dtype": "os"}, {"float": "1e999999"}]
)
def test_unknown_values_are_refused(lowered, value):
    data = copy.deepcopy(lowered.spec.data())
    _first_node(data, "aten.")[2].append(value)
    with pytest.raises(BundleError):
        _from_json(lowered.spec, data).bind()


def test_a_malformed_program_is_a_bundle_error(lowered):
    with pytest.raises(BundleError, match="format"):
        ProgramSpec.from_bundle({}, {"format_version": 99})
    data = copy.deepcopy(lowered.spec.data())
    data["entries"]["forward"]["head"] = "missing"
    with pytest.raises(BundleError, match="head"):
        _from_json(lowered.spec, data).bind()
