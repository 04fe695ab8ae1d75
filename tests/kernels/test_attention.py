"""kernels.attention against reference.attention: output and dq, dk, dv, FlashAttention tolerance rule.

`fa_rule` (tests/conftest.py): the kernel's error against the reference in float64 on upcast
inputs is at most twice PyTorch's own error in the test dtype, plus a tiny atol. For float32
inputs "PyTorch's own error" is float32 SDPA's, which is itself ~1e-7, so there the rule is
effectively err <= 2 * (float32 error) + 1e-5.

On CPU the kernels run through the Triton interpreter (float32 and float16, tiny shapes, H = 1 or
2); bfloat16 and real lengths (up to 4096) need CUDA.
"""

import contextvars
import importlib
import math

import pytest
import torch

from fastsiglip import ops, reference
from fastsiglip.kernels import attention

device_module = importlib.import_module("fastsiglip.kernels._device")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (bf16 and real sizes)")


def cu_seqlens(lens, device=DEVICE):
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
    return out.to(device)


def make_qkv(q_shape, k_shape, seed=0, device=DEVICE):
    """float32 q [*q_shape], k and v [*k_shape]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device) for s in (q_shape, k_shape, k_shape)]


def run(fn, qkv, dtype, do, *args, **kwargs):
    """fn's output and (dq, dk, dv) for inputs cast to dtype, upstream gradient do."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in qkv]
    o = fn(*leaves, *args, **kwargs)
    grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
    return o.detach(), grads


def check(fa_rule, qkv, dtype, *args, **kwargs):
    """Kernel vs reference (float64 exact, `dtype` PyTorch) on output and every gradient."""
    g = torch.Generator().manual_seed(123)
    do = torch.randn(qkv[0].shape, generator=g).to(qkv[0].device)
    o, grads = run(attention, qkv, dtype, do, *args, **kwargs)
    o_exact, grads_exact = run(reference.attention, qkv, torch.float64, do, *args, **kwargs)
    o_lowp, grads_lowp = run(reference.attention, qkv, dtype, do, *args, **kwargs)
    assert o.dtype == dtype and o.shape == qkv[0].shape
    fa_rule("o", o, o_exact, o_lowp)
    for name, a, e, lp in zip(("dq", "dk", "dv"), grads, grads_exact, grads_lowp):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        fa_rule(name, a, e, lp)
    return o, grads


def packed_inputs(lens_q, lens_k, heads, head_dim, seed=0):
    qkv = make_qkv((sum(lens_q), heads, head_dim), (sum(lens_k), heads, head_dim), seed)
    return qkv, cu_seqlens(lens_q), cu_seqlens(lens_k)


# --- CPU (interpreter) and GPU: tiny shapes ------------------------------------------------------

LENS = [1, 7, 0, 64, 65]  # one token, odd, an EMPTY sequence, one full tile, a tile plus one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 72])
def test_packed_self_attention(fa_rule, dtype, head_dim):
    qkv, cu, _ = packed_inputs(LENS, LENS, 2, head_dim)
    check(fa_rule, qkv, dtype, cu, cu)


def test_inference_forward_writes_no_lse():
    # store_lse=False (no gradients wanted): the same output, and the LSE neither allocated nor
    # written (the kernel's STORE_LSE is off); with it, the LSE is log2(sum exp) of each row.
    kernel_module = importlib.import_module("fastsiglip.kernels.attention")
    (q, k, v), cu, _ = packed_inputs(LENS, LENS, 2, 64)
    max_len = max(LENS)
    scale = 64 ** -0.5
    o, lse = kernel_module.attention_fwd(q, k, v, cu, cu, max_len, max_len, scale)
    o_inf, lse_inf = kernel_module.attention_fwd(q, k, v, cu, cu, max_len, max_len, scale,
                                                  store_lse=False)
    assert lse.shape == (2, sum(LENS)) and lse_inf.numel() == 0
    assert torch.equal(o, o_inf)
    first = slice(0, LENS[1] + LENS[0])  # the first two sequences' queries, head 0
    seq = torch.tensor([0] * LENS[0] + [1] * LENS[1])
    s = (q[first, 0] @ k[first, 0].t()).double() * scale  # [n, n]
    s = s.masked_fill(seq[:, None] != seq[None, :], float("-inf"))
    torch.testing.assert_close(lse[0, first].double(), torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0)).double(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [80, 96, 128])
