"""LayerNorm over the last dimension, optionally fused with the residual add, forward + backward.

    y = (s - mean) * rstd * w + b,  mean = sum(s) / N,  rstd = 1 / sqrt(sum((s - mean)^2) / N + eps)
    s = x                  (no residual: returns y)
    s = x + residual       (returns (y, s) in one pass: the pre-LN encoder's "add, then normalize")

Statistics and all arithmetic in float32; inputs and outputs in float16, bfloat16 or float32.
Saved for backward: s (x itself when there is no residual), and float32 mean and rstd per row.

Backward, with xhat = (s - mean) * rstd and g = w * dy (the standard LayerNorm gradient, e.g.
the Triton fused-LayerNorm tutorial or PyTorch's layer_norm_backward):
    ds = rstd * (g - xhat * mean(g * xhat) - mean(g))  [+ the gradient arriving on s]
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)
With a residual, x and residual both receive ds (d s / d x = d s / d residual = I), exactly as
PyTorch's add passes the same gradient to both operands.

Row layout. A Triton block has a power-of-two size, and rounding the row up wastes lanes
(1152 -> 2048 masks 44% of them; that costs registers, hence occupancy, and instructions). A
chunked loop over the row would avoid it but cannot keep the row in registers, so normalizing
needs a second read of s (twice the load traffic of this memory-bound kernel). Instead each row
is held as two power-of-two pieces, [0, BLOCK_A) and [BLOCK_A, BLOCK_A + BLOCK_B), BLOCK_A the
largest power of two below N: every SigLIP width is a sum of two powers of two (768 = 512 + 256,
1152 = 1024 + 128, 1536 = 1024 + 512, 1024 = 512 + 512), so they waste nothing, and any other
width wastes at most 25% instead of 50%. Each program normalizes BLOCK_M rows at once (a
[BLOCK_M, BLOCK] tile) so that narrow rows still give it enough bytes in flight.

dw and db are reduced in two deterministic stages (no atomics): the backward runs a fixed grid
of programs, each looping over its share of rows and writing one float32 row of partial sums;
torch sums those rows afterwards.

Dtypes may differ, as under torch.autocast: weight and bias in any of the three dtypes (loaded
as float32; dw and db are returned in the parameter's own dtype); with a residual, s is stored
in PyTorch's promoted dtype of x and residual (a float32 residual stream stays float32 when x is
bfloat16); y in `out_dtype` (default s's dtype; the autocast dtype under torch.autocast).
Input rows may have any row stride; a tensor whose last dimension is not contiguous is copied
(`.contiguous()`) first, and so are strided weight and bias. Zero rows return empty outputs (and
zero dw, db).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._device import INTERPRET, check_device
from ._library import register_autocast

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WIDTH = 8192  # the widest row kept in registers (two 4096-wide pieces)

# Backward grid: SM count x BWD_PROGRAMS_PER_SM programs, but each program reduces at least
# BWD_MIN_ROWS rows: a program's partial dw, db rows (2 N float32, written then read again) cost
# ~2.7 x programs / rows of the main traffic (x, dy, dx in 16 bits), so about 4% at most.
BWD_PROGRAMS_PER_SM = 4
BWD_MIN_ROWS = 64
# Autotuning keeps the configs that give each thread between these many elements of one row
# tile (fewer: idle lanes and too few bytes in flight; more: register spills).
MIN_ELEMS_PER_THREAD = 4
MAX_ELEMS_PER_THREAD = 16


def _configs():
    if INTERPRET:  # the CPU interpreter: one config, a few rows per program to test row masking
        return [triton.Config({"BLOCK_M": 4}, num_warps=1)]
    # Sized for Hopper (up to 16 warps of a 64-warp SM per program); the autotuner times each
    # surviving config per (width, rows bucket, dtype), so other GPUs pick their own.
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (1, 2, 4, 8, 16, 32) for w in (4, 8, 16)]


def _prune(configs, named_args, **kwargs):
    """Keep the configs giving each thread MIN..MAX_ELEMS_PER_THREAD elements; else the closest."""
    width = {**named_args, **kwargs}["N"]
    per_thread = lambda c: c.kwargs["BLOCK_M"] * width / (32 * c.num_warps)  # noqa: E731
    kept = [c for c in configs if MIN_ELEMS_PER_THREAD <= per_thread(c) <= MAX_ELEMS_PER_THREAD]
    return kept or [min(configs, key=lambda c: abs(per_thread(c) - MIN_ELEMS_PER_THREAD))]


# Tuned per width, row-count bucket (ROWS_BUCKET: an argument the kernels only pass to the
# autotuner) and residual or not; the autotuner adds the tensors' dtypes to the key itself.
_autotune = autotune(configs=_configs(), key=["N", "ROWS_BUCKET", "HAS_RESIDUAL"],
                            prune_configs_by={"early_config_prune": _prune})


@triton.jit
def _load_tile(ptr, rows, cols, stride, N, row_ok):
    """[BLOCK_M, BLOCK] float32 tile of rows x cols of a row-major matrix; 0 outside."""
    mask = row_ok[:, None] & (cols[None, :] < N)
    offs = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, val, rows, cols, stride, N, row_ok):
    mask = row_ok[:, None] & (cols[None, :] < N)
    offs = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@_autotune
@triton.jit
def _layer_norm_fwd_kernel(
    X, R, S, Y, W, B, Mean, Rstd,  # X, R, S, Y [M, N]; W, B [N]; Mean, Rstd [M] float32
    M, N, ROWS_BUCKET, stride_x, stride_r, stride_s, stride_y, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_STATS: tl.constexpr,  # STORE_STATS False: inference, no mean / rstd
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < M
    cols_a = tl.arange(0, BLOCK_A)  # [BLOCK_A] the first piece of the row, always full
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)  # [BLOCK_B] the rest, masked past N
    xa = _load_tile(X, rows, cols_a, stride_x, N, row_ok)  # [BLOCK_M, BLOCK_A]
    xb = _load_tile(X, rows, cols_b, stride_x, N, row_ok)  # [BLOCK_M, BLOCK_B]
    if HAS_RESIDUAL:
        # s = x + residual, rounded to the input dtype as PyTorch's add does: the stored s is
        # exactly the tensor that is normalized here and re-read by the backward.
        xa = (xa + _load_tile(R, rows, cols_a, stride_r, N, row_ok)).to(S.dtype.element_ty).to(tl.float32)
        xb = (xb + _load_tile(R, rows, cols_b, stride_r, N, row_ok)).to(S.dtype.element_ty).to(tl.float32)
        _store_tile(S, xa, rows, cols_a, stride_s, N, row_ok)
        _store_tile(S, xb, rows, cols_b, stride_s, N, row_ok)
    # Two-pass variance from registers (no E[x^2] - E[x]^2 cancellation).
    mean = (tl.sum(xa, axis=1) + tl.sum(xb, axis=1)) / N  # [BLOCK_M]
    da = xa - mean[:, None]
    db = tl.where((cols_b < N)[None, :], xb - mean[:, None], 0.0)
    var = (tl.sum(da * da, axis=1) + tl.sum(db * db, axis=1)) / N
    rstd = 1.0 / tl.sqrt(var + eps)  # [BLOCK_M]
    if STORE_STATS:
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)
    wa = tl.load(W + cols_a).to(tl.float32)
    ba = tl.load(B + cols_a).to(tl.float32)
    wb = tl.load(W + cols_b, mask=cols_b < N, other=0.0).to(tl.float32)
    bb = tl.load(B + cols_b, mask=cols_b < N, other=0.0).to(tl.float32)
    _store_tile(Y, da * rstd[:, None] * wa[None, :] + ba[None, :], rows, cols_a, stride_y, N, row_ok)
    _store_tile(Y, db * rstd[:, None] * wb[None, :] + bb[None, :], rows, cols_b, stride_y, N, row_ok)


@_autotune
@triton.jit
def _layer_norm_bwd_kernel(
    DY, S, W, Mean, Rstd, DSin, DS, DWp, DBp,  # DY, S, DSin, DS [M, N]; W [N]; DWp, DBp [P, N] f32
    M, N, ROWS_BUCKET, stride_dy, stride_s, stride_dsin, stride_ds,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # HAS_RESIDUAL here: a gradient arrives on the returned s too (DSin), added to ds.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols_a = tl.arange(0, BLOCK_A)
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    wa = tl.load(W + cols_a).to(tl.float32)  # [BLOCK_A]
    wb = tl.load(W + cols_b, mask=cols_b < N, other=0.0).to(tl.float32)  # [BLOCK_B]
    # Per-program partial sums of dw and db, reduced over rows once at the end.
    dwa = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
    dwb = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    dba = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
    dbb = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, num_programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        row_ok = rows < M
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)[:, None]  # [BLOCK_M, 1]
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)[:, None]
        # Masked lanes and rows load dy = 0 (and w = 0), so they add nothing to the sums below.
        dya = _load_tile(DY, rows, cols_a, stride_dy, N, row_ok)  # [BLOCK_M, BLOCK_A]
        dyb = _load_tile(DY, rows, cols_b, stride_dy, N, row_ok)  # [BLOCK_M, BLOCK_B]
        xhat_a = (_load_tile(S, rows, cols_a, stride_s, N, row_ok) - mean) * rstd
        xhat_b = (_load_tile(S, rows, cols_b, stride_s, N, row_ok) - mean) * rstd
        ga = dya * wa[None, :]
        gb = dyb * wb[None, :]
        c1 = ((tl.sum(ga * xhat_a, axis=1) + tl.sum(gb * xhat_b, axis=1)) / N)[:, None]  # mean(g * xhat)
        c2 = ((tl.sum(ga, axis=1) + tl.sum(gb, axis=1)) / N)[:, None]  # mean(g)
        dsa = (ga - xhat_a * c1 - c2) * rstd
        dsb = (gb - xhat_b * c1 - c2) * rstd
        if HAS_RESIDUAL:
            dsa += _load_tile(DSin, rows, cols_a, stride_dsin, N, row_ok)
            dsb += _load_tile(DSin, rows, cols_b, stride_dsin, N, row_ok)
        _store_tile(DS, dsa, rows, cols_a, stride_ds, N, row_ok)
        _store_tile(DS, dsb, rows, cols_b, stride_ds, N, row_ok)
        dwa += dya * xhat_a
        dwb += dyb * xhat_b
        dba += dya
        dbb += dyb
    out = pid.to(tl.int64) * N
    tl.store(DWp + out + cols_a, tl.sum(dwa, axis=0))
    tl.store(DBp + out + cols_a, tl.sum(dba, axis=0))
    tl.store(DWp + out + cols_b, tl.sum(dwb, axis=0), mask=cols_b < N)
    tl.store(DBp + out + cols_b, tl.sum(dbb, axis=0), mask=cols_b < N)


def _pieces(N: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): BLOCK_A the largest power of two below N, BLOCK_B covers the rest."""
    block_a = triton.next_power_of_2(N) // 2 if N > 1 else 1
    return block_a, max(1, triton.next_power_of_2(N - block_a))


