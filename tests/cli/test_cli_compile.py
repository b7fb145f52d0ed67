"""`kernl-compile` / `kernl compile`: the bundle, its manifest entries, the summary; in process and as a subprocess."""

import json

from click.testing import CliRunner

from kernl.artifacts.reader import open_bundle
from kernl.cli import main


def test_compile_writes_bundle_archive_and_summary(mlm_bundle, checkpoints):
    out, result = mlm_bundle
    manifest = open_bundle(out).manifest
    assert manifest["model"] == "BertForMaskedLM"
    assert manifest["task"] == "masked-lm"  # --task auto, from config.architectures
    assert manifest["source"] == str(checkpoints["masked-lm"].resolve())
    assert manifest["buckets"] == [[2, 16]]
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert out.with_name("mlm.kernl").is_file()
    for expected in ("buckets ", "2x16", "add_layer_norm 4", "kernels ", "stage", "export", "warm-up", "archive:"):
        assert expected in result.stdout
    assert "cosine to the model" in result.stdout and "1.000000" in result.stdout


def test_product_buckets_task_option_and_force(tmp_path, checkpoints):
    out = tmp_path / "base"
    out.mkdir()
    (out / "old.txt").write_text("replaced by --force")
    args = ["compile", str(checkpoints["masked-lm"]), "-o", str(out), "--batch-sizes", "1,2", "--seq-lens", "8"]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--task", "feature-extraction", "--force"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "BertModel" and manifest["task"] == "feature-extraction"
    assert manifest["buckets"] == [[1, 8], [2, 8]]
    assert [o["name"] for o in manifest["outputs"]] == ["last_hidden_state", "pooler_output"]
    assert not (out / "old.txt").exists()


def test_compile_as_a_subprocess_records_labels(classifier_bundle):
    out, proc = classifier_bundle
    assert "BertForSequenceClassification" in proc.stdout and "2x16" in proc.stdout
    assert "warm-up 2x16" in proc.stderr  # progress, one line a stage when stderr is not a terminal
    manifest = open_bundle(out).manifest
    assert manifest["task"] == "sequence-classification"
    assert manifest["id2label"] == {"0": "negative", "1": "positive"}