def test_other_head_dims(fa_rule, head_dim):
    qkv, cu, _ = packed_inputs([7, 33], [7, 33], 1, head_dim)
    check(fa_rule, qkv, torch.float16, cu, cu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_query_per_sequence(fa_rule, dtype):
    """The MAP pooling head: one query per image over that image's patches (one has none)."""
    lens_k = [7, 0, 64, 65, 1]
    qkv, cu_q, cu_k = packed_inputs([1] * len(lens_k), lens_k, 2, 72)
    o, _ = check(fa_rule, qkv, dtype, cu_q, cu_k)
    assert torch.all(o[1] == 0), "a sequence without keys must output zeros"


def test_queries_and_keys_of_different_lengths(fa_rule):
    """All queries over fewer (masked) keys, more keys than queries, queries without keys."""
    lens_q, lens_k = [16, 16, 5, 3, 0], [9, 40, 0, 70, 4]
    qkv, cu_q, cu_k = packed_inputs(lens_q, lens_k, 2, 64)
    o, (dq, _, _) = check(fa_rule, qkv, torch.float32, cu_q, cu_k)
    rows = slice(32, 37)  # the third sequence: 5 queries, no keys
    assert torch.all(o[rows] == 0) and torch.all(dq[rows] == 0)


@pytest.mark.parametrize("head_dim", [64, 72])
def test_dense_layout(fa_rule, head_dim):
    qkv = make_qkv((2, 7, 2, head_dim), (2, 33, 2, head_dim))
    check(fa_rule, qkv, torch.float32)
    check(fa_rule, qkv, torch.float16, softmax_scale=0.3)


def test_dense_non_contiguous(fa_rule):
    """q, k, v as views into one [B, N, 3, H, D] projection, as a fused qkv linear gives them."""
    qkv_proj = make_qkv((2, 9, 3, 2, 72), (1,))[0]  # [B, N, 3, H, D]
    g = torch.Generator().manual_seed(5)
    do = torch.randn(2, 9, 2, 72, generator=g).to(DEVICE)
    results = []
    for fn, dtype in ((attention, torch.float16), (reference.attention, torch.float64),
                      (reference.attention, torch.float16)):
        x = qkv_proj.detach().to(dtype).requires_grad_()
        q, k, v = x.unbind(2)  # [B, N, H, D] views with token stride 3 H D
        o = fn(q, k, v)
        (dx,) = torch.autograd.grad(o, x, do.to(dtype))
        results.append((o.detach(), dx))
    (o, dx), (o_e, dx_e), (o_l, dx_l) = results
    fa_rule("o", o, o_e, o_l)
    fa_rule("dqkv", dx, dx_e, dx_l)


def test_strides_not_multiple_of_8(fa_rule):
    """Slices of wider tensors (head stride 70, token stride 140) are copied, then computed."""
    lens = [5, 33]
    wide = make_qkv((38, 2, 70), (38, 2, 70))
    qkv = [t[..., :64] for t in wide]
    check(fa_rule, qkv, torch.float32, cu_seqlens(lens), cu_seqlens(lens))


def test_max_seqlen_is_an_upper_bound(fa_rule):
    """The model passes the padded length: extra programs exit early, results unchanged."""
    lens = [3, 65, 0, 20]
    qkv, cu, _ = packed_inputs(lens, lens, 1, 72)
    o, grads = check(fa_rule, qkv, torch.float32, cu, cu, max_seqlen_q=130, max_seqlen_k=129)
    o2, grads2 = run(attention, qkv, torch.float32, torch.ones_like(qkv[0]), cu, cu)
    o3, grads3 = run(attention, qkv, torch.float32, torch.ones_like(qkv[0]), cu, cu, 200, 200)
    assert torch.equal(o, o2) and torch.equal(o2, o3)
    assert all(torch.equal(a, b) for a, b in zip(grads2, grads3))


def test_packed_equals_per_sequence():
    """Each sequence alone gives bit-identical results: sequences never see each other."""
    lens_q, lens_k = [5, 33, 1], [40, 7, 12]
    qkv, cu_q, cu_k = packed_inputs(lens_q, lens_k, 2, 72)
    do = torch.randn_like(qkv[0])
    o, grads = run(attention, qkv, torch.float32, do, cu_q, cu_k)
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        rq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        rk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        part = [qkv[0][rq], qkv[1][rk], qkv[2][rk]]
        o_b, (dq_b, dk_b, dv_b) = run(attention, part, torch.float32, do[rq], cu_seqlens([lq]), cu_seqlens([lk]))
        assert torch.equal(o[rq], o_b), f"sequence {b}: output differs when packed"
        assert torch.equal(grads[0][rq], dq_b) and torch.equal(grads[1][rk], dk_b) and torch.equal(grads[2][rk], dv_b)


def test_head_major_layout(fa_rule):
    """q, k, v as [T, H, D] views of [H, T, D] storage: head stride T * D, token stride D (the
    layout whose head index times head stride the kernels form in int64)."""
    lens = [5, 33]
    qkv = [t.permute(1, 0, 2).contiguous().permute(1, 0, 2) for t in make_qkv((38, 2, 64), (38, 2, 64))]
    assert qkv[0].stride() == (64, 38 * 64, 1)
    check(fa_rule, qkv, torch.float32, cu_seqlens(lens), cu_seqlens(lens))


def test_int32_offset_guards(monkeypatch):
    """Host-side guards of the int32 in-sequence offsets (meta tensors: no memory, no kernel):
    an operand whose token stride x max_seqlen (or any stride) reaches 2^31 is made contiguous,
    and a single sequence too long even then is refused."""
    module = importlib.import_module("fastsiglip.kernels.attention")  # the package re-exports the function
    ok = torch.empty_strided((4, 2, 64), (3 * 128, 64, 1), device="meta")
    assert module._rows(ok, 4096) is ok
    for strides, max_rows in (((2**28, 64, 1), 16), ((128, 2**31, 1), 1)):
        x = torch.empty_strided((4, 2, 64), strides, device="meta")
        assert module._rows(x, max_rows).stride() == (128, 64, 1)
    monkeypatch.setattr(module, "check_device", lambda op, tensors: None)  # meta tensors: skip to the guard
    q = torch.empty(1, 2**20, 16, 128, device="meta")  # one sequence of 2^20 x 2048 = 2^31 elements
    with pytest.raises(ValueError, match="int32 in-sequence offsets"):
        attention(q, q, q)


# The dK/dV kernel's padded key rows (never stored) overflow here; numpy warns about them.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_very_negative_scores(fa_rule):
    """All scores ~ -200 (LSE far below 0): the padded keys of a partial tile must not overflow."""
    lens = [40, 3]
    qkv, cu, _ = packed_inputs(lens, lens, 1, 64)
    qkv[0] = qkv[0] * 0.1 + 5.0
    qkv[1] = qkv[1] * 0.1 - 5.0
    check(fa_rule, qkv, torch.float32, cu, cu)


def test_nan_stays_in_its_sequence():
    lens = [7, 20, 33]
    qkv, cu, _ = packed_inputs(lens, lens, 1, 64)
    qkv[1][10] = float("nan")  # a key of the second sequence
    do = torch.randn_like(qkv[0])
    o, grads = run(attention, qkv, torch.float32, do, cu, cu)
    o_ref, grads_ref = run(reference.attention, qkv, torch.float64, do, cu, cu)
    assert torch.isnan(o[7:27]).all(), "the poisoned sequence should be NaN"
    for rows in (slice(0, 7), slice(27, 60)):
        assert torch.isfinite(o[rows]).all(), "NaN leaked into another sequence"
        torch.testing.assert_close(o[rows].double(), o_ref[rows], atol=1e-5, rtol=1e-5)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g[rows].double(), g_ref[rows], atol=1e-5, rtol=1e-5)


