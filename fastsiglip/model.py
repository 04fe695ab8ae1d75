"""The SigLIP / SigLIP 2 network, top-down, in plain PyTorch over `fastsiglip.ops`.

Reads in order: vision tower, text tower, the two-tower model, the tower-only models and the
image-classification model, then `build`. The blocks they are made of (attention, MLP, encoder
layer, encoder, MAP pooling head, and when they may take the fused kernels) live in layers.py,
the embeddings in embeddings.py, the output dataclasses in outputs.py (all re-exported here),
transformers' model API (save_pretrained, from_pretrained, ...) in pretrained.py.

Parameter names and shapes are those of transformers' state dicts (`vision_model.*`,
`text_model.*`, `logit_scale`, `logit_bias`, `classifier.*`); there are no buffers, so a model
built under `torch.device("meta")` is complete once the checkpoint tensors are assigned.

Two layouts of tokens reach attention:
- dense: [B, N, C], every token real (FixRes images, text without a mask);
- varlen (FlashAttention's convention): packed tokens plus int32 `cu_seqlens`. NaFlex images
  are packed ONCE from `pixel_attention_mask` and the whole encoder runs on the real tokens
  [T, C]; padded positions of `last_hidden_state` are zeros (transformers computes them and
  never uses them), unless a hook or a whole-tensor layer needs transformers' layout
  (`packable`). Masked text keeps every query (transformers pools the last position, which
  may be padding) and packs only the keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig, TextConfig, VisionConfig
from .embeddings import NaFlexEmbeddings, PatchEmbeddings, TextEmbeddings, aa_bilinear_weights  # noqa: F401
from .layers import (  # noqa: F401
    MLP,
    Attention,
    Encoder,
    EncoderLayer,
    GELUTanh,
    Layout,
    MultiheadAttentionPoolingHead,
    fixed_cu_seqlens,
    global_hooks,
    hooked,
    layer_norm,
    own_hooks,
    plain,
    tanh_gelu,
)
from .outputs import BaseModelOutputWithPooling, ImageClassifierOutput, ModelOutput, SiglipOutput  # noqa: F401
from .pretrained import PreTrainedModelMixin, as_returned, positional

INIT_STD = 0.02  # normal init of every weight matrix and embedding of a random-weight model
LOGIT_SCALE_INIT = math.log(10.0)  # SigLIP paper (Zhai et al. 2023), sec. 3.2: t' = log 10
LOGIT_BIAS_INIT = -10.0  # and b = -10


# ---------------------------------------------------------------------------------------------
# Towers
# ---------------------------------------------------------------------------------------------


def _check_pixel_type(pixel_values) -> None:
    """Pixels are the processor's floats: an integer / bool tensor (raw uint8 pixels, say) would be
    cast and encoded as if normalized, a different image than the one meant."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}: pass the "
                        "processor's output (fastsiglip.load_processor(checkpoint)(images=...))")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be floating point, rescaled and normalized by the processor, got "
                        f"{pixel_values.dtype}: pass images through fastsiglip.load_processor(checkpoint) (or "
                        "transformers' image processor) instead of raw pixels")


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
    # Exactly image_size: another size with as many whole patches (33x33 on a 32 px, patch 16 model)
    # would run with its last rows / columns dropped by the patch convolution, as transformers runs
    # it, silently. With interpolate_pos_encoding=True any size is transformers' (the remainder too).
    if not interpolate and (height, width) != (cfg.image_size,) * 2:
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


def _is_lora_linear(module: nn.Module) -> bool:
    """peft's LoRA Linear (base layer + lora_B(lora_A(dropout(x))) * scale: token by token)."""
    return type(module).__name__ == "Linear" and type(module).__module__ == "peft.tuners.lora.layer"


