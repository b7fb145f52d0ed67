"""A request's JSON body as its model (kernl.serve.schemas), with the checks and 422 errors of a FastAPI body
parameter, without FastAPI's dependency solving (a measurable part of a small request's time)."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
NOT_A_DICT = "Input should be a valid dictionary or object to extract fields from"


def is_json(content_type: str | None) -> bool:
    """Whether the body is JSON by its Content-Type (as FastAPI decides: without one, it is not)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def parse_body(model: type[M], raw: bytes, content_type: str | None) -> M:
    """raw as model, or RequestValidationError (422).

    pydantic's own JSON parser takes a well-formed body in one pass, no Python dict in between. When it refuses
    one, the body is parsed again as json.loads + model_validate, which words each error as before and still
    takes what only json.loads does (a UTF-16 body, a BOM, lone surrogates in strings)."""
    json_body = is_json(content_type)
    if json_body:
        try:
            return model.model_validate_json(raw)
        except ValidationError:
            pass  # the slow path below answers: the same model, the errors as the app has always worded them
    data = raw
    if json_body:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            error = {"type": "json_invalid", "loc": ("body", err.pos), "msg": "JSON decode error", "input": {}}
            raise RequestValidationError([{**error, "ctx": {"error": err.msg}}]) from None
        except UnicodeDecodeError as err:  # not UTF-8 (nor UTF-16/32): a malformed body too, not a server error
            error = {"type": "json_invalid", "loc": ("body", err.start), "msg": "JSON decode error", "input": {}}
            raise RequestValidationError([{**error, "ctx": {"error": err.reason}}]) from None
    if not isinstance(data, dict):
        error = {"type": "model_attributes_type", "loc": ("body",), "msg": NOT_A_DICT, "input": data}
        raise RequestValidationError([error])
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
