"""Token sampling on the device, written to sit inside a captured decode-step CUDA graph.

Nothing here reads a tensor back to the host: no `.item()`, no Python branch on a tensor's value, no shape
that depends on data. Every per-row setting lives in a device tensor of `SamplingParams`, so one captured
graph serves any mix of greedy and sampled rows; a new request batch copies its settings into the same
tensors (`SamplingParams.copy_`) instead of capturing again.

Order per row, as transformers' `generate` applies its processors: repetition penalty, then (sampled rows)
temperature, top-k, top-p, then a draw. The draw is the exponential race: argmax of p_i / E_i with
E_i ~ Exponential(1) picks token i with probability p_i (written in log space: logit_i - log E_i, a Gumbel
max), so it needs no `torch.multinomial` (which syncs) and its noise comes from a `torch.Generator` on the
device: a seed makes a run reproducible. Under CUDA-graph capture a non-default generator must be
registered with the graph before capture (`CUDAGraph.register_generator_state(generator)`), so that each
replay advances its offset.

Stopping: `update_done` marks rows that emitted one of their eos ids or reached max_new_tokens; a row that
was already done emits `pad_token_id` (transformers' convention: pad, defaulting to the first eos id).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from kernl.errors import InputError

__all__ = [
    "SamplingParams",
    "make_generator",
    "mark_seen",
    "sample",
    "seen_tokens",
    "update_done",
    "warped_logits",
]

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """Per-row sampling and stopping settings of a request batch, all device tensors of fixed shape.

    temperature: [rows] float32, 0 = greedy (argmax)
    top_k: [rows] int64, 0 = off
    top_p: [rows] float32, 1.0 = off
    repetition_penalty: [rows] float32, 1.0 = off
    eos_token_id: [rows, n_eos] int64, -1 pads rows with fewer eos ids
    pad_token_id: [rows] int64, emitted by a row after it is done
    max_new_tokens: [rows] int64
    all_greedy: host-side flag, True when every row is greedy (known at build time, from Python values):
        a caller may capture the cheaper `sample(..., greedy_only=True)` graph for such batches.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    eos_token_id: torch.Tensor
    pad_token_id: torch.Tensor
    max_new_tokens: torch.Tensor
    all_greedy: bool = False

    @property
    def rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls,
        rows: int,
        device: torch.device | str = "cpu",
        *,
        do_sample: bool | Sequence[bool] = True,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        repetition_penalty: float | Sequence[float] = 1.0,
        eos_token_id: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
        pad_token_id: int | Sequence[int] | None = None,
        max_new_tokens: int | Sequence[int] = 1,
        n_eos: int | None = None,
        vocab_size: int | None = None,
    ) -> SamplingParams:
        """Settings for `rows` rows from Python values: each argument is one value for every row or a list
        of one per row. `do_sample=False` makes a row greedy whatever its temperature (as in HF). eos_token_id
        is an id, a list of ids shared by every row, or a list (per row) of lists. pad_token_id defaults to
        the row's first eos id, else 0. `n_eos` fixes the width of the eos tensor (so that later batches can
        `copy_` into a captured one); `vocab_size`, when given, bounds the token ids. Bad values raise
        `kernl.InputError` naming the argument."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise InputError(f"rows must be a positive int, got {rows!r}")
        sample_rows = [bool(v) for v in _per_row("do_sample", do_sample, rows, (bool,))]
        temps = _per_row("temperature", temperature, rows, (int, float))
        ks = _per_row("top_k", top_k, rows, (int,))
        ps = _per_row("top_p", top_p, rows, (int, float))
        penalties = _per_row("repetition_penalty", repetition_penalty, rows, (int, float))
        limits = _per_row("max_new_tokens", max_new_tokens, rows, (int,))
        for t in temps:
            if not math.isfinite(t) or t < 0:
                raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        for k in ks:
            if k < 0:
                raise InputError(f"top_k must be >= 0 (0 = off), got {k!r}")
        for p in ps:
            if not (0 < p <= 1):  # also rejects nan
                raise InputError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        for r in penalties:
            if not (math.isfinite(r) and r > 0):
                raise InputError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")
        for m in limits:
            if m < 1:
                raise InputError(f"max_new_tokens must be >= 1, got {m!r}")
        eos = _eos_rows(eos_token_id, rows, vocab_size)
        width = max([len(e) for e in eos] + [1])
        if n_eos is not None:
            if width > n_eos:
                raise InputError(f"eos_token_id: a row has {width} eos ids, more than n_eos={n_eos}")
            width = n_eos
        if pad_token_id is None:
            pads = [e[0] if e else 0 for e in eos]
        else:
            pads = _per_row("pad_token_id", pad_token_id, rows, (int,))
            for pad in pads:
                _check_id("pad_token_id", pad, vocab_size)
        if vocab_size is not None:
            for k in ks:
                if k > vocab_size:
                    raise InputError(f"top_k must be <= the vocabulary size {vocab_size}, got {k}")
        temps = [t if s else 0.0 for t, s in zip(temps, sample_rows, strict=True)]
        dev = torch.device(device)
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=dev),
            top_k=torch.tensor(ks, dtype=torch.int64, device=dev),
            top_p=torch.tensor(ps, dtype=torch.float32, device=dev),
            repetition_penalty=torch.tensor(penalties, dtype=torch.float32, device=dev),
            eos_token_id=torch.tensor([e + [-1] * (width - len(e)) for e in eos], dtype=torch.int64, device=dev),
            pad_token_id=torch.tensor(pads, dtype=torch.int64, device=dev),
            max_new_tokens=torch.tensor(limits, dtype=torch.int64, device=dev),
            all_greedy=all(t == 0 for t in temps),
        )

    def head(self, rows: int) -> SamplingParams:
        """The first rows' settings, as views of these tensors (what a step over those rows reads)."""
        views = {f.name: getattr(self, f.name)[:rows] for f in fields(self) if f.name != "all_greedy"}
        return SamplingParams(**views, all_greedy=self.all_greedy)

    def copy_(self, other: SamplingParams) -> SamplingParams:
        """Copy another batch's settings into these tensors in place (the ones a captured graph reads)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, torch.Tensor):
                if mine.shape != theirs.shape:
                    raise InputError(f"{f.name}: shape {tuple(theirs.shape)} differs from {tuple(mine.shape)}")
                mine.copy_(theirs, non_blocking=True)
        self.all_greedy = other.all_greedy
        return self


def _per_row(name: str, value, rows: int, types: tuple[type, ...]) -> list:
    """One value per row from a scalar or a sequence of `rows` values, each of one of `types`."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * rows
    if len(values) != rows:
        raise InputError(f"{name}: expected one value or {rows} (one per row), got {len(values)}")
    for v in values:
        # bool is an int subclass: accept it only where a bool is meant.
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise InputError(f"{name}: expected {' or '.join(t.__name__ for t in types)}, got {v!r}")
    return values


