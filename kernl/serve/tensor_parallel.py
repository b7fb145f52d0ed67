"""Serving a tensor-parallel bundle: N ranks of one host, the server in rank 0, the other ranks following it.

Every rank must make the same calls in the same order, or the all-reduces inside their graphs never meet. Rank 0
serves its bundle through a Mirror: each call made on it (a forward batch, generate, stream's next token, a
continuous batch's admit/step, and the objects they return) is first broadcast over a host (gloo) group, then
run; the other ranks run each call they receive on their own bundle (follow). Arguments go by value (tensors
through the host), except objects that hold device state (a Request, a generator's stream): those stay on each
rank and are named by reference. Calls are mirrored in the order rank 0 makes them, one at a time: a call must not
wait inside for another mirrored call (kernl's server makes them from one scheduler thread, under bundle.lock).

    serve_tensor_parallel(bundle_path, 2, lambda bundle: kernl.serve.run(bundle, host=..., port=...))
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import inspect
import logging
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from kernl.errors import KernlError

_log = logging.getLogger("kernl.serve")
_LOCKS = (type(threading.Lock()), type(threading.RLock()))
_SAMPLING_CALLS = frozenset({"generate", "stream", "request"})  # take do_sample= and seed=
_HOST_ONLY = frozenset({"tokenizer"})  # attributes that do no device work: rank 0's own, not mirrored
_FOREVER = datetime.timedelta(days=365)  # followers wait for rank 0's next call as long as the server runs


def _plain(value: Any) -> bool:
    """A value that travels by copy: data with no device state behind it."""
    if value is None or isinstance(
        value, (bool, int, float, complex, str, bytes, enum.Enum, torch.device, torch.dtype)
    ):
        return True
    if isinstance(value, (torch.Tensor, *_LOCKS)):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(
            _plain(getattr(value, f.name)) and not isinstance(getattr(value, f.name), torch.Tensor)
            for f in dataclasses.fields(value)
        )
    return False


@dataclasses.dataclass(frozen=True)
class _Ref:
    oid: int  # an object both sides registered under the same number


def _to_host(value: Any) -> Any:
    """value for the broadcast: tensors on the host, Mirrors as references (containers walked)."""
    if isinstance(value, Mirror):
        return _Ref(value._oid)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    return value


def _resolve(value: Any, objects: dict[int, Any]) -> Any:
    """A received value with references replaced by this rank's objects; on rank 0, Mirrors by their targets."""
    if isinstance(value, _Ref):
        return objects[value.oid]
    if isinstance(value, Mirror):
        return value._target
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, objects) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, objects) for k, v in value.items()}
    return value


class _Channel:
    """Rank 0's side: numbers objects, broadcasts calls, one at a time."""

    def __init__(self, group, src: int) -> None:
        self.group, self.src = group, src
        self.lock = threading.RLock()
        self.next_oid = 1  # 0: the bundle
        self.dropped: list[int] = []

    def send(self, message: tuple) -> None:
        drops, self.dropped = self.dropped, []
        dist.broadcast_object_list([(drops, message)], src=self.src, group=self.group)

    def send_numbered(self, message: tuple) -> int:
        """Broadcast a call or attribute read; returns the number its result has on every rank (follow numbers
        each one it receives, whether or not it raises)."""
        self.send(message)
        oid, self.next_oid = self.next_oid, self.next_oid + 1
        return oid

    def wrap(self, value: Any, oid: int) -> Any:
        """A call's result or an attribute, as rank 0 sees it: plain values as they are, the rest as a Mirror."""
        return value if _plain(value) else Mirror(value, oid, self)


class Mirror:
    """An object of rank 0 whose calls every rank makes (see the module docstring)."""

    def __init__(self, target: Any, oid: int, channel: _Channel) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_oid", oid)
        object.__setattr__(self, "_channel", channel)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if _plain(value) or name in _HOST_ONLY:
            return value
        if inspect.ismethod(value) or inspect.isbuiltin(value) or inspect.isfunction(value):
            return lambda *args, **kwargs: self._call(name, args, kwargs)
        with self._channel.lock:  # a live attribute (a batch's generator): both sides number it
            oid = self._channel.send_numbered(("attr", self._oid, name, (), {}))
            return self._channel.wrap(value, oid)

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in _SAMPLING_CALLS and kwargs.get("do_sample") and kwargs.get("seed") is None:
            # Every rank samples with rank 0's seed: the same tokens from the same logits, so the ranks' next
            # steps agree (a rank seeding itself at random would not).
            kwargs = {**kwargs, "seed": random.SystemRandom().randrange(2**62)}
        with self._channel.lock:
            oid = self._channel.send_numbered(("call", self._oid, name, _to_host(args), _to_host(kwargs)))
            result = getattr(self._target, name)(*_resolve(args, {}), **_resolve(kwargs, {}))
            return self._channel.wrap(result, oid)

    def __call__(self, *args, **kwargs) -> Any:
        return self._call("__call__", args, kwargs)

    def __iter__(self) -> Mirror:
        return self if hasattr(self._target, "__next__") else self._call("__iter__", (), {})

    def __next__(self) -> Any:
        return self._call("__next__", (), {})

    def __len__(self) -> int:
        return len(self._target)

    def __repr__(self) -> str:
        return f"<mirrored {self._target!r}>"

    def __del__(self) -> None:
        channel = self.__dict__.get("_channel")
        if channel is not None:
            channel.dropped.append(self._oid)  # the followers free theirs with the next call


def lead(bundle: Any, group, src: int = 0) -> Mirror:
    """Rank 0's bundle, every call of which the other ranks make too (they run follow)."""
    return Mirror(bundle, 0, _Channel(group, src))


