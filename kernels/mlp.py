"""The transformer MLP, fc2(GELU_tanh(fc1(x))) [+ residual], as fused Triton GEMMs, fwd + bwd.

One GEMM kernel, C[M, N] = A[M, K] @ B[K, N] with arbitrary strides (a transpose is a stride
swap, so no operand is ever copied), float32 accumulation, and a fused epilogue:

forward                                   (x [M, C], W1 [I, C], W2 [C, I], I = intermediate)
  fc1: h = x @ W1^T + b1, a = gelu(h)     EPI_GELU: bias + GELU; stores a, and h when training
  fc2: y = a @ W2^T + b2 [+ residual]     EPI_NONE: bias (+ residual)
backward                                  (dy [M, C]; saved: x and h only)
  dh  = (dy @ W2) * gelu'(h)              EPI_GELU_GRAD: loads h, multiplies by gelu'(h), also
                                          stores a = gelu(h) and per-block column sums of dh
  dW2 = dy^T @ a,  db2 = sum_rows dy      plain GEMM, split-K; torch.sum for db2 (dy is [M, C])
  dW1 = dh^T @ x,  db1 = sum_rows dh      plain GEMM, split-K; db1 from the column sums above
  dx  = dh @ W1                           plain GEMM

What autograd keeps per MLP is x and h (eager PyTorch keeps h and gelu(h) as well). The GELU
output needed by dW2 is recomputed in the dh GEMM's epilogue, which loads h anyway, and
materialized transiently (freed right after dW2): recomputing it in dW2's prologue instead
would put a load -> GELU -> shared-memory round trip inside that GEMM's main loop, done
C / BLOCK_M times per element, and keep the B operand off the async-copy/wgmma path on Hopper;
the transient write is M*I elements, once.
"""

from __future__ import annotations


import math

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._device import INTERPRET, check_device
from ._library import autocast_dtype, cast, register_autocast

# GELU, tanh approximation (Hendrycks & Gimpel 2016), exactly as F.gelu(approximate="tanh"):
#   gelu(x)  = 0.5 x (1 + tanh u),  u = SQRT_2_OVER_PI (x + GELU_COEF x^3)
#   gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) SQRT_2_OVER_PI (1 + 3 GELU_COEF x^2)
# (product and chain rule with tanh' = 1 - tanh^2: the same terms as PyTorch's GeluBackward,
# aten/src/ATen/native/cpu/Activation.cpp, GeluBackwardKernelImpl, approximate == "tanh").
# Evaluated in float32 through tanh u = 2 sigmoid(2u) - 1: with s = sigmoid(2u) = 1 / (1 + exp(-2u)),
#   0.5 (1 + tanh u) = s  and  1 - tanh^2 u = 4 s (1 - s),  so
#   gelu(x) = x s,   gelu'(x) = s + 2 SQRT_2_OVER_PI (1 + 3 GELU_COEF x^2) (x s) (1 - s).
# Safe for every u: exp(-2u) overflows to inf only where s -> 0 (1 / inf = 0), and (x s) (1 - s)
# is formed before the growing x^2 factor, so saturated tails give 0, never inf * 0. It needs no
# tl.math.tanh (missing from older triton), has no 1 + tanh cancellation for negative x, and
# keeps fewer values live than the tanh form (the dh epilogue is register-bound).
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_COEF = tl.constexpr(0.044715)

EPI_NONE = tl.constexpr(0)  # C = acc [+ bias] [+ residual]
EPI_GELU = tl.constexpr(1)  # C = gelu(acc + bias); aux_out = acc + bias (the pre-activation)
EPI_GELU_GRAD = tl.constexpr(2)  # C = acc * gelu'(aux_in); aux_out = gelu(aux_in); column sums

