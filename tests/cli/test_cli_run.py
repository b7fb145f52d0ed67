"""`kernl run`: tokenized with the bundle's tokenizer; top tokens, labels, embeddings; never imports transformers."""

from click.testing import CliRunner

from kernl.cli import main
from tests.cli.conftest import imported_modules, run_cli


def test_run_masked_lm_shows_top_tokens(mlm_bundle):
    texts = ["--text", "the cat sat on the [MASK] .", "--text", "a good movie"]
    result = CliRunner().invoke(main, ["run", str(mlm_bundle[0]), *texts, "--top-k", "3"])
    assert result.exit_code == 0, result.output
    assert "BertForMaskedLM (masked-lm) on cpu" in result.stdout
    assert "[0] 'the cat sat on the [MASK] .' (9 tokens)" in result.stdout
    assert "mask at token 6: " in result.stdout
    assert "no mask token in the text" in result.stdout


def test_run_classifier_as_subprocess_without_transformers(classifier_bundle):
    proc = run_cli("run", str(classifier_bundle[0]), "--text", "i liked it", "--text", "awful", importtime=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("label: ") == 2
    assert "positive" in proc.stdout and "negative" in proc.stdout
    assert "transformers" not in imported_modules(proc.stderr)


def test_run_base_model_prints_embeddings(tmp_path, checkpoints):
    out = tmp_path / "base"
    args = [str(checkpoints["masked-lm"]), "-o", str(out), "--buckets", "1x8", "--device", "cpu"]
    assert CliRunner().invoke(main, ["compile", *args, "--task", "feature-extraction"]).exit_code == 0
    result = CliRunner().invoke(main, ["run", str(out), "--text", "the dog"])
    assert result.exit_code == 0, result.output
    assert "embedding: dim 32, norm " in result.stdout


def test_run_more_texts_than_the_largest_bucket(mlm_bundle):
    texts = [arg for t in ("a", "b", "c") for arg in ("--text", t)]
    result = CliRunner().invoke(main, ["run", str(mlm_bundle[0]), *texts])
    assert result.exit_code == 2
    assert result.stderr.strip() == "kernl run: error: 3 texts: the bundle's largest bucket takes 2"


def test_report_next_token_for_causal_lms(mlm_bundle):
    import torch

    import kernl
    from kernl.commands.present import report

    tok = kernl.load(mlm_bundle[0]).tokenizer
    inputs = tok(["the cat sat", "a dog"], max_length=16)
    logits = torch.zeros(*inputs["input_ids"].shape, 26)
    logits[0, 4, tok.token_to_id("mat")] = 10.0  # after [CLS] the cat sat [SEP]
    lines = report(
        ["the cat sat", "a dog"], inputs, {"logits": logits}, task="causal-lm", tok=tok, id2label={}, top_k=2
    )
    assert lines[1].startswith("  next token: 'mat' 0.9")
    assert lines[2] == "[1] 'a dog' (4 tokens)"


def test_run_refuses_an_edited_tokenizer(mlm_bundle, tmp_path):
    """The tokenizer is read from the bytes kernl.load verified, never from the folder on its own."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mlm_bundle[0], copy)
    path = copy / "tokenizer" / "tokenizer.json"
    path.write_text(path.read_text().replace('"mat"', '"hat"'))  # same size, other bytes
    result = CliRunner().invoke(main, ["run", str(copy), "--text", "the cat sat on the hat"])
    assert result.exit_code == 2
    assert "tokenizer/tokenizer.json" in result.stderr and result.stdout == ""


def test_run_a_bundle_without_tokenizer(tiny_bert_bundle):
    result = CliRunner().invoke(main, ["run", str(tiny_bert_bundle[1]), "--text", "hello"])
    assert result.exit_code == 2
    assert "has no tokenizer/tokenizer.json" in result.stderr
