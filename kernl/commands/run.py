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
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1), help="generation bundles")
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
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    device: str | None,
    top_k: int,
    trusted_keys: tuple[Path, ...],
) -> None:
    """Run BUNDLE on texts and print embeddings, top tokens or labels; a generation bundle streams the
    completion of --prompt."""
    import kernl
    from kernl.commands.present import report
    from kernl.commands.tasks import infer_task
    from kernl.commands.tokenizer import bundle_tokenizer

    if not texts and not prompts:
        raise CliError("give --text (or --prompt for a generation bundle)")
    loaded = load_bundle(bundle, device, trusted_keys)
    tok = bundle_tokenizer(loaded, bundle)  # read from the bytes kernl.load verified
    manifest = loaded.manifest
    if "generation" in manifest:
        from kernl.commands.generate import run_generation

        options = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                       top_p=top_p, seed=seed)  # fmt: skip
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
