"""The ASGI app: kernl.serve.app(bundle), a FastAPI app that answers the bundle's task over HTTP, batching requests.

Endpoints: POST /v1/embeddings (feature extraction, OpenAI-compatible), POST /v1/predict (classification,
masked LM), POST /v1/completions and /v1/chat/completions (generation, OpenAI-compatible, streamed as server-sent
events with stream: true; continuous batching), GET /health, GET /v1/models, GET /metrics (Prometheus).
Status codes: 400 bad parameters, 404 an unknown model or path, 413 more or longer inputs than the largest bucket,
422 a malformed body, 503 a full queue or a server shutting down, 500 anything unexpected (the server keeps
serving). The encoder endpoints are answered by kernl.serve.fast_routes in front of FastAPI's router.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from kernl.errors import KernlError
from kernl.serve.batcher import DynamicBatcher
from kernl.serve.bodies import parse_body
from kernl.serve.completions import Completions
from kernl.serve.encoder import Encoder, EncoderHandler
from kernl.serve.endpoints import Endpoint, Served, check_model, encoder_endpoints
from kernl.serve.fast_routes import FastRoutes
from kernl.serve.generation import GenerationScheduler
from kernl.serve.metrics import CONTENT_TYPE, Metrics
from kernl.serve.observe import Observe
from kernl.serve.options import ServeOptions
from kernl.serve.pooling import Pooling
from kernl.serve.responses import EXPECTED, error_response, json_response
from kernl.serve.scheduler import Dispatcher
from kernl.serve.schemas import ChatBody, CompletionBody, SamplingBody
from kernl.serve.tasks import check_masks, classify, embeddings, fill_masks, serve_task

log = logging.getLogger("kernl.serve")
ENDPOINTS = frozenset(
    {"/v1/embeddings", "/v1/predict", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
)


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


async def _answer_error(request: Request, err: Exception) -> Response:
    return error_response(err)


def _route(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """A FastAPI endpoint for endpoint: the same parsing and answer as FastRoutes gives it."""

    async def answer(request: Request) -> Response:
        body = parse_body(endpoint.model, await request.body(), request.headers.get("content-type"))
        return json_response(await endpoint.answer(body))

    return answer


def _schema(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that parses its body itself (kernl.serve.bodies)."""
    schema = {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}
    return {"requestBody": schema}


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
    hot = encoder_endpoints(served)
    if hot:  # FastRoutes answers them inside Observe (one owner of the metrics), so it is added first
        api.add_middleware(FastRoutes, endpoints=hot)
    api.add_middleware(Observe, metrics=served.metrics, endpoints=ENDPOINTS)
    for kind in (*EXPECTED, Exception):  # one handler: responses.problem words every error
        api.add_exception_handler(kind, _answer_error)

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

    for path, endpoint in hot.items():  # reached only past FastRoutes: other methods (405), the OpenAPI schema
        api.add_api_route(path, _route(endpoint), methods=["POST"], openapi_extra=_schema(endpoint.model))

    if "generate" in served.dispatcher.kinds:

        async def generate(body: SamplingBody, chat: bool) -> Response:
            check_model(served, body.model)
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
