"""Contrastive fine-tuning pieces: the SigLIP loss as a criterion, on one GPU or many.

`SigmoidLoss` holds the two learned scalars (logit_scale, applied as exp, and logit_bias) and
calls `ops.sigmoid_loss` (the chunked Triton kernel on CUDA, the reference on CPU), or, with
`distributed=True`, `distributed_sigmoid_loss`, which gives every rank the exact global-batch
loss and gradients.

Distributed convention (as open_clip's SigLipLoss: each rank's images, over their count): with
W ranks each holding b image-text pairs (global batch B = W * b, pair k of rank r is global pair r * b + k),
rank r all-gathers the text embeddings (with autograd) and computes the loss of its b images
against all B texts, positives where global image index == global text index:
    L_r = -sum_{i in rank r, all j} logsigmoid(z_ij l_ij) / b
so the global loss (single-process value on the concatenated batch) is mean_r L_r. Backward
sends each d text back to the rank that owns it, summed over ranks (the all-gather's backward
is a reduce-scatter). Hence, for every parameter theta (encoders, logit_scale, logit_bias):
    mean_r dL_r/dtheta (through rank r's own embeddings and its texts' gradients from all ranks)
        = d(global loss)/dtheta,
which is exactly what DistributedDataParallel produces (it averages gradients over ranks):
wrap the model in DDP, call `loss = criterion(img, txt)` and `loss.backward()` on every rank,
and the gradients equal the single-process ones on the whole batch. Without DDP, all-reduce the
gradients and divide by W. To log the global loss, all-reduce the detached L_r and divide by W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..model import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT  # the paper's init, as SiglipModel's


def _all_gather_with_grad(x: torch.Tensor, group) -> list[torch.Tensor]:
    import torch.distributed.nn.functional as dist_nn  # autograd-aware collectives

    return list(dist_nn.all_gather(x, group=group))


def distributed_sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, group=None, chunk_size=None):
    """This rank's share L_r of the global-batch sigmoid loss; mean over ranks = global loss.

    image_embeds [b_img, D], text_embeds [b_txt, D]: this rank's pairs (every rank must hold the
    same b_img and b_txt: a tiny all-gather of the sizes checks it). Texts are gathered with
    autograd (torch.distributed.nn.functional.all_gather), then ops.sigmoid_loss computes the
    [b_img, W * b_txt] block in chunks with the positives at global image index == global text
    index. See the module docstring for how gradients combine under DDP. With no process group
    initialized, or a world of one, this is ops.sigmoid_loss.
    """
    if not isinstance(image_embeds, torch.Tensor) or not isinstance(text_embeds, torch.Tensor):
        raise TypeError("distributed_sigmoid_loss: image_embeds and text_embeds must be tensors")
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise ValueError(f"distributed_sigmoid_loss: expected image_embeds [b_img, D] and text_embeds "
                         f"[b_txt, D], got shapes {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed_sigmoid_loss: no torch.distributed process group is initialized; call "
                           "torch.distributed.init_process_group first, or use SigmoidLoss(distributed=False)")
    world = dist.get_world_size(group)
    if world == 1:
        return ops.sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size)
    rank = dist.get_rank(group)
    # Sizes on the embeddings' device: NCCL only moves CUDA tensors, gloo CPU ones.
    sizes = torch.tensor([image_embeds.shape[0], text_embeds.shape[0], text_embeds.shape[1]],
                         device=text_embeds.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    all_sizes = torch.stack(all_sizes).cpu()  # [W, 3]
    if not bool((all_sizes == all_sizes[0]).all()):
        raise ValueError(f"distributed_sigmoid_loss: every rank must hold the same number of images, texts and "
                         f"the same D; got (b_img, b_txt, D) per rank = {all_sizes.tolist()}; drop the last "
                         "incomplete batch (DataLoader(drop_last=True)) or pad the batches evenly")
    texts = torch.cat(_all_gather_with_grad(text_embeds.contiguous(), group), dim=0)  # [W * b_txt, D]
    return ops.sigmoid_loss(image_embeds, texts, logit_scale, logit_bias, chunk_size,
                            positive_offset=rank * image_embeds.shape[0])


class SigmoidLoss(nn.Module):
    """SigLIP's sigmoid loss as a fine-tuning criterion: `loss = criterion(image_embeds, text_embeds)`.

    Holds `logit_scale` (log of the scale, applied as exp) and `logit_bias` as learnable
    one-element parameters, initialized as in the paper (log 10 and -10), from given values, or
    from a loaded model with `SigmoidLoss.from_model(model)` (copies its two scalars).
    The embeddings must be L2-normalized (as the model's image/text embeddings are).
    `distributed=True` computes this rank's share of the global-batch loss
    (`distributed_sigmoid_loss`, see this module's docstring for the DDP convention); its two
    parameters then need DDP's gradient averaging too: register the criterion inside the
    DDP-wrapped module, or all-reduce their gradients and divide by the world size.
    """

    def __init__(self, logit_scale=LOGIT_SCALE_INIT, logit_bias=LOGIT_BIAS_INIT, distributed=False, group=None,
                 chunk_size=None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.as_tensor(logit_scale, dtype=torch.float32).detach().clone().reshape(1))
        self.logit_bias = nn.Parameter(torch.as_tensor(logit_bias, dtype=torch.float32).detach().clone().reshape(1))
        self.distributed = distributed
        self.group = group
        self.chunk_size = chunk_size

    @classmethod
    def from_model(cls, model, **kwargs) -> SigmoidLoss:
        """A criterion starting from a loaded model's `logit_scale` and `logit_bias`."""
        if not (hasattr(model, "logit_scale") and hasattr(model, "logit_bias")):
            raise ValueError(f"SigmoidLoss.from_model: {type(model).__name__} has no logit_scale / logit_bias; pass "
                             "a two-tower model (SiglipModel), or give the values directly")
        crit = cls(model.logit_scale.detach().float().cpu(), model.logit_bias.detach().float().cpu(), **kwargs)
        return crit.to(model.logit_scale.device)

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            return distributed_sigmoid_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias,
                                            self.group, self.chunk_size)
        return ops.sigmoid_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias, self.chunk_size)

    def extra_repr(self) -> str:
        return f"distributed={self.distributed}, chunk_size={self.chunk_size}"


__all__ = ["SigmoidLoss", "distributed_sigmoid_loss", "LOGIT_SCALE_INIT", "LOGIT_BIAS_INIT"]
