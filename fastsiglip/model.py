"""The SigLIP / SigLIP 2 network, top-down, in plain PyTorch over `fastsiglip.ops`.

Reads in order: attention, MLP, encoder layer, encoder, MAP pooling head, vision tower, text
tower, the two-tower model, the tower-only models and the image-classification model, then
`build`. The embeddings live in embeddings.py, the output dataclasses in outputs.py (both
re-exported here).

Parameter names and shapes are those of transformers' state dicts (`vision_model.*`,
`text_model.*`, `logit_scale`, `logit_bias`, `classifier.*`); there are no buffers, so a model
built under `torch.device("meta")` is complete once the checkpoint tensors are assigned.

Two layouts of tokens reach attention:
- dense: [B, N, C], every token real (FixRes images, text without a mask);
- varlen (FlashAttention's convention): packed tokens plus int32 `cu_seqlens`. NaFlex images
  are packed ONCE from `pixel_attention_mask` and the whole encoder runs on the real tokens
  [T, C]; padded positions of `last_hidden_state` are zeros (transformers computes them and
  never uses them). Masked text keeps every query (transformers pools the last position, which
  may be padding) and packs only the keys.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import ops
from .config import ModelConfig, TextConfig, VisionConfig
from .embeddings import NaFlexEmbeddings, PatchEmbeddings, TextEmbeddings, aa_bilinear_weights  # noqa: F401
from .outputs import BaseModelOutputWithPooling, ImageClassifierOutput, ModelOutput, SiglipOutput  # noqa: F401

INIT_STD = 0.02  # normal init of every weight matrix and embedding of a random-weight model
LOGIT_SCALE_INIT = math.log(10.0)  # SigLIP paper (Zhai et al. 2023), sec. 3.2: t' = log 10
LOGIT_BIAS_INIT = -10.0  # and b = -10


class Layout(NamedTuple):
    """How attention sees the tokens when they are not dense [B, N, C]: FlashAttention varlen.

    Queries are all tokens flattened ([Tq, C]); keys are the same tokens, or the subset
    `key_indices` of them when only some may be attended to (masked text).
    """

    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    key_indices: torch.Tensor | None = None  # [Tk] int64, into the flattened query tokens


def _fixed_cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    """cu_seqlens of `batch` sequences of `seqlen` tokens each: [0, N, 2N, ..., BN]."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


def _attend(q, k, v, layout: Layout | None):
    """ops.attention on [..., H, D] projections laid out as `layout` says; output like q."""
    if layout is None:
        return ops.attention(q, k, v)  # [B, N, H, D]
    shape = q.shape
    q, k, v = q.flatten(0, -3), k.flatten(0, -3), v.flatten(0, -3)  # [T, H, D]
    if layout.key_indices is not None:
        k, v = k.index_select(0, layout.key_indices), v.index_select(0, layout.key_indices)
    out = ops.attention(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k)
    return out.view(shape)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention, softmax scale head_dim ** -0.5.

    q, k and v come from one [3C, C] GEMM (F.linear against the three weights concatenated),
    which writes [..., 3C]; q, k and v are strided views of it (token stride 3C, head stride D),
    which the attention kernel reads as they are (kernels/attention.py `_rows`: unit stride
    along D, other strides multiples of 8). The parameters stay transformers' q_proj, k_proj and
    v_proj, so state dicts, named_parameters and checkpoints are unchanged; the price is
    concatenating the three weights on every call (3 C^2 elements copied, against the GEMM's
    3 T C^2 multiply-adds; autograd hands each weight its slice of the gradient).
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])  # [3C, C]
        bias = torch.cat([p.bias for p in projections])  # [3C]
        qkv = F.linear(x, weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim))  # [..., 3, H, D]
        q, k, v = qkv.unbind(-3)  # each [B, N, H, D] or [T, H, D], token stride 3C
        return self.out_proj(_attend(q, k, v, layout).flatten(-2))


class MLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))), one ops.mlp call."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual)


def _norm(ln: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor | None = None):
    """(LN(x + residual), x + residual) through ops.layer_norm; (LN(x), x) without residual."""
    if residual is None:
        return ops.layer_norm(x, ln.weight, ln.bias, ln.eps), x
    return ops.layer_norm(x, ln.weight, ln.bias, ln.eps, residual=residual)


