"""KERNL_ALL_REDUCE decides the all-reduce path from the world size alone, so every rank takes the same one."""

import pytest
import torch

from kernl.errors import KernlError
from kernl.kernels import peer_all_reduce, peer_norm
from tests.runtime.tp_launch import free_port


@pytest.mark.parametrize(
    ("setting", "world", "one_shot"),
    [
        (None, 2, False),  # auto: NCCL at 2 ranks, where the two paths measured within 3%
        (None, 4, True),  # auto: the one-shot from 4 ranks on
        (None, 8, True),
        ("auto", 2, False),
        ("nccl", 4, False),
        ("one_shot", 2, True),
    ],
)
def test_the_path_follows_the_setting_and_the_world_size(setting, world, one_shot, monkeypatch):
    if setting is None:
        monkeypatch.delenv("KERNL_ALL_REDUCE", raising=False)
    else:
        monkeypatch.setenv("KERNL_ALL_REDUCE", setting)
    assert peer_all_reduce.wanted(world) is one_shot


def test_an_unknown_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("KERNL_ALL_REDUCE", "oneshot")
    with pytest.raises(KernlError, match="KERNL_ALL_REDUCE='oneshot'.*auto, one_shot, nccl"):
        peer_all_reduce.wanted(4)


@pytest.mark.parametrize(("setting", "world", "fused"), [(None, 2, True), ("nccl", 2, False), ("one_shot", 2, True)])
def test_the_sum_fused_with_the_norm_goes_over_peer_memory_from_two_ranks(setting, world, fused, monkeypatch):
    if setting is None:
        monkeypatch.delenv("KERNL_ALL_REDUCE", raising=False)
    else:
        monkeypatch.setenv("KERNL_ALL_REDUCE", setting)
    assert peer_all_reduce.wanted(world, peer_norm.AUTO_MIN_RANKS) is fused


@pytest.fixture
def one_rank_group():
    """A process group of one rank (gloo), for the agreement collective."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_failed_set_up_falls_back_on_every_rank_and_says_why(one_rank_group):
    def broken():
        raise RuntimeError("no NVLink here")

    assert peer_all_reduce.set_up_on_every_rank(torch.device("cpu"), broken, done="fused", otherwise="apart") == (
        None,
        "apart (RuntimeError: no NVLink here)",
    )
    made = object()
    got = peer_all_reduce.set_up_on_every_rank(torch.device("cpu"), lambda: made, done="fused", otherwise="apart")
    assert got == (made, "fused")
