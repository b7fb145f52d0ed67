"""Encoder-decoder generation from a seq2seq bundle (Whisper, BART-like): encode once, decode steps on the device.

The program has two entries over one weight set and one static state (kernl.compiler.seq2seq):

    encode                 encoder inputs of a (batch, seq) bucket → writes each decoder layer's cross k/v into
                           the cross caches at the requests' rows (a padded bucket row writes a scratch row)
    decode                 one token per decode row → logits; rows are request-major (request i's beams are
                           rows i*beams .. i*beams+beams-1) and read their request's cross cache row

A call encodes its batch, feeds the decoder prefix (the start token; Whisper's forced tokens) through decode
steps one token at a time (no separate decoder prefill entry: a prefix is a few tokens), then runs decode
steps with the sampler (greedy / sampling: kernl.runtime.sampling) or the beam search (kernl.runtime.beam)
inside. Every row of a step sits at the same position, so the position is one counter. Beam search reorders
the self-attention caches on the device after each step (index_select by each row's parent); the cross caches
are per request and never copied. On CUDA each step is a captured graph per (batch bucket, beams, mode).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kernl.errors import BundleError, InputError
from kernl.runtime.beam import BeamState, beam_step, finalize
from kernl.runtime.generation import _smallest, id_limit
from kernl.runtime.program import ProgramSpec
from kernl.runtime.sampling import SamplingParams, make_generator, sample, update_done
from kernl.runtime.steps import capture_step, read_async, wait_read

CHECK_EVERY = 8  # decode steps queued between two looks at the done flags
N_EOS = 4
SPEECH, TEXT = "speech", "text"


@dataclass
class Seq2SeqSettings:
    kind: str
    max_length: int
    batch_sizes: list[int]
    seq_lens: list[int]
    num_beams: int
    vocab_size: int
    enc_len: int
    eos_token_id: list[int]
    pad_token_id: int | None
    decoder_prefix: list[int]
    suppress_tokens: list[int]
    begin_suppress_tokens: list[int]
    return_prefix: bool
    num_mel_bins: int | None
    audio: dict | None = None  # speech: {"config", "mel_filters"} for log-mel features from waveforms

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Seq2SeqSettings:
        gen = manifest.get("seq2seq")
        try:
            eos = gen.get("eos_token_id")
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            out = cls(
                str(gen["kind"]),
                int(gen["max_length"]),
                sorted(int(b) for b in gen["batch_sizes"]),
                sorted(int(s) for s in gen["seq_lens"]),
                int(gen["num_beams"]),
                int(gen["vocab_size"]),
                int(gen["enc_len"]),
                [int(e) for e in eos],
                None if gen.get("pad_token_id") is None else int(gen["pad_token_id"]),
                [int(t) for t in gen["decoder_prefix"]],
                [int(t) for t in gen.get("suppress_tokens") or []],
                [int(t) for t in gen.get("begin_suppress_tokens") or []],
                bool(gen.get("return_prefix", True)),
                None if gen.get("num_mel_bins") is None else int(gen["num_mel_bins"]),
                gen.get("audio"),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            raise BundleError("manifest.json: seq2seq settings are malformed") from None
        if out.kind not in (SPEECH, TEXT) or not out.batch_sizes or not out.seq_lens or not out.decoder_prefix:
            raise BundleError("manifest.json: seq2seq buckets are malformed")
        if len(out.decoder_prefix) >= out.max_length or out.num_beams < 1:
            raise BundleError("manifest.json: seq2seq decoder prefix or beams are malformed")
        if out.audio is not None:
            config, bank = out.audio["config"], out.audio["mel_filters"]
            rows = 1 + int(config["n_fft"]) // 2
            if (
                out.kind != SPEECH
                or list(bank["shape"]) != [rows, out.num_mel_bins]
                or (int(config["n_samples"]) // int(config["hop_length"]) != out.seq_lens[-1])
            ):
                raise BundleError("manifest.json: seq2seq audio settings do not fit the model's features")
            if len(bank["index"]) != len(bank["values"]) or any(not 0 <= i < rows * out.num_mel_bins
                                                                for i in bank["index"]):  # fmt: skip
                raise BundleError("manifest.json: seq2seq mel filters are malformed")
        return out

    def mel_filters(self) -> torch.Tensor | None:
        """The dense mel filter bank [1 + n_fft // 2, mels] float32 (stored sparse), or None."""
        if self.audio is None:
            return None
        bank = self.audio["mel_filters"]
        dense = torch.zeros(int(bank["shape"][0]) * int(bank["shape"][1]), dtype=torch.float32)
        index = torch.tensor(bank["index"], dtype=torch.int64)
        dense[index] = torch.tensor(bank["values"], dtype=torch.float64).to(torch.float32)
        return dense.view(*bank["shape"])


@dataclass
class Seq2SeqRequest:
    encoder_inputs: list[torch.Tensor]  # host tensors of the bucket: [features] or [ids, mask]
    lengths: list[int]  # encoder positions of each request
    batch: int  # real requests
    bucket: int  # batch bucket
    prefix: list[int]
    num_beams: int
    max_new_tokens: int
    params: SamplingParams | None  # greedy / sampling (num_beams == 1)
    beam_options: dict
    seed: int | None


class Seq2SeqGenerator:
    """The encode and decode entries of one seq2seq bundle on one device, their static state and graphs."""

    def __init__(
        self,
        spec: ProgramSpec,
        weights: Sequence[torch.Tensor],
        device: torch.device,
        settings: Seq2SeqSettings,
        *,
        cuda_graphs: bool = True,
        scope: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.settings = s = settings
        self.device = device
        filters = s.mel_filters()
        self.mel_filters = None if filters is None else filters.to(device)
        self.scope = scope or contextlib.nullcontext
        self.id_limit = id_limit(spec, ("encode", "decode"), ("input_ids", "decoder_input_ids"), s.vocab_size)
        self.encode = spec.bind("encode")
        self.decode = spec.bind("decode")
        self.state = spec.allocate_state(device)
        self.args = [*weights, *self.state]
        self.self_caches = self.state[: len(self.state) // 2]
        requests, rows = s.batch_sizes[-1], s.batch_sizes[-1] * s.num_beams
        if self.self_caches and self.self_caches[0].shape[0] < rows:
            raise BundleError(f"program state has {self.self_caches[0].shape[0]} decode rows for {rows}")
        self.scratch_row = requests
        long = dict(dtype=torch.int64, device=device)
        self.tokens = torch.zeros(rows, 1, **long)
        self.positions = torch.zeros(rows, 1, **long)
        self.enc_lengths = torch.zeros(requests, **long)
        self.seq = torch.zeros(rows, s.max_length + 1, **long)
        self.done = torch.ones(rows, dtype=torch.bool, device=device)
        self.step_count = torch.zeros(rows, **long)
        self.params = SamplingParams.build(rows, device, do_sample=False, n_eos=N_EOS)
        self.suppress = torch.zeros(s.vocab_size, dtype=torch.bool, device=device)
        self.suppress[s.suppress_tokens] = True
        self.begin_suppress = torch.zeros(s.vocab_size, dtype=torch.bool, device=device)
        self.begin_suppress[s.begin_suppress_tokens] = True
        self.rng = make_generator(device, 0)
        self.beams: dict[tuple[int, int], BeamState] = {}
        self.graphs = cuda_graphs and device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.encode_entries: dict[tuple[int, int], tuple[Any, list[torch.Tensor], Callable]] = {}
        self.step_graphs: dict[tuple, Any] = {}
        self.timings = {"capture_s": 0.0}

    # ---- checking a call -------------------------------------------------------------------------------

    def request(
        self,
        input_ids=None,
        attention_mask=None,
        input_features=None,
        *,
        audio=None,
        sampling_rate: int | None = None,
        max_new_tokens: int,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        decoder_prefix: Sequence[int] | None = None,
        seed: int | None = None,
        no_repeat_ngram_size: int = 0,
        min_length: int = 0,
        min_new_tokens: int = 0,
        forced_bos_token_id: int | None = None,
        forced_eos_token_id: int | None = None,
    ) -> Seq2SeqRequest:
        s = self.settings
        if s.kind == SPEECH:
            if input_ids is not None or attention_mask is not None:
                raise InputError("input_ids: this bundle transcribes speech: give input_features (log-mel)")
            if audio is not None:
                if input_features is not None:
                    raise InputError("audio: give audio or input_features, not both")
                input_features = self.features(audio, sampling_rate)
            inputs, lengths = self._features(input_features)
        else:
            if input_features is not None or audio is not None:
                what = "input_features" if input_features is not None else "audio"
                raise InputError(f"{what}: this bundle reads text: give input_ids (and attention_mask)")
            inputs, lengths = self._texts(input_ids, attention_mask)
        batch = len(lengths)
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or not 1 <= num_beams <= s.num_beams:
            raise InputError(f"num_beams must be an int in 1..{s.num_beams} (the bundle's largest), got {num_beams!r}")
        if num_beams > 1 and do_sample:
            raise InputError("do_sample: beam sampling is not supported; give num_beams=1 or do_sample=False")
        if float(repetition_penalty) != 1.0:
            raise InputError("repetition_penalty: not supported by seq2seq bundles")
        # BART-like generation configs ask for these logits processors; the runtime has none of them.
        unsupported = {"no_repeat_ngram_size": no_repeat_ngram_size, "min_length": min_length,
                       "min_new_tokens": min_new_tokens, "forced_bos_token_id": forced_bos_token_id,
                       "forced_eos_token_id": forced_eos_token_id}  # fmt: skip
        asked = next((name for name, value in unsupported.items() if value not in (None, 0)), None)
        if asked is not None:
            raise InputError(f"{asked}: not supported by seq2seq bundles (give None or 0)")
        prefix = list(s.decoder_prefix if decoder_prefix is None else decoder_prefix)
        if not prefix or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.id_limit
                             for t in prefix):  # fmt: skip
            raise InputError(f"decoder_prefix: expected token ids in 0..{self.id_limit - 1}, got {prefix!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if len(prefix) + max_new_tokens > s.max_length:
            raise InputError(f"max_new_tokens: {len(prefix)} decoder prefix tokens + {max_new_tokens} new ones "
                             f"exceed the bundle's max_length {s.max_length}")  # fmt: skip
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InputError(f"seed must be an int >= 0, got {seed!r}")
        eos = s.eos_token_id if eos_token_id is None else eos_token_id
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        if len(eos_list) > N_EOS:
            raise InputError(f"eos_token_id: at most {N_EOS} ids, got {len(eos_list)}")
        pad = pad_token_id if pad_token_id is not None else s.pad_token_id
        bucket = _smallest(s.batch_sizes, batch)
        params, beam_options = None, {}
        if num_beams == 1:
            rows = bucket
            params = SamplingParams.build(
                rows, self.device,
                do_sample=[do_sample] * batch + [False] * (rows - batch),
                temperature=temperature, top_k=top_k, top_p=top_p,
                eos_token_id=eos_list, pad_token_id=pad,
                max_new_tokens=[max_new_tokens] * batch + [1] * (rows - batch),
                n_eos=N_EOS, vocab_size=s.vocab_size,
            )  # fmt: skip
        else:
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < s.vocab_size for t in eos_list):
                raise InputError(f"eos_token_id: token ids must be in 0..{s.vocab_size - 1}")
            beam_options = dict(eos_token_id=eos_list, pad_token_id=pad, length_penalty=length_penalty,
                                early_stopping=early_stopping)  # fmt: skip
        return Seq2SeqRequest(inputs, lengths, batch, bucket, prefix, num_beams, max_new_tokens, params,
                              beam_options, seed)  # fmt: skip

    def features(self, audio, sampling_rate: int | None = None) -> torch.Tensor:
        """Log-mel features [batch, mels, frames] of 16 kHz waveforms (a 1-D tensor or array, a [batch, samples]
        one, or a list of 1-D ones), as the model's WhisperFeatureExtractor computes them (kernl.runtime.audio)."""
        from kernl.runtime.audio import log_mel

        if self.mel_filters is None:
            raise InputError("audio: this bundle carries no mel filters (built without a feature extractor); "
                             "give input_features")  # fmt: skip

        def tensor(clip):
            if isinstance(clip, torch.Tensor):
                return clip
            try:
                import numpy as np

                if isinstance(clip, np.ndarray):
                    return torch.from_numpy(np.ascontiguousarray(clip))
            except ImportError:  # pragma: no cover - numpy ships with torch's wheels
                pass
            raise InputError(f"audio: expected a tensor or numpy array (or a list of them), got {type(clip).__name__}")

        clips = [tensor(c) for c in audio] if isinstance(audio, (list, tuple)) else tensor(audio)
        if isinstance(clips, list) and not clips:
            raise InputError("audio: expected at least one clip")
        if isinstance(clips, torch.Tensor) and clips.dim() == 1:
            clips = [clips]
        batch = len(clips)
        if not 1 <= batch <= self.settings.batch_sizes[-1]:
            raise InputError(f"audio: batch {batch} is outside 1..{self.settings.batch_sizes[-1]} (the largest bucket)")
        return log_mel(clips, self.mel_filters, self.settings.audio["config"], sampling_rate=sampling_rate)

    def _features(self, feats) -> tuple[list[torch.Tensor], list[int]]:
        s = self.settings
        if not isinstance(feats, torch.Tensor) or not feats.dtype.is_floating_point:
            raise InputError("input_features: expected a float tensor [batch, mel bins, frames]")
        if feats.dim() == 2:
            feats = feats.unsqueeze(0)
        want = (s.num_mel_bins, s.seq_lens[-1])
        if feats.dim() != 3 or tuple(feats.shape[1:]) != want:
            raise InputError(f"input_features: expected [batch, {want[0]}, {want[1]}] (mel bins, frames), got "
                             f"{tuple(feats.shape)}")  # fmt: skip
        batch = feats.shape[0]
        if not 1 <= batch <= s.batch_sizes[-1]:
            raise InputError(f"input_features: batch {batch} is outside 1..{s.batch_sizes[-1]} (the largest bucket)")
        if not bool(torch.isfinite(feats).all()):
            raise InputError("input_features: holds NaN or infinite values")
        bucket = _smallest(s.batch_sizes, batch)
        host = torch.zeros(bucket, *want, dtype=self.state[0].dtype)
        host[:batch] = feats.detach().cpu()
        return [host], [s.enc_len] * batch

    def _texts(self, input_ids, attention_mask) -> tuple[list[torch.Tensor], list[int]]:
        from kernl.runtime.generation import checked_prompts

        if input_ids is None:
            raise InputError("input_ids: required (this bundle reads text)")
        s = self.settings
        prompts = checked_prompts(
            input_ids, attention_mask, s.batch_sizes[-1], s.seq_lens[-1], self.id_limit, "an input", "bucket"
        )
        longest = max(len(p) for p in prompts)
        bucket, seq = _smallest(s.batch_sizes, len(prompts)), _smallest(s.seq_lens, longest)
        ids = torch.zeros(bucket, seq, dtype=torch.int64)
        mask = torch.zeros(bucket, seq, dtype=torch.int64)
        for r, p in enumerate(prompts):  # right-padded: positions stay those of the unpadded input
            ids[r, : len(p)] = torch.tensor(p, dtype=torch.int64)
            mask[r, : len(p)] = 1
        mask[len(prompts) :, 0] = 1  # padding rows see one token: no row of all-masked keys
        return [ids, mask], [len(p) for p in prompts]

    # ---- steps, eager or captured ----------------------------------------------------------------------

    def _capture(self, run: Callable[[], Any], generator: bool) -> tuple[Any, Any]:
        start = time.perf_counter()
        out = capture_step(run, self.device, self.pool, self.rng if generator else None)
        self.timings["capture_s"] += time.perf_counter() - start
        return out

    def _encode_entry(self, bucket: tuple[int, int]):
        """(replay, static inputs) of an encoder bucket; inputs: the encoder's, then rows."""
        if bucket not in self.encode_entries:
            batch, seq = bucket
            s, long = self.settings, dict(dtype=torch.int64, device=self.device)
            if s.kind == SPEECH:
                inputs = [torch.zeros(batch, s.num_mel_bins, seq, dtype=self.state[0].dtype, device=self.device)]
            else:
                inputs = [torch.zeros(batch, seq, **long), torch.ones(batch, seq, **long)]
            inputs.append(torch.full((batch,), self.scratch_row, **long))

            def run():
                return self.encode(self.device, *self.args, *inputs)

            replay = run
            if self.graphs:
                with torch.no_grad(), self.scope(), torch.cuda.device(self.device):
                    graph, _ = self._capture(run, generator=False)
                replay = graph.replay
            self.encode_entries[bucket] = (replay, inputs)
        return self.encode_entries[bucket]

    def _logits(self, rows: int, requests: int) -> torch.Tensor:
        (logits,) = self.decode(self.device, *self.args, self.tokens[:rows], self.positions[:rows],
                                self.enc_lengths[:requests])  # fmt: skip
        return logits

    def _prefix_step(self, rows: int, requests: int) -> None:
        self._logits(rows, requests)
        self.positions[:rows].add_(1)

    def _sample_step(self, rows: int, greedy: bool) -> None:
        logits = self._logits(rows, rows).float()
        first = (self.step_count[:rows] == 0)[:, None]
        banned = self.suppress[None, :] | (self.begin_suppress[None, :] & first)
        logits = logits.masked_fill(banned, float("-inf"))
        params = self.params.head(rows)
        token = sample(logits, params, None, self.rng, greedy_only=greedy)
        running = ~self.done[:rows]
        update_done(token, params, self.step_count[:rows], self.done[:rows])
        positions = self.positions[:rows, 0]
        column = torch.where(running, positions + 1, self.settings.max_length)
        self.seq[:rows].scatter_(1, column.unsqueeze(1), token.unsqueeze(1))
        positions.add_(1)
        self.tokens[:rows, 0].copy_(token)

    def _beam_step(self, state: BeamState, requests: int) -> None:
        rows = state.batch * state.beams
        beam_step(state, self._logits(rows, requests))
        for cache in self.self_caches:
            cache[:rows].copy_(cache[:rows].index_select(0, state.parents))
        self.tokens[:rows, 0].copy_(state.tokens)
        self.positions[:rows].add_(1)

    def _step(self, key: tuple, run: Callable[[], None], generator: bool = False) -> Callable[[], None]:
        """run itself on CPU, else the replay of its graph (captured on first use)."""
        if not self.graphs:
            return run
        if key not in self.step_graphs:
            with torch.no_grad(), self.scope(), torch.cuda.device(self.device):
                graph, _ = self._capture(run, generator=generator)
            self.step_graphs[key] = graph
        return self.step_graphs[key].replay

    def _beam_state(self, requests: int, beams: int) -> BeamState:
        key = (requests, beams)
        if key not in self.beams:
            s = self.settings
            self.beams[key] = BeamState.allocate(requests, beams, s.max_length, s.vocab_size, self.device)
        return self.beams[key]

    def capture(self) -> None:
        """Capture every encoder bucket and the greedy step of every batch bucket (at load)."""
        if not self.graphs:
            return
        s = self.settings
        for bucket in ((b, q) for b in s.batch_sizes for q in s.seq_lens):
            self._encode_entry(bucket)
        for rows in s.batch_sizes:
            if len(s.decoder_prefix) > 1:
                self._step(("prefix", rows, 1), lambda r=rows: self._prefix_step(r, r))
            self._step(("sample", rows, True), lambda r=rows: self._sample_step(r, True))

    # ---- running a request -----------------------------------------------------------------------------

    def _encode(self, req: Seq2SeqRequest) -> None:
        s = self.settings
        seq = req.encoder_inputs[0].shape[-1] if s.kind == TEXT else s.seq_lens[-1]
        replay, inputs = self._encode_entry((req.bucket, seq))
        for static, host in zip(inputs, req.encoder_inputs):
            static.copy_(host, non_blocking=True)
        rows = torch.full((req.bucket,), self.scratch_row, dtype=torch.int64)
        rows[: req.batch] = torch.arange(req.batch)
        inputs[-1].copy_(rows, non_blocking=True)
        lengths = torch.zeros(req.bucket, dtype=torch.int64)
        lengths[: req.batch] = torch.tensor(req.lengths)
        self.enc_lengths[: req.bucket].copy_(lengths, non_blocking=True)
        replay()

    def _steps_for(self, req: Seq2SeqRequest) -> tuple[Callable[[], None], Callable[[], None]]:
        """(prefix step, decode step) of a request, captured now if new: before the request writes any state,
        since a capture's warm run moves positions, caches and beams."""
        rows = req.bucket * req.num_beams
        prefix = _unused  # one prefix token (T5, BART): the first decode step reads it, no prefix step runs
        if len(req.prefix) > 1:
            prefix = self._step(("prefix", req.bucket, req.num_beams), lambda: self._prefix_step(rows, req.bucket))
        if req.num_beams > 1:
            state = self._beam_state(req.bucket, req.num_beams)
            return prefix, self._step(("beam", req.bucket, req.num_beams), lambda: self._beam_step(state, req.bucket))
        greedy = req.params.all_greedy
        return prefix, self._step(("sample", rows, greedy), lambda: self._sample_step(rows, greedy), not greedy)

    def _feed_prefix(self, req: Seq2SeqRequest, rows: int, step: Callable[[], None]) -> None:
        """Every prefix token but the last through decode steps (their logits unused): the caches hold them."""
        self.positions[:rows].zero_()
        for token in req.prefix[:-1]:
            self.tokens[:rows].fill_(token)
            step()
        self.tokens[:rows].fill_(req.prefix[-1])

    def run(self, req: Seq2SeqRequest) -> torch.Tensor:
        """The decoder sequences [batch, prefix + new] on the host (HF generate's, before any prefix strip)."""
        with torch.no_grad(), self.scope():
            prefix_step, step = self._steps_for(req)
            self._encode(req)
            if req.num_beams == 1:
                return self._run_sampling(req, prefix_step, step)
            return self._run_beams(req, prefix_step, step)

    def _loop(self, step: Callable[[], None], steps: int, done: torch.Tensor) -> None:
        check = None
        for i in range(steps):
            step()
            if (i + 1) % CHECK_EVERY == 0:
                if check is not None and bool(wait_read(check)[0].all()):
                    break
                check = read_async(done)

    def _run_sampling(
        self, req: Seq2SeqRequest, prefix_step: Callable[[], None], step: Callable[[], None]
    ) -> torch.Tensor:
        rows, plen = req.bucket, len(req.prefix)
        self._feed_prefix(req, rows, prefix_step)
        self.params.copy_(_padded(req.params, self.params.rows))
        if req.seed is not None:
            self.rng.manual_seed(req.seed)
        else:
            self.rng.seed()
        self.step_count[:rows].zero_()
        done = torch.zeros(rows, dtype=torch.bool)
        done[req.batch :] = True
        self.done[:rows].copy_(done, non_blocking=True)
        self.seq[:rows, :plen].copy_(torch.tensor([req.prefix] * rows), non_blocking=True)
        self._loop(step, req.max_new_tokens, self.done[: req.batch])
        seq, produced = self.seq[: req.batch].cpu(), self.step_count[: req.batch].cpu()
        pads = req.params.pad_token_id.cpu().tolist()
        width = int(produced.max())
        out = torch.empty(req.batch, plen + width, dtype=torch.int64)
        for r in range(req.batch):
            n = int(produced[r])
            out[r, : plen + n] = seq[r, : plen + n]
            out[r, plen + n :] = pads[r]
        return out

    def _run_beams(
        self, req: Seq2SeqRequest, prefix_step: Callable[[], None], step: Callable[[], None]
    ) -> torch.Tensor:
        s = self.settings
        state = self._beam_state(req.bucket, req.num_beams)
        rows = req.bucket * req.num_beams
        self._feed_prefix(req, rows, prefix_step)
        prefix = torch.tensor([req.prefix] * req.batch, dtype=torch.int64)
        state.reset(prefix, num_beams=req.num_beams, max_new_tokens=req.max_new_tokens,
                    suppress_tokens=s.suppress_tokens, begin_suppress_tokens=s.begin_suppress_tokens,
                    **req.beam_options)  # fmt: skip
        self._loop(step, req.max_new_tokens, state.all_done)
        seq, _ = finalize(state)
        return seq.cpu()


def _unused() -> None:
    raise AssertionError("a prefix step for a request whose prefix is one token")


def _padded(params: SamplingParams, rows: int) -> SamplingParams:
    from kernl.runtime.generation import _padded_params

    return _padded_params(params, rows)
