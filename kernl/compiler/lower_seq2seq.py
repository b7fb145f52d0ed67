"""Export an encoder-decoder's encoder and decoder → rewrite → encode and decode entries, in memory."""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind

from kernl.compiler.codegen import bind_device, generation_source
from kernl.compiler.decoder_positions import fed_positions, position_embedding
from kernl.compiler.lower import _weights
from kernl.compiler.lower_generation import positive
from kernl.compiler.passes import run_passes
from kernl.compiler.seq2seq import (
    DECODE,
    DECODER_INPUTS,
    ENC_LENGTHS,
    ENCODE,
    ENCODER_STATES,
    ROWS,
    Seq2SeqLayout,
    arrange_params,
    decode_graph,
    encode_graph,
    layout,
)
from kernl.compiler.serialize import generation_spec
from kernl.compiler.trace import is_constraint_violation, relaxed_export
from kernl.errors import KernlError
from kernl.runtime.program import ProgramSpec

SPEECH, TEXT = "speech", "text"
MAX_BEAMS = 8


@dataclass(frozen=True)
class Seq2SeqSettings:
    """What a seq2seq bundle serves: encoder inputs padded to (batch, seq) buckets (speech: one fixed window),
    decode steps of batch × beams rows, and max_length decoder positions per row (forced prefix included)."""

    kind: str  # "text" (input_ids) or "speech" (input_features)
    max_length: int
    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]  # encoder input lengths (speech: the fixed number of frames)
    num_beams: int  # the largest beam count a call may ask for

    @classmethod
    def checked(
        cls,
        kind: str,
        max_length: int,
        batch_sizes: Sequence[int],
        seq_lens: Sequence[int],
        num_beams: int = 1,
        model_max: int | None = None,
    ) -> Seq2SeqSettings:
        (max_length,) = positive("max_length", [max_length])
        if max_length < 2:
            raise KernlError("max_length: at least 2 (the decoder start token and one new token)")
        (num_beams,) = positive("num_beams", [num_beams])
        if num_beams > MAX_BEAMS:
            raise KernlError(f"num_beams: at most {MAX_BEAMS}, got {num_beams}")
        if model_max is not None and max_length > model_max:
            raise KernlError(f"max_length {max_length} is beyond the decoder's {model_max} positions")
        return cls(kind, max_length, positive("batch_sizes", batch_sizes), positive("seq_lens", seq_lens), num_beams)

    @property
    def decode_rows(self) -> int:
        return self.batch_sizes[-1] * self.num_beams

    def encode_buckets(self) -> list[tuple[int, int]]:
        return [(b, s) for b in self.batch_sizes for s in self.seq_lens]

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "max_length": self.max_length,
            "batch_sizes": list(self.batch_sizes),
            "seq_lens": list(self.seq_lens),
            "num_beams": self.num_beams,
        }


@dataclass
class LoweredSeq2Seq:
    model: torch.nn.Module
    spec: ProgramSpec
    source: str
    weights: dict[str, torch.Tensor]
    report: dict[str, int]
    settings: Seq2SeqSettings
    layout: Seq2SeqLayout
    enc_len: int  # encoder output positions at the largest input bucket (the cross cache's length)
    dtype: torch.dtype
    device: torch.device

    def weight_list(self) -> list[torch.Tensor]:
        return [self.weights[name] for name in self.spec.weights]


