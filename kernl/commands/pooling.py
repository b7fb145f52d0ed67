"""The sentence-transformers config beside a model (modules.json, the Pooling module's config), for the manifest.

kernl serve pools and normalises embeddings as this entry says (kernl.serve.pooling); compile records it as
metadata={"sentence_transformers": sentence_transformers_config(source)} when the model folder has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# modules.json names module classes by their import path, which moved between sentence-transformers versions.
POOLING, NORMALIZE, TRANSFORMER = "Pooling", "Normalize", "Transformer"
# Older configs turn modes on with these flags, in the order sentence-transformers concatenates them; newer
# ones name them in "pooling_mode" (a string or a list).
MODE_FLAGS = (
    ("cls", "pooling_mode_cls_token"),
    ("max", "pooling_mode_max_tokens"),
    ("mean", "pooling_mode_mean_tokens"),
    ("mean_sqrt_len_tokens", "pooling_mode_mean_sqrt_len_tokens"),
    ("weightedmean", "pooling_mode_weightedmean_tokens"),
    ("lasttoken", "pooling_mode_lasttoken"),
)


def _model_dir(source: str | Path) -> Path | None:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:  # a hub id: its snapshot in the local cache, never a download
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True))
    except Exception:
        return None


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def sentence_transformers_config(source: str | Path) -> dict[str, Any] | None:
    """{"pooling": [modes], "normalize": bool, "max_seq_length": int | None, "skipped": [module types]} from the
    model's sentence-transformers files, or None when it has none (or its pooling cannot be read).

    skipped lists modules kernl does not run (a Dense projection, ...): embeddings then differ from
    sentence-transformers', and kernl serve says so when it starts."""
    root = _model_dir(source)
    modules = _read(root / "modules.json") if root else None
    if not isinstance(modules, list):
        return None
    pooling = normalize = None
    skipped = []
    for module in modules:
        kind = str(module.get("type") if isinstance(module, dict) else None)
        name = kind.rsplit(".", 1)[-1]
        if name == POOLING:
            pooling = _read(root / str(module.get("path", "")) / "config.json")
        elif name == NORMALIZE:
            normalize = True
        elif name != TRANSFORMER:
            skipped.append(kind)
    if not isinstance(pooling, dict):
        return None
    named = pooling.get("pooling_mode")
    modes = [named] if isinstance(named, str) else list(named) if isinstance(named, list) else []
    modes = modes or [name for name, flag in MODE_FLAGS if pooling.get(flag)] or ["mean"]
    st_config = _read(root / "sentence_bert_config.json") or {}
    limit = st_config.get("max_seq_length") if isinstance(st_config, dict) else None
    return {
        "pooling": modes,
        "normalize": bool(normalize),
        "max_seq_length": limit if isinstance(limit, int) else None,
        "skipped": skipped,
    }
