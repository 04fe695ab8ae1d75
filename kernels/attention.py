"""Flash attention (bidirectional, no dropout) over packed variable-length sequences, fwd + bwd.

Layouts (FlashAttention's varlen convention): q [Tq, H, D], k and v [Tk, H, D], int32
`cu_seqlens_q` / `cu_seqlens_k` of length B+1; sequence b of q attends to sequence b of k only.
The dense layout [B, N, H, D] is the packed one with cu_seqlens = 0, N, 2N, ... (a view, no copy).
One program owns one (sequence, head, row block); `max_seqlen_*` only size the grid and may be
upper bounds (the model passes the padded N to avoid a host sync): programs past the end of
their sequence exit at once.

Head dimension without padding to a power of two. tl.dot needs power-of-two tiles with every
dimension >= 16, so the head dimension is split into a power-of-two main part D0 and a tail D1:
    64 = 64        80 = 64 + 16       96 = 64 + 32       128 = 128
    72 = 64 + 16, of which the last 8 columns are masked loads (zeros) and masked stores
and every product over the head dimension is two dots, e.g. S = Q0 K0^T + Q1 K1^T and
O = [P V0, P V1]. Head dim 72 thus costs 80/72 = 1.11x its useful MMA work (padding to 128 would
cost 1.78x); 80 and 96 cost none. In instructions the tail costs more: where the head dim is the
reduction (S = Q K^T, dP = dO V^T) it adds k-steps in proportion (4 -> 5 wgmma), but where it is
the output width (P V, dS K, P^T dO, dS^T Q) the 16-wide tail takes one more m64n16k16 wgmma per
k-step of the 64-wide part: 12 -> 21 wgmma per 128 x 128 forward step (sm_90 PTX, bench/
compile_check.py), +75% for +25% work. tl.dot's power-of-two, >= 16 tile sides leave only one
alternative, the output side padded to 128 (5 + 8 = 13 wgmma, +8%, but 1.6x the MMA work); which
is faster depends on whether the narrow wgmma are issue-bound, a GPU measurement not yet made.

Forward (FlashAttention-2, Dao 2023, Algorithm 1): per key block, in float32,
    S = Q K^T * scale * LOG2E          (exp2 instead of exp: the LOG2E factor is folded in)
    m_new = max(m, rowmax(S));  P = exp2(S - m_new);  alpha = exp2(m - m_new)
    l = alpha l + rowsum(P);    acc = alpha acc + P V          (the online-softmax rescale)
and at the end O = acc / l, LSE = m + log2(l) (kept, in log2 units, for the backward).
A sequence without keys has l = 0 and gets O = 0.

Backward (FlashAttention-2, Algorithm 2), with P recomputed from LSE:
    delta = rowsum(dO * O)                               (_attn_bwd_preprocess_kernel)
    dV = P^T dO;  dP = dO V^T;  dS = P * (dP - delta);  dK = scale dS^T Q;  dQ = scale dS K
dK and dV are accumulated per key block looping over query blocks (_attn_bwd_dkdv_kernel), dQ
per query block looping over key blocks (_attn_bwd_dq_kernel): no atomics, deterministic.

float32 inputs use IEEE dots (no TF32), so they meet float32 tolerances.

Warp-specialized forward (sm_90). With triton's default pipelining the two wgmma of a key block
(S = Q K^T, then P V) run serially within a warp group. `tl.range(..., warp_specialize=True)`
instead splits a program into a TMA producer warp group and two consumer warp groups of 64 query
rows each (1 + 2 warp groups from num_warps 4, registers rebalanced 40 / 232), so one consumer's
softmax overlaps the other's wgmma. Triton 3.9 (and 3.6) applies it only to a loop it can
partition: K, V (and Q) loaded through device-side TMA descriptors (tl.make_tensor_descriptor),
every key block inside the one loop with the key mask applied in each (a masked tail block after
the loop, or an early `return`, makes the pass give up or crash). So the forward has two bodies,
selected by the constexpr WARP_SPECIALIZE of its configs: the pointer body above (masked tail
block, early exit) and the descriptor body (programs past the end of their sequence run zero key
blocks instead of returning). Both are candidates of the one autotuner, which times them on the
GPU; the warp-specialized configs are pruned, never tried, unless _ws_mode allows them:
FASTSIGLIP_WARP_SPECIALIZE=1 in the environment (off by default: this body has been compiled
for sm_90 and run through the interpreter, never run on a GPU; tests/kernels/
test_attention.py::test_gpu_warp_specialized is its first GPU check), an NVIDIA device of compute
capability 9.x (sm_100 is untested), triton >= WS_MIN_TRITON, 16-bit operands, and the layout
TMA needs (16-byte aligned base pointers and strides, unit stride along D). That
decision is an argument of the autotuner's key, so a config chosen for aligned operands is never
reused for unaligned ones. Device-side descriptors live in a global scratch buffer that triton
asks `triton.set_allocator`'s allocator for at launch: attention_fwd installs a torch-backed one
the first time a warp-specialized config may run, unless the caller installed one. Triton keeps
the allocator in a ContextVar: it holds for the calling thread (context) and every later triton
launch there, not only ours. The interpreter has no device to gate on: the tests force the
descriptor body with FORCE_WARP_SPECIALIZE (float32 included; there one list serves all dtypes).
"""

from __future__ import annotations