def _check_id(name: str, token: int, vocab_size: int | None) -> None:
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise InputError(f"{name}: token ids must be ints >= 0, got {token!r}")
    if vocab_size is not None and token >= vocab_size:
        raise InputError(f"{name}: token id {token} is outside the vocabulary (size {vocab_size})")


def _eos_rows(eos, rows: int, vocab_size: int | None) -> list[list[int]]:
    """eos ids per row from None, an id, a shared list of ids, or a per-row list of lists."""
    if eos is None:
        per_row: list[list[int]] = [[] for _ in range(rows)]
    elif isinstance(eos, int) and not isinstance(eos, bool):
        per_row = [[eos] for _ in range(rows)]
    elif isinstance(eos, (list, tuple)) and eos and all(isinstance(e, (list, tuple)) for e in eos):
        if len(eos) != rows:
            raise InputError(f"eos_token_id: expected {rows} lists (one per row), got {len(eos)}")
        per_row = [list(e) for e in eos]
    elif isinstance(eos, (list, tuple)):
        per_row = [list(eos) for _ in range(rows)]
    else:
        raise InputError(f"eos_token_id: expected an int, a list of ints or a list of lists, got {eos!r}")
    for row in per_row:
        for token in row:
            _check_id("eos_token_id", token, vocab_size)
    return per_row


def make_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A generator on `device`, seeded with `seed` (a fresh random seed when None)."""
    generator = torch.Generator(device=torch.device(device))
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def seen_tokens(input_ids: torch.Tensor, vocab_size: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, vocab] bool, True where a token occurs in the row's prompt (the repetition penalty's input).

    HF's RepetitionPenaltyLogitsProcessor penalizes every id of input_ids, pad positions included; pass
    attention_mask to leave the pads out instead."""
    counts = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.int32, device=input_ids.device)
    src = torch.ones_like(input_ids, dtype=torch.int32) if attention_mask is None else attention_mask.int()
    # Counted, not assigned: a masked position must not clear a token that another position set.
    return counts.scatter_add_(1, input_ids, src) > 0


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor) -> None:
    """Record this step's tokens [rows] in seen [rows, vocab] (in place, no sync)."""
    seen.scatter_(1, tokens.unsqueeze(1), True)


