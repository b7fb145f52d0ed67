"""rotary against its reference, an independent fp64 rotation, and transformers' apply_rotary_pos_emb."""

import pytest
import torch

from kernl.kernels import rotary, rotary_reference
from kernl.kernels._backend import runs_triton
from tests.kernels.helpers import rel_err

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def inv_freq(rot, base=10000.0):
    """HF's default RoPE frequencies for rot rotary dims, in fp64."""
    return 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)


def positions(batch, seq, device="cpu"):
    """Positions [batch, seq] that differ per sequence (as with left padding), so batch indexing shows."""
    return torch.arange(seq, device=device)[None, :] + 5 * torch.arange(batch, device=device)[:, None]


def hf_cos_sin(pos, rot, dtype, base=10000.0):
    """cos, sin [*pos.shape, rot] built as LlamaRotaryEmbedding does: fp32 angles, cat(freqs, freqs), cast."""
    freqs = pos.float()[..., None] * inv_freq(rot, base).float().to(pos.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def formula(x, pos, rot, base=10000.0):
    """Rotate pairs (i, i + rot/2) by pos * inv_freq[i] as complex numbers, in fp64; the tail passes through."""
    half = rot // 2
    theta = pos.double()[..., None] * inv_freq(rot, base).to(pos.device)
    theta = theta.unsqueeze(-3)  # broadcast over heads
    z = torch.complex(x[..., :half].double(), x[..., half:rot].double()) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat((z.real, z.imag, x[..., rot:].double()), dim=-1)


def qk(batch, heads_q, heads_k, seq, head_dim, dtype, device="cpu"):
    q = torch.randn(batch, heads_q, seq, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, heads_k, seq, head_dim, dtype=dtype, device=device)
    return q, k


def check(q, k, cos, sin, pos, rot, dtype, base=10000.0):
    """rotary against the reference and the formula; pass-through dims bit-exact; inputs untouched."""
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = rotary(q, k, cos, sin)
    q_ref, k_ref = rotary_reference(q, k, cos, sin)
    for out, x, ref in ((q_out, q, q_ref), (k_out, k, k_ref)):
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
        assert rel_err(out, ref) < TOL[dtype]
        assert rel_err(out, formula(x, pos, rot, base)) < TOL[dtype]
        assert torch.equal(out[..., rot:], x[..., rot:])
    assert torch.equal(q, q_in) and torch.equal(k, k_in)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, seq", [(2, 1), (2, 7), (1, 37)])
@pytest.mark.parametrize("head_dim, rot", [(32, 16), (32, 32), (64, 32), (64, 64)])
def test_rotary_matches_reference_and_formula(dtype, batch, seq, head_dim, rot):
    q, k = qk(batch, 4, 2, seq, head_dim, dtype)
    pos = positions(batch, seq)
    cos, sin = hf_cos_sin(pos, rot, dtype)  # [batch, seq, rot], as HF passes them
    check(q, k, cos, sin, pos, rot, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_arbitrary_cos_sin(dtype):
    # Not HF's cat(freqs, freqs): cos/sin differ between the halves, so each output dim must read its own.
    q, k = qk(2, 4, 2, 7, 64, dtype)
    cos, sin = torch.randn(2, 7, 48), torch.randn(2, 7, 48)
    got, want = rotary(q, k, cos, sin), rotary_reference(q, k, cos, sin)
    x1, x2 = q.double()[..., :24], q.double()[..., 24:48]
    c, s = cos.double()[:, None], sin.double()[:, None]
    by_hand = torch.cat(
        (x1 * c[..., :24] - x2 * s[..., :24], x2 * c[..., 24:] + x1 * s[..., 24:], q.double()[..., 48:]), -1
    )
    assert rel_err(got[0], by_hand) < TOL[dtype]
    for out, ref in zip(got, want):
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("layout", ["seq", "shared_batch", "batch"])
@pytest.mark.parametrize("dtype, cos_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_rotary_cos_sin_layouts(layout, dtype, cos_dtype):
    batch, seq, head_dim, rot = 2, 7, 64, 32
    q, k = qk(batch, 4, 2, seq, head_dim, dtype)
    pos = positions(batch, seq) if layout == "batch" else torch.arange(seq)
    cos, sin = hf_cos_sin(pos, rot, cos_dtype)
    if layout == "shared_batch":  # HF's position_ids [1, seq]: one cos/sin row set for the whole batch
        cos, sin, pos = cos[None], sin[None], pos[None]
    check(q, k, cos, sin, pos, rot, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_reads_strided_views(dtype):
    batch, seq, heads_q, heads_k, head_dim, rot = 2, 7, 4, 2, 32, 32
    # A fused qkv projection [batch, seq, (heads_q + 2 heads_k) * head_dim], split and transposed: views.
    qkv = torch.randn(batch, seq, (heads_q + 2 * heads_k) * head_dim, dtype=dtype)
    q = qkv[..., : heads_q * head_dim].view(batch, seq, heads_q, head_dim).transpose(1, 2)
    k = qkv[..., heads_q * head_dim : (heads_q + heads_k) * head_dim]
    k = k.view(batch, seq, heads_k, head_dim).transpose(1, 2)
    pos = positions(batch, seq)
    cos, sin = hf_cos_sin(pos, rot, dtype)
    check(q, k, cos, sin, pos, rot, dtype)
    # Non-unit stride in head_dim too, and cos/sin that are views with padded rows.
    q = torch.randn(batch, heads_q, seq, head_dim, 2, dtype=dtype)[..., 1]
    k = torch.randn(batch, heads_k, seq, head_dim, 2, dtype=dtype)[..., 0]
    padded = torch.randn(2, batch, seq, rot + 8, dtype=dtype)
    padded[0, ..., :rot], padded[1, ..., :rot] = hf_cos_sin(pos, rot, dtype)
    check(q, k, padded[0, ..., :rot], padded[1, ..., :rot], pos, rot, dtype)


def test_rotary_kernel_writes_every_element():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not runs_triton(torch.empty(0, device=device)):
        pytest.skip("Triton runs neither on a GPU nor through its interpreter here")
    from kernl.kernels._rotary_kernel import launch_rotary

    # Odd head counts leave the last head block partly masked; rot < head_dim exercises the copy tail.
    batch, seq, head_dim, rot = 2, 7, 48, 16
    q, k = qk(batch, 3, 1, seq, head_dim, torch.float32, device)
    pos = positions(batch, seq, device)
    cos, sin = hf_cos_sin(pos, rot, torch.float32)
    q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    launch_rotary(q, k, cos, sin, q_out, k_out)
    assert rel_err(q_out, formula(q, pos, rot)) < 1e-5
    assert rel_err(k_out, formula(k, pos, rot)) < 1e-5


def test_rotary_custom_op():
    qkv = torch.randn(2, 7, 8 * 32)
    q = qkv[..., : 4 * 32].view(2, 7, 4, 32).transpose(1, 2)
    k = qkv[..., 4 * 32 : 6 * 32].view(2, 7, 2, 32).transpose(1, 2)
    pos = torch.arange(7)
    cos, sin = hf_cos_sin(pos, 32, torch.float32)
    q_out, k_out = torch.ops.kernl.rotary(q, k, cos, sin)
    assert rel_err(q_out, formula(q, pos, 32)) < 1e-5
    assert rel_err(k_out, formula(k, pos, 32)) < 1e-5
    # The fake must promise what the real op returns: contiguous outputs even for strided inputs.
    torch.library.opcheck(
        torch.ops.kernl.rotary.default, (q, k, cos, sin), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_matches_transformers_llama(dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = qk(2, 4, 2, 7, 64, dtype)
    cos, sin = hf_cos_sin(positions(2, 7), 64, dtype)
    want_q, want_k = llama.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rotary(q, k, cos, sin)
    assert rel_err(got_q, want_q) < TOL[dtype]
    assert rel_err(got_k, want_k) < TOL[dtype]


def test_rotary_matches_transformers_partial():
    neox = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    # GPT-NeoX's apply_rotary_pos_emb rotates cos.shape[-1] dims and concatenates the rest (partial rotary).
    q, k = qk(2, 4, 4, 7, 64, torch.float32)
    cos, sin = hf_cos_sin(positions(2, 7), 16, torch.float32)
    want_q, want_k = neox.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rotary(q, k, cos, sin)
    assert rel_err(got_q, want_q) < 1e-5
    assert rel_err(got_k, want_k) < 1e-5


def _bad(name, **changes):
    """Valid arguments (q [2, 4, 7, 32], k [2, 2, 7, 32], cos/sin [2, 7, 16]) with some replaced."""
    args = dict(
        q=torch.randn(2, 4, 7, 32), k=torch.randn(2, 2, 7, 32), cos=torch.randn(2, 7, 16), sin=torch.randn(2, 7, 16)
    )
    args.update(changes)
    return pytest.param(args, name, id=f"{name}-{'-'.join(changes)}")


@pytest.mark.parametrize(
    "args, name",
    [
        _bad("q", q=torch.randn(4, 7, 32)),
        _bad("q", q=torch.randint(0, 3, (2, 4, 7, 32))),
        _bad("k", k=torch.randn(3, 2, 7, 32)),
        _bad("k", k=torch.randn(2, 2, 7, 64)),
        _bad("k", k=torch.randn(2, 2, 7, 32).half()),
        _bad("k", k=torch.randn(2, 2, 7, 32, device="meta")),
        _bad("cos", cos=torch.randn(2, 1, 7, 16)),
        _bad("cos", cos=torch.randn(2, 8, 16)),
        _bad("cos", cos=torch.randn(3, 7, 16)),
        _bad("cos", cos=torch.randn(2, 7, 15), sin=torch.randn(2, 7, 15)),
        _bad("cos", cos=torch.randn(2, 7, 64), sin=torch.randn(2, 7, 64)),
        _bad("cos", cos=torch.randn(2, 7, 16, device="meta")),
        _bad("sin", sin=torch.randn(2, 7, 8)),
        _bad("sin", sin=torch.randn(7, 16)),
        _bad("sin", sin=torch.randn(2, 7, 16).half()),
    ],
)
def test_bad_input_names_the_argument(args, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        rotary(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("seq", [1, 128, 4096])
def test_rotary_llama_8b_on_gpu(dtype, batch, seq):
    heads_q, heads_k, head_dim, base = 32, 8, 128, 500000.0
    # q and k as Llama makes them: views of the projection outputs [batch, seq, heads * head_dim].
    q = torch.randn(batch, seq, heads_q * head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, seq, heads_k * head_dim, device="cuda", dtype=dtype)
    q = q.view(batch, seq, heads_q, head_dim).transpose(1, 2)
    k = k.view(batch, seq, heads_k, head_dim).transpose(1, 2)
    pos = torch.arange(seq, device="cuda")[None, :]  # HF's position_ids [1, seq]
    cos, sin = hf_cos_sin(pos, head_dim, dtype, base)
    check(q, k, cos, sin, pos, head_dim, dtype, base)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotary_partial_on_gpu(dtype):
    batch, seq, head_dim, rot = 2, 333, 128, 64
    q, k = qk(batch, 32, 8, seq, head_dim, dtype, device="cuda")
    pos = positions(batch, seq, device="cuda")
    cos, sin = hf_cos_sin(pos, rot, dtype)
    check(q, k, cos, sin, pos, rot, dtype)
