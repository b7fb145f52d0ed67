"""Tasks: which transformers Auto class loads a model, chosen from its config's architectures."""

from __future__ import annotations

from typing import Any

AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "text-generation": "AutoModelForCausalLM",
}
TASKS = ("auto", *AUTO_CLASSES)


def infer_task(architectures: list[str] | None) -> str:
    """The task of config.architectures' first entry; feature-extraction when it names none of the heads."""
    for arch in architectures or []:
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
    return "feature-extraction"


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(source: str, task: str, **kwargs: Any):
    """The model at source (a directory or a cached hub id), with the Auto class of task; no network."""
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[task])
    return auto.from_pretrained(source, local_files_only=True, **kwargs).eval()