class EncoderLayer(nn.Module):
    """Pre-LN block: x = x + attn(LN1(x)); x = x + mlp(LN2(x)).

    The residual stream travels as (delta, stream) with x = delta + stream, so that every
    residual add happens inside the next LayerNorm (ops.layer_norm's fused residual form):
    LN1 adds the previous block's MLP output, LN2 adds this block's attention output.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = Attention(hidden_size, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = MLP(hidden_size, intermediate_size)

    def forward(self, delta, stream, layout: Layout | None):
        h, stream = _norm(self.layer_norm1, delta, stream)
        h, stream = _norm(self.layer_norm2, self.self_attn(h, layout), stream)
        return self.mlp(h), stream


class Encoder(nn.Module):
    """The encoder layers. With `gradient_checkpointing` on (the models'
    gradient_checkpointing_enable), each layer in training mode keeps only its inputs and is run
    again during backward (torch.utils.checkpoint, `checkpoint_kwargs`)."""

    def __init__(self, cfg: VisionConfig | TextConfig):
        super().__init__()
        args = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(*args) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict = {}

    def forward(self, x: torch.Tensor, layout: Layout | None, final_norm: nn.LayerNorm,
                hidden_states: list | None = None) -> torch.Tensor:
        """The layers, then the tower's final LayerNorm fused with the last residual add.

        A `hidden_states` list receives the residual stream delta + stream before every layer
        and after the last, before the final norm: transformers' output_hidden_states (the
        sum its `residual + mlp(...)` forms)."""
        delta, stream = x, None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(delta if stream is None else delta + stream)
            if checkpointing:
                delta, stream = torch.utils.checkpoint.checkpoint(layer, delta, stream, layout,
                                                                  **self.checkpoint_kwargs)
            else:
                delta, stream = layer(delta, stream, layout)
        if hidden_states is not None:
            hidden_states.append(delta if stream is None else delta + stream)
        return _norm(final_norm, delta, stream)[0]


class PoolingAttention(nn.Module):
    """The parameters of the MAP head's nn.MultiheadAttention, under the same names."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))  # q, k, v stacked
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)