# db1 is reduced in two steps without atomics (deterministic, and safe under autotuning): the
# dh GEMM writes one float32 row of column sums per COLSUM_ROWS rows of dh, then torch sums
# those. Every config's BLOCK_M is a multiple of it, so the buffer does not depend on the config.
COLSUM_ROWS = tl.constexpr(32)
# Split-K for the weight-gradient GEMMs (K = tokens, output only [I, C]): their output tiles
# (3072 x 768 / 128^2 = 144 for ViT-B) make barely more than one wave on 132 SMs, the second
# nearly empty. So K is split until there are about SPLIT_K_WAVES waves of 128 x 128 tiles, each
# split at least SPLIT_K_MIN_CHUNK long; the splits write float32 slices, summed afterwards.
SPLIT_K_WAVES = 4
SPLIT_K_MIN_CHUNK = 2048
SPLIT_K_MAX = 16
SPLIT_K_ALIGN = 64  # split boundaries: a multiple of every config's BLOCK_K
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(bm, bn, bk, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


if INTERPRET:  # the CPU interpreter runs tl.dot in numpy: one small config, no tuning
    _CONFIGS_16BIT = [_config(64, 32, 32, 1, 4)]
    _CONFIGS_FP32 = _CONFIGS_16BIT
else:
    # Hopper-sized tiles for 16-bit inputs (wgmma, 228 KB shared memory); a config that does not
    # fit a smaller GPU fails to compile and the autotuner skips it, so the same list serves
    # Ampere/Ada as sensible defaults.
    _CONFIGS_16BIT = [
        _config(128, 256, 64, 3, 8),
        _config(256, 128, 64, 3, 8),
        _config(128, 128, 64, 4, 8),
        _config(128, 128, 64, 4, 4),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        # 32 float32 accumulators per thread: for the GELU-gradient epilogue (see _prune_configs)
        _config(128, 64, 64, 4, 8),
        _config(64, 128, 64, 4, 8),
        _config(64, 64, 64, 4, 4),
    ]
    # IEEE float32 dots run on FMA units: smaller tiles, 4-byte elements in shared memory.
    _CONFIGS_FP32 = [
        _config(64, 64, 32, 3, 4),
        _config(128, 64, 32, 3, 4),
        _config(128, 128, 32, 3, 8),
    ]


# Float32 accumulators per thread (BLOCK_M * BLOCK_N / threads) a config may hold, by epilogue.
# The fused epilogues keep more [BLOCK_M, BLOCK_N] float32 tiles live beside the accumulator (h,
# gelu(h), gelu'(h), the residual), and tiles above these caps spilled when compiled for sm_90
# (bench/compile_check.py, triton 3.9): bias + GELU or residual at 128 per thread 16-224 B, the
# GELU-gradient epilogue at 64 per thread 32-44 B and at 128 per thread 1.4-1.5 KB. Spilling
# configs are not worth the autotuner's time; the compile check guards these caps. The three
# 32-per-thread tiles serve the GELU-gradient epilogue only (fc2 + residual at 128 x 64 with 8
# warps spilled 12 B on sm_100).
MAX_ACC_PER_THREAD = {"plain": 128, "fused": 64, "gelu_grad": 32}


def _acc_per_thread(c):
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)


def _prune_configs(configs, named_args, **kwargs):
    """The configs written for the operand dtype (IEEE float32 or 16-bit) whose accumulator tile
    fits the registers beside the launch's epilogue (MAX_ACC_PER_THREAD); the last three 16-bit
    tiles (32 per thread) only for the GELU-gradient epilogue."""
    wanted = _CONFIGS_FP32 if named_args["a_ptr"].dtype == torch.float32 else _CONFIGS_16BIT
    args = {**named_args, **kwargs}
    if args.get("EPILOGUE") == EPI_GELU_GRAD.value:
        kind = "gelu_grad"
    else:
        kind = "fused" if args.get("EPILOGUE") == EPI_GELU.value or args.get("HAS_RESIDUAL") else "plain"
        wanted = wanted[:6]
    kept = [c for c in configs if any(c is w for w in wanted) and _acc_per_thread(c) <= MAX_ACC_PER_THREAD[kind]]
    return kept or [c for c in configs if any(c is w for w in wanted)][:1] or configs[:1]


@triton.jit
def _sigmoid_2u(x):
    """s = sigmoid(2u) = 0.5 (1 + tanh u), u = SQRT_2_OVER_PI (x + GELU_COEF x^3)."""
    u = SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x)
    return 1.0 / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _gelu(x):
    return x * _sigmoid_2u(x)


@triton.jit
def _gelu_and_grad(x):
    """(gelu(x), gelu'(x)) in float32, as in the header comment."""
    s = _sigmoid_2u(x)
    act = x * s
    grad = s + (2.0 * SQRT_2_OVER_PI) * (1.0 + 3.0 * GELU_COEF * x * x) * (act * (1.0 - s))
    return act, grad


