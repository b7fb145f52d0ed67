"""`kernl bench BUNDLE`: per bucket, the bundle's latency beside the original model's, in one process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from kernl.commands.bundle_path import load_bundle, trusted_key_option
from kernl.commands.errors import CliError, Command, first_line

# Ways to run the original model: name -> torch.compile mode (None: eager).
BASELINES = {"eager": None, "compile": "default", "reduce-overhead": "reduce-overhead"}


def parse_against(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise CliError(f"--against {unknown[0]!r}: expected names from {', '.join(BASELINES)} (or nothing)")
    return list(dict.fromkeys(names))


def _original_model(manifest: dict[str, Any], source: str | None, device):
    """The model the bundle was compiled from, in the bundle's dtype, through transformers."""
    import torch

    from kernl.commands.tasks import infer_task, load_model

    source = source or manifest.get("source")
    if not source:
        raise CliError("the bundle does not record its source model; pass --model, or --against '' for the bundle only")
    task = manifest.get("task") or infer_task([str(manifest.get("model", ""))])
    try:
        model = load_model(source, task, dtype=getattr(torch, manifest["dtype"])).to(device)
    except (OSError, ValueError, KeyError) as err:
        raise CliError(f"{source}: cannot load the original model ({first_line(err)})") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def _inputs(names: list[str], bucket: tuple[int, int], vocab: int, device) -> dict[str, Any]:
    """Random token ids and full masks: every position does real work."""
    import torch

    make = {
        "input_ids": lambda: torch.randint(0, vocab, bucket),
        "attention_mask": lambda: torch.ones(bucket, dtype=torch.long),
        "token_type_ids": lambda: torch.zeros(bucket, dtype=torch.long),
    }
    missing = [name for name in names if name not in make]
    if missing:
        raise CliError(f"the bundle takes {missing[0]}, which kernl bench cannot make up")
    return {name: make[name]().to(device) for name in names}


def _cosine(a, b) -> float:
    import torch

    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _bench_bucket(loaded, runners: dict[str, Any], inputs: dict[str, Any], *, warmup: int, runs: int) -> dict:
    """The bundle's median latency, each baseline's and its ratio to the bundle's, on one bucket's inputs."""
    import torch

    from kernl.commands.timing import median_ms

    row: dict[str, Any] = {"kernl_ms": median_ms(lambda: loaded(**inputs), loaded.device, warmup=warmup, runs=runs)}
    for name, run in runners.items():
        with torch.inference_mode():
            row[f"{name}_ms"] = median_ms(lambda run=run: run(**inputs), loaded.device, warmup=warmup, runs=runs)
        row[f"{name}_over_kernl"] = row[f"{name}_ms"] / row["kernl_ms"]
    if "eager" in runners:
        with torch.inference_mode():
            want = runners["eager"](**inputs)[0]
        row["cosine_to_eager"] = _cosine(loaded(**inputs)[0], want)
    return row


def _bench_generate(bundle, against, json_path, source, device, runs, new_tokens, trusted_keys) -> None:
    from kernl.commands.bench_generate import HF_MODES, bench_generation, generation_table
    from kernl.commands.describe import table

    names = [n.strip() for n in against.split(",") if n.strip() and n.strip() != "compile"]
    unknown = [n for n in names if n not in HF_MODES]
    if unknown:
        raise CliError(f"--against {unknown[0]!r}: with --generate, expected names from {', '.join(HF_MODES)}")
    loaded = load_bundle(bundle, device, trusted_keys)
    if "generation" not in loaded.manifest:
        raise CliError("--generate: this bundle was not compiled for text generation")
    model = _original_model(loaded.manifest, source, loaded.device) if names else None
    if model is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    results = bench_generation(loaded, model, names, new_tokens=new_tokens, runs=min(runs, 5))
    click.echo(table(*generation_table(results, names)))
    if json_path is not None:
        json_path.write_text(json.dumps({"bundle": str(bundle), "results": results}, indent=2) + "\n")


@click.command(name="bench", cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--against", default="eager,compile", show_default=True, help="eager, compile, reduce-overhead")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="also write results here")
@click.option("--model", "source", default=None, help="the original model (default: recorded at compile time)")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: the bundle's target")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(1), help="timed runs per measure")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0), help="untimed runs first")
@click.option("--generate", "generate", is_flag=True, help="generation bundles: TTFT and tokens/s per batch")
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(2), help="with --generate")
@trusted_key_option
def bench_command(
    bundle: Path,
    against: str,
    json_path: Path | None,
    source: str | None,
    device: str | None,
    runs: int,
    warmup: int,
    generate: bool,
    new_tokens: int,
    trusted_keys: tuple[Path, ...],
) -> None:
    """Latency of BUNDLE per bucket, beside the original model run eagerly and under torch.compile; with
    --generate, time to first token and tokens/s per decode batch beside HF generate (--against eager,hf-static)."""
    if generate:
        _bench_generate(bundle, against, json_path, source, device, runs, new_tokens, trusted_keys)
        return
    baselines = parse_against(against)
    import torch

    from kernl.artifacts.manifest import library_versions
    from kernl.commands.describe import table

    loaded = load_bundle(bundle, device, trusted_keys)
    manifest, dev = loaded.manifest, loaded.device
    model = _original_model(manifest, source, dev) if baselines else None
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or manifest.get("vocab_size") or 100)
    runners = {n: model if BASELINES[n] is None else torch.compile(model, mode=BASELINES[n]) for n in baselines}
    results = []
    for bucket in loaded.buckets:
        inputs = _inputs(manifest["program"]["inputs"], bucket, vocab, dev)
        row = _bench_bucket(loaded, runners, inputs, warmup=warmup, runs=runs)
        results.append({"bucket": list(bucket), **row})
        click.echo(f"{bucket[0]}x{bucket[1]}: kernl {row['kernl_ms']:.3f} ms", err=True)

    headers = ["bucket", "kernl ms", *[h for n in baselines for h in (f"{n} ms", f"{n} / kernl")]]
    rows = [
        [f"{r['bucket'][0]}x{r['bucket'][1]}", f"{r['kernl_ms']:.3f}"]
        + [v for n in baselines for v in (f"{r[f'{n}_ms']:.3f}", f"{r[f'{n}_over_kernl']:.2f}x")]
        for r in results
    ]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    click.echo(f"{manifest.get('model')}, {manifest['dtype']}, {gpu or dev.type}; median of {runs} after {warmup}")
    click.echo(table(headers, rows))
    if json_path is not None:
        report = {
            "bundle": str(bundle),
            "model": manifest.get("model"),
            "dtype": manifest["dtype"],
            "device": dev.type,
            "gpu": gpu,
            "versions": library_versions(),
            "runs": runs,
            "warmup": warmup,
            "results": results,
        }
        json_path.write_text(json.dumps(report, indent=2) + "\n")
