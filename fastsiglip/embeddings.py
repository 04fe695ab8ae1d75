"""Embeddings: FixRes patches (Conv2d plus a learned position grid, optionally resized), NaFlex
patches (Linear on patchified pixels plus the grid resized per image, computed only for the
packed real tokens) and text (token plus position tables). Used by fastsiglip.model's towers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import TextConfig, VisionConfig


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialized (_init_weights or the checkpoint fills it): torch's
    own normal_ init, on the meta device, imports torch._dynamo and with it triton (~2 s), a
    cost `fastsiglip.load` should not pay."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def _as_weight(pixels: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The pixels in the patch layer's weight dtype, as transformers casts them, when that is a
    floating dtype. A quantized layer's weight is an integer tensor (bitsandbytes) or a method
    (torch.ao): it takes float input, so the pixels stay as they are (transformers casts them to
    uint8 / int8 there, which truncates them or fails)."""
    weight = getattr(layer, "weight", None)
    return pixels.to(weight.dtype) if isinstance(weight, torch.Tensor) and weight.is_floating_point() else pixels


class PatchEmbeddings(nn.Module):
    """FixRes: Conv2d patches of a [B, C, H, W] image plus a learned (g x g) position grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.position_grid
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = _embedding(self.grid**2, cfg.hidden_size)

    def interpolate_pos_encoding(self, height: int, width: int, num_patches: int) -> torch.Tensor:
        """Position grid resized to the image's (height // p, width // p) patches, [1, N, C].

        As transformers' SiglipVisionEmbeddings (DINO's recipe): kept as is for a square image
        with as many patches as positions, else bicubic resize with align_corners=False.
        """
        table = self.position_embedding.weight  # [g*g, C]
        if num_patches == table.shape[0] and height == width:
            return table[None]
        grid = table.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # [1, C, g, g]
        size = (height // self.patch_size, width // self.patch_size)
        grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, -1, table.shape[1])

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        x = self.patch_embedding(_as_weight(pixel_values, self.patch_embedding)).flatten(2).transpose(1, 2)  # [B, N, C]
        if interpolate_pos_encoding:
            pos = self.interpolate_pos_encoding(height, width, x.shape[1])
        else:  # the module called, as transformers calls it (with its position_ids buffer)
            pos = self.position_embedding(torch.arange(x.shape[1], device=x.device)[None])
        return (x + pos).contiguous()  # the sum keeps the conv's channels-first strides


def aa_bilinear_weights(index: torch.Tensor, out_size: torch.Tensor, in_size: int) -> torch.Tensor:
    """Weights [T, in_size] of output `index` along an axis resized from `in_size` to
    `out_size` (both [T]) by F.interpolate(mode="bilinear", antialias=True, align_corners=False).

    PyTorch's (and PIL's) antialiased resampling, aten/src/ATen/native/UpSampleKernel.cpp
    `_compute_indices_min_size_weights_aa`, in float32 as there: scale = in / out; the triangle
    filter max(0, 1 - |x|) is widened by `scale` when downsampling (support = max(scale, 1));
    output i is centred at scale * (i + 0.5) and reads inputs [xmin, xmax) with
    xmin = max(floor(center - support + 0.5), 0), xmax = min(floor(center + support + 0.5), in);
    weights are normalized to sum 1 (which also clamps at the borders when upsampling).
    One difference from transformers on CPU: torch's CPU kernel (2.13) returns wrong values for
    an output width of 1 and height != input (it repeats the first row's result); this follows
    the algorithm, i.e. what the transposed (1, h) resize gives.
    """
    scale = in_size / out_size.float()  # [T]
    support = scale.clamp(min=1.0)
    center = scale * (index.float() + 0.5)
    xmin = torch.floor(center - support + 0.5).clamp(min=0)
    xmax = torch.floor(center + support + 0.5).clamp(max=in_size)
    j = torch.arange(in_size, device=index.device, dtype=torch.float32)  # [G]
    invscale = 1.0 / support
    w = (1.0 - ((j - center[:, None] + 0.5) * invscale[:, None]).abs()).clamp(min=0.0)  # [T, G]
    w = w * ((j >= xmin[:, None]) & (j < xmax[:, None]))
    return w / w.sum(-1, keepdim=True)


class NaFlexEmbeddings(nn.Module):
    """NaFlex: Linear patches of patchified pixels plus a learned square position grid,
    resized per image to its (h, w) patches, computed only for the packed real tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.grid = cfg.position_grid
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.num_patches, cfg.hidden_size)

    def positions(self, packing: ops.Packing, spatial_shapes: torch.Tensor) -> torch.Tensor:
        """[T, C]: the grid resized to each token's image size, read at the token's place.

        transformers resizes the grid once per image (a Python loop) and gives position n of
        an image of (h, w) patches the entry (n // w, n % w), and padded places (n >= h * w)
        entry 0. Here the separable weights of every token are built at once: the resized
        entry is sum_ij wy[i] wx[j] grid[i, j], one [T, g*g] @ [g*g, C] product.
        """
        image = packing.indices // packing.seqlen  # [T] image of each token
        n = packing.indices % packing.seqlen  # [T] place inside the (padded) image sequence
        h, w = spatial_shapes[image, 0], spatial_shapes[image, 1]  # [T]
        n = torch.where(n < h * w, n, 0)
        wy = aa_bilinear_weights(n // w, h, self.grid)  # [T, g]
        wx = aa_bilinear_weights(n % w, w, self.grid)  # [T, g]
        table = self.position_embedding.weight
        # transformers resizes in float32 on CPU (no low-precision antialias there); float32 here
        # everywhere, then the model's dtype.
        pos = (wy[:, :, None] * wx[:, None, :]).flatten(1) @ table.float()  # [T, C]
        return pos.to(table.dtype)

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor,
                packing: ops.Packing | None = None) -> torch.Tensor:
        """[T, C] for the real tokens of `packing`; without it [B, N, C], transformers' layout and
        calls (patch_embedding on [B, N, P]; padded places get grid entry 0, as transformers')."""
        if packing is None:
            batch, n = pixel_values.shape[:2]
            every = ops.Packing(torch.arange(batch * n, device=pixel_values.device), None, n, batch, n)
            patches = self.patch_embedding(_as_weight(pixel_values, self.patch_embedding))  # [B, N, C]
            return patches + self.positions(every, spatial_shapes).view(batch, n, -1)
        pixels = ops.pack(pixel_values, packing)  # [T, P]
        return self.patch_embedding(_as_weight(pixels, self.patch_embedding)) + self.positions(packing, spatial_shapes)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # [1, L]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)  # [B, L, C]
