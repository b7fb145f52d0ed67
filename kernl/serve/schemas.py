"""Request bodies (OpenAI-compatible where OpenAI has the endpoint); unknown fields are ignored, as OpenAI's are."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class EmbeddingsBody(BaseModel):
    """POST /v1/embeddings."""

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class PredictBody(BaseModel):
    """POST /v1/predict: labels (classifiers) or the top_k tokens at each mask (masked LMs)."""

    input: str | list[str]
    model: str | None = None
    top_k: int = Field(default=5, ge=1, le=100)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingBody(BaseModel):
    """What completions and chat completions share: sampling, stopping and streaming (OpenAI's names, and vLLM's
    top_k, repetition_penalty, ignore_eos and return_token_ids)."""

    model: str | None = None
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: int | bool | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    return_token_ids: bool = False
    user: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(SamplingBody):
    """POST /v1/completions: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict] | None = None
    name: str | None = None


class ChatBody(SamplingBody):
    """POST /v1/chat/completions: the messages, rendered with the model's chat template."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
