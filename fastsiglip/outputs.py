"""Model outputs: dataclasses that behave as transformers' ModelOutput.

As there, an output is also an ordered dict of its fields that are set (not None), in field
order: `out.logits`, `out["logits"]`, `out[0]`, `out.to_tuple()`, `keys()` / `items()`, `in`,
`**out`; so code written for transformers' outputs (Trainer's predict and evaluate loops,
`nested_detach`, accelerate's gather) takes these unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch


class ModelOutput(OrderedDict):
    """Base of the output dataclasses: attribute and item access kept in step."""

    def __post_init__(self):
        names = [f.name for f in fields(self)]
        first = getattr(self, names[0])
        if isinstance(first, Mapping) and all(getattr(self, n) is None for n in names[1:]):
            # built from a dict of its fields, as Trainer's nested_concat and accelerate rebuild
            # outputs (type(out)({key: value, ...})), and as transformers' ModelOutput allows
            unknown = set(first) - set(names)
            if unknown:
                raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}; its fields are {names}")
            object.__setattr__(self, names[0], None)
            for name, value in first.items():
                object.__setattr__(self, name, value)
        for name in names:
            value = getattr(self, name)
            if value is not None:
                super().__setitem__(name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self:
                raise KeyError(f"{key!r} is not set in this {type(self).__name__}; it has {list(self.keys())}")
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __setattr__(self, name, value):
        if name in self and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __delitem__(self, key):
        raise TypeError(f"{type(self).__name__} fields cannot be deleted; set them to None")

    def to_tuple(self) -> tuple:
        """The set fields in order; nested outputs as tuples too (as transformers' SiglipOutput)."""
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class BaseModelOutput(ModelOutput):
    """What an encoder returns, as transformers' SiglipEncoder (a hook on it sees this)."""
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # [B, N, C]; NaFlex: zeros at padded positions
    pooler_output: torch.Tensor | None = None  # [B, D]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # output_hidden_states: embeddings, then every layer
    attentions: tuple[torch.Tensor, ...] | None = None  # transformers' field; never set (no attention matrix)


@dataclass
class SiglipOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None  # [B_img, B_txt]
    logits_per_text: torch.Tensor | None = None  # [B_txt, B_img]
    text_embeds: torch.Tensor | None = None  # [B_txt, D], L2-normalized
    image_embeds: torch.Tensor | None = None  # [B_img, D], L2-normalized
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None


@dataclass
class ImageClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, num_labels]
    hidden_states: tuple[torch.Tensor, ...] | None = None
