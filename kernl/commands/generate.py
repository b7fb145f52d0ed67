"""`kernl run BUNDLE --prompt …` for generation bundles: tokenize, generate (streaming one prompt), print text."""

from __future__ import annotations

from typing import Any

import click

from kernl.commands.errors import CliError


def run_generation(loaded: Any, tok: Any, prompts: list[str], options: dict[str, Any]) -> None:
    """Stream the completion of one prompt as it is generated; several prompts are generated as one batch."""
    import kernl

    ids = tok.encode(prompts)
    try:
        if len(prompts) == 1:
            new: list[int] = []
            shown = ""
            click.echo(prompts[0], nl=False)
            for step in loaded.stream(ids, **options):
                new.append(int(step[0]))
                text = tok.decode(new)
                # Print what the decoded text gained: a token may complete a character started by the last.
                if text.startswith(shown):
                    click.echo(text[len(shown) :], nl=False)
                    shown = text
            click.echo()
            return
        out = loaded.generate(ids, **options)
    except kernl.InputError as err:
        raise CliError(str(err)) from None
    width = max(len(row) for row in ids)
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        click.echo(f"{prompt}{tok.decode(row)}")


def _audio_inputs(paths: list[Any]) -> tuple[list[Any], int]:
    """Each .wav file's waveform, read by kernl's runtime (no transformers), and their sampling rate."""
    try:
        from kernl.runtime.audio import read_wav
    except ImportError:
        raise CliError("--audio: this kernl has no audio reader (kernl.runtime.audio)") from None
    from kernl.errors import KernlError

    waves, rates = [], []
    for path in paths:
        try:
            wave, rate = read_wav(path)
        except KernlError as err:
            raise CliError(str(err)) from None
        waves.append(wave)
        rates.append(rate)
    if len(set(rates)) > 1:
        raise CliError(f"--audio: the files are sampled at different rates ({sorted(set(rates))} Hz)")
    return waves, rates[0]


def run_seq2seq(loaded: Any, path: Any, texts: list[str], audio: list[Any], options: dict[str, Any]) -> None:
    """Generate from --audio files (speech bundles) or --text (text-to-text bundles) as one batch; print one
    line of decoded text per input (special tokens such as Whisper's task tokens skipped)."""
    import kernl

    settings = loaded.manifest["seq2seq"]
    speech = settings.get("kind") == "speech"
    if speech and (texts or not audio):
        raise CliError("this bundle transcribes speech: give --audio FILE.wav")
    if not speech and (audio or not texts):
        raise CliError("this bundle reads text: give --text")
    try:
        tok = loaded.tokenizer
    except kernl.KernlError as err:
        raise CliError(str(err)) from None
    if tok is None and not speech:
        raise CliError(f"{path}: the bundle has no tokenizer/tokenizer.json (compile it with a fast tokenizer)")
    options = dict(options)
    options.setdefault("max_new_tokens", int(settings["max_length"]) - len(settings["decoder_prefix"]))
    if options.get("num_beams", 1) > 1:  # beam search is deterministic: the sampling options do not apply
        for key in ("do_sample", "temperature", "top_p", "seed"):
            options.pop(key, None)
    try:
        if speech:
            waves, rate = _audio_inputs(audio)
            out = loaded.generate(audio=waves, sampling_rate=rate, **options)
        else:
            out = loaded.generate(tok.encode(texts), **options)
    except kernl.InputError as err:
        raise CliError(str(err)) from None
    labels = [str(p) for p in audio] if speech else texts
    for label, row in zip(labels, out.tolist()):
        text = tok.decode(row, skip_special_tokens=True).strip() if tok is not None else " ".join(map(str, row))
        click.echo(f"{label}: {text}" if len(labels) > 1 else text)
