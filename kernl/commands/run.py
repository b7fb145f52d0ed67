"""`kernl run BUNDLE --text …`: tokenize with the bundle's tokenizer, call the bundle, report. No transformers."""

from __future__ import annotations

from pathlib import Path

import click

from kernl.commands.bundle_path import load_bundle, trusted_key_option
from kernl.commands.errors import CliError, Command


@click.command(name="run", cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, required=True, help="a text to run; repeat for a batch")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: the bundle's target")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 100), help="tokens shown for LMs")
@trusted_key_option
def run_command(
    bundle: Path, texts: tuple[str, ...], device: str | None, top_k: int, trusted_keys: tuple[Path, ...]
) -> None:
    """Run BUNDLE on texts and print embeddings, top tokens or labels."""
    import kernl
    from kernl.commands.present import report
    from kernl.commands.tasks import infer_task
    from kernl.commands.tokenizer import bundle_tokenizer

    loaded = load_bundle(bundle, device, trusted_keys)
    tok = bundle_tokenizer(loaded, bundle)  # read from the bytes kernl.load verified
    manifest = loaded.manifest
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