def test_empty_inputs():
    """No tokens at all (every sequence empty), and a batch of zero sequences."""
    for lens in ([0, 0], []):
        qkv, cu, _ = packed_inputs(lens, lens, 2, 64)
        o, grads = run(attention, qkv, torch.float32, torch.zeros(0, 2, 64, device=DEVICE), cu, cu)
        assert o.shape == (0, 2, 64) and all(g.shape == (0, 2, 64) for g in grads)


def test_ops_routes_a_naflex_mask_to_the_kernel(fa_rule, monkeypatch):
    """ops.attention with the model's varlen helpers: mask -> packed + cu_seqlens, bound N."""
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    mask = torch.zeros(3, 40, dtype=torch.int32)
    for b, n in enumerate((40, 17, 1)):
        mask[b, :n] = 1
    packing = ops.packing_from_mask(mask.to(DEVICE))
    x = make_qkv((3, 40, 2, 72), (1,))[0]
    tokens = ops.pack(x, packing)  # [T, H, D]
    args = (packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen, packing.max_seqlen)
    o = ops.attention(tokens, tokens, tokens, *args)
    o_exact = reference.attention(*(tokens.double(),) * 3, *args)
    fa_rule("o", o, o_exact, reference.attention(tokens, tokens, tokens, *args))
    dense = ops.unpack(o, packing)  # [B, N, H, D], zeros at padding
    assert dense.shape == (3, 40, 2, 72) and torch.all(dense[1, 17:] == 0)


