"""fastsiglip: SigLIP and SigLIP 2 encoders for PyTorch, rewritten around Triton kernels.

    model = fastsiglip.load("google/siglip2-base-patch16-224")     # transformers' checkpoints
    processor = fastsiglip.load_processor("google/siglip2-base-patch16-224")
    fastsiglip.zero_shot(model, ["cat.jpg"], ["cat", "dog"])

Importing fastsiglip needs neither triton nor a GPU nor transformers: the Triton kernels
(fastsiglip.kernels) are imported on first use, by fastsiglip.ops, for CUDA tensors.
"""

from . import config, ops, reference
from .api import classify, embed_files, embed_texts, encode_images, encode_texts, zero_shot
from .config import ModelConfig, preset
from .loading import CheckpointError, load, resolve
from .model import SiglipForImageClassification, SiglipModel, SiglipTextModel, SiglipVisionModel, build
from .ops import sigmoid_loss
from .patch import patch, patched, unpatch
from .processing import load_processor
from .tokenizer import Tokenizer, load_tokenizer
from .train import SigmoidLoss, distributed_sigmoid_loss, finetune

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ModelConfig", "SiglipForImageClassification", "SiglipModel", "SiglipTextModel",
    "SiglipVisionModel", "SigmoidLoss", "Tokenizer", "build", "classify", "distributed_sigmoid_loss", "embed_files", "embed_texts", "encode_images", "encode_texts", "finetune", "load", "load_processor",
    "load_tokenizer", "patch", "patched", "preset", "resolve", "sigmoid_loss", "unpatch", "zero_shot",
]
