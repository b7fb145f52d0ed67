"""The hot endpoints without FastAPI's routing: a pure-ASGI middleware that answers POST /v1/embeddings and
/v1/predict itself, and hands every other request to the app behind it.

Issue #18's profile of a server's event loop: two thirds of it in FastAPI/Starlette's request handling (routing,
request objects, exception middleware), a quarter in json.dumps of the floats. This layer reads the body, parses it
with the endpoint's pydantic model (kernl.serve.bodies), awaits the endpoint's answer (kernl.serve.endpoints) and
sends the JSON (kernl.serve.responses) as two raw ASGI messages. It sits inside the app's middlewares (Observe's
metrics, FastAPI's error middleware and telemetry, any a user adds), so those see these requests as before;
errors answer with the same statuses and bodies as the FastAPI routes', and an unexpected one propagates to the
same 500 handler.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from kernl.serve.bodies import parse_body
from kernl.serve.endpoints import Endpoint
from kernl.serve.responses import EXPECTED, dumps, error_content, problem

JSON_HEADERS = [(b"content-type", b"application/json")]


class FastRoutes:
    """ASGI middleware: POST to one of endpoints' paths is answered here; every other request goes on to app."""

    def __init__(self, app: ASGIApp, endpoints: dict[str, Endpoint]) -> None:
        self.app = app
        self.endpoints = dict(endpoints)  # path -> Endpoint, answered on POST; other methods go on to FastAPI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.endpoints.get(get_route_path(scope))  # the path as the router would match it
            if endpoint is not None:
                await self._answer(endpoint, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        status, headers = 200, JSON_HEADERS
        try:
            body = parse_body(endpoint.model, await _read(receive), _content_type(scope))
            payload = dumps(await endpoint.answer(body))
        except EXPECTED as err:  # as the app's exception handlers answer them; anything else goes on to its 500
            status, message = problem(err)
            content, extra = error_content(status, message)
            payload = dumps(content)
            headers = JSON_HEADERS + [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        headers = [*headers, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _read(receive: Receive) -> bytes:
    """The whole request body (Starlette's Request.body(), without the Request)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _content_type(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.decode("latin-1")
    return None