# --- bad inputs ----------------------------------------------------------------------------------


def bad_case(case):
    qkv, cu, _ = packed_inputs([3, 5], [3, 5], 2, 64)
    q, k, v = qkv
    kw = {"cu_seqlens_q": cu, "cu_seqlens_k": cu}
    if case == "head_dim":
        q, k, v = (torch.zeros(8, 2, 48, device=DEVICE) for _ in range(3))
    elif case == "dtype":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "mixed_dtype":
        v = v.half()
    elif case == "cu_dtype":
        kw["cu_seqlens_q"] = cu.long()
    elif case == "cu_2d":
        kw["cu_seqlens_k"] = cu[None]
    elif case == "cu_decreasing":
        kw["cu_seqlens_q"] = torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=DEVICE)
        kw["cu_seqlens_k"] = cu_seqlens([3, 5, 0])
    elif case == "cu_last":
        kw["cu_seqlens_q"] = cu_seqlens([3, 4])
    elif case == "cu_length":
        kw["cu_seqlens_k"] = cu_seqlens([3, 5, 0])
    elif case == "only_one_cu":
        kw["cu_seqlens_k"] = None
    elif case == "shape":
        k = k[:, :1]
    elif case == "dense_rank":
        kw = {}
    elif case == "max_seqlen_low":
        kw["max_seqlen_q"] = 4
    elif case == "scale":
        kw["softmax_scale"] = -1.0
    return (q, k, v), kw


@pytest.mark.parametrize("case,error,message", [
    ("head_dim", ValueError, r"head dim 48 is not supported .*supported: 64, 72, 80, 96, 128"),
    ("dtype", TypeError, r"dtype torch.float64 is not supported"),
    ("mixed_dtype", TypeError, r"q, k, v must share one dtype"),
    ("cu_dtype", TypeError, r"cu_seqlens_q must be int32 .*\.to\(torch.int32\)"),
    ("cu_2d", ValueError, r"cu_seqlens_k must be 1-D of length batch \+ 1"),
    ("cu_decreasing", ValueError, r"cu_seqlens_q must start at 0, never decrease .*smallest step -2"),
    ("cu_last", ValueError, r"end at the token count 8; got first 0, last 7"),
    ("cu_length", ValueError, r"must both have length batch \+ 1, got 3 and 4"),
    ("only_one_cu", ValueError, r"pass both cu_seqlens_q and cu_seqlens_k"),
    ("shape", ValueError, r"expected q \[Tq, H, D\], k and v \[Tk, H, D\] .*got q \(8, 2, 64\), k \(8, 1, 64\)"),
    ("dense_rank", ValueError, r"expected q \[B, Nq, H, D\].*pass cu_seqlens_q and cu_seqlens_k"),
    ("max_seqlen_low", ValueError, r"max_seqlen_q=4 is below the longest sequence \(5\)"),
    ("scale", ValueError, r"softmax_scale must be positive and finite, got -1.0"),
])
def test_rejects_bad_inputs(case, error, message):
    if case == "max_seqlen_low" and HAS_CUDA:
        pytest.skip("on CUDA a given max_seqlen is trusted (no host sync), by design")
    (q, k, v), kw = bad_case(case)
    with pytest.raises(error, match=message):
        attention(q, k, v, **kw)


def test_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(device_module, "INTERPRET", False)
    q, k, v = make_qkv((1, 4, 1, 64), (1, 4, 1, 64), device="cpu")
    with pytest.raises(ValueError, match="move the inputs to CUDA.*FASTSIGLIP_IMPL=reference"):
        attention(q, k, v)


def test_rejects_mixed_devices():
    q, k, v = make_qkv((1, 4, 1, 64), (1, 4, 1, 64))
    with pytest.raises(ValueError, match="different devices"):
        attention(q, k.to("meta"), v)


# --- GPU: bf16 / fp16 / fp32 at real lengths -----------------------------------------------------

