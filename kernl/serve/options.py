"""What `kernl serve` and kernl.serve.app take beside the bundle."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeOptions:
    """max_batch_delay_ms: how long the first request of a batch waits for others to join it.
    max_queue: requests waiting (not yet in a running bundle call) before new ones get 503.
    max_batch: most rows in one bundle call (default: the largest bucket's batch).
    model_name: the id /v1/models lists and requests may name (default: the bundle folder's name).
    chat_template: a Jinja chat template for /v1/chat/completions, instead of the tokenizer config's.
    idle_dispatch: a lone request on an idle server runs at once (False: it waits out max_batch_delay_ms too)."""

    max_batch_delay_ms: float = 5.0
    max_queue: int = 1024
    max_batch: int | None = None
    model_name: str | None = None
    chat_template: str | None = None
    idle_dispatch: bool = True

    def __post_init__(self) -> None:
        from kernl.errors import InputError

        if not 0 <= self.max_batch_delay_ms <= 60_000:
            raise InputError(f"max_batch_delay_ms: expected 0 to 60000, got {self.max_batch_delay_ms}")
        if self.max_queue < 1:
            raise InputError(f"max_queue: expected at least 1, got {self.max_queue}")
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError(f"max_batch: expected at least 1, got {self.max_batch}")
