"""The one dispatch seam: every op the model calls, routed to a Triton kernel or the reference.

`FASTSIGLIP_IMPL` picks the implementation:
- ``auto`` (default): the kernel for CUDA tensors in a supported case, else reference.py; an
  unsupported CUDA case falls back to the reference with a one-time warning;
- ``kernel``: always the kernel (on a CPU this needs the Triton interpreter,
  ``TRITON_INTERPRET=1`` set before triton is imported); an unsupported case raises;
- ``reference``: always reference.py.

The kernels are imported lazily, so `import fastsiglip` works without triton or a GPU; importing
them registers their custom operators (torch.ops.fastsiglip.layer_norm, .mlp, .attention,
.sigmoid_loss and the backward ones, kernels/*.py), which handle torch.autocast and
torch.compile themselves. This module also holds the varlen helpers: NaFlex padding mask <->
packed tokens + cu_seqlens, with the one data-dependent step as the operator
torch.ops.fastsiglip.mask_indices (registered here: it needs no triton).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from typing import NamedTuple

import torch

from . import reference

IMPLS = ("auto", "kernel", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATTENTION_HEAD_DIMS = (64, 72, 80, 96, 128)  # what kernels/attention.py compiles for
_warned: set[str] = set()


# using(impl): a block of eager code forced to one implementation (fastsiglip.patch(kernels=False)).
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastsiglip_impl", default=None)


@contextlib.contextmanager
def using(impl: str):
    """Within the block (this thread or task), every op takes `impl` ("auto", "kernel" or
    "reference") whatever FASTSIGLIP_IMPL says. Eager code only: torch.compile does not trace
    context variables (a graph break), so compiled code follows FASTSIGLIP_IMPL."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    token = _FORCED.set(impl)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _impl() -> str:
    if not torch.compiler.is_compiling():
        forced = _FORCED.get()
        if forced is not None:
            return forced
    impl = os.environ.get("FASTSIGLIP_IMPL", "auto").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"FASTSIGLIP_IMPL={impl!r} is not one of {', '.join(IMPLS)}")
    return impl


def _kernels():
    try:
        from fastsiglip import kernels
    except ImportError as e:  # no triton on this machine
        raise RuntimeError(
            f"FASTSIGLIP_IMPL=kernel needs triton, which could not be imported ({e}); "
            "install triton or set FASTSIGLIP_IMPL=auto"
        ) from e
    return kernels


def _use_kernel(op: str, x: torch.Tensor, unsupported: str | None) -> bool:
    """Whether `op` goes to its kernel; `unsupported` is why the kernel can't take this case."""
    impl = _impl()
    if impl == "reference":
        return False
    if impl == "kernel":
        return True  # the kernel validates and raises its own clear error
    if x.device.type != "cuda":
        return False
    if unsupported is not None:
        if op not in _warned:
            _warned.add(op)
            warnings.warn(f"fastsiglip: {op} kernel does not support {unsupported}; using the PyTorch reference",
                          stacklevel=3)
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        if "triton" not in _warned:
            _warned.add("triton")
            warnings.warn("fastsiglip: triton is not installed; using the PyTorch reference ops", stacklevel=3)
        return False
    return True


def _dtype_problem(x: torch.Tensor, *tensors, mixed_ok=False) -> str | None:
    """Why the kernel can't take x (and the other tensors) as they are, or None.

    Under torch.autocast the operators cast their inputs to the autocast dtype themselves
    (kernels/_library.py), so mixed dtypes are fine there. Outside autocast the MLP, attention
    and loss kernels take one dtype; mixed dtypes go to the reference, which follows PyTorch's
    promotion rules. LayerNorm (`mixed_ok`) takes any mix of the kernel dtypes.
    """
    dtypes = {t.dtype for t in (x, *tensors) if t is not None}
    unsupported = sorted(str(d) for d in dtypes if d not in KERNEL_DTYPES)
    if unsupported:
        return f"dtype {', '.join(unsupported)}"
    if len(dtypes) > 1 and not mixed_ok and not torch.is_autocast_enabled(x.device.type):
        return f"mixed dtypes ({', '.join(sorted(map(str, dtypes)))}) outside torch.autocast"
    return None


def layer_norm(x, weight, bias, eps=1e-6, residual=None):
    """See reference.layer_norm."""
    if _use_kernel("layer_norm", x, _dtype_problem(x, weight, bias, residual, mixed_ok=True)):
        return _kernels().layer_norm(x, weight, bias, eps, residual)
    return reference.layer_norm(x, weight, bias, eps, residual)


def mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None):
    """See reference.mlp."""
    if _use_kernel("mlp", x, _dtype_problem(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)):
        return _kernels().mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    return reference.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)


def attention(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              softmax_scale=None):
    """See reference.attention."""
    head_dim = q.shape[-1]
    problem = _dtype_problem(q, k, v) or (None if head_dim in ATTENTION_HEAD_DIMS else f"head dim {head_dim}")
    fn = _kernels().attention if _use_kernel("attention", q, problem) else reference.attention
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)


def sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size=None, *, positive_offset=0):
    """See reference.sigmoid_loss."""
    if _use_kernel("sigmoid_loss", image_embeds, _dtype_problem(image_embeds, text_embeds)):
        return _kernels().sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size,
                                       positive_offset=positive_offset)
    return reference.sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size,
                                  positive_offset=positive_offset)


# ---------------------------------------------------------------------------------------------
# Variable length: a [B, N] padding mask <-> packed tokens + cu_seqlens (FlashAttention varlen).
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastsiglip::mask_indices", mutates_args=())
def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """[T] int64: the flat indices of the nonzero entries of `mask`, in order (mask.flatten().nonzero()).

    An operator rather than a plain nonzero() so that torch.compile keeps packing inside the
    graph: its fake implementation gives T as an unbacked (data-dependent) size, which needs no
    `capture_dynamic_output_shape_ops` setting, and varying token counts never recompile.
    Eager code calls nonzero() directly (packing_from_mask): calling any custom operator eagerly
    imports torch._dynamo, and with it triton, which the reference path on a CPU never needs.
    """
    return mask.reshape(-1).nonzero().squeeze(1)


@mask_indices.register_fake
def _(mask):
    ctx = torch.library.get_ctx()
    shape_env = ctx._shape_env
    if shape_env is None or shape_env.allow_dynamic_output_shape_ops:  # fullgraph=True, export, opcheck
        return mask.new_empty(ctx.new_dynamic_size(max=None), dtype=torch.int64)
    # Plain torch.compile (not fullgraph) refuses data-dependent sizes unless
    # capture_dynamic_output_shape_ops is set, and would graph-break here, once per enclosing
    # module call. T is always a valid size (0 <= T <= mask.numel()) and every op downstream
    # takes it symbolically, so create the size directly, as torch's own device_mesh operators do.
    size = shape_env.create_unbacked_symint()
    torch._check(size >= 0)
    torch._check(size <= mask.numel())
    return mask.new_empty(size, dtype=torch.int64)


class Packing(NamedTuple):
    indices: torch.Tensor  # [T] int64: flat index (b * N + n) of each kept token, in order
    cu_seqlens: torch.Tensor  # [B + 1] int32: where each sequence starts in the packed tokens
    max_seqlen: int  # an upper bound of the sequence lengths (N: no host sync needed)
    batch: int
    seqlen: int  # N, the padded length


def packing_from_mask(mask: torch.Tensor) -> Packing:
    """Describe the tokens a [B, N] mask keeps (nonzero = real token) as a packing.

    Built once per forward with tensor ops; the only host sync is the one inside nonzero()
    (mask_indices) that sizes the packed tensor (one per batch, never one per image).
    """
    if mask.dim() != 2:
        raise ValueError(f"the attention mask must be [batch, tokens], got shape {tuple(mask.shape)}")
    keep = mask.bool()
    batch, seqlen = keep.shape
    flat = keep.reshape(-1)
    indices = mask_indices(flat) if torch.compiler.is_compiling() else flat.nonzero().squeeze(1)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=mask.device)
    torch.cumsum(keep.sum(1, dtype=torch.int32), 0, out=cu_seqlens[1:])
    return Packing(indices, cu_seqlens, seqlen, batch, seqlen)


def pack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """[B, N, ...] -> [T, ...]: the kept tokens, sequence after sequence."""
    return x.reshape((-1,) + x.shape[2:]).index_select(0, packing.indices)


def unpack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """[T, ...] -> [B, N, ...], zeros where the mask had padding."""
    out = x.new_zeros((packing.batch * packing.seqlen,) + x.shape[1:])
    out = out.index_copy(0, packing.indices, x)
    return out.view((packing.batch, packing.seqlen) + x.shape[1:])
