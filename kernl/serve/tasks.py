"""What each task answers: embeddings from token states; labels or top tokens from logits."""

from __future__ import annotations

from typing import Any

import torch

from kernl.errors import InputError
from kernl.serve.encoder import Texts
from kernl.serve.pooling import Pooling
from kernl.serve.responses import check_finite


def serve_task(manifest: dict[str, Any]) -> str:
    """The bundle's task: the manifest's "task" (kernl-compile writes it), else guessed from its model class."""
    from kernl.commands.tasks import infer_task

    task = manifest.get("task")
    if isinstance(task, str):
        return task
    return infer_task([str(manifest.get("model", ""))])


def embeddings(pooling: Pooling):
    """finish() for /v1/embeddings: one fp32 vector a text, pooled and normalised as the model's config says."""

    def finish(payload: Texts, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = outputs.get("last_hidden_state")
        if hidden is None:
            hidden = next(iter(outputs.values()))
        return pooling(hidden, inputs["attention_mask"])

    return finish


def classify(id2label: dict[str, str]):
    """finish() for a classifier's /v1/predict: each text's label, its probability, and every label's."""

    def finish(payload: Texts, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> list[dict]:
        probs = outputs["logits"].float().softmax(-1)
        check_finite(probs)
        answers = []
        for row in probs.tolist():
            order = sorted(range(len(row)), key=lambda i: -row[i])
            scores = [{"label": id2label.get(str(i), f"LABEL_{i}"), "score": row[i]} for i in order]
            answers.append({"label": scores[0]["label"], "score": scores[0]["score"], "scores": scores})
        return answers

    return finish


def check_masks(tokenizer: Any):
    """check() for a masked LM's /v1/predict: every text holds the mask token."""
    mask_id = tokenizer.mask_token_id

    def check(payload: Texts, inputs: dict[str, torch.Tensor]) -> None:
        if mask_id is None:
            raise InputError("this model's tokenizer has no mask token")
        has = (inputs["input_ids"] == mask_id).any(1).tolist()
        if not all(has):
            token = tokenizer.id_to_token(mask_id)
            raise InputError(f"input {has.index(False)}: no {token} token; put one where a word should be predicted")

    return check


def fill_masks(tokenizer: Any):
    """finish() for a masked LM's /v1/predict: the top_k tokens at each mask position of each text."""
    mask_id = tokenizer.mask_token_id

    def token(i: int) -> str:
        text = tokenizer.decode([i], skip_special_tokens=False).strip()
        return text or tokenizer.id_to_token(i) or str(i)

    def finish(payload: Texts, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> list[dict]:
        top_k = payload.options.get("top_k", 5)
        ids, logits = inputs["input_ids"], outputs["logits"]
        answers = []
        for row in range(ids.shape[0]):
            masks = []
            for pos in (ids[row] == mask_id).nonzero().flatten().tolist():
                probs = logits[row, pos].float().softmax(-1)
                values, top = probs.topk(min(top_k, probs.numel()))
                check_finite(values)
                masks.append(
                    {
                        "position": pos,
                        "tokens": [
                            {"token": token(i), "token_id": i, "score": p}
                            for p, i in zip(values.tolist(), top.tolist(), strict=True)
                        ],
                    }
                )
            answers.append({"masks": masks})
        return answers

    return finish
