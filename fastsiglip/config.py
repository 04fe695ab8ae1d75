"""Model configuration: dataclasses read from a checkpoint's config.json, and named presets.

One `ModelConfig` describes every checkpoint family fastsiglip reads:

- ``model_type: "siglip"``: SigLIP 1 and SigLIP 2 FixRes (Conv2d patch embedding, fixed
  image size, learned position embedding of (image_size / patch_size)**2 entries);
- ``model_type: "siglip2"``: SigLIP 2 NaFlex (Linear patch embedding over patchified pixels,
  a square grid of `num_patches` position embeddings resized per image);
- the vision-only and text-only variants (``siglip_vision_model``, ``siglip2_text_model``, ...)
  and the ``*ForImageClassification`` checkpoints.

Field names follow transformers' config.json so that a checkpoint's file reads as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = (
    "siglip",
    "siglip2",
    "siglip_vision_model",
    "siglip_text_model",
    "siglip2_vision_model",
    "siglip2_text_model",
)
# The one activation every SigLIP checkpoint uses: GELU with the tanh approximation.
SUPPORTED_ACTIVATION = "gelu_pytorch_tanh"
# What fastsiglip builds, by transformers' architecture name (config.json "architectures").
ARCHITECTURES = ("SiglipModel", "SiglipVisionModel", "SiglipTextModel", "SiglipForImageClassification")


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True
    naflex: bool = False
    image_size: int = 224  # FixRes only
    num_patches: int = 256  # NaFlex only: size of the (square) position-embedding grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_grid(self) -> int:
        """Side of the square grid of learned position embeddings."""
        if self.naflex:
            return _isqrt_exact(self.num_patches, "vision num_patches")
        return self.image_size // self.patch_size  # Conv2d floors: 384 / 14 -> 27


@dataclass
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    layer_norm_eps: float = 1e-6
    pad_token_id: int = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    projection_size: int | None = None  # None: same as hidden_size

    def __post_init__(self):
        if self.projection_size is None:
            self.projection_size = self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ModelConfig:
    model_type: str = "siglip"  # "siglip" (SigLIP 1, SigLIP 2 FixRes) or "siglip2" (NaFlex)
    architecture: str = "SiglipModel"  # one of ARCHITECTURES
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    text: TextConfig | None = field(default_factory=TextConfig)
    id2label: dict[int, str] = field(default_factory=dict)  # classification checkpoints
    dtype: str | None = None  # the dtype the checkpoint was saved in, e.g. "float32"

    @property
    def family(self) -> str:
        """'siglip2' for NaFlex checkpoints, else 'siglip'."""
        return "siglip2" if self.model_type.startswith("siglip2") else "siglip"

    @property
    def naflex(self) -> bool:
        return self.family == "siglip2"

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def to_dict(self) -> dict:
        """The transformers config.json dictionary (as transformers' config.to_dict())."""
        return to_dict(self)


def _isqrt_exact(n: int, what: str) -> int:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{what} must be a perfect square (it is {n})")
    return side


def _pick(cls, d: dict, **overrides):
    """Build dataclass `cls` from the keys of `d` it knows, ignoring the others."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)


def _check_activation(d: dict, tower: str) -> None:
    act = d.get("hidden_act", SUPPORTED_ACTIVATION)
    if act != SUPPORTED_ACTIVATION:
        raise ValueError(
            f"{tower} config has hidden_act={act!r}; fastsiglip implements only "
            f"{SUPPORTED_ACTIVATION!r} (GELU, tanh approximation), which every SigLIP checkpoint uses"
        )


def _vision_from_dict(d: dict, naflex: bool) -> VisionConfig:
    _check_activation(d, "vision")
    d = dict(d)
    for key in ("image_size", "patch_size"):
        value = d.get(key)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"vision {key}={value} is not square; fastsiglip supports square {key} only")
            d[key] = value[0]
    cfg = _pick(VisionConfig, d, naflex=naflex)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"vision hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
    if naflex:
        _isqrt_exact(cfg.num_patches, "vision num_patches")
    elif cfg.image_size < cfg.patch_size:
        raise ValueError(f"vision image_size {cfg.image_size} is smaller than patch_size {cfg.patch_size}")
    return cfg


def _text_from_dict(d: dict) -> TextConfig:
    _check_activation(d, "text")
    d = dict(d)
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = d["eos_token_id"][0]
    cfg = _pick(TextConfig, d)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"text hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
    return cfg


def from_dict(d: dict) -> ModelConfig:
    """Read a transformers config.json dictionary (any SigLIP or SigLIP 2 variant)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json; fastsiglip reads "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    naflex = model_type.startswith("siglip2")
    archs = d.get("architectures") or []
    id2label = {int(k): v for k, v in (d.get("id2label") or {}).items()}
    dtype = d.get("dtype", d.get("torch_dtype"))

    if model_type.endswith("_vision_model"):
        return ModelConfig(model_type, "SiglipVisionModel", _vision_from_dict(d, naflex), None, {}, dtype)
    if model_type.endswith("_text_model"):
        return ModelConfig(model_type, "SiglipTextModel", None, _text_from_dict(d), {}, dtype)

    vision = _vision_from_dict(d.get("vision_config") or {}, naflex)
    if any(a.endswith("ForImageClassification") for a in archs):
        if not id2label:
            n = int(d.get("num_labels", 2))
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        return ModelConfig(model_type, "SiglipForImageClassification", vision, None, id2label, dtype)
    text = _text_from_dict(d.get("text_config") or {})
    return ModelConfig(model_type, "SiglipModel", vision, text, {}, dtype)


def from_file(path: str | os.PathLike) -> ModelConfig:
    """Read a checkpoint's config.json."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download the checkpoint's config.json") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} does not hold a JSON object; it is not a transformers config.json")
    return from_dict(d)


def _tower_dict(cfg, naflex: bool) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("naflex", None)
    if isinstance(cfg, VisionConfig):
        d.pop("num_patches" if not naflex else "image_size")
    d["hidden_act"] = SUPPORTED_ACTIVATION
    return d


def to_dict(cfg: ModelConfig) -> dict:
    """The transformers config.json dictionary for `cfg` (inverse of `from_dict`)."""
    prefix = "Siglip2" if cfg.naflex else "Siglip"
    arch = cfg.architecture.replace("Siglip", prefix, 1)
    if cfg.architecture == "SiglipVisionModel":
        d = _tower_dict(cfg.vision, cfg.naflex)
        d["model_type"] = f"{cfg.family}_vision_model"
    elif cfg.architecture == "SiglipTextModel":
        d = _tower_dict(cfg.text, cfg.naflex)
        d["model_type"] = f"{cfg.family}_text_model"
    else:
        d = {"model_type": cfg.family, "vision_config": _tower_dict(cfg.vision, cfg.naflex)}
        if cfg.text is not None:
            d["text_config"] = _tower_dict(cfg.text, cfg.naflex)
        if cfg.id2label:
            d["id2label"] = {str(k): v for k, v in cfg.id2label.items()}
            d["label2id"] = {v: k for k, v in cfg.id2label.items()}
    d["architectures"] = [arch]
    if cfg.dtype is not None:
        d["dtype"] = cfg.dtype
    return d


# ---------------------------------------------------------------------------------------------
# Presets: the public checkpoints' architectures, for building random-weight models offline.
# Sizes from the published config.json files of google/siglip-* and google/siglip2-*.
# ---------------------------------------------------------------------------------------------

# (hidden, intermediate, layers, heads) of the towers
_BASE = (768, 3072, 12, 12)
_LARGE = (1024, 4096, 24, 16)
_SO400M = (1152, 4304, 27, 16)  # head dim 72
_GIANT = (1536, 6144, 40, 16)  # vision of g/16; its text tower is So400m-sized, projected to 1536

_SIGLIP1_VOCAB = 32000  # English sentencepiece
_SIGLIP1_I18N_VOCAB = 250000  # the multilingual SigLIP 1 checkpoints' sentencepiece
_GEMMA_VOCAB = 256000  # SigLIP 2 uses the Gemma tokenizer


def _tower(size, **kw):
    h, i, n, a = size
    return dict(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a, **kw)


def _make(family, vision_size, text_size, patch, image=None, num_patches=None, vocab=_GEMMA_VOCAB, text_len=64, projection=None):
    naflex = family == "siglip2"
    vision = VisionConfig(**_tower(vision_size, patch_size=patch, naflex=naflex,
                                   image_size=image or 224, num_patches=num_patches or 256))
    text = TextConfig(**_tower(text_size, vocab_size=vocab, max_position_embeddings=text_len,
                               projection_size=projection))
    return ModelConfig(model_type=family, architecture="SiglipModel", vision=vision, text=text)


PRESETS = {
    # SigLIP 1
    "siglip-base-patch16-224": lambda: _make("siglip", _BASE, _BASE, 16, 224, vocab=_SIGLIP1_VOCAB),
    "siglip-base-patch16-256": lambda: _make("siglip", _BASE, _BASE, 16, 256, vocab=_SIGLIP1_VOCAB),
    "siglip-base-patch16-384": lambda: _make("siglip", _BASE, _BASE, 16, 384, vocab=_SIGLIP1_VOCAB),
    "siglip-base-patch16-512": lambda: _make("siglip", _BASE, _BASE, 16, 512, vocab=_SIGLIP1_VOCAB),
    "siglip-large-patch16-256": lambda: _make("siglip", _LARGE, _LARGE, 16, 256, vocab=_SIGLIP1_VOCAB),
    "siglip-large-patch16-384": lambda: _make("siglip", _LARGE, _LARGE, 16, 384, vocab=_SIGLIP1_VOCAB),
    "siglip-so400m-patch14-224": lambda: _make("siglip", _SO400M, _SO400M, 14, 224, vocab=_SIGLIP1_VOCAB, text_len=16),
    "siglip-so400m-patch14-384": lambda: _make("siglip", _SO400M, _SO400M, 14, 384, vocab=_SIGLIP1_VOCAB),
    "siglip-base-patch16-256-multilingual": lambda: _make("siglip", _BASE, _BASE, 16, 256, vocab=_SIGLIP1_I18N_VOCAB),
    "siglip-so400m-patch16-256-i18n": lambda: _make("siglip", _SO400M, _SO400M, 16, 256, vocab=_SIGLIP1_I18N_VOCAB),
    # SigLIP 2, FixRes (model_type "siglip", Gemma vocabulary)
    "siglip2-base-patch16-224": lambda: _make("siglip", _BASE, _BASE, 16, 224),
    "siglip2-base-patch16-256": lambda: _make("siglip", _BASE, _BASE, 16, 256),
    "siglip2-base-patch16-384": lambda: _make("siglip", _BASE, _BASE, 16, 384),
    "siglip2-base-patch16-512": lambda: _make("siglip", _BASE, _BASE, 16, 512),
    "siglip2-base-patch32-256": lambda: _make("siglip", _BASE, _BASE, 32, 256),
    "siglip2-large-patch16-256": lambda: _make("siglip", _LARGE, _LARGE, 16, 256),
    "siglip2-large-patch16-384": lambda: _make("siglip", _LARGE, _LARGE, 16, 384),
    "siglip2-large-patch16-512": lambda: _make("siglip", _LARGE, _LARGE, 16, 512),
    "siglip2-so400m-patch14-224": lambda: _make("siglip", _SO400M, _SO400M, 14, 224),
    "siglip2-so400m-patch14-384": lambda: _make("siglip", _SO400M, _SO400M, 14, 384),
    "siglip2-so400m-patch16-256": lambda: _make("siglip", _SO400M, _SO400M, 16, 256),
    "siglip2-so400m-patch16-384": lambda: _make("siglip", _SO400M, _SO400M, 16, 384),
    "siglip2-so400m-patch16-512": lambda: _make("siglip", _SO400M, _SO400M, 16, 512),
    "siglip2-giant-opt-patch16-256": lambda: _make("siglip", _GIANT, _SO400M, 16, 256, projection=1536),
    "siglip2-giant-opt-patch16-384": lambda: _make("siglip", _GIANT, _SO400M, 16, 384, projection=1536),
    # SigLIP 2, NaFlex (model_type "siglip2")
    "siglip2-base-patch16-naflex": lambda: _make("siglip2", _BASE, _BASE, 16, num_patches=256),
    "siglip2-so400m-patch16-naflex": lambda: _make("siglip2", _SO400M, _SO400M, 16, num_patches=256),
}


def preset(name: str) -> ModelConfig:
    """A named public architecture (random weights are the caller's business).

    Accepts the bare name ("siglip2-base-patch16-224") or the hub id ("google/siglip2-...").
    """
    key = name.removeprefix("google/")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]()