class MultiheadAttentionPoolingHead(nn.Module):
    """MAP head (big_vision's MAPHead): a learned probe attends over each image's tokens, then
    x + mlp(LN(x)). One probe per image through varlen attention (cu_seqlens_q = 0..B)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.attention = PoolingAttention(cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x: [T, C] the tokens of B images packed by `cu_seqlens` [B + 1] -> [B, C]."""
        batch, channels = cu_seqlens.numel() - 1, x.shape[-1]
        heads = (self.num_heads, channels // self.num_heads)
        wq, wk, wv = self.attention.in_proj_weight.chunk(3)
        bq, bk, bv = self.attention.in_proj_bias.chunk(3)
        q = F.linear(self.probe.reshape(1, channels), wq, bq).view(1, *heads).expand(batch, *heads)  # [B, H, D]
        k, v = F.linear(x, wk, bk).view(-1, *heads), F.linear(x, wv, bv).view(-1, *heads)  # [T, H, D]
        cu_q = _fixed_cu_seqlens(batch, 1, x.device)  # one query per image
        out = ops.attention(q.contiguous(), k, v, cu_q, cu_seqlens, 1, max_seqlen)  # [B, H, D]
        out = self.attention.out_proj(out.reshape(batch, channels))
        return self.mlp(_norm(self.layernorm, out)[0], residual=out)  # [B, C]


# ---------------------------------------------------------------------------------------------
# Towers
# ---------------------------------------------------------------------------------------------


def _check_fixres_pixels(pixel_values, cfg: VisionConfig, interpolate: bool, mask, shapes) -> None:
    if mask is not None or shapes is not None:
        raise ValueError("pixel_attention_mask and spatial_shapes are for NaFlex (siglip2) checkpoints; this is a "
                         "FixRes model: pass only pixel_values [batch, channels, height, width]")
    c, p = cfg.num_channels, cfg.patch_size
    if pixel_values.dim() != 4 or pixel_values.shape[1] != c:
        raise ValueError(f"pixel_values must be [batch, {c}, height, width], got shape {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds an empty batch; pass at least one image")
    height, width = pixel_values.shape[-2:]
    if height < p or width < p:
        raise ValueError(f"the image ({height}x{width}) is smaller than one {p}x{p} patch")
    if not interpolate and (height // p, width // p) != (cfg.position_grid,) * 2:
        raise ValueError(f"this model takes {cfg.image_size}x{cfg.image_size} images, got {height}x{width}: resize "
                         f"them (the processor does) or pass interpolate_pos_encoding=True")


def _check_naflex_pixels(pixel_values, cfg: VisionConfig, interpolate: bool, mask, shapes) -> None:
    if mask is None or shapes is None:
        raise ValueError("NaFlex (siglip2) models need pixel_attention_mask [batch, patches] and spatial_shapes "
                         "[batch, 2] besides pixel_values, as the Siglip2 image processor returns them")
    if interpolate:
        raise ValueError("interpolate_pos_encoding is for FixRes models; NaFlex resizes its position embeddings "
                         "to each image's spatial_shapes")
    dim = cfg.num_channels * cfg.patch_size**2
    if pixel_values.dim() != 3 or pixel_values.shape[-1] != dim:
        raise ValueError(f"NaFlex pixel_values must be patchified, [batch, patches, {dim}] "
                         f"(channels * patch_size**2), got shape {tuple(pixel_values.shape)}")
    batch, patches = pixel_values.shape[:2]
    if batch == 0 or patches == 0:
        raise ValueError(f"pixel_values holds no patches (shape {tuple(pixel_values.shape)}); pass at least one image")
    if tuple(mask.shape) != (batch, patches):
        raise ValueError(f"pixel_attention_mask must be [batch, patches] = {(batch, patches)}, got {tuple(mask.shape)}")
    if tuple(shapes.shape) != (batch, 2):
        raise ValueError(f"spatial_shapes must be [batch, 2] = {(batch, 2)}, got {tuple(shapes.shape)}")
    h, w = shapes[:, 0], shapes[:, 1]
    valid = ((h > 0) & (w > 0) & (h * w <= patches)).all()
    message = f"every spatial_shapes (h, w) must be positive with h * w <= {patches} patches"
    if torch.compiler.is_compiling():  # inside torch.compile: an assert in the graph, no host read
        torch._assert_async(valid, message)
    elif not bool(valid):  # eager: one small host read per batch, and the values in the message
        raise ValueError(f"{message}, got {shapes.tolist()}")


class VisionTransformer(nn.Module):
    """The vision tower: embeddings, encoder, post_layernorm, MAP head (both families)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = NaFlexEmbeddings(cfg) if cfg.naflex else PatchEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.vision_use_head:
            self.head = MultiheadAttentionPoolingHead(cfg)

    def forward(self, pixel_values, pixel_attention_mask=None, spatial_shapes=None, interpolate_pos_encoding=False,
                pool: bool = True, output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        """pool=False skips the MAP head (pooler_output None), as classification needs."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        check = _check_naflex_pixels if self.config.naflex else _check_fixres_pixels
        check(pixel_values, self.config, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes)
        pool = pool and self.config.vision_use_head
        states = [] if output_hidden_states else None
        if self.config.naflex:
            # The processor returns the mask and shapes on the CPU; a caller may move only the pixels.
            device = pixel_values.device
            pixel_attention_mask, spatial_shapes = pixel_attention_mask.to(device), spatial_shapes.to(device)
            packing = ops.packing_from_mask(pixel_attention_mask)
            x = self.embeddings(pixel_values, spatial_shapes, packing)  # [T, C]
            cu, n = packing.cu_seqlens, packing.max_seqlen
            x = self.encoder(x, Layout(cu, cu, n, n), self.post_layernorm, states)  # [T, C]
            pooled = self.head(x, cu, n) if pool else None
            hidden = None if states is None else tuple(ops.unpack(h, packing) for h in states)
            return BaseModelOutputWithPooling(ops.unpack(x, packing), pooled, hidden)  # [B, N, C], zeros at padding
        x = self.embeddings(pixel_values, interpolate_pos_encoding)  # [B, N, C]
        x = self.encoder(x, None, self.post_layernorm, states)
        batch, n = x.shape[:2]
        pooled = self.head(x.flatten(0, 1), _fixed_cu_seqlens(batch, n, x.device), n) if pool else None
        return BaseModelOutputWithPooling(x, pooled, None if states is None else tuple(states))


def _check_text(input_ids, attention_mask, position_ids, cfg: TextConfig) -> None:
    if input_ids is None:
        raise ValueError("input_ids is required (token ids from the tokenizer, padded to max_length)")
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be integer [batch, length], got {input_ids.dtype} {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids holds no tokens (shape {tuple(input_ids.shape)}); pass at least one text")
    if length > cfg.max_position_embeddings:
        raise ValueError(f"input_ids has {length} tokens, more than the model's {cfg.max_position_embeddings} "
                         f"positions: truncate to max_length={cfg.max_position_embeddings}")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must have input_ids' shape {(batch, length)}, "
                         f"got {tuple(attention_mask.shape)}")
    if position_ids is not None and (position_ids.dim() not in (1, 2) or position_ids.shape[-1] != length):
        raise ValueError(f"position_ids must be [length] or [batch, length] with length {length}, "
                         f"got {tuple(position_ids.shape)}")


class TextTransformer(nn.Module):
    """The text tower: embeddings, encoder, final_layer_norm, last token through `head`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.projection_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None,
                output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        _check_text(input_ids, attention_mask, position_ids, self.config)
        if position_ids is not None:
            position_ids = position_ids.to(input_ids.device)
        x = self.embeddings(input_ids, position_ids)  # [B, L, C]
        layout = None
        if attention_mask is not None:
            # transformers masks the keys only: every query, padding included, is computed.
            batch, length = input_ids.shape
            keys = ops.packing_from_mask(attention_mask.to(x.device))  # the packing lives where the tokens do
            all_tokens = _fixed_cu_seqlens(batch, length, x.device)
            layout = Layout(all_tokens, keys.cu_seqlens, length, length, keys.indices)
        states = [] if output_hidden_states else None
        x = self.encoder(x, layout, self.final_layer_norm, states)  # [B, L, C]
        # Pooled = the last position (SigLIP pads to max_length; it may be padding, as in transformers).
        return BaseModelOutputWithPooling(x, self.head(x[:, -1]), None if states is None else tuple(states))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _init_weights(model: nn.Module) -> None:
    """Random weights for a model built from a preset: normal(0, INIT_STD) matrices and
    embeddings, zero biases, unit LayerNorm scales, the paper's logit scale and bias.
    Nothing to do on the meta device (the loader assigns every tensor; and torch's meta
    normal_ imports torch._dynamo, hence triton, which `load` should not pay for)."""
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=INIT_STD)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PoolingAttention):
            nn.init.normal_(m.in_proj_weight, std=INIT_STD)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, MultiheadAttentionPoolingHead):
            nn.init.normal_(m.probe, std=INIT_STD)
    if isinstance(model, SiglipModel):
        model.logit_scale.fill_(LOGIT_SCALE_INIT)
        model.logit_bias.fill_(LOGIT_BIAS_INIT)


def _check_no_attentions(output_attentions) -> None:
    if output_attentions:
        raise ValueError("output_attentions=True is not supported: fastsiglip's attention (FlashAttention-style) "
                         "never forms the attention matrix; use transformers' eager attention for attention maps")


def _check_image_head(vision: VisionTransformer) -> None:
    """An image embedding is the MAP head's output: raise before any work if the tower has none."""
    if not vision.config.vision_use_head:
        raise ValueError("this vision tower has no pooling head (vision_use_head=False), so no image embedding; "
                         "use last_hidden_state from the vision tower's forward pass")


def _tower_config(config: ModelConfig, name: str, cls: str):
    tower = getattr(config, name)
    if tower is None:
        raise ValueError(f"{cls} needs a {name} config, and this ModelConfig ({config.architecture}) has none")
    return tower


def _positional(fixres: tuple[str, ...], naflex: tuple[str, ...]):
    """Bind positional arguments in transformers' order for the model's family.

    transformers' SigLIP classes (FixRes: SiglipModel & co) and SigLIP 2 classes (NaFlex:
    Siglip2Model & co) take different arguments in different positional orders; one fastsiglip
    class serves both, so the order is picked from `self.config.naflex`. Past that order,
    arguments are keyword-only: a longer positional call is an error, never a silent binding.
    """

    def wrap(method):
        @functools.wraps(method)
        def bound(self, *args, **kwargs):
            if args:
                order = naflex if self.config.naflex else fixres
                family = "NaFlex (Siglip2*)" if self.config.naflex else "FixRes (Siglip*)"
                where = f"{type(self).__name__}.{method.__name__}"
                if len(args) > len(order):
                    raise TypeError(f"{where} takes at most {len(order)} positional arguments, transformers' order "
                                    f"for {family} models ({', '.join(order)}); got {len(args)}: pass the others "
                                    "by keyword")
                for name, value in zip(order, args):
                    if name in kwargs:
                        raise TypeError(f"{where} got {name!r} both by position and by keyword")
                    kwargs[name] = value
            return method(self, **kwargs)

        return bound

    return wrap


_TEXT_ORDER = ("input_ids", "attention_mask", "position_ids")


class _GradientCheckpointing:
    """transformers' switch for activation checkpointing, per encoder layer (training mode only)."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Keep only each encoder layer's inputs and recompute the layer in backward (less memory,
        about one more forward of compute). `gradient_checkpointing_kwargs` go to
        torch.utils.checkpoint.checkpoint; use_reentrant defaults to False (works with
        torch.compile and with inputs that need no gradient)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if isinstance(module, Encoder):
                module.gradient_checkpointing, module.checkpoint_kwargs = True, kwargs

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, Encoder):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(isinstance(m, Encoder) and m.gradient_checkpointing for m in self.modules())


class _ImageFeatures:
    @_positional(fixres=("pixel_values", "interpolate_pos_encoding"),
                 naflex=("pixel_values", "pixel_attention_mask", "spatial_shapes"))
    def get_image_features(self, *, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None,
                           interpolate_pos_encoding=False) -> torch.Tensor:
        """The pooled image embedding [B, D] (the MAP head's output, not normalized)."""
        _check_image_head(self.vision_model)
        return self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes,
                                 interpolate_pos_encoding).pooler_output


class _TextFeatures:
    @_positional(fixres=_TEXT_ORDER, naflex=_TEXT_ORDER)
    def get_text_features(self, *, input_ids=None, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The text embedding [B, D] (the last token through `head`, not normalized)."""
        return self.text_model(input_ids, attention_mask, position_ids).pooler_output


class SiglipModel(nn.Module, _ImageFeatures, _TextFeatures, _GradientCheckpointing):
    """Two towers and the sigmoid image-text logits (SigLIP 1, SigLIP 2 FixRes and NaFlex)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(_tower_config(config, "text", "SiglipModel"))
        self.vision_model = VisionTransformer(_tower_config(config, "vision", "SiglipModel"))
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.logit_bias = nn.Parameter(torch.empty(1))
        _init_weights(self)

    @_positional(fixres=("input_ids", "pixel_values", "attention_mask", "position_ids", "return_loss",
                         "interpolate_pos_encoding"),
                 naflex=("input_ids", "pixel_values", "pixel_attention_mask", "spatial_shapes", "attention_mask",
                         "position_ids", "return_loss"))
    def forward(self, *, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                pixel_attention_mask=None, spatial_shapes=None, return_loss=None,
                interpolate_pos_encoding=False, output_attentions=None, output_hidden_states=None) -> SiglipOutput:
        _check_no_attentions(output_attentions)
        if input_ids is None or pixel_values is None:
            raise ValueError("SiglipModel needs both pixel_values and input_ids; for one tower use "
                             "get_image_features / get_text_features")
        _check_image_head(self.vision_model)
        vision = self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes, interpolate_pos_encoding,
                                   output_hidden_states=bool(output_hidden_states))
        text = self.text_model(input_ids, attention_mask, position_ids, bool(output_hidden_states))
        image_embeds = vision.pooler_output / vision.pooler_output.norm(p=2, dim=-1, keepdim=True)  # [Bi, D]
        text_embeds = text.pooler_output / text.pooler_output.norm(p=2, dim=-1, keepdim=True)  # [Bt, D]
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp() + self.logit_bias  # [Bt, Bi]
        loss = None
        if return_loss:
            if image_embeds.shape[0] != text_embeds.shape[0]:
                raise ValueError(f"return_loss needs matching pairs: {image_embeds.shape[0]} images but "
                                 f"{text_embeds.shape[0]} texts")
            loss = ops.sigmoid_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias)
        return SiglipOutput(loss, logits_per_text.t(), logits_per_text, text_embeds, image_embeds, text, vision)


class SiglipVisionModel(nn.Module, _ImageFeatures, _GradientCheckpointing):
    """The vision tower alone (checkpoints *VisionModel)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(_tower_config(config, "vision", "SiglipVisionModel"))
        _init_weights(self)

    @_positional(fixres=("pixel_values", "interpolate_pos_encoding"),
                 naflex=("pixel_values", "pixel_attention_mask", "spatial_shapes"))
    def forward(self, *, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None,
                interpolate_pos_encoding=False, output_attentions=None,
                output_hidden_states=None) -> BaseModelOutputWithPooling:
        _check_no_attentions(output_attentions)
        return self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes, interpolate_pos_encoding,
                                 output_hidden_states=bool(output_hidden_states))


class SiglipTextModel(nn.Module, _TextFeatures, _GradientCheckpointing):
    """The text tower alone (checkpoints *TextModel)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(_tower_config(config, "text", "SiglipTextModel"))
        _init_weights(self)

    @_positional(fixres=_TEXT_ORDER, naflex=_TEXT_ORDER)
    def forward(self, *, input_ids=None, attention_mask=None, position_ids=None, output_attentions=None,
                output_hidden_states=None) -> BaseModelOutputWithPooling:
        _check_no_attentions(output_attentions)
        return self.text_model(input_ids, attention_mask, position_ids, bool(output_hidden_states))


class SiglipForImageClassification(nn.Module, _GradientCheckpointing):
    """The vision tower, mean of the patch tokens (NaFlex: of the real ones), a linear classifier."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        vision = _tower_config(config, "vision", "SiglipForImageClassification")
        self.num_labels = config.num_labels
        self.vision_model = VisionTransformer(vision)
        self.classifier = nn.Linear(vision.hidden_size, self.num_labels) if self.num_labels > 0 else nn.Identity()
        _init_weights(self)

    @_positional(fixres=("pixel_values", "labels", "interpolate_pos_encoding"),
                 naflex=("pixel_values", "pixel_attention_mask", "spatial_shapes", "labels"))
    def forward(self, *, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, labels=None,
                interpolate_pos_encoding=False, output_attentions=None,
                output_hidden_states=None) -> ImageClassifierOutput:
        _check_no_attentions(output_attentions)
        out = self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes, interpolate_pos_encoding,
                                pool=False, output_hidden_states=bool(output_hidden_states))
        x = out.last_hidden_state  # [B, N, C]
        if self.config.naflex:  # padded places are zeros: sum, then divide by the real count
            count = pixel_attention_mask.to(x.device).sum(1, keepdim=True)  # [B, 1] real patches
            pooled = (x.sum(1, dtype=torch.float32) / count).to(x.dtype)
        else:
            pooled = x.mean(1)
        logits = self.classifier(pooled)  # [B, num_labels]
        return ImageClassifierOutput(None if labels is None else self._loss(logits, labels), logits, out.hidden_states)

    def _loss(self, logits, labels):
        """transformers' ForSequenceClassificationLoss, the problem type read from labels."""
        labels = labels.to(logits.device)
        if self.num_labels == 1:  # regression
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        if labels.dtype in (torch.long, torch.int):  # single label: class indices, -100 ignored
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), ignore_index=-100)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))  # multi-label


MODELS = {
    "SiglipModel": SiglipModel,
    "SiglipVisionModel": SiglipVisionModel,
    "SiglipTextModel": SiglipTextModel,
    "SiglipForImageClassification": SiglipForImageClassification,
}


def build(config: ModelConfig) -> nn.Module:
    """The model class for `config.architecture`, randomly initialized (under
    torch.device("meta"): shapes only, no memory and no initialization)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build() takes a fastsiglip.config.ModelConfig, got {type(config).__name__}; "
                        "use fastsiglip.config.from_file or preset")
    if config.architecture not in MODELS:
        raise ValueError(f"unknown architecture {config.architecture!r}; fastsiglip builds {', '.join(MODELS)}")
    return MODELS[config.architecture](config)