def packable(modules) -> bool:
    """Whether a NaFlex tower made of `modules` may run on the real tokens only: no hook anywhere
    (a hook sees transformers' [B, N, C] tensors), and every module one of those whose result for
    a token does not depend on which other tokens share its tensor (exact types: the plain
    layers, fastsiglip's blocks, which take the packed layout, and peft's LoRA Linear). Anything
    else runs in transformers' layout: torch.ao's dynamic quantization picks one activation scale
    per tensor, bitsandbytes' int8 outlier columns (threshold) are read off the whole tensor, and
    an unknown module may do either."""
    if global_hooks():
        return False
    return not any(own_hooks(m) or not (type(m) in _PACKABLE or _is_lora_linear(m) or tanh_gelu(m)) for m in modules)


class VisionTransformer(nn.Module):
    """The vision tower: embeddings, encoder, post_layernorm, MAP head (both families).

    NaFlex batches run packed (the real tokens [T, C] only) when `packable`; otherwise in
    transformers' layout, [B, N, C] with the padded positions computed as transformers computes
    them (keys masked), so that hooks and whole-tensor layers see transformers' tensors."""

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
        _check_pixel_type(pixel_values)
        check = _check_naflex_pixels if self.config.naflex else _check_fixres_pixels
        check(pixel_values, self.config, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes)
        pool = pool and self.config.vision_use_head
        states = [] if output_hidden_states else None
        if self.config.naflex:
            # The processor returns the mask and shapes on the CPU; a caller may move only the pixels.
            device = pixel_values.device
            mask, spatial_shapes = pixel_attention_mask.to(device), spatial_shapes.to(device)
            packing = ops.packing_from_mask(mask)
            cu, n = packing.cu_seqlens, packing.max_seqlen
            if not packable(self.modules()):
                return self._naflex_dense(pixel_values, mask, spatial_shapes, packing, pool, states)
            x = self.embeddings(pixel_values, spatial_shapes, packing)  # [T, C]
            x = layer_norm(self.post_layernorm, self.encoder(x, Layout(cu, cu, n, n), states).last_hidden_state)  # [T, C]
            pooled = None
            if pool:
                pooled = self.head.pool_packed(x, cu, n) if self.head.fusable() else self.head(ops.unpack(x, packing), mask)
            hidden = None if states is None else tuple(ops.unpack(h, packing) for h in states)
            return BaseModelOutputWithPooling(ops.unpack(x, packing), pooled, hidden)  # [B, N, C], zeros at padding
        x = self.embeddings(pixel_values, interpolate_pos_encoding)  # [B, N, C]
        x = layer_norm(self.post_layernorm, self.encoder(x, None, states).last_hidden_state)
        pooled = None
        if pool:
            batch, n = x.shape[:2]
            pooled = (self.head.pool_packed(x.flatten(0, 1), fixed_cu_seqlens(batch, n, x.device), n)
                      if self.head.fusable() else self.head(x))
        return BaseModelOutputWithPooling(x, pooled, None if states is None else tuple(states))

    def _naflex_dense(self, pixel_values, mask, spatial_shapes, packing, pool, states):
        """NaFlex in transformers' layout: every position embedded (padding: the resized grid's
        entry 0, as transformers), every query computed, only the real tokens as keys."""
        batch, n = mask.shape
        every = fixed_cu_seqlens(batch, n, mask.device)
        x = self.embeddings(pixel_values, spatial_shapes)  # [B, N, C]
        layout = Layout(every, packing.cu_seqlens, n, n, packing.indices)
        x = layer_norm(self.post_layernorm, self.encoder(x, layout, states).last_hidden_state)
        pooled = None
        if pool:
            pooled = (self.head.pool_packed(ops.pack(x, packing), packing.cu_seqlens, n) if self.head.fusable()
                      else self.head(x, mask))
        return BaseModelOutputWithPooling(x, pooled, None if states is None else tuple(states))


_PACKABLE = {nn.Linear, nn.LayerNorm, nn.Embedding, nn.Identity, nn.Dropout, nn.ModuleList, nn.ModuleDict,
             nn.ParameterDict, nn.MultiheadAttention, nn.modules.linear.NonDynamicallyQuantizableLinear, GELUTanh,
             Attention, MLP, EncoderLayer, Encoder, MultiheadAttentionPoolingHead, NaFlexEmbeddings, VisionTransformer}


