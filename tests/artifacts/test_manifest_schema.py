"""The manifest's one declared schema: what kernl writes fits it, what does not fit is a BundleError naming where,
and kernl's own checks (derived from the schema at import) agree with jsonschema's reading of the same schema."""

import copy
import json

import pytest
import torch

from kernl.artifacts.manifest import FORMAT_VERSION, manifest_digest, validate
from kernl.artifacts.reader import parse_manifest
from kernl.artifacts.schema import MANIFEST_SCHEMA, check_path, compile_schema
from kernl.errors import BundleError
from tests.artifacts.bundles import write_bundle

WRONG = [None, "x", -1, 1.5, True, [], {}, 2**70]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """A manifest as the writer writes it, with every optional entry kernl knows filled in."""
    root = write_bundle(tmp_path_factory.mktemp("schema") / "bundle", {"w": torch.randn(3, 2)})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(
        model="BertModel",
        export_mode="strict-dynamic",
        rewrites={"linear": 3},
        checks=[{"bucket": [1, 8], "max_abs_diff": 1e-6}],
        kernels={"triton": 0, "autotune": None},
        build_seconds={"export": 1.5},
        task="feature-extraction",
        max_positions=64,
        vocab_size=99,
        id2label={"0": "negative"},
    )
    manifest["inputs"][0]["limit"] = 99
    manifest["target"] = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
    manifest["digest"] = manifest_digest(manifest)
    return manifest


def paths(value, where=()):
    """Every place in a JSON value (a list's first item stands for the rest)."""
    yield where
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*where, key))
    elif isinstance(value, list) and value:
        yield from paths(value[0], (*where, 0))


def mutants(manifest: dict):
    """The manifest with one place replaced by a value of a wrong type (or range), for every place."""
    for where in paths(manifest):
        if not where or where[0] in ("digest", "format_version"):
            continue
        for bad in WRONG:
            edited = copy.deepcopy(manifest)
            node = edited
            for key in where[:-1]:
                node = node[key]
            node[where[-1]] = bad
            yield where, bad, edited


def test_what_kernl_writes_fits(written):
    assert validate(copy.deepcopy(written)) == written
    assert MANIFEST_SCHEMA["properties"]["format_version"] == {"const": FORMAT_VERSION}


def test_every_wrong_type_is_a_bundle_error(written):
    refused = 0
    for where, bad, edited in mutants(written):
        raw = json.dumps(edited).encode()
        try:
            parse_manifest(raw, "m.json", verify=False)
        except BundleError as err:
            refused += 1
            assert str(err).startswith("m.json: "), err
        except Exception as err:  # noqa: BLE001 - anything else is the bug this test is for
            pytest.fail(f"{where} = {bad!r}: {type(err).__name__}: {err}")
    assert refused > 200


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["inputs"][0].update(dtype="complex64"), r"inputs\[0\].dtype: expected one of"),
        (lambda m: m["inputs"][0].update(limit=0), r"inputs\[0\].limit: 0 is below 1"),
        (lambda m: m["buckets"].append([0, 8]), r"buckets\[1\]\[0\]: 0 is below 1"),
        (lambda m: m["program"]["inputs"].append("missing"), "program input 'missing' has no entry in inputs"),
        (lambda m: m["program"]["weights"].append("w"), r"program.weights: 'w' appears twice"),
        (lambda m: m["target"].update(device="tpu"), "target.device: expected one of 'cpu', 'cuda'"),
        (lambda m: m["files"]["program.json"].update(extra=1), "files\\['program.json'\\]: needs a size"),
        (lambda m: m.pop("buckets"), "missing buckets"),
        (lambda m: m["inputs"].append(dict(m["inputs"][0])), "inputs: 'input_ids' appears twice"),
        (lambda m: m["weights"].update(file="gone.safetensors"), "weights.file names 'gone.safetensors', which"),
    ],
)
def test_messages_say_where(written, edit, match):
    edited = copy.deepcopy(written)
    edit(edited)
    with pytest.raises(BundleError, match=match):
        validate(edited)


@pytest.mark.parametrize(
    "raw, match",
    [
        ('{"format_version": NaN}', "NaN is not JSON"),
        (b"\xff\xfe{\x00}\x00", "not valid JSON"),  # UTF-16: json.loads would guess it from bytes
        (b'{"a": "\xc3"}', "not valid JSON"),  # not UTF-8
        ('{"a": ' + "1" * 5000 + "}", "not valid JSON"),  # past Python's digit limit: a ValueError, not JSON's
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
)
def test_not_json(raw, match):
    raw = raw.encode() if isinstance(raw, str) else raw
    with pytest.raises(BundleError, match=match):
        parse_manifest(raw, "m.json", verify=False)


def test_lone_surrogates_refused(written):
    edited = copy.deepcopy(written)
    edited["model"] = "\ud800"
    raw = json.dumps(edited).encode()  # ascii-escaped: \\ud800, valid JSON, not valid Unicode
    with pytest.raises(BundleError, match="model: a string with a lone surrogate"):
        parse_manifest(raw, "m.json", verify=False)


def test_the_subset_is_enforced():
    with pytest.raises(ValueError, match="oneOf"):
        compile_schema({"oneOf": [{"type": "string"}]})


def test_agrees_with_jsonschema(written):
    """jsonschema (where installed) reads MANIFEST_SCHEMA as JSON Schema 2020-12; kernl's derived checks must
    accept and refuse exactly the manifests it does."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(MANIFEST_SCHEMA)
    formats = jsonschema.FormatChecker()

    @formats.checks("bundle-path")
    def bundle_path(value) -> bool:
        try:
            check_path(value)
            return True
        except Exception:  # noqa: BLE001
            return False

    theirs = jsonschema.Draft202012Validator(MANIFEST_SCHEMA, format_checker=formats)
    ours = compile_schema(MANIFEST_SCHEMA)
    compared = 0
    for where, bad, edited in [((), None, written), *mutants(written)]:
        if isinstance(bad, float) and bad.is_integer():
            continue  # JSON Schema counts 2.0 as an integer; kernl writes integers as integers
        try:
            ours(edited, "")
            we_accept = True
        except Exception:  # noqa: BLE001
            we_accept = False
        assert we_accept == theirs.is_valid(edited), (where, bad, list(theirs.iter_errors(edited))[:1])
        compared += 1
    assert compared > 200