@autotune(configs=_CONFIGS_16BIT + ([] if INTERPRET else _CONFIGS_FP32),
                 key=["M_BUCKET", "N", "K_BUCKET", "EPILOGUE", "HAS_RESIDUAL", "STORE_AUX"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr,
    M, N, K, M_BUCKET, K_BUCKET,  # the buckets only key the autotuner (sizes rounded to 2^k)
    k_per_split,  # split-K: program (i, s) reduces K range [s * k_per_split, (s + 1) * k_per_split)
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    stride_rm, stride_rn,  # residual
    stride_xm, stride_xn,  # aux_in / aux_out (both [M, N])
    colsum_rows,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_AUX: tl.constexpr, COLSUM: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks share each column block of B while it sits in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    # Rows of A / columns of B past the edge wrap around (valid memory, results never stored),
    # so the main loop masks only K. int64 row offsets: M * stride can pass 2^31.
    ra = (rm % M).to(tl.int64)
    rb = (rn % N).to(tl.int64)
    pid_s = tl.program_id(1)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    a_ptrs = a_ptr + k_start.to(tl.int64) * stride_ak + ra[:, None] * stride_am + rk[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + k_start.to(tl.int64) * stride_bk + rk[:, None] * stride_bk + rb[None, :] * stride_bn  # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_left = k_end - k
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue, all in float32.
    rm64 = rm.to(tl.int64)
    mask = (rm < M)[:, None] & (rn < N)[None, :]  # [BM, BN]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    aux_offs = rm64[:, None] * stride_xm + rn[None, :] * stride_xn
    if EPILOGUE == EPI_GELU:
        # Round h to the storage dtype first: the activation is then gelu(stored h), exactly what
        # backward recomputes, and what eager PyTorch computes.
        h = acc.to(c_ptr.dtype.element_ty)
        if STORE_AUX:
            tl.store(aux_out_ptr + aux_offs, h, mask=mask)
        out = _gelu(h.to(tl.float32))
    elif EPILOGUE == EPI_GELU_GRAD:
        h = tl.load(aux_in_ptr + aux_offs, mask=mask, other=0.0).to(tl.float32)
        act, dact = _gelu_and_grad(h)
        out = acc * dact  # dh = (dy @ W2) * gelu'(h)
        if STORE_AUX:
            tl.store(aux_out_ptr + aux_offs, act.to(aux_out_ptr.dtype.element_ty), mask=mask)
        if COLSUM:
            # This block's column sums go to partial row pid_m * SUB; the block's other SUB - 1
            # partial rows get zeros, so every partial row is written whatever the config.
            sums = tl.sum(tl.where(mask, out, 0.0), axis=0)  # [BN]
            sub = tl.arange(0, BLOCK_M // COLSUM_ROWS)  # [SUB]
            prow = pid_m * (BLOCK_M // COLSUM_ROWS) + sub  # [SUB]
            vals = tl.where(sub[:, None] == 0, sums[None, :], 0.0)  # [SUB, BN]
            pmask = (prow < colsum_rows)[:, None] & (rn < N)[None, :]
            tl.store(colsum_ptr + prow.to(tl.int64)[:, None] * N + rn[None, :], vals, mask=pmask)
    else:
        out = acc
    if HAS_RESIDUAL:
        res_offs = rm64[:, None] * stride_rm + rn[None, :] * stride_rn
        out += tl.load(res_ptr + res_offs, mask=mask, other=0.0).to(tl.float32)
    c_offs = rm64[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptr + pid_s.to(tl.int64) * stride_cs + c_offs, out.to(c_ptr.dtype.element_ty), mask=mask)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _num_splits(M, N, K, device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    return max(1, min(SPLIT_K_MAX, K // SPLIT_K_MIN_CHUNK, triton.cdiv(SPLIT_K_WAVES * sms, tiles)))


def _matmul(a, b, out, *, bias=None, residual=None, epilogue=0, aux_in=None, aux_out=None,
            colsum=None, split_k=False):
    """out[M, N] = epilogue(a[M, K] @ b[K, N]); any strides; returns out.

    split_k (plain epilogue only): split a long K over several programs per output tile.
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    splits = _num_splits(M, N, K, a.device) if split_k else 1
    k_per_split, c = K, out
    if splits > 1:
        assert epilogue == EPI_NONE.value and bias is None and residual is None
        k_per_split = triton.cdiv(triton.cdiv(K, splits), SPLIT_K_ALIGN) * SPLIT_K_ALIGN
        splits = triton.cdiv(K, k_per_split)  # the aligned splits may be fewer
    if splits > 1:
        c = torch.empty((splits, M, N), device=out.device, dtype=torch.float32)  # [S, M, N]
    aux = aux_in if aux_in is not None else aux_out
    # Unused pointer arguments get `out`: never read, never written (their flags are off).
    pick = lambda t: out if t is None else t  # noqa: E731
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    _matmul_kernel[grid](
        a, b, c, pick(bias), pick(residual), pick(aux_in), pick(aux_out), pick(colsum),
        M, N, K, _bucket(M), _bucket(k_per_split), k_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        c.stride(0) if splits > 1 else 0, c.stride(-2), c.stride(-1),
        *(residual.stride() if residual is not None else (0, 0)),
        *(aux.stride() if aux is not None else (0, 0)),
        colsum.shape[0] if colsum is not None else 0,
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        STORE_AUX=aux_out is not None, COLSUM=colsum is not None, IEEE=a.dtype == torch.float32,
    )
    if splits > 1:
        out.copy_(c.sum(0))
    return out


def mlp_fwd(x, w1, b1, w2, b2, residual=None, save_pre=False):
    """x [M, C], w1 [I, C], w2 [C, I], residual [M, C] -> (y [M, C], h [M, I] or None).

    h, the pre-activation, is written only when `save_pre` (training); a = gelu(h) is transient.
    """
    M, I = x.shape[0], w1.shape[0]
    a = torch.empty((M, I), device=x.device, dtype=x.dtype)  # [M, I]
    h = torch.empty_like(a) if save_pre else None  # [M, I]
    _matmul(x, w1.t(), a, bias=b1, epilogue=EPI_GELU.value, aux_out=h)
    y = torch.empty((M, w2.shape[0]), device=x.device, dtype=x.dtype)  # [M, C]
    _matmul(a, w2.t(), y, bias=b2, residual=residual, epilogue=EPI_NONE.value)
    return y, h


def mlp_bwd(dy, x, h, w1, w2, needs=(True,) * 5):
    """dy [M, C], x [M, C], h [M, I] -> (dx, dW1, db1, dW2, db2); `needs` skips unwanted ones."""
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs
    M, I = h.shape
    dx = dw1 = db1 = dw2 = db2 = None
    need_dh = need_dx or need_dw1 or need_db1
    dh = a = colsum = None
    if need_dh or need_dw2:
        dh = torch.empty_like(h)  # [M, I]
        a = torch.empty_like(h) if need_dw2 else None  # [M, I], gelu(h), freed after dW2
        if need_db1:
            colsum = torch.empty((triton.cdiv(M, COLSUM_ROWS.value), I), device=h.device, dtype=torch.float32)
        # dh is computed even when only dW2 is wanted: the same launch recomputes gelu(h).
        _matmul(dy, w2, dh, epilogue=EPI_GELU_GRAD.value, aux_in=h, aux_out=a, colsum=colsum)
    if need_dw2:  # [C, I] = [C, M] @ [M, I]; contiguous whatever w2's strides (as the fake says)
        dw2 = _matmul(dy.t(), a, torch.empty_like(w2, memory_format=torch.contiguous_format), split_k=True)
        del a
    if need_db2:
        db2 = dy.sum(0, dtype=torch.float32).to(w2.dtype)  # [C]
    if need_dw1:  # [I, C] = [I, M] @ [M, C]
        dw1 = _matmul(dh.t(), x, torch.empty_like(w1, memory_format=torch.contiguous_format), split_k=True)
    if need_db1:
        db1 = colsum.sum(0).to(w1.dtype)  # [I]
    if need_dx:
        dx = _matmul(dh, w1, torch.empty((M, w1.shape[1]), device=h.device, dtype=h.dtype))  # [M, C]
    return dx, dw1, db1, dw2, db2


# --- custom operators: torch.ops.fastsiglip.mlp and .mlp_backward -----------------------------------


@torch.library.custom_op("fastsiglip::mlp", mutates_args=())
def _mlp_op(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
            fc2_bias: torch.Tensor | None, residual: torch.Tensor | None, save_pre: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., C] -> (y [..., C], h [M, I]): y = fc2(gelu(fc1(x))) [+ residual], all inputs one dtype.

    h, the pre-activation the backward needs, is written only with `save_pre` (an empty tensor
    otherwise: inference allocates no [M, I] buffer besides the transient GELU output).
    Differentiable in every tensor when called with save_pre=True.
    """
    C = x.shape[-1]
    res2d = residual.reshape(-1, C) if residual is not None else None
    y, h = mlp_fwd(x.reshape(-1, C), fc1_weight, fc1_bias, fc2_weight, fc2_bias, res2d, save_pre=save_pre)
    return y.view(x.shape), (h if save_pre else x.new_empty(0))


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, save_pre):
    rows = math.prod(x.shape[:-1])  # symbolic sizes stay symbolic (Size.numel() would specialize)
    h = x.new_empty((rows, fc1_weight.shape[0])) if save_pre else x.new_empty(0)
    return x.new_empty(x.shape), h


@torch.library.custom_op("fastsiglip::mlp_backward", mutates_args=())
def _mlp_backward_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, fc1_weight: torch.Tensor,
                     fc2_weight: torch.Tensor, needs: list[bool]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x [..., C], h [M, I] -> (dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias).

    `needs`: which of the five to compute; the others come back as empty tensors.
    """
    C = x.shape[-1]
    grads = mlp_bwd(dy.reshape(-1, C), x.reshape(-1, C), h, fc1_weight, fc2_weight, needs=tuple(needs))
    dx, dw1, db1, dw2, db2 = (g if g is not None else x.new_empty(0) for g in grads)
    return (dx.view(x.shape) if needs[0] else dx), dw1, db1, dw2, db2


@_mlp_backward_op.register_fake
def _(dy, x, h, fc1_weight, fc2_weight, needs):
    inter, hidden = fc1_weight.shape
    shapes = (x.shape, (inter, hidden), (inter,), (hidden, inter), (hidden,))
    return tuple(x.new_empty(shape if need else 0) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, save_pre = inputs
    ctx.save_for_backward(x, output[1], w1, w2)  # x and h: what the backward reads
    ctx.save_pre = save_pre
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dh):
    if dy is None:
        return (None,) * 7
    if not ctx.save_pre:
        raise RuntimeError("fastsiglip.mlp: the forward ran with save_pre=False, so there is no pre-activation "
                           "to differentiate through; call it with save_pre=True when gradients are needed")
    x, h, w1, w2 = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = torch.ops.fastsiglip.mlp_backward(dy, x, h, w1, w2, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), dy if ctx.needs_input_grad[5] else None, None)


_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_rule(dtype, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, save_pre):
    """Under autocast: every tensor in the autocast dtype, as F.linear casts its input, weight and bias."""
    return (*(cast(t, dtype) for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)), save_pre)


register_autocast("mlp", _autocast_rule)


def _check(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual):
    named = {"x": x, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight,
             "fc2_bias": fc2_bias, "residual": residual}
    tensors = {k: v for k, v in named.items() if v is not None}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mlp: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"mlp: dtype {x.dtype} is not supported by the Triton kernel (float16, bfloat16 "
                        "or float32); cast the inputs, or use fastsiglip.reference.mlp")
    if autocast_dtype(x.device.type) is None:  # under autocast the operator casts them to one dtype
        for name, t in tensors.items():
            if t.dtype != x.dtype:
                raise TypeError(f"mlp: {name} is {t.dtype} but x is {x.dtype}; all inputs must share one dtype "
                                "(or run under torch.autocast)")
    check_device("mlp", tensors)
    if x.dim() < 1 or fc1_weight.dim() != 2 or fc2_weight.dim() != 2:
        raise ValueError(f"mlp: expected x [..., C], fc1_weight [I, C], fc2_weight [C, I]; got shapes "
                         f"{tuple(x.shape)}, {tuple(fc1_weight.shape)}, {tuple(fc2_weight.shape)}")
    inter, hidden = fc1_weight.shape
    expected = {"x": (x.shape[:-1] + (hidden,)), "fc2_weight": (hidden, inter), "fc1_bias": (inter,),
                "fc2_bias": (hidden,), "residual": tuple(x.shape)}
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"mlp: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                             f"(fc1_weight is {tuple(fc1_weight.shape)} = [intermediate, hidden])")


def mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None):
    """fc2(gelu_tanh(fc1(x))) [+ residual], as fastsiglip.reference.mlp.

    x [..., C]; nn.Linear layout: fc1_weight [I, C], fc1_bias [I], fc2_weight [C, I], fc2_bias [C]
    (biases may be None); residual, if given, has x's shape and is added to the output.
    float16, bfloat16 or float32 CUDA tensors (CPU only under TRITON_INTERPRET=1), one dtype, or
    any mix of them under torch.autocast (which runs the kernel in the autocast dtype).
    Runs torch.ops.fastsiglip.mlp; the pre-activation is kept only when autograd needs it.
    """
    _check(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    inputs = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    save_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return torch.ops.fastsiglip.mlp(*inputs, save_pre)[0]
