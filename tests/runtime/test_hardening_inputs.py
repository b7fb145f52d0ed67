"""Every bad call is an InputError naming the input, before anything runs, and the same on CPU and CUDA.

Out-of-vocabulary ids matter most: on CUDA the embedding's out-of-bounds read inside a graph replay is a
device-side assert that breaks the CUDA context of the whole process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernl
from kernl.runtime.dispatch import check_inputs
from kernl.runtime.limits import table_limits, with_limits
from tests.models import token_inputs

REPO = Path(__file__).resolve().parents[2]
VOCAB = 99  # tests.models.tiny_bert


@pytest.fixture(scope="module")
def loaded(tiny_bert_bundle):
    model, path = tiny_bert_bundle
    return model, kernl.load(path)


class OtherDevice(torch.Tensor):
    """A tensor that says it lives on a device kind kernl does not run on (no such backend here to make one)."""

    @property
    def device(self):
        return torch.device("mps")


def ids(*shape, dtype=torch.long, low=0, high=VOCAB):
    return torch.randint(low, high, shape).to(dtype)


BAD_CALLS = {
    "id -1": (dict(input_ids=ids(2, 8, low=-1, high=0)), r"^input_ids: holds -1; .* must lie in \[0, 99\)"),
    "id = vocab": (dict(input_ids=ids(2, 8, low=VOCAB, high=VOCAB + 1)), r"^input_ids: holds 99;"),
    "id 10**9": (dict(input_ids=torch.full((1, 3), 10**9)), r"^input_ids: holds 1000000000;"),
    "bool ids": (dict(input_ids=torch.ones(2, 8, dtype=torch.bool)), r"^input_ids: dtype torch.bool given"),
    "uint8 ids": (dict(input_ids=ids(2, 8, dtype=torch.uint8)), r"^input_ids: dtype torch.uint8 given"),
    "float ids": (dict(input_ids=ids(2, 8, dtype=torch.float32)), r"^input_ids: dtype torch.float32 given"),
    "meta ids": (dict(input_ids=torch.empty(2, 8, dtype=torch.long, device="meta")), "^input_ids: a meta tensor"),
    "mps ids": (dict(input_ids=ids(2, 8).as_subclass(OtherDevice)), "^input_ids: on device mps"),
    "sparse ids": (dict(input_ids=ids(2, 8).to_sparse()), "^input_ids: a torch.sparse_coo tensor"),
    "float mask": (dict(input_ids=ids(2, 8), attention_mask=torch.ones(2, 8)), "^attention_mask: dtype"),
    "meta mask": (
        dict(input_ids=ids(2, 8), attention_mask=torch.ones(2, 8, dtype=torch.long, device="meta")),
        "^attention_mask: a meta tensor",
    ),
    "bad id in a padded row": (
        dict(input_ids=torch.cat([ids(1, 8), torch.full((1, 8), -100)]), attention_mask=torch.ones(2, 8).long()),
        "^input_ids: holds -100",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_is_an_input_error_naming_the_input(loaded, case):
    inputs, match = BAD_CALLS[case]
    with pytest.raises(kernl.InputError, match=match):
        loaded[1](**inputs)


def test_after_the_bad_calls_good_ones_are_served(loaded):
    model, bundle = loaded
    good = token_inputs(2, 8)
    with torch.no_grad():
        want = model(**good).last_hidden_state
    assert (bundle(**good).last_hidden_state - want).abs().max() <= 1e-4


def test_narrow_integers_give_the_int64_result(loaded):
    """The padded buffers take the bundle's dtypes, not the call's: a narrower id or mask dtype changes nothing."""
    model, bundle = loaded
    good = token_inputs(2, 7)
    want = bundle(**good).last_hidden_state
    for dtype, mask_dtype in [(torch.int8, torch.bool), (torch.int32, torch.uint8)]:
        got = bundle(input_ids=good["input_ids"].to(dtype), attention_mask=good["attention_mask"].to(mask_dtype))
        assert torch.equal(got.last_hidden_state, want), (dtype, mask_dtype)


def test_limits_come_from_the_program(loaded, tiny_bert_bundle):
    _, bundle = loaded
    limits = {s["name"]: s.get("limit") for s in bundle._spec.inputs}
    assert limits == {"input_ids": VOCAB, "attention_mask": None}
    manifest = json.loads((tiny_bert_bundle[1] / "manifest.json").read_text())
    assert all("limit" not in s for s in manifest["inputs"])  # found in the program, not declared


def test_same_calls_accepted_and_refused_whatever_the_device():
    """check_inputs reads the call only: the table of decisions is the bundle's device's as well (the GPU test
    below replays it on CUDA)."""
    specs = [
        {"name": "input_ids", "dtype": "int64", "fill": "required", "rank": 2, "limit": VOCAB},
        {"name": "attention_mask", "dtype": "int64", "fill": "ones", "rank": 2},
    ]
    decisions = {}
    for case, (inputs, _) in BAD_CALLS.items():
        try:
            check_inputs(dict(inputs), specs, [(2, 16)])
            decisions[case] = "accepted"
        except kernl.InputError:
            decisions[case] = "refused"
    assert set(decisions.values()) == {"refused"}


def _function(params, nodes):
    return {"params": params, "nodes": nodes, "output": []}


def ref(name):
    return {"ref": name}


def test_table_limits_follow_ids_through_views():
    params = ["target_device", "word", "types", "pos", "input_ids", "token_type_ids", "positions"]
    nodes = [
        ["flat", "aten.view.default", [ref("input_ids"), [-1]], {}],
        ["again", "aten.reshape.default", [ref("flat"), [2, -1]], {}],
        ["embedding", "aten.embedding.default", [ref("word"), ref("again"), 0], {}],
        ["types_out", "aten.index_select.default", [ref("types"), 0, ref("token_type_ids")], {}],
        ["not_a_table", "aten.embedding.default", [ref("pos"), ref("embedding")], {}],  # indices computed: skipped
    ]
    functions = {"head": _function(params, nodes)}
    shapes = {"word": (1000, 8), "types": (2, 8), "pos": (64, 8)}
    found = table_limits(functions, "head", ["word", "types", "pos"], ["input_ids", "token_type_ids", "positions"],
                         shapes)  # fmt: skip
    assert found == {"input_ids": 1000, "token_type_ids": 2}
    with pytest.raises(kernl.BundleError, match="indexes 'word' as a table, but it has shape"):
        table_limits(functions, "head", ["word", "types", "pos"], ["input_ids", "token_type_ids", "positions"],
                     {**shapes, "word": (1000,)})  # fmt: skip
    specs = [{"name": "input_ids", "limit": 500}, {"name": "token_type_ids"}, {"name": "positions"}]
    assert [s.get("limit") for s in with_limits(specs, found, "m")] == [500, 2, None]  # a tighter declared limit
    with pytest.raises(kernl.BundleError, match="declares values below 5000, but the table it indexes has 1000"):
        with_limits([{"name": "input_ids", "limit": 5000}], found, "m")


def test_host_check_costs_microseconds():
    """The vocabulary check of host inputs: one aminmax per id input, no device work (measured, loosely bounded:
    a shared CI machine is noisy)."""
    import time

    specs = [{"name": "input_ids", "dtype": "int64", "fill": "required", "rank": 2, "limit": 128256},
             {"name": "attention_mask", "dtype": "int64", "fill": "ones", "rank": 2}]  # fmt: skip
    call = {"input_ids": torch.randint(0, 128256, (32, 256)), "attention_mask": torch.ones(32, 256, dtype=torch.long)}
    without = [dict(s) for s in specs]
    without[0].pop("limit")
    times = {}
    for name, s in (("with", specs), ("without", without)):
        for _ in range(50):
            check_inputs(call, s, [(32, 256)])
        start = time.perf_counter()
        for _ in range(500):
            check_inputs(call, s, [(32, 256)])
        times[name] = (time.perf_counter() - start) / 500
    assert times["with"] - times["without"] < 1e-3, times


GPU_SCRIPT = """
import json, sys, torch, kernl
from tests.models import tiny_bert, token_inputs
model = tiny_bert().cuda().half()
path = kernl.compile(model, sys.argv[1], buckets=[(2, 16)], device="cuda", dtype=torch.float16)
bundle = kernl.load(path)
outcomes = {}
for where in ("cpu", "cuda"):
    for name, value in [("-1", -1), ("vocab", 99), ("1e9", 10**9)]:
        bad = torch.randint(0, 99, (2, 8)); bad[1, 3] = value
        try:
            bundle(input_ids=bad.to(where)); outcomes[where + name] = "accepted"
        except kernl.InputError as err:
            outcomes[where + name] = str(err).split(":")[0]
    for name, value in [("bool", torch.ones(2, 8, dtype=torch.bool)), ("uint8", torch.ones(2, 8, dtype=torch.uint8))]:
        try:
            bundle(input_ids=value.to(where)); outcomes[where + name] = "accepted"
        except kernl.InputError as err:
            outcomes[where + name] = str(err).split(":")[0]
good = token_inputs(2, 8)
with torch.no_grad():
    want = model(**{k: v.cuda() for k, v in good.items()}).last_hidden_state.float()
got = bundle(**{k: v.cuda() for k, v in good.items()}).last_hidden_state.float()
torch.cuda.synchronize()  # a device-side assert from any call above would surface here
outcomes["good"] = float((got - want).abs().max())
print(json.dumps(outcomes))
"""


@pytest.mark.gpu
def test_out_of_vocabulary_on_cuda_in_a_subprocess(tmp_path):
    """On CUDA, from host and from device tensors: an InputError, and the process's CUDA context survives (in a
    subprocess, so that a device-side assert cannot take the test run down)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(GPU_SCRIPT), str(tmp_path / "b")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes.pop("good") <= 2e-2
    assert set(outcomes.values()) == {"input_ids"}, outcomes
