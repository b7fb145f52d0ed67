"""`kernl-compile --task text-generation` and `kernl run --prompt`: a tiny GPT-2 with a word-level tokenizer."""

import pytest
import torch
from click.testing import CliRunner

from kernl.cli import main
from tests.cli.conftest import VOCAB

# The generation logic is under test: CPU kernels through their references (see test_generation.py).
pytestmark = pytest.mark.usefixtures("cpu_references")


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                     bos_token_id=2, eos_token_id=3, pad_token_id=0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def gen_bundle(tmp_path_factory, lm_checkpoint):
    folder, _ = lm_checkpoint
    out = tmp_path_factory.mktemp("bundles") / "gen"
    args = [str(folder), "-o", str(out), "--task", "text-generation", "--buckets", "1x8,2x8", "--max-length", "20"]
    result = CliRunner().invoke(main, ["compile", *args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "decode batches 1, 2; max length 20" in result.stdout
    return out


def test_run_streams_the_greedy_completion(gen_bundle, lm_checkpoint):
    folder, model = lm_checkpoint
    out = gen_bundle
    result = CliRunner().invoke(main, ["run", str(out), "--prompt", "the cat sat", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    import transformers

    # The prompt as transformers' tokenizer encodes it (special tokens included), greedy, 6 new tokens.
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok("the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    completion = tok.decode(want.tolist(), skip_special_tokens=True)
    assert result.stdout.strip().replace(" ", "") == ("the cat sat" + completion).replace(" ", "")


def test_max_length_needs_room_after_the_longest_prompt(tmp_path, lm_checkpoint):
    folder, _ = lm_checkpoint
    args = [str(folder), "-o", str(tmp_path / "x"), "--task", "text-generation", "--buckets", "1x16", "--max-length",
            "16", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, ["compile", *args])
    assert result.exit_code == 2
    assert "--max-length 16: leaves no room to generate after a 16-token prompt" in result.stderr


def test_bench_generate_reports_tokens_per_second_beside_transformers(gen_bundle):
    args = ["bench", str(gen_bundle), "--generate", "--against", "eager", "--new-tokens", "4", "--runs", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in lines] == ["1", "2"]  # one row per decode batch
    # kernl and eager tokens/s ("8 + 4" is 3 words)
    assert all(float(row[5]) > 0 and float(row[6]) > 0 for row in lines)