GPU_LENS = [1, 100, 0, 257, 1024, 4096, 729]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
def test_gpu_long_sequences(fa_rule, dtype, head_dim):
    qkv, cu, _ = packed_inputs(GPU_LENS, GPU_LENS, 2, head_dim)
    check(fa_rule, qkv, dtype, cu, cu, max_seqlen_q=4096, max_seqlen_k=4096)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 72])
def test_gpu_float32(fa_rule, head_dim):
    qkv, cu, _ = packed_inputs([1, 300, 0, 1100], [1, 300, 0, 1100], 2, head_dim)
    check(fa_rule, qkv, torch.float32, cu, cu)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_naflex_batch_and_pooling(fa_rule, dtype):
    """A NaFlex-like batch (16 heads, padded bound 1024) and its pooling head (1 query each)."""
    lens = [1024, 1008, 990, 896, 1024, 512, 961, 0]
    qkv, cu, _ = packed_inputs(lens, lens, 16, 72)
    check(fa_rule, qkv, dtype, cu, cu, max_seqlen_q=1024, max_seqlen_k=1024)
    qkv1, cu_q, cu_k = packed_inputs([1] * len(lens), lens, 16, 72, seed=1)
    check(fa_rule, qkv1, dtype, cu_q, cu_k, max_seqlen_q=1, max_seqlen_k=1024)


@gpu
@pytest.mark.gpu
def test_gpu_dense_and_deterministic(fa_rule):
    qkv = make_qkv((4, 1024, 12, 64), (4, 1024, 12, 64))
    o, grads = check(fa_rule, qkv, torch.bfloat16)
    do = torch.randn_like(qkv[0])
    first = run(attention, qkv, torch.bfloat16, do)
    second = run(attention, qkv, torch.bfloat16, do)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@gpu
@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """Tensors of more than 2^31 elements, so every int64 offset path runs: q, k, v head-major
    (head index x head stride T * D passes 2^31 from head 15 on), o and dO token-major (the
    preprocess kernel's row x token stride passes 2^31 past 2^20 tokens). Sequences are
    independent, so the first and the last two are checked against the reference alone."""
    heads, head_dim, n, seqs = 16, 128, 128, 8960  # T = 1,146,880 tokens, 15 T D > 2^31
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs a GPU with 60 GB (eight 4.7 GB tensors)")
    total = n * seqs
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(heads, total, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
               .transpose(0, 1).requires_grad_() for _ in range(3))  # [T, H, D], head stride T * D
    do = torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.arange(seqs + 1, device="cuda", dtype=torch.int32) * n
    assert 15 * q.stride(1) >= 2**31 and total * do.stride(0) >= 2**31
    o = attention(q, k, v, cu, cu, n, n)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    for b in (0, seqs - 2, seqs - 1):
        rows = slice(b * n, (b + 1) * n)
        part = [t.detach()[rows].float().requires_grad_() for t in (q, k, v)]
        o_ref = reference.attention(*part, cu_seqlens([n]), cu_seqlens([n]))
        grads_ref = torch.autograd.grad(o_ref, part, do[rows].float())
        for name, a, e in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), (o_ref, *grads_ref)):
            err = (a[rows].float() - e).abs().max().item()
            assert err <= 2e-2 * max(1.0, e.abs().max().item()), f"sequence {b} {name}: max error {err:.3e}"


# --- the warp-specialized forward (descriptor body; gated to sm_90 on a GPU) ---------------------

kernel_module = importlib.import_module("fastsiglip.kernels.attention")


@pytest.fixture
def force_ws(monkeypatch):
    """Only the warp-specialized forward configs (the interpreter has no device to gate on)."""
    monkeypatch.setattr(kernel_module, "FORCE_WARP_SPECIALIZE", True)


def ws_forward(q, k, v, lens_q, lens_k, max_q=None, max_k=None):
    """attention_fwd's (o, lse) and whether the warp-specialized body ran."""
    max_q, max_k = max_q or max(lens_q), max_k or max(lens_k)
    o, lse = kernel_module.attention_fwd(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max_q, max_k,
                                         q.shape[-1] ** -0.5)
    return o, lse, bool(kernel_module._attn_fwd_kernel.best_config.kwargs.get("WARP_SPECIALIZE"))