def _rows_bucket(M: int) -> int:
    """Autotuning key for the row count: powers of two from 1024 to 65536 (tiny and huge alike)."""
    return min(max(triton.next_power_of_2(M), 1024), 65536)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit column stride (a view when possible, else a copy)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    return 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def layer_norm_fwd(x, w, b, eps, residual=None, out_dtype=None, store_stats=True):
    """x, residual [M, N] (unit column stride) -> (y [M, N], s [M, N], mean [M], rstd [M] float32).

    s is the normalized tensor: x + residual (new, in the promoted dtype of the two), or x itself
    without a residual. y is in `out_dtype`, default s's dtype. store_stats=False (inference): mean
    and rstd, which only the backward reads, are neither allocated nor written (empty tensors).
    """
    M, N = x.shape
    block_a, block_b = _pieces(N)
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((M, N), dtype=out_dtype or s_dtype, device=x.device)
    s = x if residual is None else torch.empty((M, N), dtype=s_dtype, device=x.device)
    mean = torch.empty(M if store_stats else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if M == 0:
        return y, s, mean, rstd
    r = x if residual is None else residual  # a placeholder pointer when unused
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _layer_norm_fwd_kernel[grid](
        x, r, s, y, w, b, mean, rstd, M, N, _rows_bucket(M), x.stride(0), r.stride(0), s.stride(0), y.stride(0),
        eps, HAS_RESIDUAL=residual is not None, STORE_STATS=store_stats, BLOCK_A=block_a, BLOCK_B=block_b,
    )
    return y, s, mean, rstd


def layer_norm_bwd(dy, s, w, mean, rstd, ds_in=None):
    """dy, s, ds_in [M, N] -> (ds [M, N] in s's dtype, dw [N], db [N] in w's dtype).

    ds_in: a gradient arriving on s itself (the residual variant's second output), or None.
    """
    M, N = s.shape
    block_a, block_b = _pieces(N)
    ds = torch.empty((M, N), dtype=s.dtype, device=s.device)
    programs = max(1, min(_sm_count(s.device) * BWD_PROGRAMS_PER_SM, triton.cdiv(M, BWD_MIN_ROWS)))
    if M == 0:
        zeros = torch.zeros(N, dtype=w.dtype, device=w.device)
        return ds, zeros, zeros.clone()
    dw_partial = torch.empty((programs, N), dtype=torch.float32, device=s.device)
    db_partial = torch.empty((programs, N), dtype=torch.float32, device=s.device)
    dsin = dy if ds_in is None else ds_in  # a placeholder pointer when unused
    _layer_norm_bwd_kernel[(programs,)](
        dy, s, w, mean, rstd, dsin, ds, dw_partial, db_partial, M, N, _rows_bucket(M),
        dy.stride(0), s.stride(0), dsin.stride(0), ds.stride(0),
        HAS_RESIDUAL=ds_in is not None, BLOCK_A=block_a, BLOCK_B=block_b,
    )
    return ds, dw_partial.sum(0).to(w.dtype), db_partial.sum(0).to(w.dtype)


# --- custom operators: torch.ops.fastsiglip.layer_norm and .layer_norm_backward ----------------


@torch.library.custom_op("fastsiglip::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                   eps: float, out_dtype: torch.dtype | None, with_stats: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [..., N] -> (y [..., N] in out_dtype, s = x + residual [..., N], mean [M], rstd [M] float32).

    M is the number of rows (x.numel() // N). Without a residual s is x itself, which an operator
    may not return: s is then an empty tensor (the backward reads x instead). mean and rstd are
    what the backward needs; without `with_stats` (inference) they are neither allocated nor
    written, and come back empty. Differentiable in x, weight, bias and residual (mean and rstd
    are not) when called with with_stats=True.
    """
    x2 = _row_major(x)  # [M, N]
    r2 = None if residual is None else _row_major(residual)
    y, s, mean, rstd = layer_norm_fwd(x2, weight.contiguous(), bias.contiguous(), eps, r2, out_dtype, with_stats)
    return y.view(x.shape), (x.new_empty(0) if residual is None else s.view(x.shape)), mean, rstd


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, eps, out_dtype, with_stats):
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    rows = math.prod(x.shape[:-1])  # symbolic sizes stay symbolic (Size.numel() would specialize)
    s = x.new_empty(0) if residual is None else x.new_empty(x.shape, dtype=s_dtype)
    stats = x.new_empty(rows if with_stats else 0, dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or s_dtype), s, stats, torch.empty_like(stats)


@torch.library.custom_op("fastsiglip::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor, ds_in: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, s, ds_in [..., N] -> (ds [..., N] in s's dtype, dw [N], db [N] in weight's dtype).

    ds_in: a gradient arriving on s itself (the residual form's second output), or None.
    """
    ds, dw, db = layer_norm_bwd(_row_major(dy), _row_major(s), weight.contiguous(), mean, rstd,
                                None if ds_in is None else _row_major(ds_in))
    return ds.view(s.shape), dw, db


@_layer_norm_backward_op.register_fake
def _(dy, s, weight, mean, rstd, ds_in):
    return s.new_empty(s.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, out_dtype, with_stats = inputs
    y, s, mean, rstd = output
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
    ctx.with_stats = with_stats
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None


def _backward(ctx, dy, ds_in, _dmean, _drstd):
    if not ctx.with_stats:
        raise RuntimeError("fastsiglip.layer_norm: the forward ran with with_stats=False, so there are no "
                           "statistics to differentiate through; call it with with_stats=True when gradients "
                           "are needed")
    s, weight, mean, rstd = ctx.saved_tensors
    has_residual = ctx.residual_dtype is not None
    ds_in = ds_in if has_residual else None
    if dy is None:  # only s was used: the LayerNorm contributes nothing
        ds, dw, db = (torch.zeros_like(s) if ds_in is None else ds_in), None, None
    else:
        ds, dw, db = torch.ops.fastsiglip.layer_norm_backward(dy, s, weight, mean, rstd, ds_in)
    # d s / d x = d s / d residual = I: both receive ds, in their own dtypes, as PyTorch's add does.
    return (ds.to(ctx.x_dtype), dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None,
            ds.to(ctx.residual_dtype) if has_residual else None, None, None, None)


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_rule(dtype, x, weight, bias, residual, eps, out_dtype, with_stats):
    """Under autocast: inputs as they are (statistics are float32 anyway, and a float32 residual
    stream stays float32), the output in the autocast dtype."""
    return x, weight, bias, residual, eps, out_dtype or dtype, with_stats


register_autocast("layer_norm", _autocast_rule)


def layer_norm(x, weight, bias, eps=1e-6, residual=None):
    """LayerNorm over the last dimension; with `residual`, returns (LN(x + residual), x + residual).

    Same signature and results as fastsiglip.reference.layer_norm. x [..., N] in float16,
    bfloat16 or float32, N <= 8192; weight and bias [N] and residual (x's shape) in any of those
    dtypes (x + residual is formed in their promoted dtype). Differentiable in x, weight, bias and
    residual. Runs torch.ops.fastsiglip.layer_norm: under torch.autocast y is in the autocast dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"layer_norm: dtype {x.dtype} is not supported (float16, bfloat16 or float32); "
                        "cast the input, or use fastsiglip.reference.layer_norm")
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension (the normalized one)")
    N = x.shape[-1]
    if not 1 <= N <= MAX_WIDTH:
        raise ValueError(f"layer_norm: the normalized width must be 1..{MAX_WIDTH}, got {N}; "
                         "use fastsiglip.reference.layer_norm for wider rows")
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"layer_norm: {name} must be a tensor of shape ({N},) (pass torch.ones / torch.zeros "
                            f"for an affine-free LayerNorm), got {type(p).__name__}")
        if tuple(p.shape) != (N,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(p.shape)}, expected ({N},) to match x's last "
                             f"dimension (x shape {tuple(x.shape)})")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"layer_norm: {name} dtype {p.dtype} is not supported (float16, bfloat16 or float32)")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
            got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"layer_norm: residual must have x's shape {tuple(x.shape)}, got {got}")
        if residual.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"layer_norm: residual dtype {residual.dtype} is not supported (float16, bfloat16 or "
                            "float32)")
    tensors = {"x": x, "weight": weight, "bias": bias, **({} if residual is None else {"residual": residual})}
    check_device("layer_norm", tensors)
    with_stats = torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values())
    y, s, _, _ = torch.ops.fastsiglip.layer_norm(x, weight, bias, residual, float(eps), None, with_stats)
    return y if residual is None else (y, s)