import math
import os
import re

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._device import INTERPRET, check_device
from ._library import autocast_dtype, cast, register_autocast

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
SUPPORTED_HEAD_DIMS = (64, 72, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_DOT = 16  # tl.dot's smallest tile dimension
# Token and head strides reach the kernels divided by STRIDE_ALIGN and are multiplied back there:
# the compiler then knows every row starts on a multiple of 8 elements (16 bytes in 16-bit) and
# vectorizes the loads. Head stride 72, say, is not a multiple of 16, the one divisibility Triton
# detects by itself. The host makes inputs with other strides contiguous (every supported D is a
# multiple of 8).
STRIDE_ALIGN = tl.constexpr(8)
PREPROCESS_ROWS = 64  # rows per program of the delta = rowsum(dO * O) kernel
# 32-bit offsets. tl.program_id and cu_seqlens are int32, and so are the stride arguments below
# 2^31. Offsets that can pass 2^31 are formed in int64: the sequence start times the token stride
# (256 images x 4096 tokens x 16 heads x 128 dims is already 2^31 elements), the head index times
# the head stride (h is int64: a head-major [H, T, D] view has head stride T * D), and the
# preprocess kernel's first row times the token stride. The offset inside one sequence, row *
# token stride with row < max_seqlen, stays int32: the host keeps max_seqlen * token stride
# below INT32_LIMIT (copying the operand to the contiguous layout, token stride H * D, if needed)
# and refuses a single sequence longer than that.
INT32_LIMIT = 2**31
# The warp-specialized forward (see the header) was compiled and checked for sm_90 with these.
WS_CAPABILITY_MAJOR = 9  # compute capability 9.x (Hopper); others never try it
WS_MIN_TRITON = (3, 6)
TMA_ALIGN = 16  # bytes: TMA reads from 16-byte aligned addresses with 16-byte aligned strides
# Autotuner key values for the warp-specialized configs: never, as candidates next to the others,
# or only them (forced, for tests).
WS_OFF, WS_CANDIDATE, WS_ONLY = 0, 1, 2
# Tests only: None (default) gates on device, triton and operands; True forces the warp-specialized
# configs wherever the operands allow TMA (on the CPU interpreter, in float32 too); False never.
FORCE_WARP_SPECIALIZE: bool | None = None


def _config(bm, bn, stages, warps, spills_at=(), warp_specialize=False):
    """spills_at: padded head widths (D0 + D1, e.g. 80 for head dim 72, 96 for 96) at which this
    config spilled registers when compiled for sm_90 or sm_100 (bench/compile_check.py, triton
    3.9), or needed more shared memory than sm_90 has; _pruner drops it there: a spilling config is
    not worth the autotuner's time.
    warp_specialize: a forward config of the descriptor body (WARP_SPECIALIZE, see the header)."""
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, **({"WARP_SPECIALIZE": True} if warp_specialize else {})}
    config = triton.Config(meta, num_stages=stages, num_warps=warps)
    config.spills_at = frozenset(spills_at)
    return config


# BLOCK_M always tiles queries and BLOCK_N keys. The small-BLOCK_M configs serve few queries per
# sequence (the pooling head has one); _prune drops configs whose query tile exceeds the queries.
if INTERPRET:  # the CPU interpreter runs tl.dot in numpy: one small config, no tuning
    _FWD_16BIT = _FWD_FP32 = [_config(32, 32, 1, 4), _config(32, 32, 1, 4, warp_specialize=True)]
    _DKDV_16BIT = _DKDV_FP32 = [_config(32, 32, 1, 4)]
    _DQ_16BIT = _DQ_FP32 = [_config(32, 32, 1, 4)]
else:
    # Hopper-sized (wgmma wants 64-row tiles per warp group, 228 KB shared memory); a config that
    # does not fit a smaller GPU fails to compile and the autotuner skips it.
    _FWD_16BIT = [_config(128, 128, 3, 8), _config(128, 64, 3, 4, spills_at=(80, 96)), _config(128, 64, 4, 8),
                  _config(64, 128, 3, 4, spills_at=(96,)), _config(64, 64, 4, 4),
                  _config(16, 128, 3, 4, spills_at=(80,)), _config(16, 64, 3, 4),
                  # warp-specialized (sm_90 only, see _ws_mode): BLOCK_M 128 and 4 warps are what
                  # triton splits into 2 consumer warp groups of 64 rows (plus the producer)
                  _config(128, 64, 3, 4, warp_specialize=True),
                  _config(128, 128, 3, 4, spills_at=(128,), warp_specialize=True)]  # d128: 240 KB smem
    _DKDV_16BIT = [_config(64, 128, 2, 8, spills_at=(96,)), _config(32, 128, 3, 8),
                   _config(64, 64, 3, 4, spills_at=(80, 96)), _config(32, 64, 3, 4),
                   _config(16, 128, 2, 4, spills_at=(80, 96)), _config(16, 64, 2, 4)]
    # BLOCK_M 16 runs on mma.sync (wgmma tiles are 64 rows): the MAP probe's one query per image.
    # At head dim 72 its 16 x 64 tile spilled; the 16 x 32 one fits.
    _DQ_16BIT = [_config(128, 64, 3, 8), _config(128, 32, 3, 4), _config(64, 64, 3, 4),
                 _config(16, 64, 3, 4, spills_at=(80,)), _config(16, 32, 3, 4)]
    # IEEE float32 dots run on FMA units, whose lowering holds whole operand tiles in registers:
    # small tiles (larger ones spill kilobytes on sm_90). float32 is for accuracy, not speed.
    _FWD_FP32, _DKDV_FP32, _DQ_FP32 = ([_config(32, 32, 1, 8), _config(16, 32, 1, 4)] for _ in range(3))


def _pruner(configs_16bit, configs_fp32):
    def prune(configs, named_args, **kwargs):
        """Configs for the operand dtype whose query tile is not wider than the queries need and
        that do not spill at this head dim (`spills_at`); the warp-specialized ones as WS_MODE says
        (a key argument of the forward only)."""
        wanted = configs_fp32 if named_args["q_ptr"].dtype == torch.float32 else configs_16bit
        args = {**named_args, **kwargs}
        width = args["D0"] + (args["D1"] if args["HAS_TAIL"] else 0)
        mine = [c for c in configs if any(c is w for w in wanted)]
        ws = [c for c in mine if c.kwargs.get("WARP_SPECIALIZE")]
        mode = args.get("WS_MODE", WS_OFF)
        if mode == WS_ONLY and ws:
            mine = ws
        elif mode == WS_OFF:
            mine = [c for c in mine if not c.kwargs.get("WARP_SPECIALIZE")]
        fits = [c for c in mine if width not in getattr(c, "spills_at", ())] or mine
        fit = max(MIN_DOT, args["MAX_Q_BUCKET"])
        kept = [c for c in fits if c.kwargs["BLOCK_M"] <= fit]
        return kept or [min(fits, key=lambda c: c.kwargs["BLOCK_M"])]

    return {"early_config_prune": prune}