def check_forward(fa_rule, q, k, v, lens_q, lens_k, o, lse):
    """o against the reference (FA rule), lse against log2(sum exp) of the scaled scores."""
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    scale = q.shape[-1] ** -0.5
    exact = reference.attention(q.double(), k.double(), v.double(), cu_q, cu_k, softmax_scale=scale)
    fa_rule("o", o, exact, reference.attention(q, k, v, cu_q, cu_k, softmax_scale=scale))
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lq and lk:
            s = torch.einsum("qhd,khd->hqk", q[rq].double(), k[rk].double()) * scale
            torch.testing.assert_close(lse[:, rq].double(), torch.logsumexp(s, -1) / math.log(2), rtol=1e-4, atol=1e-4)


WS_LENS_Q, WS_LENS_K = [5, 33, 70, 1, 0], [7, 33, 0, 64, 3]  # partial and full tiles, no keys, no queries


def strided_qkv(lens_q, lens_k, heads, head_dim, dtype):
    """q, k, v as views of one [T, 3, H, D] projection (token stride 3 H D), as the model has them."""
    x = make_qkv((max(sum(lens_q), sum(lens_k)), 3, heads, head_dim), (1,))[0].to(dtype)
    return x[:sum(lens_q), 0], x[:sum(lens_k), 1], x[:sum(lens_k), 2]


@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 64), (torch.float16, 72), (torch.float16, 80),
                                            (torch.float16, 96), (torch.float16, 128), (torch.float32, 64),
                                            (torch.float32, 72)])
def test_warp_specialized_forward(fa_rule, force_ws, dtype, head_dim):
    """The descriptor body over packed, strided q, k, v: empty sequences, more keys than queries
    and the other way round, every head-dim split (tail 8 of 16 wide at 72)."""
    q, k, v = strided_qkv(WS_LENS_Q, WS_LENS_K, 2, head_dim, dtype)
    o, lse, ws = ws_forward(q, k, v, WS_LENS_Q, WS_LENS_K)
    assert ws, "the warp-specialized config did not run"
    check_forward(fa_rule, q, k, v, WS_LENS_Q, WS_LENS_K, o, lse)
    assert torch.all(o[38:108] == 0), "a sequence without keys must output zeros"


def test_warp_specialized_upper_bounds_and_gradients(fa_rule, force_ws):
    """max_seqlen above every length (programs past the end of their sequence run no key block and
    store nothing), and the LSE it writes feeding the (pointer) backward."""
    lens = [3, 65, 0, 20]
    qkv, cu, _ = packed_inputs(lens, lens, 2, 72)
    q, k, v = (t.half() for t in qkv)
    o, lse, ws = ws_forward(q, k, v, lens, lens, max_q=130, max_k=129)
    assert ws
    check_forward(fa_rule, q, k, v, lens, lens, o, lse)
    check(fa_rule, qkv, torch.float16, cu, cu, max_seqlen_q=130, max_seqlen_k=129)
    assert kernel_module._attn_fwd_kernel.best_config.kwargs.get("WARP_SPECIALIZE")


def test_warp_specialized_needs_tma_layout(fa_rule, force_ws):
    """An operand whose base address is not 16-byte aligned cannot be read through TMA: the pointer
    body runs (WS_MODE is in the autotuner's key, so the aligned call's choice is not reused)."""
    lens = [5, 33]
    q, k, v = strided_qkv(lens, lens, 2, 64, torch.float16)
    assert ws_forward(q, k, v, lens, lens)[2]
    flat = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)
    q_odd = flat[1:].view(q.shape)  # 2 bytes past an aligned address
    q_odd.copy_(q)
    assert q_odd.data_ptr() % 16 != 0
    o, lse, ws = ws_forward(q_odd, k, v, lens, lens)
    assert not ws
    check_forward(fa_rule, q_odd, k, v, lens, lens, o, lse)


