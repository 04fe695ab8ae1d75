"""SigLIP's pairwise sigmoid loss, chunked, forward + backward, never the whole B x B logits.

Definition (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Algorithm 1;
big_vision trainers/proj/image_text/siglip.py; transformers' Siglip(2)Model(return_loss=True)):
    l_ij = exp(logit_scale) * <image_i, text_j> + logit_bias          # [Bi, Bt]
    z_ij = +1 where j == i + positive_offset (the positive pairs), -1 elsewhere
    loss = -sum_ij logsigmoid(z_ij * l_ij) / Bi
big_vision sums the log-likelihood over one axis and averages over the other, transformers does
`-sum(loglik, dim=-1).mean()` over logits_per_text: for a square batch both equal the formula
above (the same double sum over B^2 pairs, divided by B), which is reference.sigmoid_loss.

Gradients (the loss is a scalar, so they are produced during the forward pass). With
x = z * l and d/dx [-logsigmoid(x)] = -sigmoid(-x) (sigmoid' = sigmoid (1 - sigmoid)):
    dL/dl_ij = G_ij / Bi,  G_ij = -z_ij * sigmoid(-z_ij * l_ij)   in [-1, 1]
    d image  = exp(s) / Bi * G @ T          d text = exp(s) / Bi * G^T @ I
    d s      = exp(s) / Bi * sum_ij G_ij <i, t>   (chain rule through exp: dl/ds = exp(s) <i,t>)
    d bias   = 1 / Bi * sum_ij G_ij
so backward only multiplies the stored gradients by grad_output: 3 GEMMs in all (the logits,
G @ T, G^T @ I), the floor for this loss.

Design. The batch is cut into square blocks of `chunk_size` images x `chunk_size` texts. For
each block one Triton GEMM computes the logits tile by tile (tl.dot, float32 accumulation) and,
in its epilogue, in registers: the stable log-sigmoid, the loss and the two scalar-gradient
partial sums (one slot per program, summed by torch: deterministic, no atomics), and G, written
once to a chunk-sized buffer in the input dtype (unscaled, so float16 keeps its precision).
Then two cuBLAS GEMMs read that block of G: d image[rows] += G @ T[cols] and
d text[cols] += G^T @ I[rows] (a transposed view, no copy), accumulated in float32.
Why not fuse G @ T into the logits kernel (FlashAttention-backward style)? Its accumulator is a
[BLOCK_M, D] float32 tile per program: with D = 768 or 1152 that is 192-288 KB, more than an
SM's registers, so D would have to be split across programs, each recomputing the logits (8+
GEMM-equivalents instead of 3), and the transposed product would need a second pass or atomics.
Writing G once per block and reading it twice costs 6 bytes per pair in 16-bit (about a third
of the GEMM time at D = 768 on an H100) and lets each GEMM run at cuBLAS speed.
Memory: beyond the inputs, O(B * D) (float32 gradient accumulators, then the stored gradients
in the input dtype) plus one chunk_size^2 block of G (128 MiB for 8192^2 in 16-bit); the
B x B matrix never exists.

Precision: float32 accumulation everywhere; float32 inputs stay IEEE (the Triton dot uses
input_precision="ieee", torch's float32 matmuls follow torch.backends.cuda.matmul.allow_tf32,
off by default). The loss is returned in the reference's result dtype.

Log-sigmoid in float32 for any logit magnitude: logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)),
with log1p(e) = log(u) * e / (u - 1), u = 1 + e (Goldberg's trick, exact to rounding where
u rounds to 1: then it returns e), and sigmoid(-x) from the same e = exp(-|x|) <= 1: no
overflow for any finite x.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._device import INTERPRET, check_device
from ._library import autocast_dtype, cast, register_autocast

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Default block side: 8192^2 pairs is 128 MiB of G in 16-bit (256 MiB in float32), big enough
# that the accumulating GEMMs (K = chunk_size) run near peak and the per-block launches are noise.
DEFAULT_CHUNK = 8192
# Partial sums per program of the logits kernel: loss, sum G, sum G * <i, t>.
N_PARTIALS = 3
# Every config's tiles are multiples of this, so a block's partial-sum buffer sized for it
# holds one slot per program for any config.
MIN_TILE = 32


def _config(bm, bn, bk, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)


if INTERPRET:  # the CPU interpreter runs tl.dot in numpy: one small config, no tuning
    _CONFIGS = _CONFIGS_FP32 = [_config(32, 32, 32, 1, 4)]
else:
    # Hopper-sized tiles (wgmma, 228 KB shared memory); configs that do not fit a smaller GPU
    # fail to compile and the autotuner skips them.
    _CONFIGS = [
        _config(128, 256, 64, 3, 8),
        _config(256, 128, 64, 3, 8),
        _config(128, 128, 64, 4, 8),
        _config(128, 128, 64, 4, 4),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        _config(128, 128, 32, 4, 4),
        _config(128, 64, 64, 4, 8),
        _config(64, 128, 64, 4, 8),
        _config(64, 64, 64, 4, 4),
        _config(64, 64, 32, 4, 4),
    ]
    # IEEE float32 dots run on FMA units, whose lowering holds operand tiles in registers: the
    # 16-bit tiles above would spill (and take long to compile), so float32 gets small ones.
    _CONFIGS_FP32 = [
        _config(64, 64, 32, 2, 4),
        _config(64, 32, 32, 2, 4),
        _config(32, 32, 32, 2, 4),
    ]


# The epilogue keeps the logits tile, the loss terms (and with gradients G) live at once: tiles
# with more than 32 float32 accumulators per thread spilled when compiled by bench/compile_check.py,
# with gradients 0.9-8 KB per thread on sm_90 (triton 3.6 and 3.9), without gradients 3.7-3.8 KB
# at 128 per thread on sm_90 and 8 B at 64 per thread (64 x 128, 4 warps) on sm_100 (triton 3.9).
# Spilling configs are not worth the autotuner's time.
MAX_ACC_PER_THREAD = 32


def _prune(configs, named_args, **kwargs):
    """The configs written for the operand dtype (IEEE float32 or 16-bit) whose accumulator tile
    fits the registers beside the epilogue (MAX_ACC_PER_THREAD)."""
    wanted = _CONFIGS_FP32 if named_args["img_ptr"].dtype == torch.float32 else _CONFIGS
    kept = [c for c in configs if any(c is w for w in wanted)]
    kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
            <= MAX_ACC_PER_THREAD] or kept
    return kept or configs[:1]


# reset_to_zero: a config with larger tiles writes fewer slots than the buffer holds; the rest must
# read 0 after the autotuner's timing runs of other configs (the kernel stores, never accumulates,
# so the outputs are otherwise unaffected by those runs).
@autotune(configs=_CONFIGS + ([] if INTERPRET else _CONFIGS_FP32),
                 key=["M_BUCKET", "N_BUCKET", "K", "IS_FP32", "WITH_GRAD"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["part_ptr"])
@triton.jit
def _sigmoid_loss_block_kernel(
    img_ptr, txt_ptr, g_ptr, part_ptr, scale_ptr, bias_ptr,
    M, N, K, M_BUCKET, N_BUCKET,  # the buckets only key the autotuner (sizes rounded to 2^k)
    diag,  # the pair (r, c) of this block is positive where c == r + diag
    stride_im, stride_ik, stride_tn, stride_tk, stride_gm, stride_gn,
    IS_FP32: tl.constexpr, WITH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of a block: logits, loss partials and G = -z sigmoid(-z l)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # The tile's first row / column times the strides in int64: a chunk of 65,536 texts makes
    # rm * stride_gm reach 2^32 (and chunk x D can pass 2^31 too); offsets inside the tile stay
    # int32 (BLOCK x stride, small).
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    lm = tl.arange(0, BLOCK_M)  # [BM] image rows, relative to row0
    ln = tl.arange(0, BLOCK_N)  # [BN] text rows, relative to col0
    rm = row0 + lm  # [BM] image rows of the block
    rn = col0 + ln  # [BN] text rows of the block
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = img_ptr + row0.to(tl.int64) * stride_im + lm[:, None] * stride_im + rk[None, :] * stride_ik  # [BM, BK]
    b_ptrs = txt_ptr + col0.to(tl.int64) * stride_tn + rk[:, None] * stride_tk + ln[None, :] * stride_tn  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
        if IS_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ik
        b_ptrs += BLOCK_K * stride_tk

    # Epilogue, all float32: acc[i, j] = <image_i, text_j>.
    scale = tl.exp(tl.load(scale_ptr).to(tl.float32))
    bias = tl.load(bias_ptr).to(tl.float32)
    valid = (rm[:, None] < M) & (rn[None, :] < N)
    positive = rn[None, :] == rm[:, None] + diag
    z = tl.where(positive, 1.0, -1.0)
    x = z * (acc * scale + bias)  # z * l
    e = tl.exp(-tl.abs(x))  # in (0, 1]: never overflows
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
    nll = log1p_e - tl.minimum(x, 0.0)  # -logsigmoid(x)
    nll = tl.where(valid, nll, 0.0)
    part = part_ptr + (pid_m * tl.num_programs(1) + pid_n) * 3
    tl.store(part, tl.sum(tl.sum(nll, axis=1), axis=0))
    if WITH_GRAD:
        sig_neg = tl.where(x >= 0, e, 1.0) / u  # sigmoid(-x)
        g = tl.where(valid, -z * sig_neg, 0.0)  # dL/dl * Bi
        tl.store(part + 1, tl.sum(tl.sum(g, axis=1), axis=0))
        tl.store(part + 2, tl.sum(tl.sum(g * acc, axis=1), axis=0))
        g_base = g_ptr + row0.to(tl.int64) * stride_gm + col0.to(tl.int64) * stride_gn
        g_ptrs = g_base + lm[:, None] * stride_gm + ln[None, :] * stride_gn
        tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=valid)


_MM_OUT_DTYPE = None  # whether torch.mm(..., out_dtype=float32) works for 16-bit CUDA inputs


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, with a float32 result from 16-bit inputs where torch can."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if _MM_OUT_DTYPE is None:
        try:
            torch.mm(a[:1, :1], b[:1, :1], out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    if _MM_OUT_DTYPE:
        acc += torch.mm(a, b, out_dtype=torch.float32)
    else:  # each block's product rounded once to 16 bits, the sum over blocks kept in float32
        acc += torch.mm(a, b).float()


def _loss_dtype(embeds, logit_scale, logit_bias) -> torch.dtype:
    """The reference's result dtype, (embeds @ embeds^T) * exp(logit_scale) + logit_bias, by
    PyTorch's promotion rules for floating tensors: a one-element [1] parameter promotes 16-bit
    logits to float32, a 0-dim one does not (a 0-dim tensor never promotes within its category)."""
    dtype = embeds.dtype
    for p in (logit_scale, logit_bias):
        if p.dim() > 0:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def sigmoid_loss_fwd(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size, positive_offset,
                     with_grad):
    """-> (loss [], d_image [Bi, D], d_text [Bt, D], d_scale [], d_bias []) for grad_output = 1.

    The gradients are None when with_grad is False (then only the logits GEMM runs).
    """
    img, txt = image_embeds, text_embeds
    n_img, dim = img.shape
    n_txt = txt.shape[0]
    chunk = chunk_size
    device = img.device
    g_dtype = img.dtype
    g_buf = torch.empty(min(chunk, n_img), min(chunk, n_txt), device=device, dtype=g_dtype) if with_grad else None
    n_slots = triton.cdiv(min(chunk, n_img), MIN_TILE) * triton.cdiv(min(chunk, n_txt), MIN_TILE)
    parts = torch.zeros(n_slots, N_PARTIALS, device=device, dtype=torch.float32)
    totals = torch.zeros(N_PARTIALS, device=device, dtype=torch.float64)
    d_img = torch.zeros(n_img, dim, device=device, dtype=torch.float32) if with_grad else None
    d_txt = torch.zeros(n_txt, dim, device=device, dtype=torch.float32) if with_grad else None
    scale_t = logit_scale.detach().reshape(1)
    bias_t = logit_bias.detach().reshape(1)
    for r0 in range(0, n_img, chunk):
        rows = img[r0:r0 + chunk]  # [m, D]
        m = rows.shape[0]
        for c0 in range(0, n_txt, chunk):
            cols = txt[c0:c0 + chunk]  # [n, D]
            n = cols.shape[0]
            g = g_buf[:m, :n] if with_grad else parts  # parts: a placeholder pointer, never written
            parts.zero_()

            def grid(meta):
                return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

            _sigmoid_loss_block_kernel[grid](
                rows, cols, g, parts, scale_t, bias_t,
                m, n, dim, triton.next_power_of_2(m), triton.next_power_of_2(n),
                r0 + positive_offset - c0,
                rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
                g.stride(0), g.stride(1),
                IS_FP32=img.dtype == torch.float32, WITH_GRAD=with_grad,
            )
            totals += parts.sum(0, dtype=torch.float64)
            if with_grad:
                _accumulate_mm(d_img[r0:r0 + m], g, cols)  # G @ T
                _accumulate_mm(d_txt[c0:c0 + n], g.t(), rows)  # G^T @ I
    loss = (totals[0] / n_img).to(_loss_dtype(img, logit_scale, logit_bias))
    if not with_grad:
        return loss, None, None, None, None
    scale = logit_scale.detach().float().exp()
    coef = scale / n_img  # dL/dl = G / Bi, dl/d<i,t> = exp(s)
    d_img = (d_img * coef).to(img.dtype)
    d_txt = (d_txt * coef).to(txt.dtype)
    d_scale = (totals[2].float() * coef).to(logit_scale.dtype).reshape(logit_scale.shape)
    d_bias = (totals[1].float() / n_img).to(logit_bias.dtype).reshape(logit_bias.shape)
    return loss, d_img, d_txt, d_scale, d_bias


# --- custom operator: torch.ops.fastsiglip.sigmoid_loss -----------------------------------------


@torch.library.custom_op("fastsiglip::sigmoid_loss", mutates_args=())
def _sigmoid_loss_op(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor, chunk_size: int, positive_offset: int, with_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss [], d_image [Bi, D], d_text [Bt, D], d_scale, d_bias): the loss and, with `with_grad`,
    its four gradients for grad_output = 1 (empty tensors without). The backward only scales those
    by grad_output: no backward operator, and the B x B matrix is never kept."""
    loss, *grads = sigmoid_loss_fwd(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size,
                                    positive_offset, with_grad)
    if not with_grad:
        grads = [image_embeds.new_empty(0) for _ in range(4)]
    return (loss, *grads)


