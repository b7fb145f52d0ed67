"""Text generation from a generation bundle: static KV cache, prefill per prompt bucket, decode steps replayed
as CUDA graphs with the sampler inside, no host sync per token.

State (all static, allocated once at load): the cache (program state), and per cache row the next input
token, its position, the tokens produced so far (`seq`, one column per position plus a dump column for rows
that are done), a done flag and a step count. A step's graph reads them and updates them in place:

    logits = decode(tokens, positions)            one token per row, attention over the row's own cache
    next = sample(logits)                         greedy / temperature / top-k / top-p / repetition penalty
    update_done(next)                             eos or max_new_tokens; finished rows emit pad
    seq[row, position + 1] = next; position += 1  for rows that were running

so one captured graph serves every step and every mix of prompt lengths. Rows are independent: a row's
position is its own, which is what lets a server add and retire requests in a running batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from kernl.errors import BundleError, InputError
from kernl.runtime.program import ProgramSpec
from kernl.runtime.sampling import SamplingParams, make_generator, mark_seen, sample, seen_tokens, update_done
from kernl.runtime.steps import capture_step, read_async, wait_read

if TYPE_CHECKING:
    from kernl.runtime.continuous import ContinuousBatch

# How many decode steps the host queues between two looks at the done flags (a look waits for the GPU to
# reach the step before: the host stays about one chunk ahead).
CHECK_EVERY = 8
N_EOS = 4  # eos ids a row may have (Llama 3 has up to 3)


@dataclass
class Request:
    """One generate() call, checked: prompts as id lists, and per-row sampling settings."""

    prompts: list[list[int]]
    params: SamplingParams  # for the decode bucket's rows
    max_new_tokens: int
    penalty: bool
    seed: int | None


@dataclass
class Settings:
    max_length: int
    batch_sizes: list[int]
    seq_lens: list[int]
    vocab_size: int
    eos_token_id: list[int]
    pad_token_id: int | None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Settings:
        gen = manifest.get("generation")
        try:
            eos = gen.get("eos_token_id")
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            out = cls(
                int(gen["max_length"]),
                sorted(int(b) for b in gen["batch_sizes"]),
                sorted(int(s) for s in gen["seq_lens"]),
                int(gen["vocab_size"]),
                [int(e) for e in eos],
                None if gen.get("pad_token_id") is None else int(gen["pad_token_id"]),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            raise BundleError("manifest.json: generation settings are malformed") from None
        if not out.batch_sizes or not out.seq_lens or out.seq_lens[-1] >= out.max_length:
            raise BundleError("manifest.json: generation buckets are malformed")
        return out


def id_limit(spec: ProgramSpec, entries: Sequence[str], names: Sequence[str], vocab_size: int) -> int:
    """Token ids must index the embedding tables as well as the logits: the least of the vocabulary and the "limit"
    load recorded on the entries' id inputs (names)."""
    limits = [i.get("limit") for e in entries for i in spec.entry_inputs(e) if i["name"] in names]
    return min([vocab_size, *(n for n in limits if isinstance(n, int))])


def _smallest(values: Sequence[int], at_least: int) -> int | None:
    return next((v for v in values if v >= at_least), None)