def stop(bundle: Mirror) -> None:
    """Tell the followers to return."""
    with bundle._channel.lock:
        bundle._channel.send(("stop", 0, "", (), {}))


def follow(bundle: Any, group, src: int = 0) -> None:
    """Make each call rank 0 makes on its Mirror, on this rank's bundle, until rank 0 stops. A call that raises on
    rank 0 raises here too (the same inputs): the error is rank 0's to report, and this rank goes on."""
    objects: dict[int, Any] = {0: bundle}
    next_oid = 1
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=src, group=group)
        drops, (kind, oid, name, args, kwargs) = box[0]
        for gone in drops:
            objects.pop(gone, None)
        if kind == "stop":
            return
        mine, next_oid = next_oid, next_oid + 1
        try:
            target = objects[oid]
            if kind == "attr":
                result = getattr(target, name)
            else:
                result = getattr(target, name)(*_resolve(args, objects), **_resolve(kwargs, objects))
        except BaseException as err:  # noqa: BLE001 - rank 0 raised the same and answers for it
            if not isinstance(err, (StopIteration, KernlError)):
                _log.warning("rank %d: %s(...) raised %r", dist.get_rank(), name, err, exc_info=True)
            continue
        if not _plain(result):
            objects[mine] = result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _follower(rank: int, world_size: int, bundle: str, device: str | None, trusted_keys) -> None:
    """A rank > 0: load its part, then follow rank 0's calls until it stops."""
    import kernl

    loaded = kernl.load(bundle, device=device, trusted_keys=trusted_keys, rank=rank, world_size=world_size)
    group = dist.new_group(backend="gloo", timeout=_FOREVER)
    try:
        follow(loaded, group)
    finally:
        dist.destroy_process_group()


def start_ranks(
    bundle: str | os.PathLike, world_size: int, *, device: str | None = None, trusted_keys: list | None = None
) -> tuple[Any, Callable[[], None]]:
    """Rank 0 in this process, ranks 1..world_size-1 started here as processes that follow it (python -m
    kernl.serve.tensor_parallel; one GPU each, cuda:<rank> of the GPUs this process sees). Returns rank 0's mirrored
    bundle and close(), which stops the followers and joins them. A follower also leaves when this process dies."""
    bundle = os.fspath(bundle)
    trusted = [os.fspath(k) for k in trusted_keys] if trusted_keys else None
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    env = {**os.environ, "WORLD_SIZE": str(world_size)}
    procs = []
    for rank in range(1, world_size):
        cmd = [sys.executable, "-m", "kernl.serve.tensor_parallel", bundle, str(rank), str(world_size)]
        cmd += ["--device", device or ""] + [a for k in trusted or [] for a in ("--trusted-key", k)]
        procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    try:
        mirrored, close_group = _lead(bundle, world_size, device, trusted)
    except BaseException:
        _join(procs, timeout=5)
        raise

    def close() -> None:
        try:
            close_group()
        finally:
            _join(procs, timeout=60)

    return mirrored, close


def serve_tensor_parallel(
    bundle: str | os.PathLike,
    world_size: int,
    serve: Callable[[Any], None],
    *,
    device: str | None = None,
    trusted_keys: list | None = None,
) -> None:
    """Load bundle on world_size ranks of this host and call serve(bundle) in this process, rank 0, with the other
    ranks following (start_ranks). When serve returns (the server shut down) or raises, the other ranks stop and
    are joined.

    Under torchrun (RANK and WORLD_SIZE set), no process is started: rank 0 serves, the others follow.
    """
    bundle = os.fspath(bundle)
    trusted = [os.fspath(k) for k in trusted_keys] if trusted_keys else None
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == world_size:
        if int(os.environ["RANK"]) != 0:
            _follower(int(os.environ["RANK"]), world_size, bundle, device, trusted)
            return
        mirrored, close = _lead(bundle, world_size, device, trusted)
    else:
        mirrored, close = start_ranks(bundle, world_size, device=device, trusted_keys=trusted)
    try:
        serve(mirrored)
    finally:
        close()


def _lead(bundle: str, world_size: int, device: str | None, trusted: list | None) -> tuple[Any, Callable[[], None]]:
    """Rank 0: its part loaded and mirrored; close() tells the followers to stop and leaves the group."""
    import kernl

    loaded = kernl.load(bundle, device=device, trusted_keys=trusted, rank=0, world_size=world_size)
    group = dist.new_group(backend="gloo", timeout=_FOREVER)
    mirrored = lead(loaded, group)

    def close() -> None:
        try:
            stop(mirrored)
        finally:
            dist.destroy_process_group()

    return mirrored, close


def _join(procs: list[subprocess.Popen], timeout: float) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def _leave_with_parent() -> None:
    """A follower blocks on rank 0's next call with no timeout: when the process that started it is gone (a Ray
    replica stopped, a server killed), nothing would end it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="kernl-follower-watch", daemon=True).start()


def _main(argv: list[str]) -> None:
    """python -m kernl.serve.tensor_parallel BUNDLE RANK WORLD_SIZE [--device D] [--trusted-key K]...: a follower
    rank, started by serve_tensor_parallel (MASTER_ADDR and MASTER_PORT in the environment)."""
    bundle, rank, world_size, rest = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    device, trusted = None, []
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--device":
            device = value or None
        elif flag == "--trusted-key":
            trusted.append(value)
    _leave_with_parent()
    _follower(rank, world_size, bundle, device, trusted or None)


if __name__ == "__main__":
    # The module's own copy, not __main__'s: references pickled by rank 0 name kernl.serve.tensor_parallel._Ref.
    from kernl.serve.tensor_parallel import _main as main

    main(sys.argv[1:])
