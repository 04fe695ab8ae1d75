"""The exact large-batch step: GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"), made SigLIP-aware.

The sigmoid loss couples every image with every text of the global batch, so the batch cannot
be cut into independent pieces (naive gradient accumulation changes the loss: fewer
negatives). But the loss depends on the encoders only through the embeddings, so

    dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta)

and the two factors can be computed apart:
  pass 1  every micro-batch is encoded without autograd; only the embeddings [b, D] are kept;
  loss    one sigmoid loss over the global batch (ops.sigmoid_loss, across ranks through
          distributed_sigmoid_loss) on detached embeddings gives the loss, G = dL/de, and the
          logit_scale / logit_bias gradients, once;
  pass 2  each micro-batch is encoded again with autograd and backpropagates
          sum_i <e_i, G_i> over its rows (whose gradient is exactly its slice of G).
The random state of each micro-batch's pass-1 forward (CPU and CUDA) is replayed in its pass-2
forward, so a stochastic layer (dropout, drop-path) draws the same values twice and the step
stays exact; after pass 2 the state is what pass 1 left. Under DDP the gradients are
synchronized once, after the last micro-batch (no_sync before).

With one micro-batch per step there is one forward with autograd and one backward: the loss
is still computed on detached embeddings (cheap, [b, D]) so that its collectives (the text
all-gather and its reduce-scatter) never interleave with DDP's gradient buckets.

A locked tower (LiT: --lock-image / --lock-text) is encoded once, in pass 1, without autograd.
logit_scale / logit_bias are not in DDP's care (they are not used in the towers' forward); the
caller averages their gradients over ranks (`average_logit_grads`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from .loss import distributed_sigmoid_loss

def logit_param_names(towers: nn.Module) -> list[str]:
    """The names, inside `towers`, of the model's logit_scale and logit_bias (found by identity:
    inside a peft model they sit under base_model.model), which DDP must ignore: the step
    averages their gradients itself (average_logit_grads)."""
    model = towers.model
    wanted = {id(model.logit_scale), id(model.logit_bias)}
    return [name for name, p in towers.named_parameters(remove_duplicate=False) if id(p) in wanted]


class Towers(nn.Module):
    """What DDP wraps: the model's two encoders, called with whichever inputs are given;
    returns L2-normalized embeddings (float32 when the encoders ran in bf16/fp16)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_inputs: dict | None = None, input_ids: torch.Tensor | None = None):
        image = text = None
        if pixel_inputs is not None:
            image = _normalized(self.model.get_image_features(**pixel_inputs))
        if input_ids is not None:
            text = _normalized(self.model.get_text_features(input_ids=input_ids))
        return image, text


