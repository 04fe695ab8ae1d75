"""`fastsiglip.patch(model)`: fastsiglip's blocks and kernels inside the SigLIP vision towers of
transformers models (PaliGemma, Gemma 3, LLaVA, LLaVA-OneVision, Idefics3 / SmolVLM, and bare
SiglipModel / Siglip2Model), in place.

    vlm = transformers.AutoModelForImageTextToText.from_pretrained(...)
    fastsiglip.patch(vlm)        # fastsiglip.patched(vlm) lists the towers
    ... train or generate as before ...
    fastsiglip.unpatch(vlm)

Towers are found by class name (transformers is never imported here). In each, every encoder
layer becomes a fastsiglip EncoderLayer (layers.py) and the MAP head a fastsiglip
MultiheadAttentionPoolingHead, built from the tower's own submodules: the very same nn.Linear /
nn.LayerNorm / nn.MultiheadAttention objects (or the LoRA, quantized or hooked modules in their
place), under the same names, so state dicts, save_pretrained / from_pretrained, optimizers
built before the patch, DDP / FSDP and peft keep working, and each block takes the fused path
only where that computes what transformers computes (layers.py). The tower's embeddings,
post_layernorm and everything outside the tower stay transformers' own. The tower's forward is
replaced (on the instance) by one that honours the keywords of transformers' forward:
return_dict, output_hidden_states as a flag or as layer indices (transformers >= 5.23: only
those states kept, None elsewhere), output_attentions (an error: the attention matrix is never
formed), interpolate_pos_encoding, patch_attention_mask, pixel_attention_mask / spatial_shapes.

Padding: Siglip2 NaFlex masks run packed (the real tokens only; last_hidden_state is zero at the
padded positions, as fastsiglip's own models). Idefics3 / SmolVLM tiles with padded patches run
with the padded keys left out through varlen attention (cu_seqlens) but every query computed:
the connector after the tower reads the padded positions too, so they are computed as
transformers computes them. Tiles without padding run dense, with no mask at all.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import types
import warnings

import torch
from torch import nn

from . import ops
from .layers import (
    MLP,
    Attention,
    Encoder,
    EncoderLayer,
    Layout,
    MultiheadAttentionPoolingHead,
    fixed_cu_seqlens,
    layer_norm,
)
from .model import packable
from .outputs import BaseModelOutputWithPooling

logger = logging.getLogger("fastsiglip")

# Tower classes (by name) -> family. SiglipVisionModel and Siglip2VisionModel are the towers
# themselves in transformers 5; the *VisionTransformer names are transformers 4's.
FAMILIES = {
    "SiglipVisionModel": "siglip", "SiglipVisionTransformer": "siglip",
    "Siglip2VisionModel": "siglip2", "Siglip2VisionTransformer": "siglip2",
    "Idefics3VisionTransformer": "idefics3", "SmolVLMVisionTransformer": "idefics3",
}
_STATE = "_fastsiglip_patch"  # on a patched tower: what unpatch restores


class PatchError(ValueError):
    """A tower fastsiglip cannot serve; `patch` leaves it untouched and warns with this message."""


# ---------------------------------------------------------------------------------------------
# Building fastsiglip blocks around a tower's own submodules
# ---------------------------------------------------------------------------------------------


def _empty(cls):
    """An instance of a fastsiglip block with no submodules yet (filled by the caller)."""
    block = cls.__new__(cls)
    nn.Module.__init__(block)
    return block


def _share_hooks(new: nn.Module, old: nn.Module) -> None:
    """The new module uses the old one's hook dicts: hooks registered on either fire on both."""
    for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks"):
        if hasattr(old, name):
            object.__setattr__(new, name, getattr(old, name))
    # Which kind of backward hook the module has (full or legacy): a flag beside the dict, not in it.
    object.__setattr__(new, "_is_full_backward_hook", getattr(old, "_is_full_backward_hook", None))
    new.training = old.training