def _check_text(input_ids, attention_mask, position_ids, cfg: TextConfig) -> None:
    if input_ids is None:
        raise ValueError("input_ids is required (token ids from the tokenizer, padded to max_length)")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}: pass the tokenizer's "
                        "output (return_tensors='pt')")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer (int64 or int32) [batch, length], got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids holds no tokens (shape {tuple(input_ids.shape)}); pass at least one text")
    if length > cfg.max_position_embeddings:
        raise ValueError(f"input_ids has {length} tokens, more than the model's {cfg.max_position_embeddings} "
                         f"positions: truncate to max_length={cfg.max_position_embeddings}")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must have input_ids' shape {(batch, length)}, "
                         f"got {tuple(attention_mask.shape)}")
    if position_ids is not None and (position_ids.dim() not in (1, 2) or position_ids.shape[-1] != length
                                     or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch))):
        raise ValueError(f"position_ids must be [length], [1, length] or [batch, length] with batch {batch} and "
                         f"length {length}, got {tuple(position_ids.shape)}")
    if position_ids is not None and position_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"position_ids must be integer (int64 or int32), got {position_ids.dtype}")
    if torch.compiler.is_compiling():  # the value checks read the host (a device sync); a compiled graph keeps none
        return
    checked = [input_ids] if position_ids is None else [input_ids, position_ids.to(input_ids.device)]
    bounds = torch.stack([m.long() for t in checked for m in torch.aminmax(t)]).tolist()  # one sync for both
    low, high = bounds[:2]
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"input_ids must be token ids in [0, {cfg.vocab_size}) (the model's vocab_size), got "
                         f"values in [{low}, {high}]: tokenize with the checkpoint's tokenizer "
                         "(fastsiglip.load_processor / load_tokenizer)")
    if position_ids is not None and (bounds[2] < 0 or bounds[3] >= cfg.max_position_embeddings):
        raise ValueError(f"position_ids must be in [0, {cfg.max_position_embeddings}) (the model's "
                         f"max_position_embeddings), got values in [{bounds[2]}, {bounds[3]}]")


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
            all_tokens = fixed_cu_seqlens(batch, length, x.device)
            layout = Layout(all_tokens, keys.cu_seqlens, length, length, keys.indices)
        states = [] if output_hidden_states else None
        x = layer_norm(self.final_layer_norm, self.encoder(x, layout, states).last_hidden_state)  # [B, L, C]
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
        elif isinstance(m, nn.MultiheadAttention):
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


_TEXT_ORDER = ("input_ids", "attention_mask", "position_ids")


class _ImageFeatures:
    @positional(fixres=("pixel_values", "interpolate_pos_encoding"),
                naflex=("pixel_values", "pixel_attention_mask", "spatial_shapes"))
    def get_image_features(self, *, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None,
                           interpolate_pos_encoding=False, return_dict=None):
        """The pooled image embedding [B, D] (the MAP head's output, not normalized), as the
        model cards use it. return_dict=True: transformers 5's output, the vision tower's
        BaseModelOutputWithPooling (pooler_output = the embedding); False: its to_tuple()."""
        _check_image_head(self.vision_model)
        out = self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes, interpolate_pos_encoding)
        return out.pooler_output if return_dict is None else as_returned(out, return_dict)


class _TextFeatures:
    @positional(fixres=_TEXT_ORDER, naflex=_TEXT_ORDER)
    def get_text_features(self, *, input_ids=None, attention_mask=None, position_ids=None, return_dict=None):
        """The text embedding [B, D] (the last token through `head`, not normalized); return_dict
        as get_image_features."""
        out = self.text_model(input_ids, attention_mask, position_ids)
        return out.pooler_output if return_dict is None else as_returned(out, return_dict)


