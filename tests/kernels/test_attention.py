"""attention against its reference, an independent fp64 formula and, on GPU, torch's own SDPA error."""

import os

import pytest
import torch
import torch.nn.functional as F

from kernl.kernels import attention, attention_reference
from tests.kernels.helpers import rel_err

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def formula(q, k, v, mask=None, causal=False, scale=None):
    """Softmax attention in fp64, written independently: kv heads by index, masked keys weigh exactly 0."""
    q, k, v = q.double(), k.double(), v.double()
    heads_q, heads_kv, seq_q, seq_k = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kv_head = torch.arange(heads_q, device=q.device) * heads_kv // heads_q
    k, v = k[:, kv_head], v[:, kv_head]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    visible = torch.ones_like(scores, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        scores = scores + mask.double()
    if causal:
        i = torch.arange(seq_q, device=q.device)[:, None]
        j = torch.arange(seq_k, device=q.device)[None, :]
        visible = visible & (j <= i + seq_k - seq_q)
    visible = visible & (scores > float("-inf"))
    row_max = torch.where(visible, scores, -1e300).amax(-1, keepdim=True)
    weights = torch.where(visible, torch.exp(scores - row_max), 0.0)
    total = weights.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", weights / torch.where(total > 0, total, 1.0), v)


def qkv(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype, device="cpu"):
    q = torch.randn(batch, heads_q, seq_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, heads_kv, seq_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, heads_kv, seq_k, head_dim, dtype=dtype, device=device)
    return q, k, v


def padding_mask(batch, seq_k, dtype, device="cpu", fill=float("-inf")):
    """Additive [batch, 1, 1, seq_k]: the last keys of each sequence hidden (at least one key kept)."""
    lengths = torch.randint(1, seq_k + 1, (batch,), device=device)
    hidden = torch.arange(seq_k, device=device)[None, :] >= lengths[:, None]
    mask = torch.zeros(batch, 1, 1, seq_k, dtype=dtype, device=device)
    return mask.masked_fill(hidden[:, None, None, :], fill)


def check(out, q, k, v, tol, **kwargs):
    assert out.shape == q.shape and out.dtype == q.dtype
    # Stored [batch, seq, heads, head_dim], so that merging the heads afterwards is a view.
    assert out.transpose(1, 2).is_contiguous()
    assert torch.isfinite(out).all()
    assert rel_err(out, attention_reference(q, k, v, **kwargs)) < tol
    assert rel_err(out, formula(q, k, v, **kwargs)) < tol


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, mask kind, causal)
CASES = [
    (2, 4, 4, 37, 37, 32, None, False),
    (2, 4, 2, 7, 37, 80, None, True),  # GQA, causal bottom-right with seq_q < seq_k
    (1, 4, 2, 37, 37, 32, None, True),
    (1, 4, 1, 37, 7, 32, None, True),  # seq_q > seq_k: the first rows see no key
    (2, 4, 2, 37, 37, 32, "padding", False),
    (2, 4, 2, 7, 37, 80, "bool_rows", False),
    (3, 4, 2, 1, 37, 32, "bool_padding", False),
    (2, 4, 4, 7, 37, 32, "per_head", True),  # additive [b, h, q, k] plus causal
]


