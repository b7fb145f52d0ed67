"""`kernl bench`: the bundle's latency per bucket beside the original model's, with ratios and JSON."""

import json

from click.testing import CliRunner

from kernl.cli import main
from tests.cli.conftest import run_cli


def test_bench_against_eager_writes_json(mlm_bundle, tmp_path):
    report = tmp_path / "bench.json"
    args = ["bench", str(mlm_bundle[0]), "--against", "eager", "--runs", "1", "--warmup", "0", "--json", str(report)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "eager / kernl" in result.stdout and "2x16" in result.stdout
    data = json.loads(report.read_text())
    assert data["model"] == "BertForMaskedLM" and data["device"] == "cpu"
    (row,) = data["results"]
    assert row["bucket"] == [2, 16]
    assert row["kernl_ms"] > 0 and row["eager_ms"] > 0
    assert abs(row["eager_over_kernl"] - row["eager_ms"] / row["kernl_ms"]) < 1e-9
    assert row["cosine_to_eager"] > 0.9999


def test_bench_bundle_only_as_subprocess(mlm_bundle):
    proc = run_cli("bench", str(mlm_bundle[0]), "--against", "", "--runs", "1", "--warmup", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[1].split() == ["bucket", "kernl", "ms"]
    assert lines[3].startswith("2x16 ")