def model_kind(model: torch.nn.Module) -> str:
    """speech when the encoder reads input_features (Whisper), text when it reads input_ids."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    if encoder is None or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise KernlError(f"{type(model).__name__}: not an encoder-decoder model (config.is_encoder_decoder)")
    params = inspect.signature(encoder.forward).parameters
    if "input_features" in params:
        return SPEECH
    if "input_ids" in params:
        return TEXT
    raise KernlError(f"{type(model).__name__}: its encoder reads neither input_ids nor input_features")


def speech_frames(model: torch.nn.Module) -> int:
    """The fixed number of feature frames a Whisper-like encoder takes (its positions × the conv strides)."""
    encoder = model.get_encoder()
    positions = getattr(model.config, "max_source_positions", None)
    strides = [getattr(encoder, name).stride[0] for name in ("conv1", "conv2") if hasattr(encoder, name)]
    if not isinstance(positions, int) or len(strides) != 2:
        raise KernlError(f"{type(model).__name__}: cannot tell the encoder's input window (max_source_positions)")
    return positions * strides[0] * strides[1]


class _SpeechEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_features):
        return self.m.get_encoder()(input_features=input_features, return_dict=True).last_hidden_state


class _TextEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask):
        encoder = self.m.get_encoder()
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class _Decoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, decoder_input_ids, decoder_position_ids, encoder_hidden_states):
        from transformers.modeling_outputs import BaseModelOutput

        kwargs = dict(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                      decoder_input_ids=decoder_input_ids, use_cache=False, return_dict=True)  # fmt: skip
        if "decoder_position_ids" in inspect.signature(self.m.forward).parameters:
            return self.m(**kwargs, decoder_position_ids=decoder_position_ids).logits
        if position_embedding(self.m) is None:  # T5-like: positions only in the self-attention's bias
            return self.m(**kwargs).logits  # (kernl.compiler.seq2seq evaluates that bias per row)
        with fed_positions(self.m, decoder_position_ids):  # BART-like: positions computed inside the decoder
            return self.m(**kwargs).logits


def _export(module: torch.nn.Module, example: dict[str, torch.Tensor], shapes: dict):
    """Export with the declared dims; when torch's solver cannot prove a guard over a declared range, again with
    Dim.AUTO (kernl.compiler.trace.relaxed_export)."""
    what = type(module).__name__.strip("_").lower()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(module, (), dict(example), dynamic_shapes=shapes, strict=False)
        except Exception as err:  # noqa: BLE001 - say which half failed
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            if not is_constraint_violation(err):
                raise KernlError(f"{what} export failed: {first}") from err
    try:
        return relaxed_export(module, example, shapes)
    except KernlError:
        raise
    except Exception as err:  # noqa: BLE001
        raise KernlError(f"{what} export failed: {first}") from err


def _dim(name: str, top: int) -> Dim | None:
    return Dim(name, min=1, max=top) if top > 1 else None


def _rewrite(ep) -> tuple[torch.fx.GraphModule, dict[str, torch.Tensor], dict[str, int], list[str]]:
    gm = ep.graph_module
    weights = _weights(ep)
    users = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    report = run_passes(gm, weights)
    return gm, weights, report, users


def _merge(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(a)
    for name, t in b.items():
        if name in out and out[name] is not t and not (out[name].shape == t.shape and torch.equal(out[name], t)):
            raise KernlError(f"seq2seq: the encoder and decoder programs both name a different weight {name!r}")
        out.setdefault(name, t)
    return out


def _input_spec(name: str, dtype: str, rank: int) -> dict:
    return {"name": name, "dtype": dtype, "rank": rank}


def lower_seq2seq(
    model: torch.nn.Module,
    settings: Seq2SeqSettings,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    stage: Callable[[str], None] | None = None,
) -> LoweredSeq2Seq:
    """Export the model's encoder and decoder once each (dynamic batch, lengths) and derive the two entries."""
    stage = stage or (lambda name: None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KernlError("device cuda: no CUDA GPU is available on this machine")
    config = model.config
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    model_kind(model)  # an encoder-decoder, or KernlError
    param = next(iter(model.parameters()))
    if (dtype and param.dtype != dtype) or param.device != device:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    model = model.eval()
    dtype = dtype or param.dtype
    kind = settings.kind
    d_model = int(config.d_model)

    stage("export")
    # The encoder's example batch stays within its buckets: a size past a static (max 1) batch dim would be
    # baked into its reshapes. The decoder's rows go to batch x beams.
    # The decoder's example takes 2 rows even when the bundle decodes 1 (its rows dim spans 1..max(2, rows)):
    # an example of 1 would specialize that dim.
    batch, enc_batch = 2, min(2, settings.batch_sizes[-1])
    if kind == SPEECH:
        frames = settings.seq_lens[-1]
        mels = int(config.num_mel_bins)
        enc_example = {"input_features": torch.randn(enc_batch, mels, frames, device=device, dtype=dtype)}
        enc_shapes = {"input_features": {0: _dim("batch", settings.batch_sizes[-1])}}
        enc_len = int(config.max_source_positions)
        enc_specs = [_input_spec("input_features", str(dtype).removeprefix("torch."), 3)]
    else:
        seq = min(16, settings.seq_lens[-1])
        enc_example = {
            "input_ids": torch.randint(0, vocab, (enc_batch, seq), device=device),
            "attention_mask": torch.ones(enc_batch, seq, dtype=torch.int64, device=device),
        }
        dims = {0: _dim("batch", settings.batch_sizes[-1]), 1: _dim("seq", settings.seq_lens[-1])}
        enc_shapes = {"input_ids": dims, "attention_mask": dims}
        enc_len = settings.seq_lens[-1]
        enc_specs = [_input_spec("input_ids", "int64", 2), _input_spec("attention_mask", "int64", 2)]
    if hasattr(config, "use_cache"):
        config.use_cache = False
    with torch.no_grad():
        encoder = _SpeechEncoder(model) if kind == SPEECH else _TextEncoder(model)
        enc_ep = _export(encoder, enc_example, enc_shapes)
        states = encoder(**enc_example)
        steps = 3
        dec_example = {
            "decoder_input_ids": torch.randint(0, vocab, (batch, steps), device=device),
            "decoder_position_ids": torch.arange(steps, device=device).expand(batch, steps).contiguous(),
            ENCODER_STATES: states[:1].expand(batch, *states.shape[1:]).contiguous(),
        }
        rows, length = _dim("batch", max(2, settings.decode_rows)), _dim("seq", settings.max_length)
        dec_shapes = {
            "decoder_input_ids": {0: rows, 1: length},
            "decoder_position_ids": {0: rows, 1: length},
            ENCODER_STATES: {0: rows, **({1: _dim("enc", enc_len)} if kind == TEXT else {})},
        }
        dec_ep = _export(_Decoder(model), dec_example, dec_shapes)
    if states.shape[-1] != d_model:
        raise KernlError(f"seq2seq: encoder states of width {states.shape[-1]}, expected d_model {d_model}")

    stage("rewrite")
    enc_gm, enc_weights, enc_report, enc_users = _rewrite(enc_ep)
    dec_gm, dec_weights, dec_report, dec_users = _rewrite(dec_ep)
    if dec_users != [*DECODER_INPUTS, ENCODER_STATES]:
        raise KernlError(f"seq2seq: unexpected decoder inputs {dec_users}")
    weights = _merge(enc_weights, dec_weights)
    lay = layout(dec_gm.graph)
    decode = decode_graph(dec_gm, lay, vocab)
    encode = encode_graph(enc_gm, dec_gm, lay, enc_users)
    metas = {n.name: n.meta for g in (enc_gm, dec_gm) for n in g.graph.nodes if n.op == "placeholder"}
    weight_names = []
    for g in (encode, decode):
        for n in g.graph.nodes:
            if n.op == "placeholder" and n.name in weights and n.name not in weight_names:
                weight_names.append(n.name)
    state_names = lay.state_names()
    arrange_params(encode.graph, [*weight_names, *state_names, *enc_users, ROWS], metas)
    arrange_params(decode.graph, [*weight_names, *state_names, *DECODER_INPUTS, ENC_LENGTHS], metas)
    for g in (encode, decode):
        bind_device(g.graph)
        g.recompile()
    entries = {ENCODE: encode, DECODE: decode}
    report = {f"encoder.{k}": v for k, v in enc_report.items()} | {f"decoder.{k}": v for k, v in dec_report.items()}
    from kernl import __version__

    source = generation_source(entries, model_name=type(model).__name__, version=__version__, report=report)
    long = "int64"
    spec = generation_spec(
        {
            ENCODE: (encode, [*enc_specs, _input_spec(ROWS, long, 1)]),
            DECODE: (decode, [*(_input_spec(n, long, 2) for n in DECODER_INPUTS), _input_spec(ENC_LENGTHS, long, 1)]),
        },
        weights=weight_names,
        state=lay.state(settings.decode_rows, settings.max_length, settings.batch_sizes[-1], enc_len),
        outputs=[{"name": "logits", "dims": ["batch", vocab]}],
    )
    kept = {name: weights[name] for name in weight_names}
    return LoweredSeq2Seq(model, spec, source, kept, report, settings, lay, enc_len, dtype, device)
