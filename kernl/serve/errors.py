"""The errors a request can get, each with the HTTP status it answers; all of them are kernl errors."""

from __future__ import annotations

from kernl.errors import InputError, KernlError


class ModelNotFound(InputError):
    """The request names a model this server does not serve (404)."""

    status = 404


class TooLarge(InputError):
    """More inputs, or longer ones, than the bundle's largest bucket takes (413)."""

    status = 413


class Unavailable(KernlError):
    """The queue is full, or the server is shutting down (503): retry later or elsewhere."""

    status = 503


def status_of(err: BaseException) -> int:
    """The HTTP status an error answers: its own, 400 for other bad input, 500 for anything unexpected."""
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return status
    return 400 if isinstance(err, KernlError) else 500