def _all(a, b):
    return a + ([] if INTERPRET else b)


_KEY = ["MAX_Q_BUCKET", "MAX_K_BUCKET", "HEAD_DIM", "IEEE"]
_FWD_KEY = _KEY + ["WS_MODE"]


# --- tile helpers -------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in float32 (acc None: a @ b); IEEE: exact float32 products, no TF32."""
    if IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _load_rows(base, rows, stride, row_mask, MASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr):
    """Rows `rows` of a [*, HEAD_DIM] tile as (main [R, D0], tail [R, D1]); the tail is a dummy
    (the main part again) without HAS_TAIL. Masked rows and padded tail columns read as 0."""
    d0 = tl.arange(0, D0)
    ptrs = base + rows[:, None] * stride + d0[None, :]
    if MASK:
        x0 = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        x0 = tl.load(ptrs)
    x1 = x0
    if HAS_TAIL:
        d1 = D0 + tl.arange(0, D1)
        ptrs = base + rows[:, None] * stride + d1[None, :]
        if MASK:
            x1 = tl.load(ptrs, mask=row_mask[:, None] & (d1 < HEAD_DIM)[None, :], other=0.0)
        elif D0 + D1 > HEAD_DIM:
            x1 = tl.load(ptrs, mask=(d1 < HEAD_DIM)[None, :], other=0.0)
        else:
            x1 = tl.load(ptrs)
    return x0, x1


@triton.jit
def _store_rows(base, rows, stride, row_mask, x0, x1,
                HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr):
    d0 = tl.arange(0, D0)
    tl.store(base + rows[:, None] * stride + d0[None, :], x0.to(base.dtype.element_ty), mask=row_mask[:, None])
    if HAS_TAIL:
        d1 = D0 + tl.arange(0, D1)
        tl.store(base + rows[:, None] * stride + d1[None, :], x1.to(base.dtype.element_ty),
                 mask=row_mask[:, None] & (d1 < HEAD_DIM)[None, :])


@triton.jit
def _sequence(cu_ptr, b):
    start = tl.load(cu_ptr + b)
    return start, tl.load(cu_ptr + b + 1) - start


# --- forward ------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, start_n, seqlen_k, stride_kt, stride_vt,
               qk_scale, MASK: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr):
    """One key block of the online softmax (see the header); MASK: keys past seqlen_k exist."""
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < seqlen_k
    k0, k1 = _load_rows(k_base, offs_n, stride_kt, n_mask, MASK, HEAD_DIM, D0, D1, HAS_TAIL)
    s = _dot(q0, tl.trans(k0), None, IEEE)  # [BM, BN]
    if HAS_TAIL:
        s = _dot(q1, tl.trans(k1), s, IEEE)
    if MASK:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i, qk_scale)
    v0, v1 = _load_rows(v_base, offs_n, stride_vt, n_mask, MASK, HEAD_DIM, D0, D1, HAS_TAIL)
    p = p.to(v0.dtype)
    acc0 = _dot(p, v0, acc0 * alpha[:, None], IEEE)
    if HAS_TAIL:
        acc1 = _dot(p, v1, acc1 * alpha[:, None], IEEE)
    return acc0, acc1, m_new, l_i