def _adopt(new: nn.Module, old: nn.Module, expected: tuple[str, ...], what: str, convert: dict | None = None):
    """Give `new` the children of `old` under the same names and in the same order (state-dict
    keys then list as transformers' do), each through `convert[name]` if given."""
    names = [name for name, _ in old.named_children()]
    missing = [name for name in expected if name not in names]
    extra = [name for name in names if name not in expected]
    if missing or extra:
        raise PatchError(f"{what}: {type(old).__name__} has children {names}, not {list(expected)}")
    for name, child in old.named_children():
        setattr(new, name, (convert or {}).get(name, lambda module, where: module)(child, f"{what}.{name}"))
    _share_hooks(new, old)
    return new


def _attention(old: nn.Module, what: str) -> Attention:
    heads, head_dim = getattr(old, "num_heads", None), getattr(old, "head_dim", None)
    if heads is None or head_dim is None:
        raise PatchError(f"{what}: {type(old).__name__} does not say its num_heads / head_dim")
    scale = getattr(old, "scale", head_dim**-0.5)
    if abs(scale - head_dim**-0.5) > 1e-12 * head_dim**-0.5:
        raise PatchError(f"{what}: softmax scale {scale} is not head_dim ** -0.5")
    if getattr(old, "is_causal", False):
        raise PatchError(f"{what}: causal attention")
    if float(getattr(old, "dropout", 0.0) or 0.0) != 0.0:
        raise PatchError(f"{what}: attention dropout {old.dropout} (fastsiglip's attention has none)")
    new = _empty(Attention)
    new.num_heads, new.head_dim = heads, head_dim
    return _adopt(new, old, ("q_proj", "k_proj", "v_proj", "out_proj"), what)


def _mlp(old: nn.Module, what: str) -> MLP:
    return _adopt(_empty(MLP), old, ("activation_fn", "fc1", "fc2"), what)


def _layer(old: nn.Module, what: str) -> EncoderLayer:
    new = _adopt(_empty(EncoderLayer), old, ("layer_norm1", "self_attn", "layer_norm2", "mlp"), what,
                 {"self_attn": _attention, "mlp": _mlp})
    new.gradient_checkpointing = getattr(old, "gradient_checkpointing", False)
    if hasattr(old, "_gradient_checkpointing_func"):
        new._gradient_checkpointing_func = old._gradient_checkpointing_func
    return new


def _encoder(old: nn.Module, what: str) -> Encoder:
    if not isinstance(getattr(old, "layers", None), nn.ModuleList):
        raise PatchError(f"{what}: {type(old).__name__} has no layers list")
    new = _adopt(_empty(Encoder), old, ("layers",), what, {"layers": lambda layers, where: nn.ModuleList(
        _layer(layer, f"{where}.{i}") for i, layer in enumerate(layers))})
    new.gradient_checkpointing = getattr(old, "gradient_checkpointing", False)
    return new


def _head(old: nn.Module, what: str) -> MultiheadAttentionPoolingHead:
    attention = getattr(old, "attention", None)
    if not isinstance(attention, nn.MultiheadAttention) or not attention.batch_first or attention.dropout:
        raise PatchError(f"{what}: the pooling head's attention is not a batch-first nn.MultiheadAttention without "
                         "dropout")
    new = _empty(MultiheadAttentionPoolingHead)
    new.num_heads = attention.num_heads
    new.probe = old.probe  # the same nn.Parameter
    return _adopt(new, old, ("attention", "layernorm", "mlp"), what, {"mlp": _mlp})


def _write_back(new: nn.Module, old: nn.Module) -> None:
    """Put the current children of a fastsiglip block (a LoRA layer peft added after the patch,
    say) back into transformers' block it was built from, recursively, with its train/eval mode and
    the kind of its backward hooks (registered on either since)."""
    old.training = new.training
    object.__setattr__(old, "_is_full_backward_hook", getattr(new, "_is_full_backward_hook", None))
    for name, child in new.named_children():
        if isinstance(child, (Attention, MLP, EncoderLayer, Encoder, MultiheadAttentionPoolingHead)):
            _write_back(child, getattr(old, name))
        elif name == "layers" and isinstance(child, nn.ModuleList):
            for i, layer in enumerate(child):
                _write_back(layer, old.layers[i])
        elif getattr(old, name, None) is not child:
            setattr(old, name, child)
    for name, param in new.named_parameters(recurse=False):
        if getattr(old, name, None) is not param:
            setattr(old, name, param)
    for name in ("gradient_checkpointing", "_gradient_checkpointing_func"):
        if name in new.__dict__:
            setattr(old, name, new.__dict__[name])


