"""Continuous batching over a Generator's rows: requests join a running decode batch and leave it one by one.

Between two decode steps a server admits requests into free cache rows, lowest row first: their prompts are
prefilled into those rows only (the prefill bucket's `rows` input names the cache rows it writes; every other
row keeps its cache and state) and their first tokens sampled. A step runs the decode graph of the smallest
batch bucket covering the highest active row; free rows idle in it as finished rows always do (done: they emit
pad and do not move). A row that finishes (eos, max_new_tokens) leaves at once; retire() ends one early.

Each row's sampling settings are written into the generator's static SamplingParams rows, so nothing is
captured again per request: a step replays the greedy-only graph while every active row is greedy, else the
sampling graph (whose greedy rows still take the argmax), with the repetition penalty while a row needs it.

What is deterministic: a greedy row's tokens depend on its prompt alone (its own cache row and position), not on
which rows run beside it, up to float rounding between buckets of different batch (which can only flip a
numerical near-tie). Sampled rows share the generator's one random stream: a request's seed reseeds it at
admission, so a sampled request is reproducible when it runs alone (same row, same bucket); beside other
sampled rows its draws depend on theirs.

Calls are not thread-safe: one thread drives a batch (kernl.serve's generation scheduler holds the bundle's lock).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from kernl.errors import InputError
from kernl.runtime.generation import Generator, Request
from kernl.runtime.sampling import SamplingParams, sample, seen_tokens, update_done

__all__ = ["ContinuousBatch", "SlotToken"]


@dataclass(frozen=True)
class SlotToken:
    """A token one row produced: finished when it was the row's last (eos or max_new_tokens); the slot is then
    free again."""

    slot: int
    token: int
    finished: bool


@dataclass
class _Slot:
    greedy: bool
    penalty: bool
    left: int  # decode steps the row may still take (max_new_tokens less the tokens it produced)


class ContinuousBatch:
    """admit / step / retire over the rows of one Generator (Generator.continuous() gives its one batch)."""

    def __init__(self, generator: Generator) -> None:
        self.gen = generator
        self.rows = generator.settings.batch_sizes[-1]
        self.max_rows = self.rows  # a server may keep fewer rows busy (set_max_rows)
        self.slots: dict[int, _Slot] = {}
        # Set when generate() ran on these rows: rows it left running must idle before the first admission.
        self.reset = True

    @property
    def active(self) -> list[int]:
        """The rows generating, in order."""
        return sorted(self.slots)

    def free(self) -> int:
        """How many more prompts admit() takes now."""
        return max(0, self.max_rows - len(self.slots))

    def set_max_rows(self, rows: int) -> None:
        """Use at most rows rows (1 to the largest decode batch); call it while no row is active."""
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= self.rows:
            raise InputError(f"max_rows must be an int in [1, {self.rows}], got {rows!r}")
        if self.slots:
            raise InputError("max_rows: change it while no row is active")
        self.max_rows = rows

    # ---- the three calls ------------------------------------------------------------------------------------

    def admit(self, requests: Sequence[Request]) -> list[SlotToken]:
        """Prefill every prompt of requests (checked by Generator.request) into free rows in ONE prefill call and
        sample each one's first token; returns one SlotToken a prompt, in order. A prompt whose first token is
        already its last (eos, max_new_tokens=1) leaves at once."""
        gen = self.gen
        prompts = [p for req in requests for p in req.prompts]
        if not prompts:
            return []
        if len(prompts) > self.free():
            raise InputError(f"{len(prompts)} prompt(s) to admit, {self.free()} free row(s)")
        per_row = [(req, i) for req in requests for i in range(len(req.prompts))]
        with torch.no_grad(), gen.scope():
            if self.reset:
                gen.done.fill_(True)
                self.reset = False
            slots = [r for r in range(self.max_rows) if r not in self.slots][: len(prompts)]
            logits, host_ids, lengths = gen._prefill(prompts, gen.batch_bucket(len(prompts)), slots)
            n = len(prompts)
            idx = torch.tensor(slots, dtype=torch.int64, device=gen.device)
            params = _rows_of([(req.params, i) for req, i in per_row])
            for f in fields(params):
                mine = getattr(gen.params, f.name)
                if isinstance(mine, torch.Tensor):
                    mine.index_copy_(0, idx, getattr(params, f.name).to(gen.device))
            for req in requests:
                if req.seed is not None:
                    gen._seed(req.seed)
            host_ids, lengths = host_ids[:n], lengths[:n]
            gen.positions[:, 0].index_copy_(0, idx, (lengths - 1).to(gen.device))
            gen.step_count.index_fill_(0, idx, 0)
            gen.done.index_fill_(0, idx, False)
            seq = host_ids.shape[1]
            gen.seq[:, :seq].index_copy_(0, idx, host_ids.to(gen.device))
            greedy = all(req.params.all_greedy for req, _ in per_row)
            penalty = any(req.penalty for req, _ in per_row)
            if penalty:
                gen._ensure_seen()
                in_prompt = torch.arange(seq)[None, :] < lengths[:, None]
                gen.seen.index_copy_(0, idx, seen_tokens(host_ids, gen.settings.vocab_size, in_prompt).to(gen.device))
            self._advance_at(logits[:n], idx, params, greedy, penalty)
            tokens = gen.tokens[:, 0].index_select(0, idx).cpu().tolist()
            done = gen.done.index_select(0, idx).cpu().tolist()
        for (req, _), slot in zip(per_row, slots, strict=True):
            self.slots[slot] = _Slot(req.params.all_greedy, req.penalty, req.max_new_tokens - 1)
        return self._report(slots, tokens, done)

    def step(self) -> list[SlotToken]:
        """One decode step of every active row: one SlotToken each, in row order (waits for the GPU)."""
        stepped = self.steps(1)
        return stepped[0] if stepped else []

    def steps(self, n: int) -> list[list[SlotToken]]:
        """Up to n decode steps of the active rows, read back once (one host round trip for them all, not one a
        token): each step's SlotTokens, in row order, a finished row in none after its last. Never more steps
        than the longest-lived row may still take; a row that stops on eos mid-way idles through the rest."""
        if not self.slots:
            return []
        gen = self.gen
        n = max(1, min(n, max(s.left for s in self.slots.values())))
        rows = gen.batch_bucket(max(self.slots) + 1)
        greedy = all(s.greedy for s in self.slots.values())
        penalty = any(s.penalty for s in self.slots.values())
        with torch.no_grad(), gen.scope():
            tokens = torch.empty(n, rows, dtype=torch.int64, device=gen.device)
            done = torch.empty(n, rows, dtype=torch.bool, device=gen.device)
            for i in range(n):
                if gen.graphs:
                    self._graph(rows, greedy, penalty).replay()
                else:
                    gen._decode_step(rows, greedy, penalty)
                tokens[i].copy_(gen.tokens[:rows, 0])
                done[i].copy_(gen.done[:rows])
            tokens, done = tokens.cpu().tolist(), done.cpu().tolist()
        out = []
        for i in range(n):
            active = self.active
            if not active:
                break
            for slot in active:
                self.slots[slot].left -= 1
            out.append(self._report(active, [tokens[i][s] for s in active], [done[i][s] for s in active]))
        return out

    def retire(self, slot: int) -> None:
        """End a row now (its client went away, or a stop string matched); a free slot is left as it is."""
        if self.slots.pop(slot, None) is not None:
            self.gen.done[slot] = True

    def warm(self) -> None:
        """Capture now every decode graph a step may need (load captures only the greedy ones): sampled and
        repetition-penalty variants of every batch bucket, so that no capture runs while requests are served."""
        if not self.gen.graphs:
            return
        for rows in self.gen.settings.batch_sizes:
            for greedy, penalty in ((True, False), (False, False), (True, True), (False, True)):
                self._graph(rows, greedy, penalty)

    # ---- helpers --------------------------------------------------------------------------------------------

    def _report(self, slots: list[int], tokens: list[int], done: list[bool]) -> list[SlotToken]:
        out = [SlotToken(s, t, d) for s, t, d in zip(slots, tokens, done, strict=True)]
        for item in out:
            if item.finished:
                self.slots.pop(item.slot, None)
        return out

    def _advance_at(
        self, logits: torch.Tensor, idx: torch.Tensor, params: SamplingParams, greedy: bool, penalty: bool
    ) -> None:
        """Generator._advance for the rows idx (all running): sample, count, write the token and move on."""
        gen = self.gen
        params = SamplingParams(
            **{f.name: getattr(params, f.name).to(gen.device) for f in fields(params) if f.name != "all_greedy"},
            all_greedy=greedy,
        )
        seen = gen.seen.index_select(0, idx) if penalty else None
        token = sample(logits, params, seen, gen.rng, greedy_only=greedy)
        count = gen.step_count.index_select(0, idx)
        done = gen.done.index_select(0, idx)
        update_done(token, params, count, done)
        gen.step_count.index_copy_(0, idx, count)
        gen.done.index_copy_(0, idx, done)
        column = gen.positions[:, 0].index_select(0, idx) + 1
        gen.seq[idx, column] = token
        gen.positions[:, 0].index_copy_(0, idx, column)
        gen.tokens[:, 0].index_copy_(0, idx, token)
        if penalty:
            gen.seen[idx, token] = True

    def _graph(self, rows: int, greedy: bool, penalty: bool) -> torch.cuda.CUDAGraph:
        """The decode graph for (rows, greedy, penalty); capturing it runs a warm step, which must not move the
        active rows: their state is kept aside and put back (the cache entries it wrote are rewritten alike)."""
        gen = self.gen
        if (rows, greedy, penalty) in gen.decode_graphs:
            return gen.decode_graphs[(rows, greedy, penalty)]
        if penalty:
            gen._ensure_seen()
        state = [gen.tokens, gen.positions, gen.seq, gen.done, gen.step_count]
        if gen.seen is not None:
            state.append(gen.seen)
        kept = [t.clone() for t in state]
        graph = gen._decode_graph(rows, greedy, penalty)
        for t, saved in zip(state, kept, strict=True):
            t.copy_(saved)
        return graph


def _rows_of(picks: list[tuple[SamplingParams, int]]) -> SamplingParams:
    """One SamplingParams whose row j is row picks[j][1] of picks[j][0]."""
    out = {}
    for f in fields(SamplingParams):
        if f.name == "all_greedy":
            continue
        out[f.name] = torch.cat([getattr(p, f.name)[i : i + 1] for p, i in picks])
    return SamplingParams(**out, all_greedy=all(p.all_greedy for p, _ in picks))
