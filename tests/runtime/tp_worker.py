"""One rank of a tensor-parallel group on CPU (gloo), started as torchrun starts it (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment): binds a sharded program from its data, as kernl.load does, runs it
on the case's inputs and saves its outputs. Used by tests/runtime/test_tensor_parallel.py.

    python -m tests.runtime.tp_worker CASE_DIR OUT_DIR
    python -m tests.runtime.tp_worker --bundle BUNDLE INPUTS_FILE OUT_DIR   (kernl.load, as an application would)
    python -m tests.runtime.tp_worker --generate BUNDLE PROMPTS_FILE OUT_DIR (greedy, seeded and unseeded sampling)
    python -m tests.runtime.tp_worker --all-reduce OUT_DIR                   (GPUs: kernl's all_reduce alone)
    python -m tests.runtime.tp_worker --peer-norm OUT_DIR                    (GPUs: the sum + residual + norm op)
    python -m tests.runtime.tp_worker --peer-linear-norm OUT_DIR             (GPUs: a linear before it, in one op)
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist


def run_cases(case_dir: str, out_dir: str) -> None:
    from kernl.errors import BundleError
    from kernl.kernels.collectives import all_reduce
    from kernl.runtime.program import ProgramSpec
    from kernl.runtime.runner import Runner
    from kernl.runtime.tensor_parallel import place

    # A peer that never comes, or a collective that never completes, fails the rank instead of hanging it.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        results: dict[str, torch.Tensor] = {}
        x = torch.arange(6, dtype=torch.float32) * (rank + 1)  # the collective alone: each rank's own values
        results["all_reduce"] = all_reduce(x)
        # kernl.load's checks, made by all ranks together: the same bundle, each rank's own file, all loaded.
        files = [f"weights.rank{r}.safetensors" for r in range(dist.get_world_size())]
        manifest = {"digest": "d", "tensor_parallel": {"world_size": len(files)}, "weights": {"ranks": files}}
        placement = place(manifest, torch.device("cpu"), timeout_s=60)
        results["weights_file"] = placement.weights_file
        results["another_bundle"] = _error(BundleError, place, {**manifest, "digest": f"d{min(rank, 1)}"}, x.device)
        results["one_rank_failed"] = _error(
            BundleError, placement.all_ready, BundleError("its file is corrupt") if rank == 1 else None
        )
        for name in sorted(os.listdir(case_dir)):
            case = torch.load(os.path.join(case_dir, name), weights_only=True)
            spec = ProgramSpec.from_bundle(json.loads(case["manifest"]), json.loads(case["program"]))
            program = spec.bind()  # every op checked against the allow-list, kernl.all_reduce included
            weights = [case[f"rank{rank}"][w] for w in spec.weights]
            inputs = [(s["name"], getattr(torch, s["dtype"])) for s in spec.inputs]
            runner = Runner(program, weights, inputs, spec.outputs, torch.device("cpu"), graphs=False)
            tensors = {k.removeprefix("input."): v for k, v in case.items() if k.startswith("input.")}
            outs = runner(tuple(case["bucket"]), tensors)
            for spec_out, out in zip(spec.outputs, outs):
                results[f"{name}/{spec_out['name']}"] = out
        torch.save(results, os.path.join(out_dir, f"out.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_bundle(bundle: str, inputs_file: str, out_dir: str) -> None:
    """kernl.load under torchrun's environment, one call on the saved inputs, its outputs saved by rank."""
    import kernl

    loaded = kernl.load(bundle, timeout_s=60)
    try:
        out = loaded(**torch.load(inputs_file, weights_only=True))
        torch.save({k: v.cpu() for k, v in dict(out).items()}, os.path.join(out_dir, f"out.rank{loaded.rank}.pt"))
        _leave_after_nccl()
    finally:
        dist.destroy_process_group()