# ---------------------------------------------------------------------------------------------
# The patched forward
# ---------------------------------------------------------------------------------------------


def _selects_by_index() -> bool:
    """Whether the installed transformers reads an int / list output_hidden_states as the layer
    indices to keep (utils/output_capturing.selected_hidden_states, transformers >= 5.23); older
    versions take any truthy value as True. Read off the transformers already imported."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    return hasattr(capturing, "selected_hidden_states")


def _hidden_state_selection(tower, state, value):
    """output_hidden_states (None: the config's) -> None (no states), "all", or a set of indices
    into the num_layers + 1 states, as the installed transformers reads it."""
    if value is None:
        value = getattr(tower.config, "output_hidden_states", False)
    if isinstance(value, bool) or value is None or not state["index_selection"]:
        return "all" if value else None
    count = len(tower.encoder.layers) + 1
    chosen = [value] if isinstance(value, int) else list(value)
    return {i % count for i in chosen if -count <= i < count}


def _output(tower, a: dict, last, pooled, states, selection):
    hidden = None
    if selection == "all":
        hidden = tuple(states)
    elif selection is not None:
        hidden = tuple(h if i in selection else None for i, h in enumerate(states))
    out = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)
    return_dict = a.get("return_dict")
    if return_dict is None:
        return_dict = getattr(tower.config, "return_dict", None) is not False
    return out if return_dict else out.to_tuple()


def _bind(state: dict, config, args, kwargs) -> dict:
    """transformers' forward arguments by name (its positional order, recorded at patch time)."""
    names = state["positional"]
    if len(args) > len(names):
        raise TypeError(f"{state['cls']}.forward takes at most {len(names)} positional arguments ({', '.join(names)}), "
                        f"got {len(args)}")
    bound = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in bound:
            raise TypeError(f"{state['cls']}.forward got {name!r} both by position and by keyword")
        bound[name] = value
    attentions = bound.get("output_attentions")
    if attentions or (attentions is None and getattr(config, "output_attentions", False)):
        raise ValueError(f"output_attentions=True: the fastsiglip-patched {state['cls']} never forms the attention "
                         "matrix (FlashAttention-style kernels); fastsiglip.unpatch(model) first to get attention maps")
    if bound.get("pixel_values") is None:
        raise ValueError(f"{state['cls']}.forward needs pixel_values")
    return bound


def _run(tower, x, layout, selection):
    states = [] if selection is not None else None
    x = tower.encoder(x, layout, states).last_hidden_state
    return layer_norm(tower.post_layernorm, x), states


def _siglip_forward(tower, state, a):
    x = tower.embeddings(a["pixel_values"], interpolate_pos_encoding=bool(a.get("interpolate_pos_encoding", False)))
    selection = _hidden_state_selection(tower, state, a.get("output_hidden_states"))
    last, states = _run(tower, x, None, selection)  # [B, N, C]
    pooled = None
    if state["head"]:
        head = tower.head
        batch, n = last.shape[:2]
        pooled = (head.pool_packed(last.flatten(0, 1), fixed_cu_seqlens(batch, n, last.device), n)
                  if head.fusable() else head(last))
    return _output(tower, a, last, pooled, states, selection)


def _packable(tower) -> bool:
    """Whether what runs after transformers' embeddings may run on the real tokens only (model.packable)."""
    modules = [*tower.encoder.modules(), *tower.post_layernorm.modules()]
    if isinstance(getattr(tower, "head", None), nn.Module):
        modules += list(tower.head.modules())
    return packable(modules)


def _siglip2_forward(tower, state, a):
    mask = a.get("pixel_attention_mask", a.get("attention_mask"))
    shapes = a.get("spatial_shapes")
    if shapes is None:
        raise ValueError(f"{state['cls']}.forward needs spatial_shapes (the Siglip2 image processor returns them, with "
                         "pixel_attention_mask)")
    pixel_values = a["pixel_values"]
    if mask is None:  # as transformers: no mask, every patch real
        mask = torch.ones(pixel_values.shape[:2], dtype=torch.bool, device=pixel_values.device)
    mask, shapes = mask.to(pixel_values.device), shapes.to(pixel_values.device)
    x = tower.embeddings(pixel_values, shapes)  # [B, N, C] (transformers' embeddings)
    selection = _hidden_state_selection(tower, state, a.get("output_hidden_states"))
    packing = ops.packing_from_mask(mask)
    cu, n = packing.cu_seqlens, packing.max_seqlen
    head = tower.head if state["head"] else None
    if _packable(tower):  # the real tokens only: zeros at padding, as fastsiglip's NaFlex models
        last, states = _run(tower, ops.pack(x, packing), Layout(cu, cu, n, n), selection)  # [T, C]
        pooled = None
        if head is not None:
            pooled = head.pool_packed(last, cu, n) if head.fusable() else head(ops.unpack(last, packing), mask)
        states = None if states is None else [ops.unpack(h, packing) for h in states]
        return _output(tower, a, ops.unpack(last, packing), pooled, states, selection)
    batch = mask.shape[0]  # hooks or whole-tensor layers: transformers' layout, padded keys masked
    layout = Layout(fixed_cu_seqlens(batch, n, mask.device), cu, n, n, packing.indices)
    last, states = _run(tower, x, layout, selection)
    pooled = None
    if head is not None:
        pooled = head.pool_packed(ops.pack(last, packing), cu, n) if head.fusable() else head(last, mask)
    return _output(tower, a, last, pooled, states, selection)


def _idefics3_forward(tower, state, a):
    pixel_values = a["pixel_values"]
    batch = pixel_values.shape[0]
    mask = a.get("patch_attention_mask")
    if mask is None:
        p = tower.patch_size
        mask = torch.ones(batch, pixel_values.shape[2] // p, pixel_values.shape[3] // p, dtype=torch.bool,
                          device=pixel_values.device)
    x = tower.embeddings(pixel_values=pixel_values, patch_attention_mask=mask)  # [B, N, C]
    selection = _hidden_state_selection(tower, state, a.get("output_hidden_states"))
    flat = mask.reshape(batch, -1).to(x.device)
    layout = None
    if torch.compiler.is_compiling() or not bool(flat.all()):
        # padded patches: left out as keys (varlen), computed as queries (the connector reads them)
        n = flat.shape[1]
        keys = ops.packing_from_mask(flat)
        layout = Layout(fixed_cu_seqlens(batch, n, x.device), keys.cu_seqlens, n, n, keys.indices)
    last, states = _run(tower, x, layout, selection)
    return _output(tower, a, last, None, states, selection)


_FORWARDS = {"siglip": _siglip_forward, "siglip2": _siglip2_forward, "idefics3": _idefics3_forward}


def _patched_forward(tower, *args, **kwargs):
    state = getattr(tower, _STATE)
    bound = _bind(state, tower.config, args, kwargs)
    bound.setdefault("return_dict", None)
    # transformers' own tower forward runs under an output collector of its own: the output
    # capturing hooks it installs on its layers (which the fastsiglip blocks share) then record
    # into that, never into an outer model's. Here no collector is active (they do nothing), and
    # hidden states are gathered by the encoder itself.
    with _no_output_collector(), (contextlib.nullcontext() if state["kernels"] else ops.using("reference")):
        return _FORWARDS[state["family"]](tower, state, bound)


@contextlib.contextmanager
def _no_output_collector():
    collector = getattr(sys.modules.get("transformers.utils.output_capturing"), "_active_collector", None)
    if collector is None or not hasattr(collector, "set"):
        yield
        return
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


# ---------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------


def _towers(model: nn.Module):
    """(path, module, family) of every SigLIP-family vision tower, outermost first, skipping any
    nested inside another."""
    found = []
    for path, module in model.named_modules():
        # by the class or a base class (a subclass, FSDP2's FSDPSiglipVisionModel, ...)
        family = next((FAMILIES[c.__name__] for c in type(module).__mro__ if c.__name__ in FAMILIES), None)
        if family is None or not (hasattr(module, "embeddings") and hasattr(module, "encoder")):
            continue
        if any(path.startswith(f"{p}.") for p, _, _ in found):
            continue
        found.append((path, module, family))
    return found


def _check_device(tower, what: str) -> None:
    p = next(tower.parameters(), None)
    heads = [layer.self_attn for layer in tower.encoder.layers]
    if p is not None and p.device.type == "cuda" and heads:
        head_dim = heads[0].head_dim
        if head_dim not in ops.ATTENTION_HEAD_DIMS:
            raise PatchError(f"{what}: head dim {head_dim}, which fastsiglip's attention kernel does not compile "
                             f"for (it takes {', '.join(map(str, ops.ATTENTION_HEAD_DIMS))})")


def patch(model: nn.Module, *, kernels: bool = True) -> nn.Module:
    """Run every SigLIP-family vision tower of `model` on fastsiglip's blocks and ops, in place;
    returns `model`. kernels=False: the same blocks with the pure-PyTorch reference ops (eager
    debugging). A tower it cannot serve is left untouched, with one warning naming it; what was
    patched is logged and listed by `patched(model)`. Patching again changes only `kernels`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastsiglip.patch takes a torch.nn.Module (a transformers model), got {type(model).__name__}")
    done = []
    for path, tower, family in _towers(model):
        what = path or type(tower).__name__
        if hasattr(tower, _STATE):  # patched already: only `kernels` may change
            getattr(tower, _STATE)["kernels"] = bool(kernels)
            done.append(what)
            continue
        try:
            if "forward" in tower.__dict__ or any(hasattr(m, "_hf_hook") for m in tower.modules()):
                raise PatchError("its forward is wrapped (accelerate's device_map / offload hooks, or another "
                                 "patch); load the model onto one device without device_map, then patch")
            _check_device(tower, what)
            encoder = _encoder(tower.encoder, f"{what}.encoder")
            head = None
            if family != "idefics3" and getattr(tower, "use_head", False) and hasattr(tower, "head"):
                head = _head(tower.head, f"{what}.head")
            if not isinstance(getattr(tower, "post_layernorm", None), nn.Module):
                raise PatchError(f"{what}: no post_layernorm")
            if family == "idefics3" and not hasattr(tower, "patch_size"):
                raise PatchError(f"{what}: no patch_size")
        except PatchError as e:
            warnings.warn(f"fastsiglip.patch: left {what} ({type(tower).__name__}) as it is: {e}", stacklevel=2)
            continue
        signature = inspect.signature(tower.forward)
        positional = [n for n, p in signature.parameters.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        state = {"family": family, "kernels": bool(kernels), "index_selection": _selects_by_index(), "cls": type(tower).__name__, "positional": positional,
                 "head": head is not None, "encoder": tower.encoder, "original_head": tower.head if head else None}
        object.__setattr__(tower, _STATE, state)
        tower.encoder = encoder
        if head is not None:
            tower.head = head
        tower.forward = types.MethodType(_patched_forward, tower)
        done.append(what)
    previous = getattr(model, "_fastsiglip_patched", [])
    object.__setattr__(model, "_fastsiglip_patched", sorted(set(previous) | set(done)))
    if done:
        logger.info("fastsiglip.patch: %s", ", ".join(done))
    return model


def patched(model: nn.Module) -> list[str]:
    """The paths of the towers fastsiglip.patch patched in `model` (the model itself: "")."""
    return [path for path, tower, _ in _towers(model) if hasattr(tower, _STATE)]


def unpatch(model: nn.Module) -> nn.Module:
    """Undo fastsiglip.patch: transformers' encoder and head modules back in place (holding the
    current submodules, so adapters added since stay), the class's forward again."""
    for _, tower, _ in _towers(model):
        state = tower.__dict__.get(_STATE)
        if state is None:
            continue
        _write_back(tower.encoder, state["encoder"])
        tower.encoder = state["encoder"]
        if state["head"]:
            _write_back(tower.head, state["original_head"])
            tower.head = state["original_head"]
        del tower.forward
        del tower.__dict__[_STATE]
    if "_fastsiglip_patched" in model.__dict__:
        del model.__dict__["_fastsiglip_patched"]
    return model