class SiglipModel(nn.Module, _ImageFeatures, _TextFeatures, PreTrainedModelMixin):
    """Two towers and the sigmoid image-text logits (SigLIP 1, SigLIP 2 FixRes and NaFlex)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(_tower_config(config, "text", "SiglipModel"))
        self.vision_model = VisionTransformer(_tower_config(config, "vision", "SiglipModel"))
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.logit_bias = nn.Parameter(torch.empty(1))
        _init_weights(self)

    @positional(fixres=("input_ids", "pixel_values", "attention_mask", "position_ids", "return_loss",
                         "interpolate_pos_encoding"),
                 naflex=("input_ids", "pixel_values", "pixel_attention_mask", "spatial_shapes", "attention_mask",
                         "position_ids", "return_loss"))
    def forward(self, *, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                pixel_attention_mask=None, spatial_shapes=None, return_loss=None,
                interpolate_pos_encoding=False, output_attentions=None, output_hidden_states=None,
                return_dict=None) -> SiglipOutput:
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
        out = SiglipOutput(loss, logits_per_text.t(), logits_per_text, text_embeds, image_embeds, text, vision)
        return as_returned(out, return_dict)


class SiglipVisionModel(nn.Module, _ImageFeatures, PreTrainedModelMixin):
    """The vision tower alone (checkpoints *VisionModel)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(_tower_config(config, "vision", "SiglipVisionModel"))
        _init_weights(self)

    @positional(fixres=("pixel_values", "interpolate_pos_encoding"),
                 naflex=("pixel_values", "pixel_attention_mask", "spatial_shapes"))
    def forward(self, *, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None,
                interpolate_pos_encoding=False, output_attentions=None, output_hidden_states=None,
                return_dict=None) -> BaseModelOutputWithPooling:
        _check_no_attentions(output_attentions)
        out = self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes, interpolate_pos_encoding,
                                output_hidden_states=bool(output_hidden_states))
        return as_returned(out, return_dict)


class SiglipTextModel(nn.Module, _TextFeatures, PreTrainedModelMixin):
    """The text tower alone (checkpoints *TextModel)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(_tower_config(config, "text", "SiglipTextModel"))
        _init_weights(self)

    @positional(fixres=_TEXT_ORDER, naflex=_TEXT_ORDER)
    def forward(self, *, input_ids=None, attention_mask=None, position_ids=None, output_attentions=None,
                output_hidden_states=None, return_dict=None) -> BaseModelOutputWithPooling:
        _check_no_attentions(output_attentions)
        return as_returned(self.text_model(input_ids, attention_mask, position_ids, bool(output_hidden_states)),
                           return_dict)


class SiglipForImageClassification(nn.Module, PreTrainedModelMixin):
    """The vision tower, mean of the patch tokens (NaFlex: of the real ones), a linear classifier."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        vision = _tower_config(config, "vision", "SiglipForImageClassification")
        self.num_labels = config.num_labels
        self.vision_model = VisionTransformer(vision)
        self.classifier = nn.Linear(vision.hidden_size, self.num_labels) if self.num_labels > 0 else nn.Identity()
        _init_weights(self)

    @positional(fixres=("pixel_values", "labels", "interpolate_pos_encoding"),
                 naflex=("pixel_values", "pixel_attention_mask", "spatial_shapes", "labels"))
    def forward(self, *, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, labels=None,
                interpolate_pos_encoding=False, output_attentions=None, output_hidden_states=None,
                return_dict=None) -> ImageClassifierOutput:
        _check_no_attentions(output_attentions)
        out = self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes, interpolate_pos_encoding,
                                pool=False, output_hidden_states=bool(output_hidden_states))
        x = out.last_hidden_state  # [B, N, C]
        if self.config.naflex:  # the mean of the real patches (padded places: zeros, or transformers' values)
            mask = pixel_attention_mask.to(x.device)  # [B, N]
            count = mask.sum(1, keepdim=True)  # [B, 1] real patches
            pooled = ((x * mask[..., None].to(x.dtype)).sum(1, dtype=torch.float32) / count).to(x.dtype)
        else:
            pooled = x.mean(1)
        logits = self.classifier(pooled)  # [B, num_labels]
        loss = None if labels is None else self._loss(logits, labels)
        return as_returned(ImageClassifierOutput(loss, logits, out.hidden_states), return_dict)

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
