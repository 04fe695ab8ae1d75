"""What every kernel file needs to register its kernel as a PyTorch custom operator.

Each kernel file defines its operators next to the kernel, in the `fastsiglip` namespace
(torch.ops.fastsiglip.<name>), with torch.library: `custom_op` (the Triton launch), `register_fake`
(shapes and dtypes only, for torch.compile and FakeTensor tracing) and `register_autograd`. They
are registered when `fastsiglip.kernels` is first imported, which fastsiglip.ops does lazily, so
`import fastsiglip` still never imports triton.

This file adds the one rule torch.library has no call for: autocast to the *current* autocast
dtype. (`torch.library.register_autocast` casts to one dtype fixed at registration; a model
trained under bf16 autocast and evaluated under fp16 autocast needs both.) Under torch.autocast,
each op's rule casts its inputs as the op's docstring says, then calls the op again with autocast
off, below the Autocast dispatch key: the kernel runs in the autocast dtype, and autograd records
the casts, so gradients reach float32 parameters in float32.
"""

from __future__ import annotations

import torch

LIB = torch.library.Library("fastsiglip", "FRAGMENT")
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
# The dtypes autocast casts (float64 is never cast, as in PyTorch's own autocast).
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in `dtype` if it is a float16/bfloat16/float32 tensor (autocast's rule), else t itself."""
    return t.to(dtype) if t is not None and t.dtype in _CASTABLE else t


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast casts to on `device_type` right now, or None if it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def register_autocast(name: str, rule) -> None:
    """Under torch.autocast, torch.ops.fastsiglip.<name>(*args) runs as op(*rule(dtype, *args))
    with autocast off; `dtype` is the autocast dtype of the device type."""
    op = getattr(torch.ops.fastsiglip, name).default

    def make(device_type):
        def kernel(*args):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return op(*rule(dtype, *args))

        return kernel

    for device_type in AUTOCAST_DEVICE_TYPES:
        LIB.impl(name, make(device_type), "Autocast" + device_type.upper())
