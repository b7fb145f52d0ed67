"""JSON responses: bodies through orjson (json when it is missing), and the error body every failed request gets.

One owner for both the FastAPI routes (their exception handlers) and the fast routes (kernl.serve.fast_routes).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from kernl.errors import KernlError
from kernl.serve.errors import status_of

try:
    import orjson
except ImportError:  # the serve extra installs it; without it responses are only slower
    orjson = None

ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}
# The errors a request answers with its own status (the app's exception handlers); anything else is a 500.
EXPECTED = (KernlError, RequestValidationError, HTTPException)
NOT_FINITE = "Out of range float values are not JSON compliant"


def dumps(content: Any) -> bytes:
    """content as compact UTF-8 JSON. numpy arrays become lists: float32 ones in float32's shortest round-trip
    form (orjson), so each number parses back to the exact float32 the model gave."""
    if orjson is not None:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_plain).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def check_finite(values: Any) -> None:
    """Raise (a 500) on NaN or infinities, as json.dumps(allow_nan=False) did: orjson would write them as null,
    which no OpenAI client expects."""
    values = np.asarray(values)
    finite = np.isfinite(values)
    if not finite.all():
        raise ValueError(f"{NOT_FINITE}: {values[~finite].flat[0].item()!r}")  # json's words, for the same 500


def problem(err: BaseException) -> tuple[int, str]:
    """The status and message a request's error answers with."""
    if isinstance(err, RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in err.errors()
        )
        return 422, problems or "malformed request body"
    if isinstance(err, HTTPException):
        return err.status_code, str(err.detail)
    if isinstance(err, KernlError):
        return status_of(err), str(err)
    return 500, f"internal error: {type(err).__name__}: {err}"


def error_content(status: int, message: str) -> tuple[dict, dict[str, str]]:
    """The OpenAI-style error body of status, and its headers (503: retry in a second)."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    headers = {"Retry-After": "1"} if status == 503 else {}
    return {"error": {"message": message, "type": kind, "code": status}}, headers


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A Starlette response of content, encoded by dumps (for the FastAPI routes)."""
    return Response(dumps(content), status_code=status, headers=headers, media_type="application/json")


def error_response(err: BaseException) -> Response:
    """What the app's exception handlers answer."""
    status, message = problem(err)
    content, headers = error_content(status, message)
    return json_response(content, status, headers)
