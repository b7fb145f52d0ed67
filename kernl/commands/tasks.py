"""Tasks: which transformers Auto class loads a model, chosen from its config's architectures."""

from __future__ import annotations

from typing import Any

AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "text-generation": "AutoModelForCausalLM",
    "automatic-speech-recognition": "AutoModelForSpeechSeq2Seq",
    "text2text-generation": "AutoModelForSeq2SeqLM",
}
TASKS = ("auto", *AUTO_CLASSES)
SPEECH_TASK, TEXT2TEXT_TASK = "automatic-speech-recognition", "text2text-generation"
SEQ2SEQ_TASKS = (SPEECH_TASK, TEXT2TEXT_TASK)  # encoder-decoder generation bundles


def infer_task(architectures: list[str] | None, config: Any = None) -> str:
    """The task of config.architectures' first entry; feature-extraction when it names none of the heads.
    With the config: an encoder-decoder's ...ForConditionalGeneration generates, from audio features when its
    encoder reads mel bins (Whisper), else from text (T5, BART)."""
    for arch in architectures or []:
        if arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
            return SPEECH_TASK if isinstance(getattr(config, "num_mel_bins", None), int) else TEXT2TEXT_TASK
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
