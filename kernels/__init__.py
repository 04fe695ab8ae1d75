"""Triton kernels, installed as `fastsiglip.kernels`: one public function per file.

A leaf package: imports torch, triton and its siblings, nothing from fastsiglip. Each function
has the signature of its twin in fastsiglip/reference.py and is differentiable. Importing the
package registers the kernels as PyTorch custom operators, torch.ops.fastsiglip.layer_norm,
.mlp, .attention, .sigmoid_loss and their backward operators (see docs/architecture.md).
"""

from .attention import attention
from .layer_norm import layer_norm
from .mlp import mlp
from .sigmoid_loss import sigmoid_loss

__all__ = ["attention", "layer_norm", "mlp", "sigmoid_loss"]