def make_mask(kind, batch, heads_q, seq_q, seq_k, dtype):
    if kind is None:
        return None
    if kind == "padding":
        return padding_mask(batch, seq_k, dtype)
    if kind == "bool_rows":
        keep = torch.rand(batch, 1, seq_q, seq_k) > 0.4
        keep[..., 0] = True
        return keep
    if kind == "bool_padding":
        return padding_mask(batch, seq_k, torch.float32) == 0
    return torch.randn(batch, heads_q, seq_q, seq_k, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, heads_q, heads_kv, seq_q, seq_k, head_dim, mask_kind, causal", CASES)
def test_attention_matches_reference_and_formula(
    dtype, batch, heads_q, heads_kv, seq_q, seq_k, head_dim, mask_kind, causal
):
    q, k, v = qkv(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype)
    mask = make_mask(mask_kind, batch, heads_q, seq_q, seq_k, dtype)
    out = attention(q, k, v, mask=mask, causal=causal)
    check(out, q, k, v, TOL[dtype], mask=mask, causal=causal)


def test_custom_scale_and_hf_min_mask():
    q, k, v = qkv(2, 4, 2, 7, 37, 32, torch.float16)
    # Hugging Face fills with finfo.min, not -inf: a finite value that must stay finite inside the kernel.
    mask = padding_mask(2, 37, torch.float32, fill=torch.finfo(torch.float32).min)
    mask[1] = torch.finfo(torch.float32).min  # every key "hidden": finite scores, so a plain average, as SDPA
    out = attention(q, k, v, mask=mask, scale=0.3)
    check(out, q, k, v, TOL[torch.float16], mask=mask, scale=0.3)
    average = v[1].float().mean(1, keepdim=True).repeat_interleave(2, dim=0).expand(4, 7, 32)
    assert rel_err(out[1], average) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_are_zero(dtype):
    q, k, v = qkv(3, 4, 2, 7, 37, 32, dtype)
    keep = torch.rand(3, 1, 7, 37) > 0.5
    keep[..., 0] = True
    keep[0, :, 2] = False  # one query row of batch 0 sees nothing
    keep[1] = False  # every row of batch 1 sees nothing
    additive = torch.zeros(3, 1, 7, 37, dtype=dtype).masked_fill(~keep, float("-inf"))
    for mask in (keep, additive):
        out = attention(q, k, v, mask=mask)
        assert torch.isfinite(out).all()
        assert (out[0, :, 2] == 0).all() and (out[1] == 0).all()
        check(out, q, k, v, TOL[dtype], mask=mask)


def test_strided_views_from_fused_projections():
    batch, seq, heads, head_dim = 2, 37, 4, 32
    # MHA: [b, s, 3 * h * d] -> [3, b, h, s, d] views, no copies.
    fused = torch.randn(batch, seq, 3 * heads * head_dim, dtype=torch.float16)
    q, k, v = fused.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    check(attention(q, k, v, causal=True), q, k, v, TOL[torch.float16], causal=True)
    # GQA: [b, s, (hq + 2 hkv) d] split on the last dim, then [b, s, h, d] -> [b, h, s, d].
    fused = torch.randn(batch, seq, (4 + 2 + 2) * head_dim)
    parts = fused.split([4 * head_dim, 2 * head_dim, 2 * head_dim], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, head_dim)).transpose(1, 2) for t in parts)
    check(attention(q, k, v), q, k, v, TOL[torch.float32])
    # head_dim not the innermost dim: q read from a [b, h, d, s] tensor.
    q = torch.randn(batch, heads, head_dim, 7).transpose(-1, -2)
    k, v = torch.randn(batch, heads, 2, seq, head_dim).unbind(2)
    check(attention(q, k, v), q, k, v, TOL[torch.float32])


@pytest.mark.parametrize("config", [(16, 16), (16, 32), (32, 16), (64, 32)])
@pytest.mark.parametrize("seq_q, seq_k", [(37, 37), (7, 37), (37, 7), (40, 64)])
def test_tile_shapes_across_edges(config, seq_q, seq_k):
    from kernl.kernels._attention_kernel import AttentionConfig, launch_attention

    q, k, v = qkv(1, 2, 1, seq_q, seq_k, 80, torch.float32)
    mask = torch.randn(1, 1, seq_q, seq_k)
    for kwargs in (dict(causal=True), dict(mask=mask), dict(mask=mask > 0, causal=True)):
        out = launch_attention(
            q, k, v, kwargs.get("mask"), kwargs.get("causal", False), 80**-0.5, AttentionConfig(*config, 4, 1)
        )
        check(out, q, k, v, TOL[torch.float32], **kwargs)


def test_custom_op_and_fake():
    q, k, v = qkv(2, 4, 2, 7, 37, 32, torch.float32)
    mask = padding_mask(2, 37, torch.float32)
    out = torch.ops.kernl.attention(q, k, v, mask, True, 0.2)
    check(out, q, k, v, TOL[torch.float32], mask=mask, causal=True, scale=0.2)
    torch.library.opcheck(
        torch.ops.kernl.attention.default, (q, k, v, None, False, None), test_utils=("test_schema", "test_faketensor")
    )


def test_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(1, 2, 1, 7, 9, 32, torch.float32)
    assert torch.equal(attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True))


