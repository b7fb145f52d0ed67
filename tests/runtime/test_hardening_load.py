"""kernl.load: a manifest edited and re-digested, weights that do not fit the program, a cache that cannot be
written, a weights file changed after load: each a BundleError (or nothing at all), never another exception."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernl
from kernl.artifacts.manifest import manifest_digest
from tests.artifacts.bundles import edit_manifest, reseal
from tests.models import token_inputs

WRONG = [None, "x", -1, 1.5, [], {}, 10**30]
# What the runtime reads from a manifest (the rest is described, never used to run anything).
READ_AT_LOAD = ("versions", "target", "dtype", "inputs", "outputs", "buckets", "program", "weights", "kernels", "files")


@pytest.fixture
def bundle(tiny_bert_bundle, tmp_path):
    copy_ = tmp_path / "bert"
    shutil.copytree(tiny_bert_bundle[1], copy_)
    return copy_


def paths(value, where=()):
    yield where
    if isinstance(value, dict):
        for key, item in value.items():
            if where == ("files",) or where == ("program", "weights"):
                yield from paths(item, (*where, key))  # one file, one weight stands for the rest
                return
            yield from paths(item, (*where, key))
    elif isinstance(value, list) and value:
        yield from paths(value[0], (*where, 0))


def test_edited_and_redigested_manifest_is_a_bundle_error(bundle):
    original = json.loads((bundle / "manifest.json").read_text())
    outcomes = {"refused": 0, "loaded": 0}
    for where in paths(original):
        if not where or where[0] not in READ_AT_LOAD:
            continue
        for bad in WRONG:
            manifest = copy.deepcopy(original)
            node = manifest
            for key in where[:-1]:
                node = node[key]
            node[where[-1]] = bad
            manifest["digest"] = manifest_digest(manifest)
            (bundle / "manifest.json").write_text(json.dumps(manifest))
            try:
                kernl.load(bundle)
                outcomes["loaded"] += 1
            except kernl.BundleError:
                outcomes["refused"] += 1
            except Exception as err:  # noqa: BLE001 - anything else is the bug this test is for
                pytest.fail(f"{where} = {bad!r}: {type(err).__name__}: {err}")
    assert outcomes["refused"] > 100, outcomes


def rewrite_weights(bundle, edit) -> None:
    """Edit the weights file's tensors and reseal the bundle (hashes and digest), as anyone can."""
    path = bundle / "weights.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    reseal(bundle)


def test_a_weight_the_program_does_not_name(bundle):
    rewrite_weights(bundle, lambda t: t.update(stowaway=torch.randn(3)))
    with pytest.raises(kernl.BundleError, match="holds 'stowaway', which the program does not name"):
        kernl.load(bundle)


def test_a_weight_the_program_needs_is_missing(bundle):
    rewrite_weights(bundle, lambda t: t.pop("p_pooler_dense_bias"))
    with pytest.raises(kernl.BundleError, match="no tensor 'p_pooler_dense_bias', which the program needs"):
        kernl.load(bundle)


def test_an_embedding_that_is_not_a_table(bundle):
    name = "p_embeddings_word_embeddings_weight"
    rewrite_weights(bundle, lambda t: t.update({name: t[name].reshape(-1)}))
    with pytest.raises(kernl.BundleError, match=f"indexes '{name}' as a table, but it has shape"):
        kernl.load(bundle)


def test_declared_weight_shapes(bundle):
    tensors = load_file(str(bundle / "weights.safetensors"))
    names = json.loads((bundle / "manifest.json").read_text())["program"]["weights"]
    specs = [{"shape": list(tensors[n].shape), "dtype": str(tensors[n].dtype).removeprefix("torch.")} for n in names]
    edit_manifest(bundle, lambda m: m["program"].update(weight_specs=specs))
    kernl.load(bundle)  # as compiled
    specs[3]["shape"][0] += 1
    edit_manifest(bundle, lambda m: m["program"].update(weight_specs=specs))
    with pytest.raises(kernl.BundleError, match=f"'{names[3]}' is float32 .*; the program was compiled for"):
        kernl.load(bundle)


def test_declared_vocabulary(bundle):
    def declare(limit):
        def edit(manifest):
            manifest["inputs"][0]["limit"] = limit

        return edit

    edit_manifest(bundle, declare(50))  # tighter than the table: ids 50..98 refused
    with pytest.raises(kernl.InputError, match=r"input_ids: holds 60; .* \[0, 50\)"):
        kernl.load(bundle)(input_ids=torch.full((1, 4), 60))
    edit_manifest(bundle, declare(100))  # wider than the table: the manifest is wrong
    with pytest.raises(kernl.BundleError, match="declares values below 100, but the table it indexes has 99 rows"):
        kernl.load(bundle)


def test_unwritable_cache_is_a_bundle_error(bundle, tmp_path, monkeypatch):
    from kernl.artifacts.archive import pack

    archive = pack(bundle, tmp_path / "bert.kernl")
    (tmp_path / "not-a-folder").write_text("a file where the cache should be")
    monkeypatch.setenv("KERNL_CACHE", str(tmp_path / "not-a-folder" / "cache"))
    with pytest.raises(kernl.BundleError, match="bert.kernl: cannot be unpacked into"):
        kernl.load(archive)


def test_weights_file_changed_after_load(bundle, tiny_bert_bundle, tmp_path, monkeypatch):
    """CPU weights live in memory the process owns: editing or truncating the file (here, the archive's
    extraction in the cache) changes no result and raises no SIGBUS."""
    from kernl.artifacts.archive import pack

    monkeypatch.setenv("KERNL_CACHE", str(tmp_path / "cache"))
    loaded = kernl.load(pack(bundle, tmp_path / "bert.kernl"))
    inputs = token_inputs(2, 8)
    before = loaded(**inputs).last_hidden_state
    (weights,) = (tmp_path / "cache").rglob("weights.safetensors")
    with open(weights, "r+b") as f:
        f.write(bytes(4096))  # the header and the first tensors, zeroed in place
        f.truncate(100)
    assert torch.equal(loaded(**inputs).last_hidden_state, before)
