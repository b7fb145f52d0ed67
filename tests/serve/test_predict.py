"""kernl.serve.app in process (TestClient) over tiny masked-LM and classifier bundles: /v1/predict, errors, CLI."""

import sys

import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient

import kernl
from kernl.serve import app
from tests.cli.conftest import save_checkpoint


def compile_tiny(root, model_class: str, task: str, **config):
    from transformers import AutoTokenizer

    from kernl.commands.tasks import load_model

    source = save_checkpoint(root / f"{task}-model", model_class, **config)
    meta = {"task": task}
    if "id2label" in config:
        meta["id2label"] = {str(k): v for k, v in config["id2label"].items()}
    model, tok = load_model(str(source), task), AutoTokenizer.from_pretrained(source)
    return kernl.compile(model, root / task, buckets=[(4, 16)], device="cpu", tokenizer=tok, metadata=meta)


@pytest.fixture(scope="module", autouse=True)
def _torch_references():
    """These tests are about serving, not kernels: run the kernels' torch references on CPU, as a production CPU
    process does (without TRITON_INTERPRET; runs_triton reads it at each call)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        yield


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, _torch_references):
    root = tmp_path_factory.mktemp("predict")
    return {
        "masked-lm": compile_tiny(root, "BertForMaskedLM", "masked-lm"),
        "classifier": compile_tiny(
            root, "BertForSequenceClassification", "sequence-classification", id2label={0: "negative", 1: "positive"}
        ),
    }


def test_masked_lm_top_tokens_equal_the_bundles_own(bundles):
    texts = ["the cat sat on the [MASK] .", "a [MASK] movie , [MASK] !"]
    with TestClient(app(bundles["masked-lm"])) as client:
        r = client.post("/v1/predict", json={"input": texts, "top_k": 3, "model": "masked-lm"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "masked-lm" and out["task"] == "masked-lm"
    bundle = kernl.load(bundles["masked-lm"])
    tok = bundle.tokenizer
    for i, text in enumerate(texts):
        inputs = tok([text])
        probs = bundle(**inputs).logits[0].float().softmax(-1)
        positions = (inputs["input_ids"][0] == tok.mask_token_id).nonzero().flatten().tolist()
        masks = out["data"][i]["masks"]
        assert [m["position"] for m in masks] == positions
        for mask, pos in zip(masks, positions):
            want_p, want_ids = probs[pos].topk(3)
            assert [t["token_id"] for t in mask["tokens"]] == want_ids.tolist()
            torch.testing.assert_close(torch.tensor([t["score"] for t in mask["tokens"]]), want_p, atol=1e-5, rtol=0)
            assert mask["tokens"][0]["token"] == tok.decode([want_ids[0].item()], skip_special_tokens=False).strip()
    assert out["usage"]["prompt_tokens"] == sum(len(tok([t])["input_ids"][0]) for t in texts)


def test_masked_lm_bad_requests(bundles):
    with TestClient(app(bundles["masked-lm"])) as client:
        no_mask = client.post("/v1/predict", json={"input": ["the [MASK] sat", "a good movie"]})
        assert no_mask.status_code == 400
        assert no_mask.json()["error"]["message"].startswith("input 1: no [MASK] token")
        assert client.post("/v1/predict", json={"input": "[MASK]", "top_k": 0}).status_code == 422
        assert client.post("/v1/embeddings", json={"input": "the [MASK]"}).status_code == 404
        long = client.post("/v1/predict", json={"input": "the cat " * 10 + "[MASK]"})
        assert long.status_code == 413 and "longer than 16 tokens" in long.json()["error"]["message"]
        assert client.post("/v1/predict", json={"input": "the [MASK] ."}).status_code == 200


def test_classifier_labels_equal_the_bundles_own(bundles):
    texts = ["i liked it", "awful", "a good film", "the movie was bad"]
    bundle = kernl.load(bundles["classifier"])
    with TestClient(app(bundle, model_name="sentiment")) as client:  # a loaded bundle serves as well as a path
        r = client.post("/v1/predict", json={"input": texts, "model": "sentiment"})
        models = client.get("/v1/models").json()
    assert r.status_code == 200, r.text
    assert models["data"][0]["id"] == "sentiment" and models["data"][0]["task"] == "sequence-classification"
    probs = bundle(**bundle.tokenizer(texts)).logits.float().softmax(-1)
    for row, want in zip(r.json()["data"], probs):
        scores = {s["label"]: s["score"] for s in row["scores"]}
        assert set(scores) == {"negative", "positive"}
        torch.testing.assert_close(torch.tensor([scores["negative"], scores["positive"]]), want, atol=1e-5, rtol=0)
        assert row["label"] == ("positive" if want[1] > want[0] else "negative") == row["scores"][0]["label"]


def test_metrics_and_health_in_process(bundles):
    with TestClient(app(bundles["classifier"], max_batch_delay_ms=0)) as client:
        client.post("/v1/predict", json={"input": ["i liked it", "awful"]})
        text = client.get("/metrics").text
        health = client.get("/health").json()
    assert "kernl_batch_size_count 1.0" in text and "kernl_batch_size_sum 2.0" in text
    assert 'kernl_requests_total{endpoint="/v1/predict",status="200"} 1.0' in text
    assert health["status"] == "ok" and health["task"] == "sequence-classification"


def test_import_without_the_serve_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    for name in [n for n in sys.modules if n == "kernl.serve" or n.startswith("kernl.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError) as err:
        import kernl.serve  # noqa: F401
    assert str(err.value) == (
        "kernl.serve needs FastAPI, uvicorn and prometheus_client (fastapi is missing): pip install 'kernl[serve]'"
    )


def test_cli_errors_are_one_line(bundles, monkeypatch):
    from kernl.cli import main

    result = CliRunner().invoke(main, ["serve", str(bundles["classifier"]), "--replicas", "2"])
    assert (
        result.exit_code == 2
        and result.stderr.strip() == "kernl serve: error: --replicas and --ray-address go with --ray"
    )
    result = CliRunner().invoke(main, ["serve", "no-such-bundle"])
    assert result.exit_code == 2 and result.stderr.strip() == "kernl serve: error: no-such-bundle: no such bundle"
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "kernl.serve", raising=False)
    result = CliRunner().invoke(main, ["serve", str(bundles["classifier"])])
    assert result.exit_code == 2 and "pip install 'kernl[serve]'" in result.stderr
