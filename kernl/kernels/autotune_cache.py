"""kernl's own autotuner: chosen kernel configs are data, so a bundle stores them and loading never benchmarks.

A decision is keyed by (kernel name, key); the key holds whatever changes the best config, e.g.
dtype, M bucketed to a power of two (`bucket_m`), N, K and flags. `tune` times the candidates once
per key with `triton.testing.do_bench`, on CUDA only; elsewhere it takes the first candidate
untimed. `export` / `load` move the decisions in and out of a bundle as JSON-ready dicts.

A kernel that streams its operands (a decode-step linear reading its weight once) is timed as a decode step
runs it, when its launcher passes `Streamed`: a CUDA graph of back-to-back calls over copies of those operands,
more bytes than L2 holds. Timed alone, such a kernel's launch and ramp-up dominate, and the pick was up to 2.7x
slower inside a step than the best candidate (benchmarks/decode_linears.py).

Decisions and the frozen flag belong to a `Tuner`. The module-level functions act on the current
one: the tuner a `use(tuner)` block made current in this context (a compile session, a loaded
bundle while its program runs), else the process default. So a bundle's frozen decisions apply
only inside its own scope, and a compile after a load in the same process still tunes.

Frozen mode (what a loaded bundle runs under): a key with no decision gets the heuristic default,
the first candidate, without benchmarking and without being recorded; it is counted in
`stats()["defaults_used"]`. A bundle never stalls on a shape it was not warmed for, it only runs a
sane untuned config. `stats()["benchmarks_run"]` counts candidate timings, so tests can prove that
none happened; `process_stats()` sums every tuner of the process, scoped or not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

import torch

Config = dict[str, int]
FORMAT_VERSION = 1

_STAT_NAMES = ("hits", "tunings", "benchmarks_run", "failed_candidates", "untimed_picks", "defaults_used", "reused")
_totals = dict.fromkeys(_STAT_NAMES, 0)
# Winners timed in this process by tuners created with reuse=True (compiles), with the candidates they were
# chosen from: another such tuner asked the same question takes the answer instead of timing it again
# (compiling two models that share shapes).
_measured: dict[tuple[str, tuple], tuple[list[Config], Config]] = {}


def bucket_m(m: int) -> int:
    """M rounded up to a power of two: one decision covers a range of batch x sequence sizes."""
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as it appears in keys: "float16", not "torch.float16"."""
    return str(dtype).removeprefix("torch.")


def _normalise_key(key: Sequence[Hashable]) -> tuple:
    """A key as JSON-ready scalars: dtypes become their names, lists (from JSON) become tuples."""
    parts = []
    for part in key:
        if isinstance(part, torch.dtype):
            part = dtype_name(part)
        elif not (part is None or isinstance(part, bool | int | float | str)):
            raise ValueError(f"key: {part!r} is not a dtype, None, bool, int, float or str")
        parts.append(part)
    return tuple(parts)


