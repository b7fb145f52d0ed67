"""`kernl inspect`: the manifest in words, loadability here; never imports transformers."""

import torch
from click.testing import CliRunner

from kernl.cli import main
from kernl.commands.inspect import loadability
from tests.cli.conftest import imported_modules, run_cli


def test_inspect_describes_the_bundle(mlm_bundle):
    out, _ = mlm_bundle
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in (
        "BertForMaskedLM, task masked-lm",
        "dtype        float32",
        "target       cpu",
        "export mode  ",
        "buckets      2x16",
        "add_layer_norm 4",
        "weights.safetensors",
        "tokenizer/tokenizer.json",
        "manifest.json",
        "loads here   yes, on cpu",
        "logits [batch, seq, 26]",
    ):
        assert expected in text, expected


def test_inspect_archive_as_subprocess_without_transformers(mlm_bundle):
    out, _ = mlm_bundle
    proc = run_cli("inspect", str(out.with_name("mlm.kernl")), importtime=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BertForMaskedLM" in proc.stdout and "loads here   yes" in proc.stdout
    modules = imported_modules(proc.stderr)
    assert "kernl" in modules and "transformers" not in modules


def test_inspect_says_why_a_corrupt_bundle_cannot_load(mlm_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mlm_bundle[0], copy)
    program = copy / "program.py"
    program.write_text(program.read_text() + "\n# edited\n")
    result = CliRunner().invoke(main, ["inspect", str(copy)])
    assert result.exit_code == 0, result.output
    assert "loads here   no: " in result.stdout and "program.py" in result.stdout


def test_loadability_of_a_cuda_bundle_here():
    manifest = {
        "target": {"device": "cuda", "gpu": "Some GPU", "capability": "0.1"},
        "versions": {"torch": "0.0", "triton": "0.0"},
    }
    ok, why = loadability(manifest)
    assert not ok
    if torch.cuda.is_available():
        assert "compute capability 0.1" in why and "recompile=True" in why
    else:
        assert "no CUDA GPU" in why


def test_inspect_prints_the_readable_program(mlm_bundle):
    out, _ = mlm_bundle
    result = CliRunner().invoke(main, ["inspect", str(out), "--program"])
    assert result.exit_code == 0, result.output
    assert "def head(" in result.output and "kernl_ops." in result.output
