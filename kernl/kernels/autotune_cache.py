"""kernl's own autotuner: chosen kernel configs are data, so a bundle stores them and loading never benchmarks.

A decision is keyed by (kernel name, key); the key holds whatever changes the best config, e.g.
dtype, M bucketed to a power of two (`bucket_m`), N, K and flags. `tune` times the candidates once
per key with `triton.testing.do_bench`, on CUDA only; elsewhere it takes the first candidate
untimed. `export` / `load` move the decisions in and out of a bundle as JSON-ready dicts.

Frozen mode (`set_frozen(True)`, what a loaded bundle runs under): a key with no decision gets the
heuristic default, the first candidate, without benchmarking and without being recorded; it is
counted in `stats()["defaults_used"]`. A bundle never stalls on a shape it was not warmed for, it
only runs a sane untuned config. `stats()["benchmarks_run"]` counts candidate timings, so tests can
prove that none happened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import torch

Config = dict[str, int]
FORMAT_VERSION = 1

_decisions: dict[tuple[str, tuple], Config] = {}
_frozen = False
_STAT_NAMES = ("hits", "tunings", "benchmarks_run", "failed_candidates", "untimed_picks", "defaults_used")
_stats = dict.fromkeys(_STAT_NAMES, 0)


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


def lookup(kernel_name: str, key: Sequence[Hashable]) -> Config | None:
    """The stored decision for this kernel and key, or None."""
    return _decisions.get((kernel_name, _normalise_key(key)))


def _time_ms(fn: Callable[[], object]) -> float:
    """Median time of fn in ms; a short budget, since every config of every key is timed once."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def _capturing() -> bool:
    # Benchmark launches inside a CUDA graph capture would be recorded into the graph.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tune(
    kernel_name: str,
    key: Sequence[Hashable],
    candidates: Sequence[Config],
    run_fn: Callable[[Config], object],
    *,
    benchmark: bool = True,
) -> Config:
    """The config to run `kernel_name` with for `key`, deciding (and recording) it on first use.

    candidates: configs in order of preference; the first is the default wherever nothing is timed.
    run_fn(config): launches the kernel once with that config; it must be safe to call repeatedly.
    benchmark: time the candidates (pass `tensor.is_cuda`); False picks the first one untimed.
    """
    # Hot path, once per kernel launch: launchers pass keys of plain scalars, already normalised.
    decided = _decisions.get((kernel_name, key if type(key) is tuple else tuple(key)))
    if decided is None:
        full_key = (kernel_name, _normalise_key(key))
        decided = _decisions.get(full_key)
    if decided is not None:
        _stats["hits"] += 1
        return decided
    if not candidates:
        raise ValueError(f"candidates: no config to choose from for {kernel_name} {full_key[1]}")
    if _frozen or _capturing():
        # Never benchmark here; do not record either, so export() holds only real decisions.
        _stats["defaults_used"] += 1
        return candidates[0]
    if not benchmark:
        # CPU or interpreter: timings mean nothing, the first candidate is as good as any.
        _stats["untimed_picks"] += 1
        _decisions[full_key] = dict(candidates[0])
        return _decisions[full_key]
    best, best_ms, error = None, math.inf, None
    for config in candidates:
        _stats["benchmarks_run"] += 1
        try:
            ms = _time_ms(lambda config=config: run_fn(config))
        except Exception as e:  # e.g. a config this GPU lacks shared memory or registers for: it loses
            _stats["failed_candidates"] += 1
            error = e
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError(f"{kernel_name}: no candidate config ran for key {full_key[1]}") from error
    _stats["tunings"] += 1
    _decisions[full_key] = dict(best)
    return _decisions[full_key]


def export() -> dict:
    """Every decision as a JSON-serialisable dict, in a stable order (for the bundle's kernels/ folder)."""
    entries = [
        {"kernel": name, "key": list(key), "config": dict(config)}
        for (name, key), config in sorted(_decisions.items(), key=repr)
    ]
    return {"version": FORMAT_VERSION, "entries": entries}


def load(data: dict) -> int:
    """Add the decisions of an export() (replacing any with the same key); returns how many were loaded."""
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise ValueError(f"data: expected an autotune export of version {FORMAT_VERSION}, got version {version!r}")
    loaded = {}
    for entry in data.get("entries", []):
        try:
            name, key, config = entry["kernel"], entry["key"], entry["config"]
            loaded[(str(name), _normalise_key(key))] = {str(k): int(v) for k, v in config.items()}
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"data: malformed autotune entry {entry!r}") from e
    _decisions.update(loaded)
    return len(loaded)


def clear() -> None:
    """Forget every decision (the statistics stay; see reset_stats)."""
    _decisions.clear()


def set_frozen(frozen: bool) -> None:
    """Frozen: missing keys get the first candidate, untimed and unrecorded, instead of a benchmark."""
    global _frozen
    _frozen = bool(frozen)


def is_frozen() -> bool:
    return _frozen


def stats() -> dict[str, int]:
    """Counters since the last reset_stats(): hits, tunings, benchmarks_run, defaults_used, ..."""
    return dict(_stats)


def reset_stats() -> None:
    _stats.update(dict.fromkeys(_STAT_NAMES, 0))