def _time_ms(fn: Callable[[], object]) -> float:
    """Median time of fn in ms; a short budget, since every config of every key is timed once."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median")


# Linears of at most this many rows (M bucket) stream their weights, as decode steps do: timed with Streamed.
STREAMED_M = 16
# A streamed timing rotates through copies of the operands totalling this many bytes (several times an H100's or
# H200's L2), in at most MAX_STREAM_CALLS calls a graph.
STREAM_BYTES = 256 * 2**20
MAX_STREAM_CALLS = 128


@dataclass(frozen=True)
class Streamed:
    """The operands a kernel streams from memory (weights), and run(config, operands) launching it on them."""

    operands: tuple[torch.Tensor, ...]
    run: Callable[[Config, tuple[torch.Tensor, ...]], object]


def stream_timer(streamed: Streamed) -> Callable[[Config], float]:
    """ms per call of a config inside a CUDA graph of back-to-back calls, each over its own copy of the operands.

    The copies live as long as the returned function. Each config is run once outside the graph first (compile,
    allocate; a config that cannot run raises there, not inside the capture).
    """
    per_call = sum(t.numel() * t.element_size() for t in streamed.operands)
    calls = min(MAX_STREAM_CALLS, max(2, math.ceil(STREAM_BYTES / max(per_call, 1))))
    sets = [streamed.operands] + [tuple(t.clone() for t in streamed.operands) for _ in range(calls - 1)]

    def time_ms(config: Config) -> float:
        def chain() -> None:
            for operands in sets:
                streamed.run(config, operands)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            chain()
        return _time_ms(graph.replay) / calls

    return time_ms


def pinned(kernel_name: str, key: Sequence[Hashable], config: Config) -> Tuner:
    """A frozen tuner holding one decision: under use() it runs kernel_name at key with config (one candidate)."""
    tuner = Tuner(frozen=True)
    tuner.decisions[(kernel_name, _normalise_key(key))] = dict(config)
    return tuner


def _capturing() -> bool:
    # Benchmark launches inside a CUDA graph capture would be recorded into the graph.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Tuner:
    """One set of autotune decisions, its frozen flag and its counters.

    frozen: missing keys get the first candidate, untimed and unrecorded (a loaded bundle).
    reuse: take a decision benchmarked earlier in this process before timing anything (a compile).
    aside: a context the candidates are timed in (a compile keeps the kernels of losing configs out of its bundle).
    """

    def __init__(
        self,
        *,
        frozen: bool = False,
        reuse: bool = False,
        aside: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self.decisions: dict[tuple[str, tuple], Config] = {}
        self.frozen = bool(frozen)
        self.reuse = bool(reuse)
        self.aside = aside or nullcontext
        self._stats = dict.fromkeys(_STAT_NAMES, 0)

    def __repr__(self) -> str:
        return f"<kernl Tuner: {len(self.decisions)} decisions{', frozen' if self.frozen else ''}>"

    def _count(self, name: str) -> None:
        self._stats[name] += 1
        _totals[name] += 1

    def lookup(self, kernel_name: str, key: Sequence[Hashable]) -> Config | None:
        """The stored decision for this kernel and key, or None."""
        return self.decisions.get((kernel_name, _normalise_key(key)))

    def tune(
        self,
        kernel_name: str,
        key: Sequence[Hashable],
        candidates: Sequence[Config],
        run_fn: Callable[[Config], object],
        *,
        benchmark: bool = True,
        streamed: Streamed | None = None,
    ) -> Config:
        """See the module-level tune()."""
        # Hot path, once per kernel launch: launchers pass keys of plain scalars, already normalised.
        decided = self.decisions.get((kernel_name, key if type(key) is tuple else tuple(key)))
        if decided is None:
            full_key = (kernel_name, _normalise_key(key))
            decided = self.decisions.get(full_key)
        if decided is not None:
            self._count("hits")
            return decided
        if not candidates:
            raise ValueError(f"candidates: no config to choose from for {kernel_name} {full_key[1]}")
        if self.frozen or _capturing():
            # Never benchmark here; do not record either, so export() holds only real decisions.
            self._count("defaults_used")
            return candidates[0]
        if not benchmark:
            # CPU or interpreter: timings mean nothing, the first candidate is as good as any.
            self._count("untimed_picks")
            self.decisions[full_key] = dict(candidates[0])
            return self.decisions[full_key]
        measured = _measured.get(full_key) if self.reuse else None
        if measured is not None and measured[0] == list(candidates):
            self._count("reused")
            self.decisions[full_key] = dict(measured[1])
            return self.decisions[full_key]
        best, best_ms, error = None, math.inf, None
        with self.aside():
            timer = None
            if streamed is not None:
                try:
                    timer = stream_timer(streamed)
                except torch.OutOfMemoryError:  # no room for the copies: time each candidate alone
                    pass
            for config in candidates:
                self._count("benchmarks_run")
                try:
                    ms = timer(config) if timer is not None else _time_ms(lambda config=config: run_fn(config))
                except Exception as e:  # e.g. a config this GPU lacks shared memory or registers for: it loses
                    self._count("failed_candidates")
                    error = e
                    continue
                if ms < best_ms:
                    best, best_ms = config, ms
        if best is None:
            raise RuntimeError(f"{kernel_name}: no candidate config ran for key {full_key[1]}") from error
        self._count("tunings")
        self.decisions[full_key] = dict(best)
        if self.reuse:
            _measured[full_key] = ([dict(c) for c in candidates], dict(best))
        return self.decisions[full_key]

    def export(self) -> dict:
        """Every decision as a JSON-serialisable dict, in a stable order (for the bundle's kernels/ folder)."""
        entries = [
            {"kernel": name, "key": list(key), "config": dict(config)}
            for (name, key), config in sorted(self.decisions.items(), key=repr)
        ]
        return {"version": FORMAT_VERSION, "entries": entries}

    def load(self, data: dict) -> int:
        """Add the decisions of an export() (replacing any with the same key); returns how many were loaded."""
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise ValueError(f"data: expected an autotune export of version {FORMAT_VERSION}, got version {version!r}")
        entries = data.get("entries", [])
        if not isinstance(entries, list):
            raise ValueError("data: entries is not a list")
        loaded = {}
        for entry in entries:
            try:
                name, key, config = entry["kernel"], entry["key"], entry["config"]
                if not isinstance(name, str) or not isinstance(key, list):
                    raise TypeError(entry)
                loaded[(name, _normalise_key(key))] = {str(k): int(v) for k, v in config.items()}
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise ValueError(f"data: malformed autotune entry {entry!r}") from e
        self.decisions.update(loaded)
        return len(loaded)

    def clear(self) -> None:
        """Forget every decision (the statistics stay; see reset_stats)."""
        self.decisions.clear()

    def stats(self) -> dict[str, int]:
        """Counters since the last reset_stats(): hits, tunings, benchmarks_run, defaults_used, ..."""
        return dict(self._stats)

    def reset_stats(self) -> None:
        self._stats.update(dict.fromkeys(_STAT_NAMES, 0))


_default = Tuner()
_current: ContextVar[Tuner | None] = ContextVar("kernl_tuner", default=None)


def current() -> Tuner:
    """The tuner kernels consult here: the innermost use() block's, else the process default."""
    tuner = _current.get()
    return _default if tuner is None else tuner


@contextmanager
def use(tuner: Tuner) -> Iterator[Tuner]:
    """Make tuner the current one in this context (this thread, this task) for the block."""
    token = _current.set(tuner)
    try:
        yield tuner
    finally:
        _current.reset(token)


def lookup(kernel_name: str, key: Sequence[Hashable]) -> Config | None:
    """The current tuner's decision for this kernel and key, or None."""
    return current().lookup(kernel_name, key)


def tune(
    kernel_name: str,
    key: Sequence[Hashable],
    candidates: Sequence[Config],
    run_fn: Callable[[Config], object],
    *,
    benchmark: bool = True,
    streamed: Streamed | None = None,
) -> Config:
    """The config to run `kernel_name` with for `key`, deciding (and recording) it on first use.

    candidates: configs in order of preference; the first is the default wherever nothing is timed.
    run_fn(config): launches the kernel once with that config; it must be safe to call repeatedly.
    benchmark: time the candidates (pass `tensor.is_cuda`); False picks the first one untimed.
    streamed: time the candidates in a graph over copies of these operands (stream_timer) instead of alone.
    """
    tuner = _current.get()
    chosen = (_default if tuner is None else tuner).tune
    return chosen(kernel_name, key, candidates, run_fn, benchmark=benchmark, streamed=streamed)


def export() -> dict:
    """The current tuner's decisions as a JSON-serialisable dict."""
    return current().export()


def load(data: dict) -> int:
    """Add the decisions of an export() to the current tuner; returns how many were loaded."""
    return current().load(data)


def clear() -> None:
    """Forget the current tuner's decisions (the statistics stay; see reset_stats)."""
    current().clear()


def set_frozen(frozen: bool) -> None:
    """Frozen: missing keys get the first candidate, untimed and unrecorded, instead of a benchmark."""
    current().frozen = bool(frozen)


def is_frozen() -> bool:
    return current().frozen


def stats() -> dict[str, int]:
    """The current tuner's counters since its last reset_stats()."""
    return current().stats()


def reset_stats() -> None:
    current().reset_stats()


def process_stats() -> dict[str, int]:
    """Counters summed over every tuner of this process since it started (never reset)."""
    return dict(_totals)
