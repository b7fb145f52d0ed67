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
