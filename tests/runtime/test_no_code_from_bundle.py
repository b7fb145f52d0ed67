"""Loading a bundle runs no code from it, even when an attacker edits its files and recomputes every hash."""

import json
import subprocess
import sys

import pytest
import torch

import kernl
from kernl.errors import BundleError
from tests.artifacts.bundles import edit_manifest, reseal
from tests.models import token_inputs


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _payload(marker) -> str:
    return f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n"


def test_a_payload_in_program_py_never_runs(tiny_bert_bundle, tmp_path):
    """program.py is the readable view: editing it (hashes recomputed) changes nothing that runs."""
    model, path = tiny_bert_bundle
    bundle_dir = _copy(path, tmp_path / "bundle")
    marker = tmp_path / "marker"
    with open(bundle_dir / "program.py", "a") as f:
        f.write(_payload(marker))
    reseal(bundle_dir)
    # A fresh process, as a production app would load it: no module of the bundle may be imported there either.
    script = (
        "import sys, torch, kernl; b = kernl.load(sys.argv[1]); "
        "out = b(input_ids=torch.randint(0, 99, (2, 9))).last_hidden_state; print(tuple(out.shape))"
    )
    run = subprocess.run([sys.executable, "-c", script, str(bundle_dir)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "(2, 9, 32)"
    assert not marker.exists()


def test_a_program_pointing_at_another_file_is_refused(tiny_bert_bundle, tmp_path):
    _, path = tiny_bert_bundle
    bundle_dir = _copy(path, tmp_path / "bundle")
    outside = tmp_path / "evil.json"
    outside.write_text((bundle_dir / "program.json").read_text())
    for target in ["../evil.json", str(outside), "program.py"]:
        edit_manifest(bundle_dir, lambda m, t=target: m["program"].update(file=t))
        with pytest.raises(BundleError):
            kernl.load(bundle_dir)


def test_an_op_outside_the_allow_list_in_a_resealed_bundle_is_refused(tiny_bert_bundle, tmp_path):
    _, path = tiny_bert_bundle
    bundle_dir = _copy(path, tmp_path / "bundle")
    data = json.loads((bundle_dir / "program.json").read_text())
    node = next(n for fn in data["functions"].values() for n in fn["nodes"] if n[1].startswith("aten."))
    node[1] = "aten.from_file.default"
    (bundle_dir / "program.json").write_text(json.dumps(data))
    reseal(bundle_dir)
    with pytest.raises(BundleError, match=r"aten\.from_file\.default"):
        kernl.load(bundle_dir)


def test_a_bundle_round_trip_matches_the_model(tiny_bert_bundle):
    model, path = tiny_bert_bundle
    bundle = kernl.load(path)
    inputs = token_inputs(3, 20)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    got = bundle(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)
