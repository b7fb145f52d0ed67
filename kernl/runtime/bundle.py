"""A loaded bundle: weights on the device, the program bound, calls dispatched to buckets."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kernl.errors import InputError
from kernl.runtime.continuous import ContinuousBatch
from kernl.runtime.dispatch import call_shape, check_inputs, pick_bucket
from kernl.runtime.generation import Generator, Settings, output_ids
from kernl.runtime.output import BundleOutput
from kernl.runtime.program import Program, ProgramSpec
from kernl.runtime.runner import Runner

CAPTURE_MODES = ("all", "lazy")


class Bundle:
    """Call with the model's keyword inputs (input_ids=…, attention_mask=…); returns a BundleOutput."""

    def __init__(
        self,
        manifest: dict[str, Any],
        spec: ProgramSpec,
        program: Program | None,
        weights: list[torch.Tensor],
        device: torch.device,
        *,
        cuda_graphs: bool = True,
        capture: str = "all",
        scope: Callable[[], contextlib.AbstractContextManager] | None = None,
        tokenizer: Callable[[], Any] | None = None,
    ) -> None:
        self.manifest = manifest
        self.device = device
        self.buckets = [tuple(b) for b in manifest["buckets"]]
        self._spec = spec
        self._lock = threading.Lock()
        self._tokenizer_loader, self._tokenizer = tokenizer, None
        # Seconds spent in each step of kernl.load (verify, weights, warm-up, capture...), for diagnosis.
        self.load_timings: dict[str, float] = {}
        self._runner = self._generator = self._seq2seq = None
        # Tensor parallel (set by kernl.load): rank 0's sampling seed for every rank, so all ranks pick the same tokens.
        self.shared_seed: Callable[[int | None], int | None] | None = None
        self.placement = None  # tensor parallel: this rank's kernl.runtime.tensor_parallel.Placement
        if program is not None:
            inputs = [(s["name"], getattr(torch, s["dtype"])) for s in spec.inputs]
            self._runner = Runner(
                program, weights, inputs, spec.outputs, device, graphs=cuda_graphs, scope=scope, specs=spec.inputs
            )
            if capture == "all":
                self._runner.capture(self.buckets)
                self.load_timings.update(self._runner.timings)
        if "generation" in manifest:
            settings = Settings.from_manifest(manifest)
            self._generator = Generator(spec, weights, device, settings, cuda_graphs=cuda_graphs, scope=scope)
            if capture == "all":
                self._generator.capture()
                self.load_timings.update(self._generator.timings)
        if "seq2seq" in manifest:
            from kernl.runtime.seq2seq import Seq2SeqGenerator, Seq2SeqSettings

            s2s = Seq2SeqSettings.from_manifest(manifest)
            self._seq2seq = Seq2SeqGenerator(spec, weights, device, s2s, cuda_graphs=cuda_graphs, scope=scope)
            if capture == "all":
                self._seq2seq.capture()
                self.load_timings.update(self._seq2seq.timings)

    def __repr__(self) -> str:
        return f"<kernl.Bundle {self.manifest.get('model')} on {self.device}, buckets {self.buckets}>"

    @property
    def tokenizer(self):
        """The bundle's tokenizer (kernl.runtime.tokenizer), or None when it was built without one."""
        if self._tokenizer_loader is not None:
            self._tokenizer, self._tokenizer_loader = self._tokenizer_loader(), None
        return self._tokenizer

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> BundleOutput:
        if self._runner is None:
            raise InputError("this bundle generates text: call bundle.generate(input_ids, ...) or bundle.stream(...)")
        tensors = check_inputs(inputs, self._spec.inputs, self.buckets)
        batch, seq = call_shape(tensors, self._spec.inputs)
        bucket = pick_bucket(batch, seq, self.buckets, self._spec.input_names[0])
        with self._lock:  # one replay at a time: the static buffers are shared
            outs = self._runner(bucket, tensors)
        return BundleOutput((spec["name"], out) for spec, out in zip(self._spec.outputs, outs))

    @property
    def lock(self) -> threading.Lock:
        """Held while the bundle runs: a server sharing the bundle's static buffers takes it around its own work."""
        return self._lock

    def continuous(self) -> ContinuousBatch:
        """The generation bundle's one continuous batch (kernl.runtime.continuous): requests join and leave a
        running decode batch at free cache rows. Use under bundle.lock."""
        return self._generation().continuous()

    def _generation(self) -> Generator:
        if self._generator is None:
            raise InputError("this bundle was not compiled for text generation (kernl-compile --task text-generation)")
        return self._generator

    def generate(self, input_ids=None, attention_mask=None, **options) -> torch.Tensor:
        """Generate from prompts: HF-style [batch, seq] tensors (with attention_mask when padded, either side)
        or a ragged list of token-id lists. Returns [batch, prompt + new] ids on the host, as transformers'
        generate does. options: max_new_tokens (required), do_sample, temperature, top_k, top_p,
        repetition_penalty, eos_token_id, pad_token_id, seed.

        An encoder-decoder bundle (kernl.runtime.seq2seq) takes input_ids/attention_mask (text) or
        input_features=[batch, mel bins, frames] (speech) or audio= 16 kHz waveforms (a 1-D tensor or array, or a
        list of them; sampling_rate= checks theirs), plus num_beams, length_penalty, early_stopping and
        decoder_prefix, and returns the decoder's ids as HF generate does (Whisper: the new tokens only)."""
        if self._seq2seq is not None:
            req = self._seq2seq.request(input_ids, attention_mask, **options)
            with self._lock:
                out = self._seq2seq.run(req)
            return out if self._seq2seq.settings.return_prefix else out[:, len(req.prefix) :]
        if input_ids is None:
            raise InputError("input_ids: required")
        generator = self._generation()
        if self.shared_seed is not None:
            options["seed"] = self.shared_seed(options.get("seed"))
        req = generator.request(input_ids, attention_mask, **options)
        with self._lock:
            seq, produced = generator.run(req)
        return output_ids(input_ids, req, seq, produced)

    def stream(self, input_ids, attention_mask=None, **options) -> Iterator[torch.Tensor]:
        """As generate, yielding each step's new tokens ([batch] int64 on the host; pad for finished rows)."""
        if self._seq2seq is not None:
            raise InputError("stream: not supported by encoder-decoder bundles yet; call generate")
        generator = self._generation()
        if self.shared_seed is not None:
            options["seed"] = self.shared_seed(options.get("seed"))
        req = generator.request(input_ids, attention_mask, **options)  # bad arguments raise here, not at next()

        def tokens() -> Iterator[torch.Tensor]:
            with self._lock:
                yield from generator.stream(req)

        return tokens()