def run_generate(bundles: str, prompts_file: str, out_dir: str) -> None:
    """Generation bundles (comma-separated) under torchrun's environment: greedy, sampled with a seed, and sampled
    without one (rank 0's random seed shared), each rank's tokens saved by bundle."""
    import kernl

    case = torch.load(prompts_file, weights_only=True)
    ids, fixed = case["input_ids"], dict(max_new_tokens=int(case["max_new_tokens"]), eos_token_id=[])
    sample = dict(do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    results = {}
    try:
        for i, bundle in enumerate(bundles.split(",")):
            loaded = kernl.load(bundle, timeout_s=60)
            results[f"{i}/greedy"] = loaded.generate(ids, **fixed)
            results[f"{i}/seeded"] = loaded.generate(ids, seed=7, **sample, **fixed)
            results[f"{i}/unseeded"] = loaded.generate(ids, **sample, **fixed)
            results[f"{i}/stream"] = torch.stack(list(loaded.stream(ids, **fixed)), dim=1)
        torch.save(results, os.path.join(out_dir, f"out.rank{loaded.rank}.pt"))
        _leave_after_nccl()
    finally:
        dist.destroy_process_group()


def run_all_reduce(out_dir: str) -> None:
    """kernl's all_reduce on this rank's GPU over NCCL's group: sums of several sizes and dtypes, called directly
    and replayed from a CUDA graph with new values, saved with this rank's inputs and the path each dtype took."""
    from kernl.kernels import peer_all_reduce
    from kernl.kernels.collectives import all_reduce

    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60))
    gen = torch.Generator().manual_seed(100 + rank)
    results = {}
    shapes = {"decode": ((1, 4096), torch.bfloat16), "batch": ((8, 4096), torch.float32),
              "odd": ((3, 5), torch.float32), "prefill": ((64, 4096), torch.bfloat16)}  # fmt: skip
    for name, (shape, dtype) in shapes.items():
        x = torch.randn(shape, generator=gen).to(dtype)
        results[f"{name}/input"] = x
        results[f"{name}/direct"] = all_reduce(x.to(device)).cpu()
        static = torch.zeros(shape, dtype=dtype, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            all_reduce(static.clone())  # set up outside the capture, as a bundle's warm-up run does
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            summed = all_reduce(static)
        y = torch.randn(shape, generator=gen).to(dtype)
        static.copy_(y)
        graph.replay()
        results[f"{name}/graph_input"] = y
        results[f"{name}/graph"] = summed.cpu()
    results["paths"] = json.dumps(peer_all_reduce.status())
    torch.save(results, os.path.join(out_dir, f"out.rank{rank}.pt"))
    _leave_after_nccl()


def run_peer_norm(out_dir: str, linear: bool = False) -> None:
    """all_reduce_add_rms_norm on this rank's GPU: called directly, then a CUDA graph of CALLS chained calls (each
    call's total is the next one's residual) replayed REPLAYS times on new partials; saved with this rank's inputs
    (the partial rows) and which path ran. linear: linear_all_reduce_add_rms_norm of a row-parallel linear's input
    (decode: one row), its partial rows computed again by kernl.linear for the record."""
    from kernl.kernels import peer_norm
    from kernl.kernels.linear import linear as plain_linear
    from kernl.kernels.peer_linear_norm import linear_all_reduce_add_rms_norm

    calls, replays, dtype = 3, 3, torch.bfloat16
    shape, k_in = ((1, 4096), 1024) if linear else ((2, 4096), None)
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60))
    gen = torch.Generator().manual_seed(200 + rank)
    shared = torch.Generator().manual_seed(7)  # residual and weight: the same on every rank
    residual = torch.randn(shape, generator=shared).to(dtype)
    weight = torch.randn(shape[-1], generator=shared).to(dtype)
    results = {"residual": residual, "weight": weight}
    res, w = residual.to(device), weight.to(device)
    if linear:
        rows_weight = (torch.randn(shape[-1], k_in, generator=gen) / k_in**0.5).to(dtype).to(device)

    def new_input() -> torch.Tensor:
        return torch.randn((shape[0], k_in) if linear else shape, generator=gen).to(dtype).to(device)

    def op(x: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if linear:
            return linear_all_reduce_add_rms_norm(x, rows_weight, False, total, w, 1e-6)
        return peer_norm.all_reduce_add_rms_norm(x.clone(), total, w, 1e-6)

    def partial(x: torch.Tensor) -> torch.Tensor:
        return (plain_linear(x, rows_weight) if linear else x).cpu()

    x = new_input()
    results["direct/input"] = partial(x)
    results["direct/y"], results["direct/total"] = (t.cpu() for t in op(x, res))
    results["path"] = peer_norm.status().get(str(device), "apart (never set up)")

    statics = [torch.zeros_like(new_input()) for _ in range(calls)]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        outs, total = [], res
        for static in statics:
            y, total = op(static, total)
            outs.append((y, total))
    for replay in range(replays):
        for i, static in enumerate(statics):
            static.copy_(new_input())
            results[f"graph{replay}/{i}/input"] = partial(static)
        graph.replay()
        for i, (y, total) in enumerate(outs):
            results[f"graph{replay}/{i}/y"], results[f"graph{replay}/{i}/total"] = y.cpu(), total.cpu()
    torch.save(results, os.path.join(out_dir, f"out.rank{rank}.pt"))
    _leave_after_nccl()


def _leave_after_nccl() -> None:
    """NCCL's teardown after CUDA graphs that hold its collectives can wait forever: a rank whose results are saved
    leaves at once (gloo ranks tear down as usual)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        sys.stdout.flush()
        os._exit(0)


def _error(kind: type, fn, *args) -> str:
    try:
        fn(*args)
    except kind as err:
        return str(err)
    return "no error"


if __name__ == "__main__":
    if sys.argv[1] == "--bundle":
        run_bundle(*sys.argv[2:5])
    elif sys.argv[1] == "--generate":
        run_generate(*sys.argv[2:5])
    elif sys.argv[1] == "--all-reduce":
        run_all_reduce(sys.argv[2])
    elif sys.argv[1] == "--peer-norm":
        run_peer_norm(sys.argv[2])
    elif sys.argv[1] == "--peer-linear-norm":
        run_peer_norm(sys.argv[2], linear=True)
    else:
        run_cases(sys.argv[1], sys.argv[2])