def test_warp_specialized_gate(monkeypatch):
    """_ws_mode: candidates only on sm_90 with a new enough triton, 16-bit operands, TMA layout."""
    bf16 = torch.empty(64, 2, 64, device="meta", dtype=torch.bfloat16)
    monkeypatch.setenv("FASTSIGLIP_WARP_SPECIALIZE", "1")
    assert kernel_module._ws_mode(bf16, bf16, bf16) == kernel_module.WS_OFF  # meta / CPU: no GPU
    monkeypatch.setattr(kernel_module, "_ws_device", lambda device: True)
    assert kernel_module._ws_mode(bf16, bf16, bf16) == kernel_module.WS_CANDIDATE
    monkeypatch.delenv("FASTSIGLIP_WARP_SPECIALIZE")  # opt-in: off without it
    assert kernel_module._ws_mode(bf16, bf16, bf16) == kernel_module.WS_OFF
    monkeypatch.setenv("FASTSIGLIP_WARP_SPECIALIZE", "1")
    fp32 = bf16.float()
    assert kernel_module._ws_mode(fp32, fp32, fp32) == kernel_module.WS_OFF
    odd_base = torch.empty(64 * 128 + 1, device="meta", dtype=torch.bfloat16)[1:].view(64, 2, 64)
    odd_stride = torch.empty(64, 2, 68, device="meta", dtype=torch.bfloat16)[..., :64]  # 136-byte rows
    for bad in (odd_base, odd_stride):
        assert kernel_module._ws_mode(bf16, bad, bf16) == kernel_module.WS_OFF
    monkeypatch.setattr(kernel_module, "FORCE_WARP_SPECIALIZE", False)
    assert kernel_module._ws_mode(bf16, bf16, bf16) == kernel_module.WS_OFF
    monkeypatch.setattr(kernel_module, "FORCE_WARP_SPECIALIZE", True)
    assert kernel_module._ws_mode(fp32, fp32, fp32) == kernel_module.WS_ONLY


def test_warp_specialized_device_rule(monkeypatch):
    """Compute capability 9.x only (sm_100 untested), and triton >= WS_MIN_TRITON."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, allowed in (((9, 0), True), ((10, 0), False), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert kernel_module._ws_device(cuda) is allowed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.4")  # an MI300 under ROCm also says cuda and 9.x
    assert not kernel_module._ws_device(cuda)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(kernel_module.triton, "__version__", "3.5.1")
    assert not kernel_module._ws_device(cuda)
    assert not kernel_module._ws_device(torch.device("cpu"))


def test_warp_specialized_pruning():
    """WS_MODE picks the configs: none warp-specialized (off), both kinds (candidate), only them."""
    prune = kernel_module._pruner(kernel_module._FWD_16BIT, kernel_module._FWD_FP32)["early_config_prune"]
    configs = kernel_module._attn_fwd_kernel.configs
    q = torch.empty(8, 2, 64, device="meta", dtype=torch.float16)
    args = {"D0": 64, "D1": 16, "HAS_TAIL": False, "MAX_Q_BUCKET": 256}

    def kinds(mode):
        return {bool(c.kwargs.get("WARP_SPECIALIZE")) for c in prune(configs, {"q_ptr": q}, **args, WS_MODE=mode)}
    assert kinds(kernel_module.WS_OFF) == {False}
    assert kinds(kernel_module.WS_ONLY) == {True}
    assert kinds(kernel_module.WS_CANDIDATE) == {False, True}


def test_allocator_installed_once_and_not_over_a_callers():
    """_ensure_allocator installs the torch-backed allocator where none is set, and keeps one the
    caller set (triton keeps it in a ContextVar: run in fresh contexts)."""
    from triton.runtime import _allocation

    def installed(preset):
        if preset is not None:
            kernel_module.triton.set_allocator(preset)
        kernel_module._ensure_allocator()
        return _allocation._allocator.get()

    assert contextvars.Context().run(installed, None) is kernel_module._torch_allocator
    mine = lambda size, alignment, stream: None  # noqa: E731
    assert contextvars.Context().run(installed, mine) is mine


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
def test_gpu_warp_specialized(fa_rule, force_ws, dtype, head_dim):
    """On sm_90 the warp-specialized forward alone, at real lengths (elsewhere it never runs)."""
    if torch.cuda.get_device_capability()[0] != kernel_module.WS_CAPABILITY_MAJOR:
        pytest.skip("the warp-specialized forward runs on sm_90 only")
    qkv, cu, _ = packed_inputs(GPU_LENS, GPU_LENS, 2, head_dim)
    o, _ = check(fa_rule, qkv, dtype, cu, cu, max_seqlen_q=4096, max_seqlen_k=4096)
    assert kernel_module._attn_fwd_kernel.best_config.kwargs.get("WARP_SPECIALIZE")
    # queries whose sequence has no keys (a zero-row K/V descriptor), next to ones that have some
    qkv, cu_q, cu_k = packed_inputs([5, 300, 0, 130], [0, 257, 64, 1], 2, head_dim)
    check(fa_rule, qkv, dtype, cu_q, cu_k, max_seqlen_q=300, max_seqlen_k=257)
