"""`kernl run BUNDLE --text …`: tokenize with the bundle's tokenizer, call the bundle, report. No transformers."""

from __future__ import annotations

from pathlib import Path

import click

from kernl.commands.bundle_path import load_bundle, trusted_key_option
from kernl.commands.errors import CliError, Command


@click.command(name="run", cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, help="a text to run; repeat for a batch")
@click.option("--prompt", "prompts", multiple=True, help="generation bundles: a prompt; repeat for a batch")
@click.option(
    "--audio",
    "audio_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="speech bundles (Whisper): a .wav file to transcribe; repeat for a batch",
)
@click.option(
    "--max-new-tokens",
    default=None,
    type=click.IntRange(1),
    help="generation bundles [default: 64; encoder-decoders: up to the bundle's max length]",
)
@click.option("--num-beams", default=1, show_default=True, type=click.IntRange(1), help="encoder-decoders: beam search")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="generation: 0 = greedy")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="generation: nucleus sampling")
@click.option("--seed", default=None, type=click.IntRange(0), help="generation: makes sampling reproducible")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: the bundle's target")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 100), help="tokens shown for LMs")
@trusted_key_option
def run_command(
    bundle: Path,
    texts: tuple[str, ...],
    prompts: tuple[str, ...],
    audio_files: tuple[Path, ...],
    max_new_tokens: int | None,
    num_beams: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    device: str | None,
    top_k: int,
    trusted_keys: tuple[Path, ...],
) -> None:
    """Run BUNDLE on texts and print embeddings, top tokens or labels; a generation bundle streams the
    completion of --prompt; an encoder-decoder prints what it generates from --text or --audio."""
    import kernl
    from kernl.commands.present import report
    from kernl.commands.tasks import infer_task
    from kernl.commands.tokenizer import bundle_tokenizer

    if not texts and not prompts and not audio_files:
        raise CliError("give --text (or --prompt for a generation bundle, --audio for a speech bundle)")
    loaded = load_bundle(bundle, device, trusted_keys)
    manifest = loaded.manifest
    sampling = dict(do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p, seed=seed)
    if "seq2seq" in manifest:
        from kernl.commands.generate import run_seq2seq

        options = dict(sampling, num_beams=num_beams, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
        run_seq2seq(loaded, bundle, list(prompts or texts), list(audio_files), options)
        return
    if audio_files:
        raise CliError("--audio: this bundle does not read audio (compile a Whisper model with --task "
                       "automatic-speech-recognition)")  # fmt: skip
    if num_beams != 1:
        raise CliError("--num-beams: only for encoder-decoder bundles")
    tok = bundle_tokenizer(loaded, bundle)  # read from the bytes kernl.load verified
    if "generation" in manifest:
        from kernl.commands.generate import run_generation

        options = dict(sampling, max_new_tokens=max_new_tokens or 64)
        run_generation(loaded, tok, list(prompts or texts), options)
        return
    if prompts:
        raise CliError("--prompt: this bundle does not generate (use --text)")
    max_batch = max(b for b, _ in loaded.buckets)
    if len(texts) > max_batch:
        raise CliError(f"{len(texts)} texts: the bundle's largest bucket takes {max_batch}")
    max_seq = max(s for _, s in loaded.buckets)
    inputs = tok(list(texts), max_length=max_seq)
    try:
        outputs = loaded(**inputs)
    except kernl.InputError as err:
        raise CliError(str(err)) from None
    task = manifest.get("task") or infer_task([str(manifest.get("model", ""))])
    lines = report(
        list(texts),
        inputs,
        {name: value.cpu() for name, value in outputs.items()},
        task=task,
        tok=tok,
        id2label=manifest.get("id2label") or {},
        top_k=top_k,
    )
    click.echo(f"{manifest.get('model')} ({task}) on {loaded.device}, inputs {tuple(inputs['input_ids'].shape)}")
    click.echo("\n".join(lines))
