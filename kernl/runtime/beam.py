"""Beam search on the device, one step a CUDA-graph-capturable call, with Hugging Face's semantics.

This is transformers' `GenerationMixin._beam_search` (5.17 to 5.24: vectorized over beams, static-shaped)
rewritten over static state, so that one captured graph serves every step, every batch up to the state's batch,
and every beam count up to its beams:

    candidates = top C of (running score + log_softmax(logits)) over beams x vocab, C = max(2, 1 + n_eos) * beams
    running    = the best `beams` candidates that did not just hit eos or the length limit
    finished   = the best `beams` of (finished so far, top-`beams` candidates that just finished,
                 scored sum_logprobs / generated_length ** length_penalty)
    done       = HF's early-stop heuristic, or early_stopping=True and every finished slot taken, or max length

Rows are batch-major: row b * max_beams + j is beam j of batch item b. Beams past a call's num_beams and batch
items past its batch are inert: their score is -inf, they keep their own row (parent = row) and emit the fill
token. A batch item that is done is frozen the same way (HF keeps running it, but nothing it does reaches
the output, so freezing gives the same result without the work of reordering its beams).

Every scalar setting lives in a device tensor written by `reset` (host side, once a call); `beam_step` reads
them and writes only in place, with no host sync and no data-dependent shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernl.errors import InputError

MAX_EOS = 4  # eos ids a call may give (Llama 3 has 3)
_BIG = -1.0e9  # HF's "very large negative" score: empty finished slots, beams 1.. at the first step


@dataclass
class BeamState:
    """Static beam-search state for up to `batch` items x `beams` beams and sequences of `max_length` tokens
    (decoder prefix included, as HF's max_length). Allocate once with `BeamState.allocate`, `reset` per call."""

    batch: int
    beams: int
    max_length: int
    vocab_size: int
    # Running beams, row b * beams + j.
    seq: torch.Tensor  # [batch * beams, max_length + 1] int64: prefix, generated tokens, fill after
    scores: torch.Tensor  # [batch * beams] float32: summed log-probs; -1e9 (HF) or -inf (inert rows)
    tokens: torch.Tensor  # [batch * beams] int64: each row's newest token, the next decode step's input
    parents: torch.Tensor  # [batch * beams] int64: the row each row continues (global), for cache index_select
    # Finished hypotheses, best first.
    hyp_seq: torch.Tensor  # [batch, beams, max_length + 1] int64
    hyp_scores: torch.Tensor  # [batch, beams] float32: length-penalized; -1e9 empty, -inf past num_beams
    hyp_lengths: torch.Tensor  # [batch, beams] int64: generated tokens (eos included, prefix not)
    hyp_finished: torch.Tensor  # [batch, beams] bool: slot holds a finished hypothesis
    # Per batch item.
    done: torch.Tensor  # [batch] bool
    improvable: torch.Tensor  # [batch] bool: HF's is_early_stop_heuristic_unsatisfied
    # Per call settings (device scalars, shape [1]) and tables.
    step: torch.Tensor  # int64: tokens generated so far (HF's cur_len - decoder_prompt_len)
    prefix_len: torch.Tensor  # int64: decoder prompt length
    max_new_tokens: torch.Tensor  # int64
    num_beams: torch.Tensor  # int64: the call's beams (<= beams)
    keep: torch.Tensor  # int64: HF's beams_to_keep = max(2, 1 + n_eos) * num_beams
    stop_when_full: torch.Tensor  # bool: early_stopping is True
    fill: torch.Tensor  # int64: HF's fill for unused positions
    eos: torch.Tensor  # [MAX_EOS] int64, -1 where unused
    denominators: torch.Tensor  # [max_length + 1] float32: n ** length_penalty for n generated tokens
    best_denominator: torch.Tensor  # [1] float32: the early-stop heuristic's, or 0 to use denominators[n]
    suppress: torch.Tensor  # [vocab] bool: tokens never chosen (HF SuppressTokensLogitsProcessor)
    begin_suppress: torch.Tensor  # [vocab] bool: tokens not chosen first (SuppressTokensAtBeginLogitsProcessor)
    all_done: torch.Tensor  # [1] bool: every batch item done; read it (async) to stop the decode loop
    real_batch: int = 0  # the call's batch (host)

    @property
    def candidates(self) -> int:
        return max(2, 1 + MAX_EOS) * self.beams

    @classmethod
    def allocate(
        cls, batch: int, beams: int, max_length: int, vocab_size: int, device: torch.device | str
    ) -> BeamState:
        """State for at most batch items of at most beams beams; sequences up to max_length tokens in all."""
        if min(batch, beams, max_length, vocab_size) < 1:
            raise ValueError("batch, beams, max_length and vocab_size must be >= 1")
        device = torch.device(device)
        rows = batch * beams
        long = dict(dtype=torch.int64, device=device)
        one = lambda dtype=torch.int64: torch.zeros(1, dtype=dtype, device=device)  # noqa: E731
        state = cls(
            batch, beams, max_length, vocab_size,
            seq=torch.zeros(rows, max_length + 1, **long),
            scores=torch.zeros(rows, dtype=torch.float32, device=device),
            tokens=torch.zeros(rows, **long),
            parents=torch.arange(rows, **long),
            hyp_seq=torch.zeros(batch, beams, max_length + 1, **long),
            hyp_scores=torch.zeros(batch, beams, dtype=torch.float32, device=device),
            hyp_lengths=torch.zeros(batch, beams, **long),
            hyp_finished=torch.zeros(batch, beams, dtype=torch.bool, device=device),
            done=torch.ones(batch, dtype=torch.bool, device=device),
            improvable=torch.zeros(batch, dtype=torch.bool, device=device),
            step=one(), prefix_len=one(), max_new_tokens=one(), num_beams=one(), keep=one(),
            stop_when_full=one(torch.bool), fill=one(),
            eos=torch.full((MAX_EOS,), -1, **long),
            denominators=torch.ones(max_length + 1, dtype=torch.float32, device=device),
            best_denominator=one(torch.float32),
            suppress=torch.zeros(vocab_size, dtype=torch.bool, device=device),
            begin_suppress=torch.zeros(vocab_size, dtype=torch.bool, device=device),
            all_done=torch.ones(1, dtype=torch.bool, device=device),
        )  # fmt: skip
        return state

    def reset(
        self,
        prefix: torch.Tensor,
        *,
        num_beams: int,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None = None,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        suppress_tokens: Sequence[int] | None = None,
        begin_suppress_tokens: Sequence[int] | None = None,
    ) -> None:
        """Start a call (host side, not captured): prefix [batch, prefix_len] int64 is each item's decoder prompt
        (decoder start token, Whisper's forced tokens, or a decoder-only prompt), one length for the batch as in
        HF. pad_token_id as HF resolves it (its generation config's, else eos[0]). Raises InputError."""
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 2 or prefix.dtype.is_floating_point:
            raise InputError("prefix: expected [batch, prefix_len] integer token ids")
        batch, plen = prefix.shape
        if not 1 <= batch <= self.batch:
            raise InputError(f"prefix: batch {batch} is outside 1..{self.batch}")
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or not 1 <= num_beams <= self.beams:
            raise InputError(f"num_beams must be an int in 1..{self.beams}, got {num_beams!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if plen < 1 or plen + max_new_tokens > self.max_length:
            raise InputError(f"max_new_tokens: {plen} prefix tokens + {max_new_tokens} new ones exceed max_length "
                             f"{self.max_length}")  # fmt: skip
        if early_stopping not in (True, False, "never"):
            raise InputError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
            raise InputError(f"length_penalty must be a number, got {length_penalty!r}")
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if len(eos) > MAX_EOS:
            raise InputError(f"eos_token_id: at most {MAX_EOS} ids, got {len(eos)}")
        ids = [*eos, *([pad_token_id] if pad_token_id is not None else [])]
        ids += list(suppress_tokens or []) + list(begin_suppress_tokens or [])
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise InputError(f"eos/pad/suppressed token ids must be ints in 0..{self.vocab_size - 1}")
        host = prefix.detach().cpu().long()
        if host.numel() and not (0 <= int(host.min()) and int(host.max()) < self.vocab_size):
            raise InputError(f"prefix: token ids must be in 0..{self.vocab_size - 1}")

        # HF fills with `pad_token_id or eos_token_id[0]` on tensors: a pad id of 0 is falsy and gives eos[0].
        # Without eos every hypothesis runs to max_length and HF's -1 never shows: 0 keeps ids in range.
        fill = max((pad_token_id or eos[0]) if eos else -1, 0)
        k, K, rows = num_beams, self.beams, self.batch * self.beams
        seq = torch.full((self.batch, K, self.max_length + 1), fill, dtype=torch.int64)
        seq[:batch, :, :plen] = host[:, None, :]
        scores = torch.full((self.batch, K), float("-inf"))
        scores[:batch, 0] = 0.0
        scores[:batch, 1:k] = _BIG
        hyp_scores = torch.full((self.batch, K), float("-inf"))
        hyp_scores[:, :k] = _BIG
        done = torch.arange(self.batch) >= batch
        # Denominators as HF computes them: a Python float (int ** float), then float32.
        n = torch.arange(self.max_length + 1)
        table = torch.tensor([float(i) ** length_penalty if i else 1.0 for i in n.tolist()], dtype=torch.float32)
        best = float(max_new_tokens) ** length_penalty if early_stopping == "never" and length_penalty > 0.0 else 0.0
        vocab = torch.zeros(2, self.vocab_size, dtype=torch.bool)
        vocab[0, list(suppress_tokens or [])] = True
        vocab[1, list(begin_suppress_tokens or [])] = True
        dev = self.seq.device
        to = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
        self.seq.copy_(to(seq.view(rows, -1)))
        self.scores.copy_(to(scores.view(rows)))
        self.tokens.copy_(to(seq[:, :, plen - 1].reshape(rows)))
        self.parents.copy_(to(torch.arange(rows)))
        self.hyp_seq.fill_(fill)
        self.hyp_scores.copy_(to(hyp_scores))
        self.hyp_lengths.zero_()
        self.hyp_finished.zero_()
        self.done.copy_(to(done))
        self.improvable.copy_(to(~done))
        self.step.zero_()
        self.prefix_len.fill_(plen)
        self.max_new_tokens.fill_(max_new_tokens)
        self.num_beams.fill_(k)
        self.keep.fill_(max(2, 1 + len(eos)) * k)
        self.stop_when_full.fill_(early_stopping is True)
        self.fill.fill_(fill)
        self.eos.copy_(to(torch.tensor(eos + [-1] * (MAX_EOS - len(eos)), dtype=torch.int64)))
        self.denominators.copy_(to(table))
        self.best_denominator.fill_(best)
        self.suppress.copy_(to(vocab[0]))
        self.begin_suppress.copy_(to(vocab[1]))
        self.all_done.fill_(False)
        self.real_batch = batch


def beam_step(state: BeamState, logits: torch.Tensor) -> None:
    """One beam-search step from logits [batch * beams, vocab] (raw, any float dtype; each row's logits for its
    next token). Updates state in place: tokens, parents, seq, scores, finished hypotheses, done, step.
    Capturable in a CUDA graph; a step after every item is done changes nothing."""
    B, K, C = state.batch, state.beams, state.candidates
    V = logits.shape[-1]
    if logits.shape != (B * K, state.vocab_size):
        raise ValueError(f"logits: expected [{B * K}, {state.vocab_size}], got {tuple(logits.shape)}")
    dev = logits.device
    t = state.step  # [1]
    live = ~state.done  # [B]
    slot = torch.arange(K, device=dev)
    in_call = slot < state.num_beams  # [K]: slots of the call's beams

    # Log-probs, then HF's processors: suppressed tokens, and begin-suppressed ones at the first new token.
    logp = torch.log_softmax(logits.float(), dim=-1)
    banned = state.suppress | (state.begin_suppress & (t == 0))
    logp = torch.where(banned, float("-inf"), logp)
    scores = state.scores.view(B, K)
    acc = logp.view(B, K, V) + scores[:, :, None]
    # Inert rows never produce a candidate, whatever their logits hold (NaN included).
    row_live = live[:, None] & in_call[None, :]
    acc = torch.where(row_live[:, :, None], acc, float("-inf")).view(B, K * V)

    # c. top C candidates; ranks past the call's beams_to_keep do not exist in HF: -inf.
    top_lp, top_idx = torch.topk(acc, C, dim=1)
    rank = torch.arange(C, device=dev)
    top_lp = torch.where(rank < state.keep, top_lp, float("-inf"))
    beam = top_idx // V  # [B, C] source beam
    token = top_idx % V
    seq = state.seq.view(B, K, -1)
    cand_seq = torch.gather(seq, 1, beam[:, :, None].expand(B, C, seq.shape[-1]))
    column = (state.prefix_len + t).view(1, 1, 1).expand(B, C, 1)
    cand_seq = cand_seq.scatter(2, column, token[:, :, None])

    # d. stopping criteria of each candidate: eos, or the length limit
    hits = torch.isin(token, state.eos) | (t + 1 >= state.max_new_tokens)

    # e. running beams: the best candidates that did not just finish
    run_lp = top_lp + hits.to(torch.float32) * _BIG
    new_scores, pick = torch.topk(run_lp, K, dim=1)
    new_seq = torch.gather(cand_seq, 1, pick[:, :, None].expand(B, K, seq.shape[-1]))
    new_parent = torch.gather(beam, 1, pick) + torch.arange(B, device=dev)[:, None] * K
    new_token = torch.gather(token, 1, pick)
    keep_row = row_live  # rows that continue; the rest stay put, inert
    own = torch.arange(B * K, device=dev).view(B, K)
    state.seq.copy_(torch.where(keep_row[:, :, None], new_seq, seq).view(B * K, -1))
    state.scores.copy_(torch.where(keep_row, new_scores, torch.where(in_call, scores, float("-inf"))).view(-1))
    state.parents.copy_(torch.where(keep_row, new_parent, own).view(-1))
    state.tokens.copy_(torch.where(keep_row, new_token, state.fill).view(-1))

    # f. finished hypotheses: merge the top num_beams candidates that just finished, length-penalized
    fin = top_lp / state.denominators.index_select(0, t + 1)
    full = (state.hyp_finished | ~in_call).all(dim=1, keepdim=True) & state.stop_when_full
    fin = fin + full.to(torch.float32) * _BIG
    fin = fin + (~state.improvable[:, None]).to(torch.float32) * _BIG
    just = hits & (rank < state.num_beams)
    fin = fin + (~just) * _BIG
    merged_scores = torch.cat([state.hyp_scores, fin], dim=1)
    merged_seq = torch.cat([state.hyp_seq, cand_seq], dim=1)
    merged_len = torch.cat([state.hyp_lengths, (t + 1).expand(B, C)], dim=1)
    merged_fin = torch.cat([state.hyp_finished, just], dim=1)
    best_scores, best = torch.topk(merged_scores, K, dim=1)
    best_scores = torch.where(in_call, best_scores, float("-inf"))
    best_fin = torch.gather(merged_fin, 1, best) & in_call
    upd = live[:, None]
    state.hyp_seq.copy_(torch.where(upd[:, :, None], torch.gather(merged_seq, 1, best[:, :, None].expand(
        B, K, seq.shape[-1])), state.hyp_seq))  # fmt: skip
    state.hyp_scores.copy_(torch.where(upd, best_scores, state.hyp_scores))
    state.hyp_lengths.copy_(torch.where(upd, torch.gather(merged_len, 1, best), state.hyp_lengths))
    state.hyp_finished.copy_(torch.where(upd, best_fin, state.hyp_finished))

    # g. HF's early-stop heuristic (after cur_len += 1): can the best running beam still beat the worst finished?
    hyp_scores, finished = state.hyp_scores, state.hyp_finished
    denominator = torch.where(state.best_denominator > 0, state.best_denominator,
                              state.denominators.index_select(0, t + 1))  # fmt: skip
    best_running = state.scores.view(B, K)[:, :1] / denominator
    worst = torch.where(in_call, hyp_scores, float("inf")).min(dim=1, keepdim=True).values
    worst = torch.where(finished, worst, _BIG)
    worst = torch.where(in_call, worst, float("inf"))
    improvable = state.improvable & (best_running > worst).any(dim=1)
    state.improvable.copy_(torch.where(live, improvable, state.improvable))
    full = (finished | ~in_call).all(dim=1) & state.stop_when_full
    done = state.done | ~improvable | full | (t + 1 >= state.max_new_tokens)
    state.done.copy_(done)
    state.step.add_(live.any().long())
    state.all_done.copy_(done.all().view(1))


def finalize(state: BeamState) -> tuple[torch.Tensor, torch.Tensor]:
    """HF generate's beam-search output for the call's batch (host sync): sequences [batch, prefix_len +
    longest best hypothesis] int64 (prefix included, shorter rows filled as HF fills them) and their scores
    [batch] float32 (HF's sequences_scores)."""
    batch = state.real_batch
    lengths = state.hyp_lengths[:batch, 0]
    width = int(state.prefix_len) + int(lengths.max())
    return state.hyp_seq[:batch, 0, :width].clone(), state.hyp_scores[:batch, 0].clone()