@triton.jit
def _softmax_step(s, m_i, l_i, qk_scale):
    """The online-softmax update of one [BM, BN] score block (see the header) -> (P, alpha, m, l)."""
    # The scale (> 0) is applied inside the exponent, s * qk_scale - m as one FMA per score.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # finite: every block holds at least one key
    alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])  # [BM, BN]
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _tile_desc(base, rows, stride, BLOCK: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A TMA descriptor of the [rows, HEAD_DIM] matrix at `base` (row stride `stride`) read in
    [BLOCK, WIDTH] tiles; rows past `rows` and columns past HEAD_DIM read as 0."""
    return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride, 1], block_shape=[BLOCK, WIDTH])


@triton.jit
def _fwd_block_tma(acc0, acc1, m_i, l_i, q0, q1, kd0, kd1, vd0, vd1, start_n, seqlen_k, qk_scale,
                   IEEE: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr):
    """_fwd_block with K, V read through TMA descriptors (keys past the end read as 0), the key
    mask applied to every block: the body of the warp-specialized loop."""
    k0 = kd0.load([start_n, 0])  # [BN, D0]
    s = _dot(q0, tl.trans(k0), None, IEEE)  # [BM, BN]
    if HAS_TAIL:
        s = _dot(q1, tl.trans(kd1.load([start_n, D0])), s, IEEE)
    s = tl.where((start_n + tl.arange(0, BLOCK_N) < seqlen_k)[None, :], s, float("-inf"))
    p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i, qk_scale)
    v0 = vd0.load([start_n, 0])
    p = p.to(v0.dtype)
    acc0 = _dot(p, v0, acc0 * alpha[:, None], IEEE)
    if HAS_TAIL:
        acc1 = _dot(p, vd1.load([start_n, D0]), acc1 * alpha[:, None], IEEE)
    return acc0, acc1, m_new, l_i


@autotune(configs=_all(_FWD_16BIT, _FWD_FP32), key=_FWD_KEY, prune_configs_by=_pruner(_FWD_16BIT, _FWD_FP32))
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_heads, total_q, max_seqlen_q, qk_scale,
    MAX_Q_BUCKET, MAX_K_BUCKET,  # key the autotuner only (sizes rounded up to 2^k)
    WS_MODE,  # keys the autotuner only: may warp-specialized configs run (_ws_mode)
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr, IEEE: tl.constexpr,
    STORE_LSE: tl.constexpr,  # False for inference: the LSE is only the backward's
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,  # the descriptor body (see the header)
):
    stride_qt, stride_qh = stride_qt * STRIDE_ALIGN, stride_qh * STRIDE_ALIGN
    stride_kt, stride_kh = stride_kt * STRIDE_ALIGN, stride_kh * STRIDE_ALIGN
    stride_vt, stride_vh = stride_vt * STRIDE_ALIGN, stride_vh * STRIDE_ALIGN
    stride_ot, stride_oh = stride_ot * STRIDE_ALIGN, stride_oh * STRIDE_ALIGN
    # Row blocks of one (sequence, head) are neighbours in launch order: they share K, V in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(max_seqlen_q, BLOCK_M)
    pid_m = pid % blocks_m
    b = pid // blocks_m // num_heads
    h = (pid // blocks_m % num_heads).to(tl.int64)  # int64: see INT32_LIMIT
    q_start, seqlen_q = _sequence(cu_q_ptr, b)
    if not WARP_SPECIALIZE:  # the warp-specialized body has no early exit (see the header)
        if pid_m * BLOCK_M >= seqlen_q:
            return
    k_start, seqlen_k = _sequence(cu_k_ptr, b)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM], positions inside the sequence
    m_mask = offs_m < seqlen_q
    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], tl.float32)  # unused without HAS_TAIL (removed as dead code)
    if WARP_SPECIALIZE:
        # Q through a descriptor of head h's whole [Tq, D] slab (Tq > 0: the host launches nothing
        # otherwise), never of an empty one: rows of a neighbouring sequence that a partial block
        # reads only feed output rows that are not stored. K, V per sequence: keys past its end
        # read as 0 (and are masked), never a neighbour's.
        q_row = q_start + pid_m * BLOCK_M
        q0 = _tile_desc(q_ptr + h * stride_qh, total_q, stride_qt, BLOCK_M, D0, HEAD_DIM).load([q_row, 0])
        q1 = q0
        kd0 = _tile_desc(k_base, seqlen_k, stride_kt, BLOCK_N, D0, HEAD_DIM)
        vd0 = _tile_desc(v_base, seqlen_k, stride_vt, BLOCK_N, D0, HEAD_DIM)
        kd1 = kd0
        vd1 = vd0
        if HAS_TAIL:
            q1 = _tile_desc(q_ptr + h * stride_qh, total_q, stride_qt, BLOCK_M, D1, HEAD_DIM).load([q_row, D0])
            kd1 = _tile_desc(k_base, seqlen_k, stride_kt, BLOCK_N, D1, HEAD_DIM)
            vd1 = _tile_desc(v_base, seqlen_k, stride_vt, BLOCK_N, D1, HEAD_DIM)
        hi = tl.where(pid_m * BLOCK_M < seqlen_q, seqlen_k, 0)  # past the end: no key blocks, no stores
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
            acc0, acc1, m_i, l_i = _fwd_block_tma(acc0, acc1, m_i, l_i, q0, q1, kd0, kd1, vd0, vd1, start_n,
                                                  seqlen_k, qk_scale, IEEE, BLOCK_N, D0, HAS_TAIL)
    else:
        q_base = q_ptr + q_start.to(tl.int64) * stride_qt + h * stride_qh
        q0, q1 = _load_rows(q_base, offs_m, stride_qt, m_mask, True, HEAD_DIM, D0, D1, HAS_TAIL)
        n_full = seqlen_k - seqlen_k % BLOCK_N  # full key blocks need no masking
        for start_n in range(0, n_full, BLOCK_N):
            acc0, acc1, m_i, l_i = _fwd_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, start_n, seqlen_k,
                                              stride_kt, stride_vt, qk_scale, False, IEEE, BLOCK_N,
                                              HEAD_DIM, D0, D1, HAS_TAIL)
        if n_full < seqlen_k:
            acc0, acc1, m_i, l_i = _fwd_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, n_full, seqlen_k,
                                              stride_kt, stride_vt, qk_scale, True, IEEE, BLOCK_N,
                                              HEAD_DIM, D0, D1, HAS_TAIL)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # no keys: l = 0 and acc = 0, so O = 0
    inv_l = 1.0 / l_safe
    o_base = o_ptr + q_start.to(tl.int64) * stride_ot + h * stride_oh
    _store_rows(o_base, offs_m, stride_ot, m_mask, acc0 * inv_l[:, None], acc1 * inv_l[:, None],
                HEAD_DIM, D0, D1, HAS_TAIL)
    if STORE_LSE:
        lse = m_i + tl.math.log2(l_safe)  # [BM], log2 units; -inf without keys (never read back)
        tl.store(lse_ptr + h * total_q + q_start + offs_m, lse, mask=m_mask)


# --- backward -----------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, stride_ot, stride_oh, stride_dot, stride_doh,
                                total_q, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                                HAS_TAIL: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in float32."""
    stride_ot, stride_oh = stride_ot * STRIDE_ALIGN, stride_oh * STRIDE_ALIGN
    stride_dot, stride_doh = stride_dot * STRIDE_ALIGN, stride_doh * STRIDE_ALIGN
    # Global row times token stride passes 2^31 at 2^31 / (H D) tokens: the block's first row is
    # applied in int64, the rows inside the block stay int32 (see INT32_LIMIT).
    row0 = tl.program_id(0) * BLOCK
    h = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK)  # [BLOCK], relative to row0
    mask = row0 + rows < total_q
    o_base = o_ptr + row0.to(tl.int64) * stride_ot + h * stride_oh
    do_base = do_ptr + row0.to(tl.int64) * stride_dot + h * stride_doh
    o0, o1 = _load_rows(o_base, rows, stride_ot, mask, True, HEAD_DIM, D0, D1, HAS_TAIL)
    g0, g1 = _load_rows(do_base, rows, stride_dot, mask, True, HEAD_DIM, D0, D1, HAS_TAIL)
    delta = tl.sum(o0.to(tl.float32) * g0.to(tl.float32), 1)
    if HAS_TAIL:
        delta += tl.sum(o1.to(tl.float32) * g1.to(tl.float32), 1)
    tl.store(delta_ptr + h * total_q + row0 + rows, delta, mask=mask)


