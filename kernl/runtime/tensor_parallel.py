"""Loading a tensor-parallel bundle: which rank this process is, which weights file it reads, and the checks
every rank makes together before any graph is captured.

A bundle compiled with tensor_parallel=N holds one program and N weight files (manifest "weights.ranks"); its
manifest's "tensor_parallel" says how the weights were split. Each of the N processes (launched by torchrun,
or given rank= and world_size= with their process group) loads the file of its rank. Every mismatch raises
BundleError on every rank, and nothing waits forever: the checks that need the other ranks are collectives
with a timeout.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kernl.errors import BundleError


@dataclass(frozen=True)
class Placement:
    """Where this process runs a bundle: its rank among world_size, its device and its weights file."""

    rank: int
    world_size: int
    device: torch.device
    weights_file: str | None  # None: the bundle's one weights file
    group: Any = None  # host-side (gloo) group of the ranks, for checks that must not wait forever

    def all_ready(self, failure: BaseException | None) -> None:
        """After each rank loaded its part: BundleError on every rank when one of them failed (its own error
        on that rank), rather than the others waiting at their first all-reduce."""
        if self.world_size == 1:
            if failure is not None:
                raise failure
            return
        errors = _gather(self.group, self.world_size, None if failure is None else f"{failure}")
        if failure is not None:
            raise failure
        failed = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if failed is not None:
            raise BundleError(f"tensor parallel: rank {failed[0]} failed to load: {failed[1]}")

    def same_seed(self, seed: int | None) -> int | None:
        """Rank 0's seed on every rank (a fresh random one when rank 0 gave None): ranks that sample from the
        same logits with the same seed pick the same tokens, so the next step's inputs agree. A host broadcast
        over the gloo group, made by every rank at the same call."""
        if self.world_size == 1:
            return seed
        if self.rank == 0 and seed is None:
            seed = random.SystemRandom().randrange(2**62)
        box = [seed]
        try:
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        except RuntimeError as err:
            raise BundleError(f"tensor parallel: rank 0 did not send its seed in time ({err})") from None
        return box[0]


def bundle_world_size(manifest: dict[str, Any]) -> int:
    """How many ranks the bundle was compiled for (1 without tensor parallelism)."""
    tp = manifest.get("tensor_parallel")
    if tp is None:
        return 1
    n = tp.get("world_size") if isinstance(tp, dict) else None
    ranks = (manifest.get("weights") or {}).get("ranks")
    if not isinstance(n, int) or n < 2 or not isinstance(ranks, list) or len(ranks) != n:
        raise BundleError("manifest.json: tensor_parallel needs a world_size >= 2 and one weights file per rank")
    return n


def place(
    manifest: dict[str, Any],
    device: torch.device,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_s: float = 300.0,
) -> Placement:
    """This process's rank, device and weights file for the bundle; joins (or starts) the process group.

    A bundle of one process ignores any process group (each rank may load its own replica), unless the caller
    asks for world_size > 1. A tensor-parallel bundle needs a process group of exactly its world size: the
    default one when it exists, else one started here from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), with collectives that time out after timeout_s.
    """
    n = bundle_world_size(manifest)
    if world_size is not None and world_size != n:
        raise BundleError(f"the bundle was compiled for {n} rank(s); loaded with world_size={world_size}")
    if n == 1:
        return Placement(0, 1, device, None)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        _start_group(n, device, rank, world_size, timeout)
    got_rank, got_world = dist.get_rank(), dist.get_world_size()
    if rank is not None and rank != got_rank:
        raise BundleError(f"rank={rank}, but this process is rank {got_rank} of its process group")
    if got_world != n:
        raise BundleError(f"the bundle was compiled for {n} ranks; this process group has {got_world}")
    if device.type == "cuda":
        device = _rank_device(device, got_rank)
        torch.cuda.set_device(device)  # NCCL reduces on the current device
    # Host-side (gloo) with its own timeout: a rank that never comes fails the others instead of hanging them.
    group = dist.new_group(backend="gloo", timeout=timeout)
    _agree(group, manifest, device, got_rank, n)
    return Placement(got_rank, n, device, manifest["weights"]["ranks"][got_rank], group)


def _start_group(n: int, device: torch.device, rank, world_size, timeout: datetime.timedelta) -> None:
    env_rank, env_world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None and env_rank is None:
        raise BundleError(
            f"the bundle was compiled for {n} ranks: launch it with torchrun --nproc-per-node {n}, or pass rank= "
            "and world_size= (with MASTER_ADDR and MASTER_PORT set, or a process group already started)"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(
            backend,
            rank=rank if rank is not None else int(env_rank),
            world_size=world_size if world_size is not None else int(env_world or n),
            timeout=timeout,
        )
    except (RuntimeError, ValueError) as err:
        raise BundleError(f"tensor parallel: cannot join the {n} ranks ({err})") from None


def _rank_device(device: torch.device, rank: int) -> torch.device:
    """cuda:<LOCAL_RANK> (torchrun's) when the caller named no GPU, else the one named."""
    if device.index is not None:
        return device
    local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
    return torch.device("cuda", local)


def _gather(group, n: int, value) -> list:
    seen: list = [None] * n
    try:
        dist.all_gather_object(seen, value, group=group)
    except RuntimeError as err:
        raise BundleError(f"tensor parallel: the other ranks did not answer in time ({err})") from None
    return seen


def _agree(group, manifest: dict[str, Any], device: torch.device, rank: int, n: int) -> None:
    """Every rank loaded the same bundle on the same kind of device; otherwise BundleError on every rank."""
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} sm_{props.major}{props.minor}"
    mine = (manifest.get("digest"), device.type, gpu)
    seen = _gather(group, n, mine)
    for other, theirs in enumerate(seen):
        if theirs[0] != mine[0]:
            raise BundleError(f"tensor parallel: rank {other} loaded another bundle than rank {rank}")
        if theirs[1:] != mine[1:]:
            raise BundleError(f"tensor parallel: rank {other} runs on {theirs[1:]}, rank {rank} on {mine[1:]}")
