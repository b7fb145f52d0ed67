"""Ray Serve: the same app on N replicas, each loading the bundle itself (one GPU a replica for CUDA bundles).

ray_deployment(bundle_path, ...) is for users' own Ray apps (serve.run(ray_deployment(...))); run_ray is
`kernl serve BUNDLE --ray`. The bundle path must be readable on every node that runs a replica.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from kernl.serve.options import ServeOptions

# kernl.serve.app's options: the serving ones (one owner: ServeOptions), then where and what to load.
APP_KEYS = (*ServeOptions.__dataclass_fields__, "device", "trusted_keys")


def _ray_serve():
    try:
        from ray import serve
    except ImportError:
        raise ImportError("Ray Serve replicas need Ray: pip install 'kernl[ray]'") from None
    return serve


def gpus_per_replica(bundle_path: str | os.PathLike) -> int:
    """1 for a CUDA bundle, 0 for a CPU one; when the manifest cannot be read here, 1 where CUDA is present."""
    path = Path(bundle_path)
    try:
        if path.is_file():  # an archive: unpacked (and verified later, on load) into kernl's cache
            from kernl.artifacts.archive import unpack

            path = unpack(path)
        target = json.loads((path / "manifest.json").read_text())["target"]["device"]
        return 1 if target == "cuda" else 0
    except Exception:  # a path only the replicas can read: decide by this machine
        import torch

        return 1 if torch.cuda.is_available() else 0


def ray_deployment(
    bundle_path: str | os.PathLike,
    *,
    name: str = "kernl",
    num_replicas: int | str | None = None,
    autoscaling_config: dict[str, Any] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
    tensor_parallel: int = 1,
    **options: Any,
):
    """A bound Ray Serve application (pass it to ray.serve.run) serving kernl.serve.app(bundle_path, **options).

    num_replicas, autoscaling_config (min_replicas, max_replicas, target_ongoing_requests...) and
    ray_actor_options go to serve.deployment as given; ray_actor_options defaults to num_gpus=1 for a CUDA bundle
    and 0 for a CPU one, times tensor_parallel. With tensor_parallel=N (a bundle compiled for N ranks) each replica
    reserves N GPUs (one actor: Ray places it on a node that has them all) and serves as rank 0, the other ranks
    started in it on its GPUs (kernl.serve.tensor_parallel.start_ranks). max_ongoing_requests (Ray's default is 5)
    defaults to max_queue, so that requests reach the replica's batcher, which is where they are batched."""
    serve = _ray_serve()
    unknown = sorted(set(options) - set(APP_KEYS))
    if unknown:
        raise TypeError(f"ray_deployment: unknown option {unknown[0]!r} (options: {', '.join(APP_KEYS)})")
    checked = ServeOptions(**{k: v for k, v in options.items() if k in ServeOptions.__dataclass_fields__})
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be an int >= 1, got {tensor_parallel!r}")
    path = str(Path(bundle_path).expanduser().resolve())
    app_options = dict(options)

    def build_app():  # runs in each replica: the bundle is loaded there, never pickled
        from kernl.serve.asgi import app

        if tensor_parallel == 1:
            return app(path, **app_options)
        from kernl.serve.tensor_parallel import start_ranks

        rest = dict(app_options)
        device, keys = rest.pop("device", None), rest.pop("trusted_keys", None)
        mirrored, _ = start_ranks(path, tensor_parallel, device=device, trusted_keys=keys)
        return app(mirrored, **rest)  # the followers leave with the replica's process

    settings: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_gpus": tensor_parallel * gpus_per_replica(path), **(ray_actor_options or {})},
        "max_ongoing_requests": max_ongoing_requests or checked.max_queue,
    }
    if num_replicas is not None:
        settings["num_replicas"] = num_replicas
    if autoscaling_config is not None:
        settings["autoscaling_config"] = autoscaling_config
    return serve.deployment(**settings)(serve.ingress(build_app)()).bind()


def run_ray(
    bundle_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    address: str | None = None,
    on_ready=None,
    **options: Any,
) -> None:
    """`kernl serve BUNDLE --ray`: replicas of the app behind Ray Serve's HTTP proxy, until SIGINT or SIGTERM.

    address: a running Ray cluster ("auto", "ray://..."); by default RAY_ADDRESS, else a local cluster with at
    least one logical CPU a replica."""
    serve = _ray_serve()
    import ray

    application = ray_deployment(bundle_path, num_replicas=replicas, **options)
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, include_dashboard=False)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False)
    stop = False

    def request_stop(signum, frame) -> None:
        nonlocal stop
        stop = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name="kernl", route_prefix="/")
        if on_ready is not None:
            on_ready()
        while not stop:
            time.sleep(0.2)
    finally:
        # Serve's shutdown stops the proxy first, then each replica's lifespan drains its batcher.
        serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
