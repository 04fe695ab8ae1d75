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

import copy
import math
import pathlib

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_ATTENTION, _MLP = ("q_proj", "k_proj", "v_proj", "out_proj"), ("fc1", "fc2")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"LoRA fine-tuning needs peft, which could not be imported ({e}): "
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


def check_options(*, rank, alpha, dropout, targets) -> None:
    """The LoRA options (ValueError naming the option), and that peft imports (ImportError naming
    the extra); before anything is loaded or written. rank None: no LoRA, and then the other
    options must keep their defaults (they would be silently unused)."""
    if rank is None:
        given = [name for name, value, default in (("--lora-alpha", alpha, None), ("--lora-dropout", dropout, 0.0),
                                                     ("--lora-targets", tuple(targets), TARGETS)) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --lora-rank (LoRA is off "
                             "without it)")
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer, got {rank!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"--lora-dropout must lie in [0, 1), got {dropout!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"--lora-alpha must be a finite positive number, got {alpha!r}")
    target_pattern(targets)
    _peft()


def apply_lora(model: nn.Module, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
               targets=TARGETS) -> nn.Module:
    """peft.get_peft_model with LoRA of `rank` on `targets` (alpha default: rank, a scale of 1);
    the base weights are frozen, each adapter's B starts at zero (peft's default)."""
    check_options(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                             target_modules=target_pattern(targets), bias="none")
    return peft.get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with transformers' keys and every active adapter merged in:
    peft's own merge_and_unload on a copy (so DoRA, LoRA biases and modules_to_save merge as peft
    merges them), `model` unchanged."""
    merged = copy.deepcopy(model).merge_and_unload()
    return {key: tensor.detach() for key, tensor in merged.state_dict().items()}


def save_adapter(model: nn.Module, folder: pathlib.Path, *, base: str) -> None:
    """peft's adapter files (adapter_config.json, adapter_model.safetensors) into `folder`, with
    transformers' module names and `base` as base_model_name_or_path."""
    configs = list(model.peft_config.values())
    before = [config.base_model_name_or_path for config in configs]
    try:
        for config in configs:
            config.base_model_name_or_path = base
        model.save_pretrained(str(folder))
    finally:  # the caller's model keeps its own
        for config, name in zip(configs, before):
            config.base_model_name_or_path = name