def _check(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> None:
    # Shapes only: static, checked on the host without reading any value.
    if logits.dim() != 2 or logits.shape[0] != params.rows:
        raise InputError(f"logits must be [rows={params.rows}, vocab], got {tuple(logits.shape)}")
    if seen is not None and (seen.shape != logits.shape or seen.dtype != torch.bool):
        raise InputError(
            f"seen must be a bool tensor of shape {tuple(logits.shape)}, got {seen.dtype} {tuple(seen.shape)}"
        )


def _penalized(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """float32 logits with the repetition penalty applied (HF: negative scores multiplied, others divided)."""
    scores = logits.float()
    if seen is None:
        return scores
    penalty = params.repetition_penalty.unsqueeze(1)
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def _filtered_sorted(scores: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k and top-p on penalized scores, in descending order: (masked scores, token ids).

    Removed tokens hold -inf. Greedy rows go through with temperature 1 (their result is not used)."""
    vocab = scores.shape[1]
    temperature = torch.where(params.temperature > 0, params.temperature, torch.ones_like(params.temperature))
    scaled = scores / temperature.unsqueeze(1)
    # stable: ties keep the lower id first, as argmax does.
    values, ids = torch.sort(scaled, dim=1, descending=True, stable=True)
    # top-k as HF's TopKLogitsWarper: drop what is below the k-th value (ties with it stay).
    k = torch.where(params.top_k > 0, params.top_k.clamp(max=vocab), torch.full_like(params.top_k, vocab))
    kth = values.gather(1, (k - 1).unsqueeze(1))
    values = values.masked_fill(values < kth, NEG_INF)
    # top-p as HF's TopPLogitsWarper: keep a token while the probability before it is < top_p, which keeps
    # the smallest prefix reaching top_p and always the first token. top_p = 1 keeps all (no rounding loss).
    probs = torch.softmax(values, dim=1)
    before = torch.cumsum(probs, dim=1) - probs
    drop = (before >= params.top_p.unsqueeze(1)) & (params.top_p < 1).unsqueeze(1)
    values = values.masked_fill(drop, NEG_INF)
    return values, ids


# A row's argmax in two passes: torch reduces one long row with few blocks (27 µs for 128k floats on an
# H200); chunk maxima first spread the row over many blocks. Ties resolve to the lowest id, as argmax does.
ARGMAX_CHUNK = 256


def row_argmax(scores: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of [rows, vocab] (first index on ties), in two passes when vocab allows."""
    rows, vocab = scores.shape
    if vocab % ARGMAX_CHUNK or vocab < 4 * ARGMAX_CHUNK:
        return scores.argmax(dim=1)
    best, where = scores.view(rows, vocab // ARGMAX_CHUNK, ARGMAX_CHUNK).max(dim=2)
    chunk = best.argmax(dim=1, keepdim=True)
    return (chunk * ARGMAX_CHUNK + where.gather(1, chunk)).squeeze(1)


def warped_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The scores a sampled row draws from, in vocabulary order ([rows, vocab] float32, -inf = removed):
    repetition penalty, temperature, top-k, top-p. For inspection and tests; `sample` avoids the scatter."""
    _check(logits, params, seen)
    values, ids = _filtered_sorted(_penalized(logits, params, seen), params)
    return torch.empty_like(values).scatter_(1, ids, values)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    greedy_only: bool = False,
) -> torch.Tensor:
    """Next token per row: [rows] int64, without any host sync (safe to capture in a CUDA graph).

    logits: [rows, vocab] float (any float dtype; computed in float32)
    seen: [rows, vocab] bool, tokens already in the row (prompt and generated), for the repetition penalty;
        None = no penalty
    generator: a torch.Generator on logits' device (None = the device's default generator)
    greedy_only: skip the sampling path (a Python flag fixed at capture; use it when params.all_greedy).
    Rows with temperature 0 take the argmax; the others sample after temperature, top-k and top-p."""
    _check(logits, params, seen)
    scores = _penalized(logits, params, seen)
    greedy = row_argmax(scores)
    if greedy_only:
        return greedy
    values, ids = _filtered_sorted(scores, params)
    # Exponential race in log space; clamp so that E = 0 cannot give -inf - (-inf) = nan.
    noise = torch.empty_like(values).exponential_(generator=generator)
    race = values - noise.clamp_min(torch.finfo(noise.dtype).tiny).log()
    drawn = ids.gather(1, row_argmax(race).unsqueeze(1)).squeeze(1)
    return torch.where(params.temperature > 0, drawn, greedy)


def update_done(tokens: torch.Tensor, params: SamplingParams, step_count: torch.Tensor, done: torch.Tensor) -> None:
    """After a step, in place and without sync: rows already done get their pad_token_id in `tokens`; the
    other rows count the step and become done when the token is one of their eos ids or they have produced
    max_new_tokens tokens.

    tokens: [rows] int64, the tokens just sampled (rewritten for done rows)
    step_count: [rows] int64, tokens produced so far by each row (this step included after the call)
    done: [rows] bool"""
    running = ~done
    tokens.copy_(torch.where(running, tokens, params.pad_token_id))
    step_count.add_(running.long())
    hit_eos = (tokens.unsqueeze(1) == params.eos_token_id).any(dim=1)
    done.logical_or_(running & (hit_eos | (step_count >= params.max_new_tokens)))
