"""Bad input: one line on stderr, exit status 2, nothing written; through CliRunner and as a subprocess."""

import pytest
import torch
from click.testing import CliRunner

from kernl.cli import compile_command, main
from tests.cli.conftest import MAX_POSITIONS, run_cli

# name -> (compile arguments after MODEL, text the error line contains); "{model}" / "{missing}" are filled in.
CASES = {
    "missing model path": (["{missing}", "--buckets", "1x8"], "no such model directory"),
    "unknown task": (["{model}", "--buckets", "1x8", "--task", "translation"], "'translation' is not one of"),
    "malformed bucket": (["{model}", "--buckets", "1x8,8by16"], "'8by16' is not BATCHxSEQ"),
    "zero bucket": (["{model}", "--buckets", "0x8"], "'0x8' is not BATCHxSEQ"),
    "both bucket forms": (["{model}", "--buckets", "1x8", "--batch-sizes", "1", "--seq-lens", "8"], "not both"),
    "no buckets": (["{model}"], "give the shape buckets"),
    "bad seq lens": (["{model}", "--batch-sizes", "1", "--seq-lens", "8,x"], "--seq-lens"),
    "bucket too long": (["{model}", "--buckets", f"1x{MAX_POSITIONS + 1}"], f"model's {MAX_POSITIONS} positions"),
    "bad dtype": (["{model}", "--buckets", "1x8", "--dtype", "int8"], "'int8' is not one of"),
}


def _args(case: str, model, tmp_path, device: str = "cpu") -> tuple[list[str], str]:
    args, expected = CASES[case]
    filled = [a.format(model=model, missing=tmp_path / "no-such-model") for a in args]
    return [*filled, "-o", str(tmp_path / "out"), "--device", device], expected


def _check_nothing_written(tmp_path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a partial bundle was left behind"


def _check_one_line(stderr: str, expected: str, prog: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_in_process(case, tmp_path, checkpoints):
    args, expected = _args(case, checkpoints["masked-lm"], tmp_path / "work")
    (tmp_path / "work").mkdir()
    result = CliRunner().invoke(compile_command, args)
    assert result.exit_code == 2, result.output
    _check_one_line(result.stderr, expected, "kernl-compile")
    assert result.stdout == ""
    _check_nothing_written(tmp_path / "work")


@pytest.mark.parametrize("case", ["missing model path", "unknown task", "malformed bucket", "bucket too long"])
def test_bad_input_as_subprocess(case, tmp_path, checkpoints):
    args, expected = _args(case, checkpoints["masked-lm"], tmp_path)
    proc = run_cli("compile", *args)
    assert proc.returncode == 2, proc.stderr
    _check_one_line(proc.stderr, expected, "kernl compile")
    assert proc.stdout == ""
    _check_nothing_written(tmp_path)


@pytest.mark.parametrize("subprocess", [False, True])
def test_existing_output_without_force_is_left_alone(subprocess, tmp_path, checkpoints):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["compile", str(checkpoints["masked-lm"]), "-o", str(out), "--buckets", "1x8", "--device", "cpu"]
    if subprocess:
        proc = run_cli(*args)
        code, stderr = proc.returncode, proc.stderr
    else:
        result = CliRunner().invoke(main, args)
        code, stderr = result.exit_code, result.stderr
    assert code == 2
    _check_one_line(stderr, "already exists (use --force", "kernl compile")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"] and (out / "keep.txt").read_text() == "mine"


def test_existing_archive_without_force(tmp_path, checkpoints):
    (tmp_path / "bundle.kernl").write_bytes(b"an older archive")
    args = [str(checkpoints["masked-lm"]), "-o", str(tmp_path / "bundle"), "--buckets", "1x8", "--archive"]
    result = CliRunner().invoke(compile_command, [*args, "--device", "cpu"])
    assert result.exit_code == 2
    _check_one_line(result.stderr, "bundle.kernl already exists", "kernl-compile")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.kernl"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("subprocess", [False, True])
def test_device_cuda_without_gpu(subprocess, tmp_path, checkpoints):
    args = [str(checkpoints["masked-lm"]), "-o", str(tmp_path / "out"), "--buckets", "1x8", "--device", "cuda"]
    if subprocess:
        proc = run_cli("compile", *args)
        code, stderr, prog = proc.returncode, proc.stderr, "kernl compile"
    else:
        result = CliRunner().invoke(compile_command, args)
        code, stderr, prog = result.exit_code, result.stderr, "kernl-compile"
    assert code == 2
    _check_one_line(stderr, "no CUDA GPU", prog)
    _check_nothing_written(tmp_path)


@pytest.mark.parametrize("command", ["inspect", "run", "bench"])
def test_missing_bundle(command, tmp_path):
    extra = ["--text", "hello"] if command == "run" else []
    result = CliRunner().invoke(main, [command, str(tmp_path / "nope"), *extra])
    assert result.exit_code == 2
    _check_one_line(result.stderr, "no such bundle", f"kernl {command}")


def test_unknown_command_and_bad_against(mlm_bundle):
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2
    _check_one_line(result.stderr, "No such command", "kernl")
    result = CliRunner().invoke(main, ["bench", str(mlm_bundle[0]), "--against", "eager,jit"])
    assert result.exit_code == 2
    _check_one_line(result.stderr, "--against 'jit'", "kernl bench")