@triton.jit
def _dkdv_block(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, start_m, seqlen_q,
                stride_qt, stride_dot, qk_scale, MASK: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr):
    """One query block's contribution to dK, dV of a key block, all transposed ([BN, BM])."""
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BM]
    m_mask = offs_m < seqlen_q
    q0, q1 = _load_rows(q_base, offs_m, stride_qt, m_mask, MASK, HEAD_DIM, D0, D1, HAS_TAIL)
    g0, g1 = _load_rows(do_base, offs_m, stride_dot, m_mask, MASK, HEAD_DIM, D0, D1, HAS_TAIL)
    if MASK:  # LSE = +inf makes P^T = 0 in the columns of queries past the end
        lse = tl.load(lse_base + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
    else:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    s_t = _dot(k0, tl.trans(q0), None, IEEE)  # [BN, BM] = S^T
    if HAS_TAIL:
        s_t = _dot(k1, tl.trans(q1), s_t, IEEE)
    p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # P^T, recomputed
    dv0 = _dot(p_t.to(g0.dtype), g0, dv0, IEEE)  # dV += P^T dO
    if HAS_TAIL:
        dv1 = _dot(p_t.to(g0.dtype), g1, dv1, IEEE)
    dp_t = _dot(v0, tl.trans(g0), None, IEEE)  # [BN, BM] = (dO V^T)^T
    if HAS_TAIL:
        dp_t = _dot(v1, tl.trans(g1), dp_t, IEEE)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)  # dS^T = P^T * (dP^T - delta)
    dk0 = _dot(ds_t, q0, dk0, IEEE)  # dK += dS^T Q (scaled at the end)
    if HAS_TAIL:
        dk1 = _dot(ds_t, q1, dk1, IEEE)
    return dk0, dk1, dv0, dv1


