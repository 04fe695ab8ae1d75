"""Model outputs: dataclasses that also read like transformers' ModelOutput (out["key"], keys())."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class ModelOutput:
    """Field access (`out.logits`), key access (`out["logits"]`), and `to_tuple()` of the
    fields that are set, as transformers' outputs allow."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r} is not set in this {type(self).__name__}; it has {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # [B, N, C]; NaFlex: zeros at padded positions
    pooler_output: torch.Tensor | None = None  # [B, D]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # output_hidden_states: embeddings, then every layer


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
