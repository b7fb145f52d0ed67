"""`kernl run`'s report: embeddings, top tokens or labels, read from the bundle's outputs."""

from __future__ import annotations

from typing import Any

import torch

from kernl.commands.tokenizer import token_text
from kernl.runtime.tokenizer import BundleTokenizer


def _floats(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:+.4f}" for v in values.tolist()) + ", …]"


def _top(logits: torch.Tensor, tok: BundleTokenizer, k: int) -> str:
    probs = logits.float().softmax(-1)
    values, ids = probs.topk(min(k, probs.numel()))
    return ", ".join(f"{token_text(tok, i)!r} {p:.3f}" for p, i in zip(values.tolist(), ids.tolist()))


def embedding_lines(hidden: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Mean over the text's real tokens (as sentence-transformers pools), its norm and first dims."""
    m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
    pooled = ((hidden.float() * m).sum(0) / m.sum(0).clamp(min=1)).cpu()
    return [f"  embedding: dim {pooled.numel()}, norm {pooled.norm():.4f}, {_floats(pooled[:4])}"]


def masked_lm_lines(logits: torch.Tensor, ids: torch.Tensor, tok: BundleTokenizer, k: int) -> list[str]:
    mask_id = tok.mask_token_id
    positions = (ids == mask_id).nonzero().flatten().tolist() if mask_id is not None else []
    if not positions:
        return ["  no mask token in the text; put one in to see its predictions"]
    return [f"  mask at token {p}: {_top(logits[p], tok, k)}" for p in positions]


def classifier_lines(logits: torch.Tensor, id2label: dict[str, str]) -> list[str]:
    probs = logits.float().softmax(-1).cpu()
    best = int(probs.argmax())
    label = id2label.get(str(best), f"label {best}")
    others = ", ".join(f"{id2label.get(str(i), i)} {p:.3f}" for i, p in enumerate(probs.tolist()))
    return [f"  label: {label} ({probs[best]:.3f}; {others})"]


def report(
    texts: list[str],
    inputs: dict[str, torch.Tensor],
    outputs: dict[str, torch.Tensor],
    *,
    task: str,
    tok: BundleTokenizer,
    id2label: dict[str, Any],
    top_k: int,
) -> list[str]:
    """One block of lines a text."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    logits = outputs.get("logits")
    lines = []
    for row, text in enumerate(texts):
        length = int(mask[row].sum())
        lines.append(f"[{row}] {text!r} ({length} tokens)")
        start = len(lines)
        if "last_hidden_state" in outputs:
            lines += embedding_lines(outputs["last_hidden_state"][row, :length], mask[row, :length])
        if logits is not None and task == "masked-lm":
            lines += masked_lm_lines(logits[row, :length], ids[row, :length], tok, top_k)
        elif logits is not None and task == "causal-lm":
            lines.append(f"  next token: {_top(logits[row, length - 1], tok, top_k)}")
        elif logits is not None and task == "sequence-classification":
            lines += classifier_lines(logits[row], id2label)
        if len(lines) == start:  # no output this report knows: their shapes
            shapes = ", ".join(f"{name} {tuple(t[row].shape)}" for name, t in outputs.items())
            lines.append(f"  outputs: {shapes}")
    return lines
