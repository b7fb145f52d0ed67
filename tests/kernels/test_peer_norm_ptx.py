"""The fused sum + norm kernel as Triton compiles it for Hopper (no GPU needed): its wait on a peer's row must read
memory every time. A plain or `.cv` load polled from L1 on Triton 3.6 and hung the kernel on two H200s, which the
interpreter cannot show."""

import os
import re
import subprocess
import sys

import pytest

# Run in a fresh interpreter without TRITON_INTERPRET, which turns @triton.jit functions into Python ones.
COMPILE_FOR_SM90 = """
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:
    print(err, file=sys.stderr)
    sys.exit(3)
from kernl.kernels import _peer_norm_kernel as k

signature = {name: "*bf16" for name in "XRWYS"}
signature |= {name: "i32" for name in ("stride_x", "stride_r", "stride_y", "stride_s", "rank", "world", "N")}
signature |= {"bases": "*i64", "counters": "*i32", "eps": "fp32", "weight_offset": "fp32"}
signature |= {name: "constexpr" for name in ("ON_GPU", "BLOCK_N", "WORLD_P2", "USE_PDL", "PUSHED")}
constexprs = {"ON_GPU": True, "BLOCK_N": 4096, "WORLD_P2": 4, "USE_PDL": True, "PUSHED": sys.argv[1] == "pushed"}
source = ASTSource(fn=k.peer_add_rms_norm_kernel, signature=signature, constexprs=constexprs)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
print(compiled.asm["ptx"])
"""


# The GEMV that stores its rows into the ranks' places (the pushed mode's other half): it must compile for Hopper.
COMPILE_PUSH_FOR_SM90 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernl.kernels._gemv_push_kernel import gemv_push_kernel

signature = {"X": "*bf16", "W": "*bf16", "bases": "*i64", "counters": "*i32"}
ints = ("M", "N", "K", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "rank", "world")
signature |= {name: "i32" for name in ints}
constexprs = {"EVEN_K": True, "BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 1024, "USE_PDL": True, "PREFETCH_K": 512}
signature |= {name: "constexpr" for name in constexprs}
source = ASTSource(fn=gemv_push_kernel, signature=signature, constexprs=constexprs)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"])
"""


def _ptx(program: str, *args: str) -> str:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", program, *args], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 3:
        pytest.skip(f"this Triton cannot compile for CUDA: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("mode", ["own-row", "pushed"])
def test_the_wait_on_a_peers_row_is_a_volatile_load_on_hopper(mode):
    loads = re.findall(r"\bld\.[\w.]+", _ptx(COMPILE_FOR_SM90, mode))
    assert any(op.startswith("ld.volatile.global") for op in loads), f"no volatile load among {sorted(set(loads))}"


def test_the_gemv_that_pushes_compiles_for_hopper_and_waits_after_its_prefetch():
    ptx = _ptx(COMPILE_PUSH_FOR_SM90)
    assert "st.global" in ptx
    assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")
