"""fastsiglip: SigLIP and SigLIP 2 encoders for PyTorch, rewritten around Triton kernels."""

from . import config, ops, reference

__version__ = "0.1.0"