@autotune(configs=_all(_DKDV_16BIT, _DKDV_FP32), key=_KEY, prune_configs_by=_pruner(_DKDV_16BIT, _DKDV_FP32))
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_heads, total_q, max_seqlen_k, qk_scale, softmax_scale,
    MAX_Q_BUCKET, MAX_K_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    stride_qt, stride_qh = stride_qt * STRIDE_ALIGN, stride_qh * STRIDE_ALIGN
    stride_kt, stride_kh = stride_kt * STRIDE_ALIGN, stride_kh * STRIDE_ALIGN
    stride_vt, stride_vh = stride_vt * STRIDE_ALIGN, stride_vh * STRIDE_ALIGN
    stride_dot, stride_doh = stride_dot * STRIDE_ALIGN, stride_doh * STRIDE_ALIGN
    stride_dkt, stride_dkh = stride_dkt * STRIDE_ALIGN, stride_dkh * STRIDE_ALIGN
    stride_dvt, stride_dvh = stride_dvt * STRIDE_ALIGN, stride_dvh * STRIDE_ALIGN
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(max_seqlen_k, BLOCK_N)
    pid_n = pid % blocks_n
    b = pid // blocks_n // num_heads
    h = (pid // blocks_n % num_heads).to(tl.int64)  # int64: see INT32_LIMIT
    k_start, seqlen_k = _sequence(cu_k_ptr, b)
    if pid_n * BLOCK_N >= seqlen_k:
        return
    q_start, seqlen_q = _sequence(cu_q_ptr, b)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    # Keys past the end load as 0: their rows of dK, dV are garbage (exp2(-LSE) may even overflow)
    # and are never stored; each row depends on its own key only.
    n_mask = offs_n < seqlen_k
    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + h * stride_vh
    k0, k1 = _load_rows(k_base, offs_n, stride_kt, n_mask, True, HEAD_DIM, D0, D1, HAS_TAIL)
    v0, v1 = _load_rows(v_base, offs_n, stride_vt, n_mask, True, HEAD_DIM, D0, D1, HAS_TAIL)
    q_base = q_ptr + q_start.to(tl.int64) * stride_qt + h * stride_qh
    do_base = do_ptr + q_start.to(tl.int64) * stride_dot + h * stride_doh
    lse_base = lse_ptr + h * total_q + q_start
    delta_base = delta_ptr + h * total_q + q_start

    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
    m_full = seqlen_q - seqlen_q % BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk0, dk1, dv0, dv1 = _dkdv_block(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base,
                                         start_m, seqlen_q, stride_qt, stride_dot, qk_scale, False, IEEE, BLOCK_M,
                                         HEAD_DIM, D0, D1, HAS_TAIL)
    if m_full < seqlen_q:
        dk0, dk1, dv0, dv1 = _dkdv_block(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base,
                                         m_full, seqlen_q, stride_qt, stride_dot, qk_scale, True, IEEE, BLOCK_M,
                                         HEAD_DIM, D0, D1, HAS_TAIL)

    dk_base = dk_ptr + k_start.to(tl.int64) * stride_dkt + h * stride_dkh
    dv_base = dv_ptr + k_start.to(tl.int64) * stride_dvt + h * stride_dvh
    _store_rows(dk_base, offs_n, stride_dkt, n_mask, dk0 * softmax_scale, dk1 * softmax_scale,
                HEAD_DIM, D0, D1, HAS_TAIL)
    _store_rows(dv_base, offs_n, stride_dvt, n_mask, dv0, dv1, HEAD_DIM, D0, D1, HAS_TAIL)


@triton.jit
def _dq_block(dq0, dq1, q0, q1, g0, g1, lse, delta, k_base, v_base, start_n, seqlen_k, stride_kt, stride_vt,
              qk_scale, MASK: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr):
    """One key block's contribution to dQ of a query block."""
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < seqlen_k
    k0, k1 = _load_rows(k_base, offs_n, stride_kt, n_mask, MASK, HEAD_DIM, D0, D1, HAS_TAIL)
    v0, v1 = _load_rows(v_base, offs_n, stride_vt, n_mask, MASK, HEAD_DIM, D0, D1, HAS_TAIL)
    s = _dot(q0, tl.trans(k0), None, IEEE)  # [BM, BN]
    if HAS_TAIL:
        s = _dot(q1, tl.trans(k1), s, IEEE)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASK:  # keys past the end: S = 0 there, and exp2(-LSE) may overflow; drop them
        p = tl.where(n_mask[None, :], p, 0.0)
    dp = _dot(g0, tl.trans(v0), None, IEEE)  # [BM, BN] = dO V^T
    if HAS_TAIL:
        dp = _dot(g1, tl.trans(v1), dp, IEEE)
    ds = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 = _dot(ds, k0, dq0, IEEE)  # dQ += dS K (scaled at the end)
    if HAS_TAIL:
        dq1 = _dot(ds, k1, dq1, IEEE)
    return dq0, dq1


@autotune(configs=_all(_DQ_16BIT, _DQ_FP32), key=_KEY, prune_configs_by=_pruner(_DQ_16BIT, _DQ_FP32))
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    num_heads, total_q, max_seqlen_q, qk_scale, softmax_scale,
    MAX_Q_BUCKET, MAX_K_BUCKET,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    stride_qt, stride_qh = stride_qt * STRIDE_ALIGN, stride_qh * STRIDE_ALIGN
    stride_kt, stride_kh = stride_kt * STRIDE_ALIGN, stride_kh * STRIDE_ALIGN
    stride_vt, stride_vh = stride_vt * STRIDE_ALIGN, stride_vh * STRIDE_ALIGN
    stride_dot, stride_doh = stride_dot * STRIDE_ALIGN, stride_doh * STRIDE_ALIGN
    stride_dqt, stride_dqh = stride_dqt * STRIDE_ALIGN, stride_dqh * STRIDE_ALIGN
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(max_seqlen_q, BLOCK_M)
    pid_m = pid % blocks_m
    b = pid // blocks_m // num_heads
    h = (pid // blocks_m % num_heads).to(tl.int64)  # int64: see INT32_LIMIT
    q_start, seqlen_q = _sequence(cu_q_ptr, b)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    k_start, seqlen_k = _sequence(cu_k_ptr, b)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_mask = offs_m < seqlen_q
    q_base = q_ptr + q_start.to(tl.int64) * stride_qt + h * stride_qh
    do_base = do_ptr + q_start.to(tl.int64) * stride_dot + h * stride_doh
    q0, q1 = _load_rows(q_base, offs_m, stride_qt, m_mask, True, HEAD_DIM, D0, D1, HAS_TAIL)
    g0, g1 = _load_rows(do_base, offs_m, stride_dot, m_mask, True, HEAD_DIM, D0, D1, HAS_TAIL)
    lse = tl.load(lse_ptr + h * total_q + q_start + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(delta_ptr + h * total_q + q_start + offs_m, mask=m_mask, other=0.0)
    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + h * stride_vh

    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
    n_full = seqlen_k - seqlen_k % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq0, dq1 = _dq_block(dq0, dq1, q0, q1, g0, g1, lse, delta, k_base, v_base, start_n, seqlen_k,
                             stride_kt, stride_vt, qk_scale, False, IEEE, BLOCK_N, HEAD_DIM, D0, D1, HAS_TAIL)
    if n_full < seqlen_k:
        dq0, dq1 = _dq_block(dq0, dq1, q0, q1, g0, g1, lse, delta, k_base, v_base, n_full, seqlen_k,
                             stride_kt, stride_vt, qk_scale, True, IEEE, BLOCK_N, HEAD_DIM, D0, D1, HAS_TAIL)

    dq_base = dq_ptr + q_start.to(tl.int64) * stride_dqt + h * stride_dqh
    _store_rows(dq_base, offs_m, stride_dqt, m_mask, dq0 * softmax_scale, dq1 * softmax_scale,
                HEAD_DIM, D0, D1, HAS_TAIL)


# --- host side ----------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _head_split(head_dim: int) -> dict:
    """The constexprs of the head-dim scheme in the header: D0 (power of two) + D1 (tail tile)."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    d1 = max(MIN_DOT, _bucket(rest)) if rest else MIN_DOT  # a dummy 16 without a tail
    return {"HEAD_DIM": head_dim, "D0": d0, "D1": d1, "HAS_TAIL": rest > 0}


def _rows(x, max_rows):
    """A [T, H, D] operand with unit stride along D, the others non-negative multiples of
    STRIDE_ALIGN below INT32_LIMIT, and max_rows * token stride < INT32_LIMIT (see the header)."""
    align = STRIDE_ALIGN.value
    ok = x.stride(-1) == 1 and all(0 <= s < INT32_LIMIT and s % align == 0 for s in x.stride()[:2])
    return x if ok and max_rows * x.stride(0) < INT32_LIMIT else x.contiguous()


def _strides(x):
    """Token and head strides of a [T, H, D] tensor, in units of STRIDE_ALIGN elements."""
    return x.stride(0) // STRIDE_ALIGN.value, x.stride(1) // STRIDE_ALIGN.value


def _triton_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


def _ws_enabled() -> bool:
    """FASTSIGLIP_WARP_SPECIALIZE=1: offer the warp-specialized configs (off by default until it
    has run on a GPU; see the header)."""
    return os.environ.get("FASTSIGLIP_WARP_SPECIALIZE") == "1"


def _ws_device(device) -> bool:
    """A GPU and compiler the warp-specialized forward was verified for (see the header): NVIDIA
    (ROCm also says "cuda", and MI200/MI300 report capability 9.x), sm_90, triton >= WS_MIN_TRITON."""
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] == WS_CAPABILITY_MAJOR
            and _triton_version() >= WS_MIN_TRITON)


def _tma_layout(*tensors) -> bool:
    """TMA's rules for [T, H, D] operands: base address and strides multiples of 16 bytes, unit
    stride along D (the descriptor's box starts at row starts: token and head offsets)."""
    return all(t.stride(-1) == 1 and t.data_ptr() % TMA_ALIGN == 0
               and all(s * t.element_size() % TMA_ALIGN == 0 for s in t.stride()[:-1]) for t in tensors)


def _ws_mode(q, k, v) -> int:
    """WS_OFF / WS_CANDIDATE / WS_ONLY for these operands (after _rows): the autotuner key argument
    that lets the pruner keep the warp-specialized configs."""
    if FORCE_WARP_SPECIALIZE is False or not (FORCE_WARP_SPECIALIZE or _ws_enabled()) or not _tma_layout(q, k, v):
        return WS_OFF
    if FORCE_WARP_SPECIALIZE:
        return WS_ONLY
    return WS_CANDIDATE if q.element_size() == 2 and _ws_device(q.device) else WS_OFF


def _torch_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    """triton's global scratch (device-side TMA descriptors) from PyTorch's caching allocator, on the
    current device and stream, as triton launches (its blocks are 512-byte aligned)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Install _torch_allocator with triton.set_allocator unless an allocator is already set. Triton
    keeps it in a ContextVar: set for this thread (context), for every later triton launch there."""
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # a triton without these internals: install ours
        unset = True
    if unset:
        triton.set_allocator(_torch_allocator)


def attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, store_lse=True):
    """Packed q [Tq, H, D], k, v [Tk, H, D] -> (o [Tq, H, D], lse [H, Tq] float32, log2 units).
    store_lse=False (inference): the LSE is neither allocated nor written; lse comes back empty."""
    q, k, v = _rows(q, max_q), _rows(k, max_k), _rows(v, max_k)
    total_q, heads, head_dim = q.shape
    batch = cu_q.numel() - 1
    if total_q == 0 or batch == 0 or max_q == 0:  # nothing to launch
        return (q.new_zeros((total_q, heads, head_dim)),
                torch.full((heads, total_q) if store_lse else (0,), float("-inf"), device=q.device,
                           dtype=torch.float32))
    o = torch.empty((total_q, heads, head_dim), device=q.device, dtype=q.dtype)  # [Tq, H, D]
    lse = torch.empty((heads, total_q) if store_lse else (0,), device=q.device, dtype=torch.float32)  # [H, Tq]
    ws_mode = _ws_mode(q, k, v)
    if ws_mode != WS_OFF and q.device.type == "cuda":
        _ensure_allocator()
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, cu_q, cu_k, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        heads, total_q, max_q, scale * LOG2E, _bucket(max_q), _bucket(max_k), ws_mode,
        IEEE=q.dtype == torch.float32, STORE_LSE=store_lse, **_head_split(head_dim),
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale):
    """-> (dq, dk, dv) for the packed layout of attention_fwd."""
    do, q, k, v = _rows(do, max_q), _rows(q, max_q), _rows(k, max_k), _rows(v, max_k)
    total_q, heads, head_dim = q.shape
    batch = cu_q.numel() - 1
    if total_q == 0 or k.shape[0] == 0 or batch == 0 or max_q == 0 or max_k == 0:  # no query sees any key
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    # Every row is written below: each query row by the dq kernel (0 without keys), each key row
    # by the dkdv kernel (0 without queries).
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)  # [Tq, H, D]
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)  # [Tk, H, D]
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    split = _head_split(head_dim)
    ieee = q.dtype == torch.float32
    delta = torch.empty((heads, total_q), device=q.device, dtype=torch.float32)  # [H, Tq]
    _attn_bwd_preprocess_kernel[(triton.cdiv(total_q, PREPROCESS_ROWS), heads)](
        o, do, delta, *_strides(o), *_strides(do), total_q, BLOCK=PREPROCESS_ROWS, **split)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    grid_kv = lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]) * batch * heads,)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *common, *_strides(dk), *_strides(dv),
        heads, total_q, max_k, scale * LOG2E, scale, _bucket(max_q), _bucket(max_k), IEEE=ieee, **split)
    grid_q = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, *common, *_strides(dq),
        heads, total_q, max_q, scale * LOG2E, scale, _bucket(max_q), _bucket(max_k), IEEE=ieee, **split)
    return dq, dk, dv


