"""The ASGI app: kernl.serve.app(bundle), a FastAPI app that answers the bundle's task over HTTP, batching requests.

Endpoints: POST /v1/embeddings (feature extraction, OpenAI-compatible), POST /v1/predict (classification,
masked LM), POST /v1/completions and /v1/chat/completions (generation, OpenAI-compatible, streamed as server-sent
events with stream: true; continuous batching), GET /health, GET /v1/models, GET /metrics (Prometheus).
Status codes: 400 bad parameters, 404 an unknown model or path, 413 more or longer inputs than the largest bucket,
422 a malformed body, 503 a full queue or a server shutting down, 500 anything unexpected (the server keeps
serving).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from kernl.errors import InputError, KernlError
from kernl.serve.batcher import DynamicBatcher
from kernl.serve.completions import Completions
from kernl.serve.encoder import Encoder, EncoderHandler, Texts
from kernl.serve.errors import ModelNotFound, status_of
from kernl.serve.generation import GenerationScheduler
from kernl.serve.metrics import CONTENT_TYPE, Metrics
from kernl.serve.observe import Observe
from kernl.serve.options import ServeOptions
from kernl.serve.pooling import Pooling
from kernl.serve.scheduler import Dispatcher
from kernl.serve.schemas import ChatBody, CompletionBody, EmbeddingsBody, PredictBody, SamplingBody
from kernl.serve.tasks import check_masks, classify, embeddings, fill_masks, serve_task

log = logging.getLogger("kernl.serve")
ENDPOINTS = frozenset(
    {"/v1/embeddings", "/v1/predict", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
)
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}


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


def app(
    bundle: str | os.PathLike | Any,
    *,
    max_batch_delay_ms: float = 5.0,
    max_queue: int = 1024,
    max_batch: int | None = None,
    model_name: str | None = None,
    device: str | None = None,
    trusted_keys: list[str | os.PathLike] | None = None,
    chat_template: str | None = None,
    idle_dispatch: bool = True,
) -> FastAPI:
    """A FastAPI app serving bundle (a path, loaded here with kernl.load(path, device, trusted_keys=...), or a
    loaded kernl Bundle). Serve it with any ASGI server; its lifespan starts the batcher and drains it on
    shutdown. See ServeOptions for the batching options (for a generation bundle, max_batch caps the rows
    generating at once)."""
    options = ServeOptions(max_batch_delay_ms, max_queue, max_batch, model_name, chat_template, idle_dispatch)
    loaded, name = _load(bundle, device, trusted_keys)
    served = _serve(loaded, options.model_name or name, options)
    return _routes(served)


def _load(bundle: Any, device: str | None, trusted_keys: list | None) -> tuple[Any, str]:
    if isinstance(bundle, str | os.PathLike):
        import kernl

        path = Path(bundle)
        loaded = kernl.load(path, device=device, trusted_keys=list(trusted_keys) if trusted_keys else None)
        return loaded, path.name.removesuffix(".kernl")
    if not callable(bundle) or not hasattr(bundle, "manifest"):
        raise KernlError(f"bundle: expected a path or a loaded kernl Bundle, got {type(bundle).__name__}")
    return bundle, str(bundle.manifest.get("model") or "kernl")


def _serve(bundle: Any, name: str, options: ServeOptions) -> Served:
    manifest = bundle.manifest
    task = serve_task(manifest)
    tok = bundle.tokenizer
    if tok is None:
        raise KernlError("the bundle has no tokenizer/tokenizer.json: a server takes texts (compile it with one)")
    if "generation" in manifest:
        return _serve_generation(bundle, name, task, options)
    pooling = Pooling.from_manifest(manifest)
    skipped = (manifest.get("sentence_transformers") or {}).get("skipped")
    if task == "feature-extraction" and skipped:
        log.warning("kernl serve: the model's sentence-transformers modules %s are not run", ", ".join(skipped))
    encoder = Encoder(bundle, tok, max_seq=pooling.max_seq_length, max_rows=options.max_batch)
    handlers: dict[str, EncoderHandler] = {}
    if task == "feature-extraction":
        handlers["embeddings"] = EncoderHandler(encoder, embeddings(pooling))
    elif task == "sequence-classification":
        handlers["predict"] = EncoderHandler(encoder, classify(manifest.get("id2label") or {}))
    elif task == "masked-lm":
        handlers["predict"] = EncoderHandler(encoder, fill_masks(tok), check_masks(tok))
    if not handlers:
        log.warning("kernl serve: no endpoint answers task %s yet; only /health, /v1/models and /metrics", task)
    metrics = Metrics(encoder.max_rows)
    schedulers = []
    if handlers:
        schedulers.append(
            DynamicBatcher(
                handlers,
                bundle.buckets,
                max_rows=encoder.max_rows,
                max_queue=options.max_queue,
                max_delay_ms=options.max_batch_delay_ms,
                observer=metrics,
                idle_dispatch=options.idle_dispatch,
            )
        )
    dim = _embedding_dim(manifest, pooling)
    return Served(bundle, name, task, Dispatcher(schedulers), metrics, int(time.time()), dim)


def _serve_generation(bundle: Any, name: str, task: str, options: ServeOptions) -> Served:
    """A generation bundle: completions and chat completions through continuous batching."""
    scheduler = GenerationScheduler(bundle, bundle.tokenizer, max_queue=options.max_queue, max_rows=options.max_batch)
    metrics = Metrics(scheduler.max_rows)
    scheduler.metrics = metrics.generation
    completions = Completions(bundle.tokenizer, scheduler.generator.settings, name, options.chat_template)
    served = Served(bundle, name, task, Dispatcher([scheduler]), metrics, int(time.time()))
    served.completions = completions
    return served


def _error(status: int, message: str) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    headers = {"Retry-After": "1"} if status == 503 else None
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _is_json(content_type: str | None) -> bool:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body as model, as a FastAPI body parameter gives it (the same checks and 422 errors) without
    FastAPI's dependency solving, a measurable part of a small request's time."""
    data = raw = await request.body()
    if _is_json(request.headers.get("content-type")):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            error = {"type": "json_invalid", "loc": ("body", err.pos), "msg": "JSON decode error", "input": {}}
            raise RequestValidationError([{**error, "ctx": {"error": err.msg}}]) from None
    if not isinstance(data, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",), "msg": msg, "input": data}])
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _schema(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that parses its body itself (_body)."""
    schema = {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}
    return {"requestBody": schema}


def _check_model(served: Served, model: str | None) -> None:
    if model is not None and model != served.name:
        raise ModelNotFound(f"model {model!r}: not served here (this server serves {served.name!r})")


def _check_dimensions(asked: int | None, dim: int | None) -> None:
    # Only the model's own size: truncating would be right for Matryoshka-trained models alone.
    if asked is not None and dim is not None and asked != dim:
        raise InputError(f"dimensions: {asked} asked; this model's embeddings have {dim}")


def _embedding_dim(manifest: dict[str, Any], pooling: Pooling) -> int | None:
    for out in manifest.get("outputs") or []:
        dims = out.get("dims") or []
        if out.get("name") == "last_hidden_state" and dims and isinstance(dims[-1], int):
            return dims[-1] * len(pooling.modes)
    return None


def _routes(served: Served) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await served.dispatcher.start()
        served.ready = True
        try:
            yield
        finally:
            served.ready = False
            await served.dispatcher.drain()  # every queued request is answered before the process exits

    api = FastAPI(title=f"kernl: {served.name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    api.state.kernl = served
    api.add_middleware(Observe, metrics=served.metrics, endpoints=ENDPOINTS)

    @api.exception_handler(KernlError)
    async def kernl_error(request: Request, err: KernlError) -> JSONResponse:
        return _error(status_of(err), str(err))

    @api.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in err.errors()
        )
        return _error(422, problems or "malformed request body")

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @api.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(err).__name__}: {err}")

    @api.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if served.ready else "unavailable",
            "model": served.name,
            "task": served.task,
            "replica": f"{socket.gethostname()}:{os.getpid()}",
        }
        return JSONResponse(body, status_code=200 if served.ready else 503)

    @api.get("/v1/models")
    async def models() -> dict:
        model = {
            "id": served.name,
            "object": "model",
            "created": served.created,
            "owned_by": "kernl",
            "task": served.task,
            "buckets": [list(b) for b in served.bundle.buckets],
            "device": str(served.bundle.device),
        }
        if served.completions is not None:
            model["max_model_len"] = served.completions.settings.max_length
        return {"object": "list", "data": [model]}

    @api.get("/metrics")
    async def metrics() -> Response:
        served.metrics.queued(served.dispatcher.queue_length())
        served.metrics.generation.refresh()
        return Response(served.metrics.text(), media_type=CONTENT_TYPE)

    if "embeddings" in served.dispatcher.kinds:

        @api.post("/v1/embeddings", openapi_extra=_schema(EmbeddingsBody))
        async def create_embeddings(request: Request) -> JSONResponse:
            body = await _body(request, EmbeddingsBody)
            _check_model(served, body.model)
            _check_dimensions(body.dimensions, served.dim)
            answer = await served.dispatcher.submit("embeddings", Texts(body.texts(), {}))
            vectors = answer.result
            _check_dimensions(body.dimensions, vectors.shape[-1])
            if body.encoding_format == "base64":
                rows = [base64.b64encode(v.contiguous().numpy().astype("<f4").tobytes()).decode() for v in vectors]
            else:
                rows = vectors.tolist()
            data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
            usage = {"prompt_tokens": answer.tokens, "total_tokens": answer.tokens}
            return JSONResponse({"object": "list", "data": data, "model": served.name, "usage": usage})

    if "predict" in served.dispatcher.kinds:

        @api.post("/v1/predict", openapi_extra=_schema(PredictBody))
        async def predict(request: Request) -> JSONResponse:
            body = await _body(request, PredictBody)
            _check_model(served, body.model)
            answer = await served.dispatcher.submit("predict", Texts(body.texts(), {"top_k": body.top_k}))
            data = [{"object": "prediction", "index": i, **row} for i, row in enumerate(answer.result)]
            usage = {"prompt_tokens": answer.tokens, "total_tokens": answer.tokens}
            return JSONResponse(
                {"object": "list", "data": data, "model": served.name, "task": served.task, "usage": usage}
            )

    if "generate" in served.dispatcher.kinds:

        async def generate(body: SamplingBody, chat: bool) -> Response:
            _check_model(served, body.model)
            make = served.completions.chat_job if chat else served.completions.completion_job
            job = await asyncio.to_thread(make, body)  # tokenizing and rendering the template: off the loop
            stream = await served.dispatcher.submit("generate", job)
            if body.stream:
                events = served.completions.events(stream, body, chat)
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            return JSONResponse(await served.completions.respond(stream, body, chat))

        @api.post("/v1/completions")
        async def completions(body: CompletionBody) -> Response:
            return await generate(body, chat=False)

        @api.post("/v1/chat/completions")
        async def chat_completions(body: ChatBody) -> Response:
            return await generate(body, chat=True)

    return api