@_sigmoid_loss_op.register_fake
def _(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size, positive_offset, with_grad):
    loss = image_embeds.new_empty((), dtype=_loss_dtype(image_embeds, logit_scale, logit_bias))
    if not with_grad:
        return (loss, *(image_embeds.new_empty(0) for _ in range(4)))
    return (loss, image_embeds.new_empty(image_embeds.shape), text_embeds.new_empty(text_embeds.shape),
            logit_scale.new_empty(logit_scale.shape), logit_bias.new_empty(logit_bias.shape))


def _setup_context(ctx, inputs, output):
    ctx.with_grad = inputs[6]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, *_):
    if grad_output is None:
        return (None,) * 7
    if not ctx.with_grad:
        raise RuntimeError("fastsiglip.sigmoid_loss: the forward ran with with_grad=False, so it stored no "
                           "gradients; call it with with_grad=True when gradients are needed")
    go = grad_output.float()
    return (*((g * go).to(g.dtype) for g in ctx.saved_tensors), None, None, None)


_sigmoid_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_rule(dtype, image_embeds, text_embeds, *rest):
    """Under autocast: the embeddings in the autocast dtype (as the reference's logits matmul casts
    them); logit_scale and logit_bias stay as they are (float32 parameters, used as scalars)."""
    return (cast(image_embeds, dtype), cast(text_embeds, dtype), *rest)