def _normalized(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||, as SiglipModel.forward; low-precision outputs go to float32 first (the loss
    statistics are float32)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return x / x.norm(p=2, dim=-1, keepdim=True)


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class ExactStep:
    """One training step's gradients (not the optimizer update) for one rank.

    towers: a Towers, or DDP(Towers); to_inputs(micro) -> (pixel inputs, input_ids) on the
    device, called once per pass and micro-batch (the micro-batches stay compact until then);
    train_image / train_text: False for a locked tower; autocast: a context manager factory.
    Calling it with this rank's micro-batches accumulates the gradients of the global loss into
    .grad (DDP-averaged tower gradients; logit gradients of this rank's share, to be averaged
    with `average_logit_grads`) and returns this rank's loss share L_r (detached).
    """

    def __init__(self, towers: nn.Module, to_inputs, *, device, train_image: bool = True, train_text: bool = True,
                 autocast=contextlib.nullcontext, distributed: bool = False):
        if not (train_image or train_text):
            raise ValueError("both towers are locked: nothing to train (drop --lock-image or --lock-text)")
        self.towers = towers
        self.ddp = isinstance(towers, nn.parallel.DistributedDataParallel)
        self.inner = towers.module if self.ddp else towers
        self.to_inputs = to_inputs
        self.device = torch.device(device)
        self.train_image, self.train_text = train_image, train_text
        self.autocast = autocast
        self.distributed = distributed

    def loss(self, image, text):
        model = self.inner.model
        if self.distributed:
            return distributed_sigmoid_loss(image, text, model.logit_scale, model.logit_bias)
        return ops.sigmoid_loss(image, text, model.logit_scale, model.logit_bias)

    def _encode(self, towers, micro, image: bool, text: bool):
        pixels, ids = self.to_inputs(micro)
        with self.autocast():
            return towers(pixels if image else None, ids if text else None)

    def __call__(self, micros: list) -> torch.Tensor:
        if len(micros) == 1:
            return self._single(micros[0])
        return self._two_pass(micros)

    def _frozen(self, micro):
        """Embeddings of the locked tower(s), without autograd: (image or None, text or None)."""
        lock_img, lock_txt = not self.train_image, not self.train_text
        if not (lock_img or lock_txt):
            return None, None
        with torch.no_grad():
            return self._encode(self.inner, micro, lock_img, lock_txt)

    def _loss_grads(self, image, text):
        """Loss on detached leaves; backward gives G for the trained towers and the logit grads."""
        image = image.detach().requires_grad_(self.train_image)
        text = text.detach().requires_grad_(self.train_text)
        loss = self.loss(image, text)
        loss.backward()
        return loss.detach(), image.grad, text.grad

    def _single(self, micro) -> torch.Tensor:
        frozen_img, frozen_txt = self._frozen(micro)
        img, txt = self._encode(self.towers, micro, self.train_image, self.train_text)
        img = frozen_img if img is None else img
        txt = frozen_txt if txt is None else txt
        loss, g_img, g_txt = self._loss_grads(img, txt)
        self._backward(img, txt, g_img, g_txt)
        return loss

    def _backward(self, img, txt, g_img, g_txt) -> None:
        outputs, grads = [], []
        if self.train_image:
            outputs.append(img)
            grads.append(g_img)
        if self.train_text:
            outputs.append(txt)
            grads.append(g_txt)
        torch.autograd.backward(outputs, grads)

    def _two_pass(self, micros: list) -> torch.Tensor:
        # Pass 1: embeddings only, and the random state each forward started from.
        states, images, texts = [], [], []
        with torch.no_grad():
            for micro in micros:
                states.append(_rng_state(self.device))
                img, txt = self._encode(self.inner, micro, True, True)
                images.append(img)
                texts.append(txt)
        after = _rng_state(self.device)
        sizes = [t.shape[0] for t in texts]
        loss, g_img, g_txt = self._loss_grads(torch.cat(images), torch.cat(texts))
        g_img = g_img.split(sizes) if g_img is not None else [None] * len(micros)
        g_txt = g_txt.split(sizes) if g_txt is not None else [None] * len(micros)
        # Pass 2: re-encode the trained tower(s) with autograd, backprop each slice of G.
        for i, micro in enumerate(micros):
            _set_rng_state(states[i], self.device)
            last = i == len(micros) - 1
            sync = contextlib.nullcontext() if last or not self.ddp else self.towers.no_sync()
            with sync:
                img, txt = self._encode(self.towers, micro, self.train_image, self.train_text)
                self._backward(img, txt, g_img[i], g_txt[i])
        _set_rng_state(after, self.device)
        return loss


def average_logit_grads(model: nn.Module, world_size: int) -> None:
    """Mean over ranks of the logit_scale / logit_bias gradients (each rank holds the gradient
    of its own loss share L_r; the global loss is mean_r L_r)."""
    if world_size == 1:
        return
    params = [p for p in (model.logit_scale, model.logit_bias) if p.requires_grad]
    if not params:
        return
    grads = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                       for p in params])
    dist.all_reduce(grads)
    grads /= world_size
    for p, g in zip(params, grads.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()