def _inputs(**over):
    q, k, v = qkv(2, 4, 2, 7, 9, 32, torch.float32)
    args = dict(q=q, k=k, v=v, mask=None)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "args, name",
    [
        (_inputs(q=torch.randn(4, 7, 32)), "q"),
        (_inputs(q=torch.randn(2, 4, 7, 300), k=torch.randn(2, 2, 9, 300), v=torch.randn(2, 2, 9, 300)), "q"),
        (_inputs(q=torch.randint(0, 3, (2, 4, 7, 32))), "q"),
        (_inputs(k=torch.randn(2, 3, 9, 32), v=torch.randn(2, 3, 9, 32)), "k"),
        (_inputs(k=torch.randn(3, 2, 9, 32), v=torch.randn(3, 2, 9, 32)), "k"),
        (_inputs(k=torch.randn(2, 2, 9, 16)), "k"),
        (_inputs(k=torch.randn(2, 2, 9, 32).half()), "k"),
        (_inputs(k=torch.randn(2, 2, 9, 32, device="meta")), "k"),
        (_inputs(v=torch.randn(2, 2, 8, 32)), "v"),
        (_inputs(mask=torch.zeros(2, 1, 5, 9)), "mask"),
        (_inputs(mask=torch.zeros(1, 2, 1, 1, 9)), "mask"),
        (_inputs(mask=torch.zeros(2, 1, 1, 9, dtype=torch.int64)), "mask"),
        (_inputs(mask=torch.zeros(2, 1, 1, 9, device="meta")), "mask"),
    ],
)
def test_bad_input_names_the_argument(args, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        attention(args["q"], args["k"], args["v"], mask=args["mask"])


# --- GPU: realistic shapes; kernl's error must stay within twice torch SDPA's, both against fp32. ---

GPU_CASES = [
    # (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, mask kind, causal)
    (8, 12, 12, 128, 128, 64, "padding", False),  # BERT-base
    (8, 12, 12, 512, 512, 64, "padding", False),
    (2, 12, 12, 1024, 1024, 64, None, True),  # GPT-2
    (1, 32, 8, 1, 1, 128, None, True),  # Llama-8B geometry
    (2, 32, 8, 37, 37, 128, None, True),
    (2, 32, 8, 512, 512, 128, None, True),
    (1, 32, 8, 4096, 4096, 128, None, True),
    (1, 32, 8, 37, 4096, 128, None, True),  # chunked prefill: bottom-right causal
    (4, 32, 8, 1, 1000, 128, "padding", False),  # decode step over a padded cache
    (2, 8, 8, 333, 333, 256, None, True),
    (2, 8, 4, 257, 513, 256, "bool_rows", False),
    (4, 16, 16, 257, 257, 80, "bool_rows", False),
    (4, 16, 16, 200, 200, 80, None, False),
    # Batch 1, few programs: the 16-row tiles.
    (1, 12, 12, 128, 128, 64, "padding", False),
    (1, 12, 12, 16, 16, 64, "padding", False),
    (1, 32, 8, 16, 16, 64, None, True),
    (1, 4, 2, 77, 300, 64, "bool_rows", False),
    (1, 4, 2, 77, 300, 64, None, True),
]


def sdpa(q, k, v, mask, causal):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    seq_q, seq_k = q.shape[2], k.shape[2]
    if causal and seq_q != seq_k:
        # SDPA's is_causal is top-left aligned: give it the bottom-right diagonal as a mask.
        mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def gpu_mask(kind, batch, heads_q, seq_q, seq_k, dtype):
    if kind == "padding":
        return padding_mask(batch, seq_k, dtype, device="cuda", fill=torch.finfo(dtype).min)
    if kind == "bool_rows":
        keep = torch.rand(batch, 1, seq_q, seq_k, device="cuda") > 0.3
        keep[..., 0] = True
        return keep
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, heads_q, heads_kv, seq_q, seq_k, head_dim, mask_kind, causal", GPU_CASES)
def test_attention_error_within_twice_sdpa(dtype, batch, heads_q, heads_kv, seq_q, seq_k, head_dim, mask_kind, causal):
    q, k, v = qkv(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype, device="cuda")
    mask = gpu_mask(mask_kind, batch, heads_q, seq_q, seq_k, dtype)
    out = attention(q, k, v, mask=mask, causal=causal)
    ref = attention_reference(q.float(), k.float(), v.float(), mask=mask, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    kernl_err, torch_err = rel_err(out, ref), rel_err(sdpa(q, k, v, mask, causal), ref)
    assert kernl_err <= 2 * torch_err + 1e-6, (kernl_err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_attention_fp32_on_gpu(head_dim):
    q, k, v = qkv(2, 8, 4, 77, 300, head_dim, torch.float32, device="cuda")
    mask = padding_mask(2, 300, torch.float32, device="cuda")
    for kwargs in (dict(causal=True), dict(mask=mask), dict(mask=mask == 0, causal=True)):
        out = attention(q, k, v, **kwargs)
        assert torch.isfinite(out).all()
        assert rel_err(out, formula(q, k, v, **kwargs)) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_reads_fused_qkv_on_gpu(dtype):
    batch, seq, heads, head_dim = 4, 300, 12, 64
    fused = torch.randn(batch, seq, 3 * heads * head_dim, dtype=dtype, device="cuda")
    q, k, v = fused.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    mask = padding_mask(batch, seq, dtype, device="cuda")
    out = attention(q, k, v, mask=mask)
    ref = attention_reference(q.float(), k.float(), v.float(), mask=mask)
    assert rel_err(out, ref) <= 2 * rel_err(sdpa(q, k, v, mask, False), ref) + 1e-6


@pytest.mark.gpu
def test_device_mix_names_the_argument():
    q, k, v = qkv(1, 2, 2, 7, 7, 32, torch.float16, device="cuda")
    with pytest.raises(ValueError, match="^k:"):
        attention(q, k.cpu(), v)
    with pytest.raises(ValueError, match="^mask:"):
        attention(q, k, v, mask=torch.zeros(1, 1, 1, 7, dtype=torch.float16))


def test_interpreter_is_on_without_cuda():
    # Guard for the suite itself: on a CPU machine these tests must exercise the Triton kernel.
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