register_autocast("sigmoid_loss", _autocast_rule)


def _check(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size, positive_offset):
    if not all(isinstance(t, torch.Tensor) for t in (image_embeds, text_embeds, logit_scale, logit_bias)):
        raise TypeError("sigmoid_loss: image_embeds, text_embeds, logit_scale and logit_bias must be tensors")
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise ValueError(f"sigmoid_loss: expected image_embeds [B_img, D] and text_embeds [B_txt, D], got shapes "
                         f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"sigmoid_loss: embedding sizes differ: image_embeds has D = {image_embeds.shape[1]}, "
                         f"text_embeds has D = {text_embeds.shape[1]}; project both towers to the same width")
    if image_embeds.shape[0] == 0 or text_embeds.shape[0] == 0 or image_embeds.shape[1] == 0:
        raise ValueError(f"sigmoid_loss: empty batch (image_embeds {tuple(image_embeds.shape)}, text_embeds "
                         f"{tuple(text_embeds.shape)}); the loss needs at least one image, one text and D >= 1")
    if logit_scale.numel() != 1 or logit_bias.numel() != 1:
        raise ValueError(f"sigmoid_loss: logit_scale and logit_bias must be scalars (one element each), got "
                         f"shapes {tuple(logit_scale.shape)} and {tuple(logit_bias.shape)}")
    if image_embeds.dtype != text_embeds.dtype and autocast_dtype(image_embeds.device.type) is None:
        raise ValueError(f"sigmoid_loss: image_embeds is {image_embeds.dtype} but text_embeds is "
                         f"{text_embeds.dtype}; cast both to one dtype")
    if image_embeds.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"sigmoid_loss: the kernel supports float16, bfloat16 and float32, got "
                         f"{image_embeds.dtype}; cast, or use fastsiglip.reference.sigmoid_loss")
    if not logit_scale.is_floating_point() or not logit_bias.is_floating_point():
        raise ValueError("sigmoid_loss: logit_scale and logit_bias must be floating-point tensors")
    check_device("sigmoid_loss", {"image_embeds": image_embeds, "text_embeds": text_embeds,
                                  "logit_scale": logit_scale, "logit_bias": logit_bias})
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"sigmoid_loss: chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(positive_offset, bool) or not isinstance(positive_offset, int):
        raise ValueError(f"sigmoid_loss: positive_offset must be an int, got {positive_offset!r}")


def sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size=None, *, positive_offset=0):
    """SigLIP's sigmoid loss, -sum_ij logsigmoid(z_ij l_ij) / B_img, differentiable; see the module doc.

    image_embeds [B_img, D], text_embeds [B_txt, D]: L2-normalized embeddings (B_img != B_txt is
    allowed), float16, bfloat16 or float32 CUDA tensors (CPU only under TRITON_INTERPRET=1).
    logit_scale, logit_bias: one-element tensors, the checkpoint's raw parameters (the scale is
    applied as exp(logit_scale)). chunk_size: side of the square blocks of pairs computed at a
    time (default 8192); extra memory is O((B_img + B_txt) * D) plus chunk_size^2 elements.
    positive_offset: the positives are the pairs (i, i + positive_offset) that exist (0: the
    diagonal; a rank's slice of a gathered batch in the distributed loss). Same values as
    fastsiglip.reference.sigmoid_loss (big_vision's and transformers' loss for a square batch).
    """
    _check(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size, positive_offset)
    chunk = DEFAULT_CHUNK if chunk_size is None else chunk_size
    with_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_embeds, text_embeds, logit_scale, logit_bias))
    # Any strides work: the kernel and cuBLAS take them, nothing is copied.
    return torch.ops.fastsiglip.sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, chunk,
                                             positive_offset, with_grad)[0]


__all__ = ["sigmoid_loss", "sigmoid_loss_fwd", "DEFAULT_CHUNK"]