class Generator:
    """Prefill and decode entries of one bundle on one device, with their static state and graphs."""

    def __init__(
        self,
        spec: ProgramSpec,
        weights: Sequence[torch.Tensor],
        device: torch.device,
        settings: Settings,
        *,
        cuda_graphs: bool = True,
        scope: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.settings = s = settings
        self.device = device
        self.scope = scope or contextlib.nullcontext
        self.id_limit = id_limit(spec, ("prefill", "decode"), ("input_ids",), s.vocab_size)
        self.prefill = spec.bind("prefill")
        self.decode = spec.bind("decode")
        self.state = spec.allocate_state(device)
        self.args = [*weights, *self.state]
        rows = s.batch_sizes[-1]
        self.scratch_row = rows  # the cache's extra row: padding rows of a prefill bucket write there
        if self.state and self.state[0].shape[0] != rows + 1:
            raise BundleError(f"program state has {self.state[0].shape[0]} cache rows for batch {rows}")
        long = dict(dtype=torch.int64, device=device)
        self.tokens = torch.zeros(rows, 1, **long)
        self.positions = torch.zeros(rows, 1, **long)
        self.seq = torch.zeros(rows, s.max_length + 1, **long)  # last column: where finished rows write
        self.done = torch.ones(rows, dtype=torch.bool, device=device)
        self.step_count = torch.zeros(rows, **long)
        self.params = SamplingParams.build(rows, device, do_sample=False, n_eos=N_EOS)
        self.seen: torch.Tensor | None = None  # [rows, vocab], allocated on the first repetition penalty
        self.rng = make_generator(device, 0)
        self.logits = torch.zeros(rows, s.vocab_size, dtype=torch.float32, device=device)
        self.graphs = cuda_graphs and device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.decode_graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}
        self.timings = {"capture_s": 0.0}
        self._continuous: ContinuousBatch | None = None

    # ---- checking a call -------------------------------------------------------------------------------

    def request(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> Request:
        """Check a call's arguments (InputError naming the argument) and turn them into a Request."""
        s = self.settings
        prompts = checked_prompts(input_ids, attention_mask, s.batch_sizes[-1], s.seq_lens[-1], self.id_limit)
        longest = max(len(p) for p in prompts)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if longest + max_new_tokens > s.max_length:
            raise InputError(f"max_new_tokens: {longest} prompt tokens + {max_new_tokens} new ones exceed the "
                             f"bundle's max_length {s.max_length}")  # fmt: skip
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InputError(f"seed must be an int >= 0, got {seed!r}")
        eos = s.eos_token_id if eos_token_id is None else eos_token_id
        if isinstance(eos, (list, tuple)) and len(eos) > N_EOS:
            raise InputError(f"eos_token_id: at most {N_EOS} ids, got {len(eos)}")
        pad = pad_token_id if pad_token_id is not None else s.pad_token_id
        rows = self.batch_bucket(len(prompts))
        # Rows past the batch are idle: greedy, one token, their output dropped.
        real = len(prompts)
        params = SamplingParams.build(
            rows,
            self.device,
            do_sample=[do_sample] * real + [False] * (rows - real),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=pad,
            max_new_tokens=[max_new_tokens] * real + [1] * (rows - real),
            n_eos=N_EOS,
            vocab_size=s.vocab_size,
        )
        return Request(prompts, params, max_new_tokens, float(repetition_penalty) != 1.0, seed)

    def batch_bucket(self, batch: int) -> int:
        return _smallest(self.settings.batch_sizes, batch)

    # ---- the steps, eager or captured ------------------------------------------------------------------

    def _advance(self, logits: torch.Tensor, rows: int, greedy: bool, penalty: bool) -> None:
        """Sample each row's next token from logits [rows, vocab] and move the rows' state one step."""
        params = self.params.head(rows)
        seen = self.seen[:rows] if penalty else None
        token = sample(logits, params, seen, self.rng, greedy_only=greedy)
        running = ~self.done[:rows]
        update_done(token, params, self.step_count[:rows], self.done[:rows])
        positions = self.positions[:rows, 0]
        column = torch.where(running, positions + 1, self.settings.max_length)
        self.seq[:rows].scatter_(1, column.unsqueeze(1), token.unsqueeze(1))
        positions.add_(running.long())
        self.tokens[:rows, 0].copy_(token)
        if penalty:
            mark_seen(self.seen[:rows], token)

    def _decode_step(self, rows: int, greedy: bool, penalty: bool) -> None:
        (logits,) = self.decode(self.device, *self.args, self.tokens[:rows], self.positions[:rows])
        self._advance(logits, rows, greedy, penalty)

    def _capture(self, run: Callable[[], Any], generator: bool) -> tuple[torch.cuda.CUDAGraph, Any]:
        start = time.perf_counter()
        out = capture_step(run, self.device, self.pool, self.rng if generator else None)
        self.timings["capture_s"] += time.perf_counter() - start
        return out

    def _decode_graph(self, rows: int, greedy: bool, penalty: bool) -> torch.cuda.CUDAGraph:
        key = (rows, greedy, penalty)
        if key not in self.decode_graphs:
            if penalty:
                self._ensure_seen()
            with torch.no_grad(), self.scope(), torch.cuda.device(self.device):
                graph, _ = self._capture(lambda: self._decode_step(rows, greedy, penalty), generator=not greedy)
            self.decode_graphs[key] = graph
        return self.decode_graphs[key]

    def _prefill_entry(self, bucket: tuple[int, int]):
        """(graph or None, static inputs, logits) of a prefill bucket; inputs: ids, positions, last, rows."""
        if bucket in self.prefill_graphs:
            return self.prefill_graphs[bucket]
        batch, seq = bucket
        long = dict(dtype=torch.int64, device=self.device)
        inputs = [
            torch.zeros(batch, seq, **long),
            torch.arange(seq, **long).expand(batch, seq).contiguous(),
            torch.zeros(batch, **long),
            torch.full((batch,), self.scratch_row, **long),
        ]

        def run():
            return self.prefill(self.device, *self.args, *inputs)[0]

        if not self.graphs:
            entry = (None, inputs, run)
        else:
            with torch.no_grad(), self.scope(), torch.cuda.device(self.device):
                graph, logits = self._capture(run, generator=False)
            entry = (graph, inputs, logits)
        self.prefill_graphs[bucket] = entry
        return entry

    def _ensure_seen(self) -> None:
        if self.seen is None:
            self.seen = torch.zeros(self.settings.batch_sizes[-1], self.settings.vocab_size, dtype=torch.bool,
                                    device=self.device)  # fmt: skip

    def capture(self) -> None:
        """Capture every prefill bucket and the greedy decode step of every batch bucket (at load)."""
        if not self.graphs:
            return
        s = self.settings
        for bucket in sorted(((b, q) for b in s.batch_sizes for q in s.seq_lens), key=lambda b: -b[0] * b[1]):
            self._prefill_entry(bucket)
        for rows in s.batch_sizes:
            self._decode_graph(rows, True, False)

    # ---- running a request -----------------------------------------------------------------------------

    def _seed(self, seed: int | None) -> None:
        """Seed the sampler's generator: `seed`, or a fresh random one when None (the one place that seeds)."""
        if seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(seed)

    def _prefill(self, prompts: Sequence[Sequence[int]], rows: int, cache_rows: Sequence[int]):
        """Run the prefill bucket (rows, smallest prompt bucket covering the prompts): prompt i goes into cache row
        cache_rows[i], the bucket's padding rows into the scratch row. Other cache rows are left as they are.
        Returns (logits [rows, vocab] float32 at each prompt's last token, host ids [rows, seq], lengths [rows])."""
        seq = _smallest(self.settings.seq_lens, max(len(p) for p in prompts))
        graph, (ids, _, last, rows_in), logits = self._prefill_entry((rows, seq))
        host_ids = torch.zeros(rows, seq, dtype=torch.int64)
        lengths = torch.ones(rows, dtype=torch.int64)
        for r, prompt in enumerate(prompts):
            host_ids[r, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
            lengths[r] = len(prompt)
        row_ids = torch.full((rows,), self.scratch_row, dtype=torch.int64)
        row_ids[: len(prompts)] = torch.tensor(list(cache_rows), dtype=torch.int64)
        ids.copy_(host_ids, non_blocking=True)
        last.copy_(lengths - 1, non_blocking=True)
        rows_in.copy_(row_ids, non_blocking=True)
        if graph is not None:
            graph.replay()
            out = logits
        else:
            out = logits()
        return out.float(), host_ids, lengths

    def _start(self, req: Request) -> tuple[int, Callable[[], None]]:
        """Prefill the prompts and sample their first tokens; returns (rows, one decode step)."""
        if self._continuous is not None and self._continuous.active:
            raise InputError("this bundle's generator is serving a continuous batch; generate() waits until it is idle")
        if self._continuous is not None:
            self._continuous.reset = True  # the rows generate() leaves behind are not the batch's free rows
        real = len(req.prompts)
        rows = req.params.rows
        greedy = req.params.all_greedy
        step_graph = self._decode_graph(rows, greedy, req.penalty) if self.graphs else None
        logits, host_ids, lengths = self._prefill(req.prompts, rows, range(real))
        seq = host_ids.shape[1]
        self.params.copy_(_padded_params(req.params, self.params.rows))
        self._seed(req.seed)
        # Row state: position of the last prompt token, nothing produced yet; idle rows start done.
        self.positions[:rows, 0].copy_(lengths - 1, non_blocking=True)
        self.step_count[:rows].zero_()
        done = torch.zeros(rows, dtype=torch.bool)
        done[real:] = True
        self.done[:rows].copy_(done, non_blocking=True)
        self.seq[:rows, :seq].copy_(host_ids, non_blocking=True)
        if req.penalty:
            self._ensure_seen()
            in_prompt = torch.arange(seq)[None, :] < lengths[:, None]
            self.seen[:rows].copy_(
                seen_tokens(host_ids, self.settings.vocab_size, in_prompt).to(self.device, non_blocking=True)
            )
        self._advance(logits, rows, greedy, req.penalty)
        if step_graph is not None:
            return rows, step_graph.replay
        return rows, lambda: self._decode_step(rows, greedy, req.penalty)

    def continuous(self) -> ContinuousBatch:
        """The continuous batch over this generator's rows (one per generator): admit, step, retire."""
        if self._continuous is None:
            from kernl.runtime.continuous import ContinuousBatch

            self._continuous = ContinuousBatch(self)
        return self._continuous

    def stream(self, req: Request) -> Iterator[torch.Tensor]:
        """Yield each step's tokens ([batch] int64 on the host, pad for finished rows) as they come; the host
        reads step i while the GPU runs step i + 1."""
        with torch.no_grad(), self.scope():
            _, step = self._start(req)
            real = len(req.prompts)
            pending = read_async(self.tokens[:real, 0], self.done[:real])
            for _ in range(req.max_new_tokens - 1):
                step()
                ready, pending = pending, read_async(self.tokens[:real, 0], self.done[:real])
                tokens, done = wait_read(ready)
                yield tokens
                if bool(done.all()):
                    return
            yield wait_read(pending)[0]

    def run(self, req: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq [batch, max_length + 1], produced [batch]) on the host after the request finishes."""
        with torch.no_grad(), self.scope():
            _, step = self._start(req)
            real = len(req.prompts)
            check = None
            for i in range(req.max_new_tokens - 1):
                step()
                if (i + 1) % CHECK_EVERY == 0:
                    if check is not None and bool(wait_read(check)[0].all()):
                        break
                    check = read_async(self.done[:real])
            return self.seq[:real].cpu(), self.step_count[:real].cpu()


def output_ids(input_ids, req: Request, seq: torch.Tensor, produced: torch.Tensor) -> torch.Tensor:
    """HF generate's return value: the prompts as given (a ragged list is left-padded with pad ids) and the new
    tokens, one column per step run; a row that stopped early is padded with its pad id."""
    pads = req.params.pad_token_id.cpu().tolist()
    steps = int(produced.max())
    new = torch.empty(len(req.prompts), steps, dtype=torch.int64)
    for r, prompt in enumerate(req.prompts):
        n = int(produced[r])
        new[r, :n] = seq[r, len(prompt) : len(prompt) + n]
        new[r, n:] = pads[r]
    if isinstance(input_ids, torch.Tensor):
        prompt = input_ids.detach().cpu().long().reshape(len(req.prompts), -1)
    else:
        width = max(len(p) for p in req.prompts)
        prompt = torch.tensor([[pads[r]] * (width - len(p)) + p for r, p in enumerate(req.prompts)])
    return torch.cat([prompt, new], dim=1)


def _padded_params(params: SamplingParams, rows: int) -> SamplingParams:
    """params for a bucket's rows extended to the static tensors' rows (the extra rows idle)."""
    if params.rows == rows:
        return params
    pad = rows - params.rows
    out = {}
    for f in fields(params):
        t = getattr(params, f.name)
        if isinstance(t, torch.Tensor):
            out[f.name] = torch.cat([t, t[-1:].expand(pad, *t.shape[1:])])
    return SamplingParams(**out, all_greedy=params.all_greedy)


def checked_prompts(
    input_ids,
    attention_mask,
    max_batch: int,
    max_len: int,
    id_limit: int,
    what: str = "a prompt",
    bucket: str = "prompt bucket",
) -> list[list[int]]:
    """The prompts as id lists (see _prompts), InputError unless they fit the largest batch and length buckets and
    every id is in [0, id_limit)."""
    prompts = _prompts(input_ids, attention_mask)
    if len(prompts) > max_batch:
        raise InputError(f"input_ids: batch {len(prompts)} is beyond the largest batch bucket {max_batch}")
    longest = max(len(p) for p in prompts)
    if longest > max_len:
        raise InputError(f"input_ids: {what} of {longest} tokens is longer than the largest {bucket} {max_len}")
    for row in prompts:
        bad = next((t for t in row if not 0 <= t < id_limit), None)
        if bad is not None:
            raise InputError(f"input_ids: token id {bad} is outside the vocabulary (size {id_limit})")
    return prompts


def _prompts(input_ids, attention_mask) -> list[list[int]]:
    """Prompts as lists of ids from a ragged list, or from HF-style [batch, seq] tensors (pads left or right
    dropped by the mask)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids: expected [batch, seq] integer ids, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")  # fmt: skip
        if input_ids.is_meta:
            raise InputError("input_ids: a meta tensor has no values")
        ids = input_ids.detach().cpu().long()
        if attention_mask is None:
            prompts = ids.tolist()
        else:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise InputError(f"attention_mask: expected a tensor of shape {tuple(input_ids.shape)}")
            keep = attention_mask.detach().cpu().bool()
            prompts = [row[m].tolist() for row, m in zip(ids, keep)]
    elif isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise InputError("attention_mask: give it only with a tensor of input_ids")
        rows = [input_ids] if input_ids and all(isinstance(t, int) for t in input_ids) else list(input_ids)
        prompts = []
        for row in rows:
            if not isinstance(row, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in row
            ):
                raise InputError("input_ids: expected a list of token-id lists (ints)")
            prompts.append(list(row))
    else:
        raise InputError(f"input_ids: expected a tensor or a list of token-id lists, got {type(input_ids).__name__}")
    if not prompts:
        raise InputError("input_ids: no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise InputError("input_ids: a prompt is empty")
    return prompts
