"""`kernl serve BUNDLE`: the bundle over HTTP with dynamic batching (uvicorn), or on Ray Serve replicas (--ray)."""

from __future__ import annotations

from pathlib import Path

import click

from kernl.commands.bundle_path import check_bundle_path, load_bundle, trusted_key_option
from kernl.commands.errors import CliError, Command


def _serve_package():
    try:
        import kernl.serve as serve
    except ImportError as err:
        raise CliError(str(err)) from None
    return serve


@click.command(name="serve", cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: every one)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--max-batch-delay-ms",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0, 60_000),
    help="how long a request waits for others to share its bundle call",
)
@click.option(
    "--max-queue", default=1024, show_default=True, type=click.IntRange(1), help="waiting requests before 503"
)
@click.option("--max-batch", default=None, type=click.IntRange(1), help="rows a call (default: the largest bucket's)")
@click.option("--model-name", default=None, help="the model id clients name (default: the bundle folder's name)")
@click.option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="a Jinja chat template file for /v1/chat/completions (default: the tokenizer config's)",
)
@click.option(
    "--no-idle-dispatch",
    is_flag=True,
    help="a lone request waits the whole batching window too (default: it runs at once when nothing else is queued)",
)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: the bundle's target")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info")
@click.option("--ray", "use_ray", is_flag=True, help="serve replicas through Ray Serve (pip install 'kernl[ray]')")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Ray Serve replicas")
@click.option(
    "--tensor-parallel",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="ranks of a tensor-parallel bundle: started on this host's GPUs (with --ray: on each replica's N GPUs), "
    "served through rank 0",
)
@click.option("--ray-address", default=None, help="a running Ray cluster (default: RAY_ADDRESS, else a local one)")
@trusted_key_option
def serve_command(
    bundle: Path,
    host: str,
    port: int,
    max_batch_delay_ms: float,
    max_queue: int,
    max_batch: int | None,
    model_name: str | None,
    chat_template: Path | None,
    no_idle_dispatch: bool,
    device: str | None,
    log_level: str,
    use_ray: bool,
    replicas: int,
    tensor_parallel: int,
    ray_address: str | None,
    trusted_keys: tuple[Path, ...],
) -> None:
    """Serve BUNDLE over HTTP: /v1/embeddings, /v1/predict or /v1/completions and /v1/chat/completions by its task,
    /health, /v1/models, /metrics. --max-batch caps the rows a generation bundle decodes at once."""
    if not use_ray and (replicas != 1 or ray_address):
        raise CliError("--replicas and --ray-address go with --ray")
    serve = _serve_package()
    from kernl.errors import KernlError

    options = {
        "max_batch_delay_ms": max_batch_delay_ms,
        "max_queue": max_queue,
        "max_batch": max_batch,
        "model_name": model_name or bundle.name.removesuffix(".kernl"),
        "chat_template": chat_template.read_text(encoding="utf-8") if chat_template else None,
        "idle_dispatch": not no_idle_dispatch,
        "device": device,
        "trusted_keys": [str(k) for k in trusted_keys] or None,
    }
    try:
        if use_ray:
            from kernl.serve.ray import run_ray

            check_bundle_path(bundle)
            ready = lambda: click.echo(f"kernl serve: {replicas} Ray Serve replica(s) on http://{host}:{port}")  # noqa: E731
            run_ray(bundle, host=host, port=port, replicas=replicas, address=ray_address, on_ready=ready,
                    tensor_parallel=tensor_parallel, **options)  # fmt: skip
            return
        if tensor_parallel > 1:
            from kernl.serve.tensor_parallel import serve_tensor_parallel

            check_bundle_path(bundle)
            keys, run_opts = options.pop("trusted_keys"), {k: v for k, v in options.items() if k != "device"}
            serve_tensor_parallel(
                bundle,
                tensor_parallel,
                lambda loaded: serve.run(loaded, host=host, port=port, log_level=log_level, **run_opts),
                device=device,
                trusted_keys=keys,
            )
            return
        loaded = load_bundle(bundle, device, trusted_keys)
        options.pop("device"), options.pop("trusted_keys")
        serve.run(loaded, host=host, port=port, log_level=log_level, **options)
    except (KernlError, ImportError) as err:
        raise CliError(str(err)) from None
