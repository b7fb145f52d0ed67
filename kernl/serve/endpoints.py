"""What the routes share (Served), and what the encoder endpoints answer: POST /v1/embeddings and /v1/predict.

One owner of their logic for both ways a request reaches it: the fast routes in front of FastAPI
(kernl.serve.fast_routes, which answer them in a served app) and the FastAPI routes behind them (which give the
OpenAPI schema, and 405 to other methods).
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydantic import BaseModel

from kernl.errors import InputError
from kernl.serve.completions import Completions
from kernl.serve.encoder import Texts
from kernl.serve.errors import ModelNotFound
from kernl.serve.metrics import Metrics
from kernl.serve.responses import check_finite
from kernl.serve.scheduler import Dispatcher
from kernl.serve.schemas import EmbeddingsBody, PredictBody


@dataclass
class Served:
    """What the routes share: the bundle, its name and task, the dispatcher and the metrics."""

    bundle: Any
    name: str
    task: str
    dispatcher: Dispatcher
    metrics: Metrics
    created: int
    dim: int | None = None
    ready: bool = False
    completions: Completions | None = None


@dataclass(frozen=True)
class Endpoint:
    """A POST endpoint: its body's model, and answer(body) -> the response's JSON content."""

    model: type[BaseModel]
    answer: Callable[[Any], Awaitable[dict]]


def encoder_endpoints(served: Served) -> dict[str, Endpoint]:
    """path -> Endpoint, for the encoder kinds the bundle's task answers."""
    endpoints = {}
    if "embeddings" in served.dispatcher.kinds:
        endpoints["/v1/embeddings"] = Endpoint(EmbeddingsBody, partial(embeddings, served))
    if "predict" in served.dispatcher.kinds:
        endpoints["/v1/predict"] = Endpoint(PredictBody, partial(predict, served))
    return endpoints


def check_model(served: Served, model: str | None) -> None:
    if model is not None and model != served.name:
        raise ModelNotFound(f"model {model!r}: not served here (this server serves {served.name!r})")


def check_dimensions(asked: int | None, dim: int | None) -> None:
    # Only the model's own size: truncating would be right for Matryoshka-trained models alone.
    if asked is not None and dim is not None and asked != dim:
        raise InputError(f"dimensions: {asked} asked; this model's embeddings have {dim}")


async def embeddings(served: Served, body: EmbeddingsBody) -> dict:
    check_model(served, body.model)
    check_dimensions(body.dimensions, served.dim)
    answer = await served.dispatcher.submit("embeddings", Texts(body.texts(), {}))
    vectors = answer.result
    check_dimensions(body.dimensions, vectors.shape[-1])
    rows = vectors.contiguous().numpy()  # fp32 [texts, dim]; its rows serialise as they are (responses.dumps)
    if body.encoding_format == "base64":
        embedded = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in rows]
    else:
        check_finite(rows)
        embedded = list(rows)
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(embedded)]
    usage = {"prompt_tokens": answer.tokens, "total_tokens": answer.tokens}
    return {"object": "list", "data": data, "model": served.name, "usage": usage}


async def predict(served: Served, body: PredictBody) -> dict:
    check_model(served, body.model)
    answer = await served.dispatcher.submit("predict", Texts(body.texts(), {"top_k": body.top_k}))
    data = [{"object": "prediction", "index": i, **row} for i, row in enumerate(answer.result)]
    usage = {"prompt_tokens": answer.tokens, "total_tokens": answer.tokens}
    return {"object": "list", "data": data, "model": served.name, "task": served.task, "usage": usage}
