"""LoRA fine-tuning through peft (`fastsiglip train --lora-rank R`, the optional extra
`fastsiglip[lora]`), and what the final export needs of a peft model.

    model = apply_lora(model, rank=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))
    merged_state_dict(model)      # transformers' keys, every LoRA delta folded in; model unchanged
    save_adapter(model, folder, base="path/to/checkpoint")   # what peft.PeftModel.from_pretrained reads

The targets are the projections transformers' SigLIP layers call: the encoder layers' q_proj,
k_proj, v_proj, out_proj, fc1, fc2, and the MAP head's mlp.fc1 / fc2. The head's
attention.out_proj is never a target: nn.MultiheadAttention reads its weight without calling it,
so an adapter there would stay untrained (on transformers as here).
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_ATTENTION, _MLP = ("q_proj", "k_proj", "v_proj", "out_proj"), ("fc1", "fc2")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise RuntimeError(f"LoRA fine-tuning needs peft, which could not be imported ({e}): "
                           "pip install 'fastsiglip[lora]'") from e
    return peft


def target_pattern(targets) -> str:
    """The module-name regex (peft full-matches a str target_modules) of `targets`."""
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(TARGETS))
    if not targets or unknown:
        raise ValueError(f"--lora-targets must name some of {','.join(TARGETS)}; got {','.join(targets) or 'none'}")
    attention = [t for t in _ATTENTION if t in targets]
    mlp = [t for t in _MLP if t in targets]
    parts = []
    if attention:
        parts.append(rf"encoder\.layers\.\d+\.self_attn\.({'|'.join(attention)})")
    if mlp:
        parts.append(rf"encoder\.layers\.\d+\.mlp\.({'|'.join(mlp)})")
        parts.append(rf"head\.mlp\.({'|'.join(mlp)})")
    return rf"(vision_model|text_model)\.({'|'.join(parts)})"


def apply_lora(model: nn.Module, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
               targets=TARGETS) -> nn.Module:
    """peft.get_peft_model with LoRA of `rank` on `targets` (alpha default: rank, a scale of 1);
    the base weights are frozen, each adapter's B starts at zero (peft's default)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer, got {rank!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"--lora-dropout must lie in [0, 1), got {dropout}")
    alpha = rank if alpha is None else alpha
    if alpha <= 0:
        raise ValueError(f"--lora-alpha must be positive, got {alpha}")
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_pattern(targets),
                             bias="none")
    return peft.get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with transformers' keys and every active LoRA delta added to
    its base weight, as merge_and_unload would give, without changing `model`."""
    base = model.get_base_model()
    state, lora_layers = {}, {}
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            lora_layers[name] = module
        elif hasattr(module, "base_layer") and type(module).__module__.startswith("peft."):
            raise ValueError(f"{name} is a {type(module).__name__} adapter layer; fastsiglip exports LoRA only: "
                             "merge the model yourself (merge_and_unload) and fine-tune or save that")
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = tensor.detach()
    with torch.no_grad():
        for name, layer in lora_layers.items():
            if layer.merged:  # the deltas are in the base weight already
                continue
            weight = state[f"{name}.weight"].clone()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight += layer.get_delta_weight(adapter).to(weight.dtype)
            state[f"{name}.weight"] = weight
    return state


def save_adapter(model: nn.Module, folder: pathlib.Path, *, base: str) -> None:
    """peft's adapter files (adapter_config.json, adapter_model.safetensors) into `folder`, with
    transformers' module names and `base` as base_model_name_or_path."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = base
    model.save_pretrained(str(folder))