# --- custom operators: torch.ops.fastsiglip.attention and .attention_backward ----------------------


@torch.library.custom_op("fastsiglip::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                  return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed q [Tq, H, D], k, v [Tk, H, D] -> (out [Tq, H, D], lse [H, Tq] float32, log2 units).

    The LSE is what the backward needs; without `return_lse` (inference) it is neither allocated
    nor written, and an empty tensor is returned in its place. Differentiable in q, k, v when
    called with return_lse=True.
    """
    return attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                         store_lse=return_lse)


@_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, return_lse):
    lse_shape = (q.shape[1], q.shape[0]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fastsiglip::attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), contiguous, for the packed layout of fastsiglip::attention."""
    return attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale)
    ctx.return_lse = return_lse
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dlse):
    if dout is None:
        return (None,) * 9
    if not ctx.return_lse:
        raise RuntimeError("fastsiglip.attention: the forward ran with return_lse=False, so there is no LSE to "
                           "differentiate through; call it with return_lse=True when gradients are needed")
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastsiglip.attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_rule(dtype, q, k, v, *rest):
    """Under autocast: q, k, v in the autocast dtype (as scaled_dot_product_attention casts them)."""
    return (cast(q, dtype), cast(k, dtype), cast(v, dtype), *rest)


register_autocast("attention", _autocast_rule)


