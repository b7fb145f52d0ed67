"""`kernl keygen`, `kernl-compile --sign`, and `--trusted-key` for inspect, run and bench."""

import os
import re

import pytest
from click.testing import CliRunner

from kernl.cli import main


def keygen(path) -> str:
    """The key id `kernl keygen PATH` prints."""
    result = CliRunner().invoke(main, ["keygen", str(path)])
    assert result.exit_code == 0, result.output
    return re.search(r"key id\s+([0-9a-f]{16})", result.stdout).group(1)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {
        "release": (folder / "release", keygen(folder / "release")),
        "other": (folder / "other", keygen(folder / "other")),
    }


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory, checkpoints, keys):
    out = tmp_path_factory.mktemp("bundles") / "signed"
    args = [str(checkpoints["masked-lm"]), "-o", str(out), "--buckets", "2x16", "--device", "cpu"]
    result = CliRunner().invoke(main, ["compile", *args, "--sign", str(keys["release"][0])])
    assert result.exit_code == 0, result.output
    return out, result


def test_keygen_writes_a_private_and_a_public_key(tmp_path):
    key_id = keygen(tmp_path / "k")
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in (tmp_path / "k.pub").read_bytes()
    result = CliRunner().invoke(main, ["keygen", str(tmp_path / "k")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"kernl keygen: error: {tmp_path / 'k'} already exists (use --force to replace it)"
    assert keygen_force(tmp_path / "k") != key_id


def keygen_force(path) -> str:
    result = CliRunner().invoke(main, ["keygen", str(path), "--force"])
    assert result.exit_code == 0, result.output
    return re.search(r"key id\s+([0-9a-f]{16})", result.stdout).group(1)


def test_compile_signs_and_inspect_says_who(signed_bundle, keys):
    out, result = signed_bundle
    key_id = keys["release"][1]
    assert f"signature  signed by {key_id}" in result.stdout  # the compile summary
    inspected = CliRunner().invoke(main, ["inspect", str(out)])
    assert inspected.exit_code == 0, inspected.output
    assert f"signature    signed by {key_id}\n" in inspected.stdout
    assert "loads here   yes" in inspected.stdout


def test_inspect_with_trusted_keys(signed_bundle, keys, mlm_bundle):
    out, _ = signed_bundle
    release, other = (f"{keys[k][0]}.pub" for k in ("release", "other"))
    trusted = CliRunner().invoke(main, ["inspect", str(out), "--trusted-key", other, "--trusted-key", release])
    assert f"signed by {keys['release'][1]}, a trusted key" in trusted.stdout
    assert "loads here   yes" in trusted.stdout
    foreign = CliRunner().invoke(main, ["inspect", str(out), "--trusted-key", other])
    assert foreign.exit_code == 0, foreign.output
    assert "loads here   no: " in foreign.stdout and "not a trusted key" in foreign.stdout
    unsigned = CliRunner().invoke(main, ["inspect", str(mlm_bundle[0]), "--trusted-key", release])
    assert "signature    unsigned" in unsigned.stdout and "the bundle is unsigned" in unsigned.stdout


def test_inspect_shows_an_edited_signature(signed_bundle, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(signed_bundle[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["signature"]["value"] = manifest["signature"]["value"][::-1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["inspect", str(copy)])
    assert result.exit_code == 0, result.output
    assert "signature    invalid: " in result.stdout


def test_run_with_trusted_keys(signed_bundle, keys, mlm_bundle):
    out, _ = signed_bundle
    release, other = (f"{keys[k][0]}.pub" for k in ("release", "other"))
    ok = CliRunner().invoke(main, ["run", str(out), "--text", "the cat sat", "--trusted-key", release])
    assert ok.exit_code == 0, ok.output
    assert "[0] 'the cat sat' (5 tokens)" in ok.stdout
    foreign = CliRunner().invoke(main, ["run", str(out), "--text", "the cat", "--trusted-key", other])
    assert foreign.exit_code == 2
    assert "not a trusted key" in foreign.stderr and foreign.stdout == ""
    unsigned = CliRunner().invoke(main, ["run", str(mlm_bundle[0]), "--text", "the cat", "--trusted-key", release])
    assert unsigned.exit_code == 2 and "unsigned" in unsigned.stderr


def test_bench_refuses_a_foreign_key(signed_bundle, keys):
    args = ["bench", str(signed_bundle[0]), "--against", "", "--runs", "1", "--warmup", "0"]
    result = CliRunner().invoke(main, [*args, "--trusted-key", f"{keys['other'][0]}.pub"])
    assert result.exit_code == 2 and "not a trusted key" in result.stderr
    result = CliRunner().invoke(main, [*args, "--trusted-key", f"{keys['release'][0]}.pub"])
    assert result.exit_code == 0, result.output


def test_compile_refuses_a_bad_sign_key_before_compiling(tmp_path, checkpoints, keys):
    out = tmp_path / "work" / "out"
    args = ["compile", str(checkpoints["masked-lm"]), "-o", str(out), "--buckets", "1x8", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--sign", f"{keys['release'][0]}.pub"])  # the public half
    assert result.exit_code == 2
    assert (
        result.stderr.strip().startswith("kernl compile: error: --sign: ") and "not a PEM private key" in result.stderr
    )
    assert not out.parent.exists() or not any(out.parent.iterdir())
