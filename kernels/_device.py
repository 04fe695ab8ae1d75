"""What every kernel file needs to know about where it runs.

INTERPRET: whether triton runs kernels in its CPU interpreter. triton decides this once, when a
kernel is defined (import time), from TRITON_INTERPRET; so it is read once here as well: setting
the variable later does not make a kernel interpreted, and must not let CPU tensors through.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_device(op: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """All of `tensors` (None entries skipped) on one device: CUDA, or the CPU under the interpreter."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, but they are on different devices ({where}); "
                         "move them to one device")
    device = next(iter(devices.values()))
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        raise ValueError(f"{op}: the Triton kernel needs CUDA tensors, got {device}; move the inputs to CUDA, or "
                         f"use fastsiglip.reference.{op} (FASTSIGLIP_IMPL=reference), or set TRITON_INTERPRET=1 "
                         "before importing triton to run the kernel on the CPU")