# --- validation and the public function ---------------------------------------------------------


def _check_tensors(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"attention: dtype {q.dtype} is not supported by the Triton kernel (float16, bfloat16 "
                        "or float32); cast the inputs, or use fastsiglip.reference.attention")
    if (k.dtype != q.dtype or v.dtype != q.dtype) and autocast_dtype(q.device.type) is None:
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_device("attention", {"q": q, "k": k, "v": v})
    head_dim = q.shape[-1] if q.dim() else 0
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim {head_dim} is not supported by the Triton kernel (supported: "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}); use fastsiglip.reference.attention")


def _check_shapes(q, k, v, packed):
    layout = "q [Tq, H, D], k and v [Tk, H, D]" if packed else "q [B, Nq, H, D], k and v [B, Nk, H, D]"
    dims = 3 if packed else 4
    shapes = f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != dims or k.dim() != dims or v.dim() != dims:
        hint = "" if packed else " (or pass cu_seqlens_q and cu_seqlens_k for the packed layout)"
        raise ValueError(f"attention: expected {layout}{hint}; {shapes}")
    if k.shape != v.shape or q.shape[-2:] != k.shape[-2:] or (not packed and q.shape[0] != k.shape[0]):
        raise ValueError(f"attention: expected {layout} (same H and D; k and v of one shape); {shapes}")


def _check_cu_seqlens(name, cu, q):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"attention: {name} must be int32 (FlashAttention's varlen convention), got {cu.dtype}; "
                        "use .to(torch.int32)")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"attention: {name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"attention: {name} is on {cu.device} but q is on {q.device}; move it to {q.device}")
    if not cu.is_contiguous():
        raise ValueError(f"attention: {name} must be contiguous; use .contiguous()")


def _seqlen_bound(name, cu, total, max_seqlen):
    """The grid's bound on the sequence lengths, checking cu_seqlens' values where that is cheap.

    The values are checked on the CPU (free), and on CUDA when `max_seqlen` is None: that needs one
    host sync, which computes the maximum at the same time. With `max_seqlen` given on CUDA (the
    model's path, no sync), or inside torch.compile (where reading values would break the graph),
    the values are trusted: they must start at 0, not decrease, end at the token count, and
    max_seqlen must bound every length.
    """
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
            raise ValueError(f"attention: {name.replace('cu_seqlens', 'max_seqlen')} must be a non-negative int or None, "
                             f"got {max_seqlen!r}")
        if cu.device.type == "cuda" or torch.compiler.is_compiling():
            return max_seqlen
    if cu.numel() == 1:
        first = last = int(cu[0])
        lo = hi = 0
    else:
        lens = cu[1:] - cu[:-1]
        first, last, lo, hi = torch.stack([cu[0], cu[-1], lens.min(), lens.max()]).tolist()
    if first != 0 or lo < 0 or last != total:
        raise ValueError(f"attention: {name} must start at 0, never decrease and end at the token count {total}; "
                         f"got first {first}, last {last}, smallest step {lo}")
    if max_seqlen is not None and max_seqlen < hi:
        raise ValueError(f"attention: {name.replace('cu_seqlens', 'max_seqlen')}={max_seqlen} is below the longest sequence "
                         f"({hi}); pass an upper bound or None")
    return hi if max_seqlen is None else max_seqlen


def attention(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              softmax_scale=None):
    """Bidirectional multi-head attention, as fastsiglip.reference.attention; differentiable in q, k, v.

    Dense: q [B, Nq, H, D], k and v [B, Nk, H, D] -> [B, Nq, H, D].
    Packed: q [Tq, H, D], k and v [Tk, H, D] with int32 cu_seqlens_q / cu_seqlens_k [B + 1]
    -> [Tq, H, D]; max_seqlen_* are upper bounds of the lengths (None: computed, one host sync).
    A sequence without keys outputs zeros. softmax_scale (> 0) defaults to D ** -0.5.
    Head dims 64, 72, 80, 96, 128; float16, bfloat16 or float32 CUDA tensors (CPU only under
    TRITON_INTERPRET=1).
    """
    _check_tensors(q, k, v)
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("attention: pass both cu_seqlens_q and cu_seqlens_k (packed layout) or neither (dense)")
    packed = cu_seqlens_q is not None
    _check_shapes(q, k, v, packed)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention: softmax_scale must be positive and finite, got {softmax_scale!r} "
                         "(use fastsiglip.reference.attention for other scales)")
    if packed:
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"attention: cu_seqlens_q and cu_seqlens_k must both have length batch + 1, got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
        max_q = _seqlen_bound("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
        max_k = _seqlen_bound("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
        qp, kp, vp = q, k, v
    else:  # dense = packed with equal lengths; the reshapes are views for the usual strides
        batch, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
        steps = torch.arange(batch + 1, device=q.device, dtype=torch.int32)
        cu_q, cu_k, max_q, max_k = steps * n_q, steps * n_k, n_q, n_k
        qp, kp, vp = (t.reshape((-1,) + t.shape[2:]) for t in (q, k, v))
        if batch * max(n_q, n_k) >= INT32_LIMIT:
            raise ValueError(f"attention: {batch} x {max(n_q, n_k)} tokens do not fit int32 cu_seqlens; "
                             "split the batch")
    row_elems = q.shape[-2] * q.shape[-1]  # H * D, the token stride of a contiguous operand
    if max(max_q, max_k) * row_elems >= INT32_LIMIT:
        raise ValueError(f"attention: a sequence of {max(max_q, max_k)} tokens x {row_elems} (H x D) elements passes "
                         "the kernel's int32 in-sequence offsets (2^31); split the sequence or use "
                         "fastsiglip.reference.attention")
    return_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    o, _ = torch.ops.fastsiglip.attention(qp, kp, vp, cu_q, cu_k, max_q, max_k, scale, return_lse)
    return o if packed else o.view(q.shape)
