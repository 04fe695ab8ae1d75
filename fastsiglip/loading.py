"""Checkpoint loading: a name or folder -> local files -> a model holding the checkpoint's weights.

    model = fastsiglip.load("google/siglip2-base-patch16-224", device="cuda", dtype="bfloat16")

- `resolve` turns a local folder or a Hugging Face hub id into a folder holding config.json,
  downloading (or finding in the hub cache) only the files fastsiglip reads.
- `load` builds the model on the meta device (no memory), then reads every tensor from the
  safetensors file(s) straight onto the requested device, casts it, and assigns it in place of
  the meta parameter, one tensor at a time: the model is never materialized twice.
- Strict: the checkpoint's keys (after the key map below) must be exactly the model's, with
  the same shapes. Anything else is one error that lists every offending key; nothing is
  silently re-initialized (transformers only warns there).
- One dtype: a tensor stored unlike the rest of the checkpoint (one float16 LayerNorm among
  float32 weights, an int64 copy of a float parameter) is cast to the model's dtype, as
  transformers casts it, with one warning that counts and names them.

Never imports transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re
import warnings
from collections import Counter

import safetensors
import torch
from torch import nn

from . import config as config_lib
from . import model as model_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Everything fastsiglip reads from a hub repo (fnmatch patterns for snapshot_download's
# allow_patterns): config, weights (single file, or transformers' shards plus their index),
# tokenizer (SigLIP: spiece.model; SigLIP 2: Gemma's tokenizer.model / tokenizer.json) and the
# image processor settings. Other files (pytorch_model.bin, flax, tf, onnx) are never fetched.
HUB_FILES = (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    "model-*-of-*.safetensors",
    "spiece.model",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# A checkpoint's fingerprint reads these files whole when small, else their first and last MiB
# (the safetensors header and the first and last tensors' data): cheap for a 4 GB model, and any
# change of weights, config or tokenizer shows up in practice.
FINGERPRINT_SUFFIXES = (".json", ".model", ".safetensors")
FINGERPRINT_BYTES = 1 << 20
# The values huggingface_hub reads as "on" for HF_HUB_OFFLINE (constants._is_true).
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}

# ---------------------------------------------------------------------------------------------
# Key map, as data. fastsiglip's parameter names are transformers' state-dict keys, so a
# checkpoint saved by transformers' SiglipModel / Siglip2Model / *ForImageClassification loads as
# it is. The rules below cover the real layouts that differ; a key no rule matches is kept.
# ---------------------------------------------------------------------------------------------

# Per architecture (config.architecture): ordered (pattern, replacement) pairs, first match wins.
KEY_RULES: dict[str, list[tuple[str, str]]] = {
    # transformers >= 5 saves the tower-only models without their tower prefix (conversion_mapping.py:
    # PrefixChange(prefix_to_remove="vision_model") for CLIPVisionModel, which SiglipVisionModel and
    # Siglip2VisionModel share; the same with "text_model" for the text towers); transformers 4
    # saved "vision_model.embeddings...". fastsiglip keeps the prefix, as SiglipModel's keys have it.
    "SiglipVisionModel": [(r"^(?!vision_model\.)", "vision_model.")],
    "SiglipTextModel": [(r"^(?!text_model\.)", "text_model.")],
}
# Checkpoint keys to skip. `embeddings.position_ids` is an arange buffer, not a weight:
# transformers' SigLIP registers it non-persistent and never writes it, but code derived from older
# CLIP modeling (which saved it) does: openai/clip-vit-base-patch32 holds
# text_model.embeddings.position_ids. Skipping it loses nothing; any other stray key is an error.
IGNORED_KEYS = (r"(^|\.)embeddings\.position_ids$",)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# safetensors' dtype names (the header's "dtype") of the floating tensors, as torch dtypes.
_STORED_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """The checkpoint's files do not hold what its config.json describes, or cannot be read."""


# ---------------------------------------------------------------------------------------------
# resolve: name or path -> folder
# ---------------------------------------------------------------------------------------------


def resolve(name_or_path, *, revision: str | None = None, cache_dir=None,
            local_files_only: bool | None = None) -> pathlib.Path:
    """The local folder of a checkpoint: `name_or_path` itself if it is a folder, else the
    snapshot folder of hub id `name_or_path` in the Hugging Face cache (`cache_dir`, default
    huggingface_hub's HF_HUB_CACHE), downloading the files fastsiglip reads (HUB_FILES) unless
    offline. Offline: `local_files_only=True`, or when it is None, HF_HUB_OFFLINE=1 (read now,
    and as huggingface_hub read it at import)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a folder path or a hub id (str), got {type(name_or_path).__name__}")
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{path} has no {CONFIG_FILE}: fastsiglip loads transformers-format checkpoints (config.json plus "
                f"model.safetensors, as save_pretrained writes them); pass the folder that holds config.json")
        return path.resolve()
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint folder that holds {CONFIG_FILE} and weights")
    is_path = not isinstance(name_or_path, str)  # a pathlib.Path is never a hub id
    return _resolve_hub(os.fspath(name_or_path), revision, cache_dir, local_files_only, is_path)


def _offline_from_env() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or value.upper() in _TRUE_VALUES


def _resolve_hub(name: str, revision, cache_dir, local_files_only, is_path: bool) -> pathlib.Path:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError, validate_repo_id)

    try:
        if is_path:
            raise HFValidationError("a path object")
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"{name} does not exist: pass an existing checkpoint folder, or a Hugging Face hub id "
                                "such as 'google/siglip2-base-patch16-224'") from None
    offline = _offline_from_env() if local_files_only is None else bool(local_files_only)
    cache = pathlib.Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    at = f"{name!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        folder = huggingface_hub.snapshot_download(name, revision=revision, cache_dir=cache, local_files_only=offline,
                                                   allow_patterns=list(HUB_FILES))
    except LocalEntryNotFoundError as e:
        incomplete = type(e).__name__ == "IncompleteSnapshotError"  # huggingface_hub >= 1.x only
        if offline and not incomplete:
            raise FileNotFoundError(
                f"{at} is not in the Hugging Face cache at {cache} and offline mode is on (HF_HUB_OFFLINE=1 / "
                "local_files_only), and no local folder has that name; download it once with network access, "
                "or pass a local folder") from e
        if incomplete:
            raise FileNotFoundError(f"the cached copy of {at} in {cache} is incomplete ({e}); download it again with "
                                    "network access, or pass a local folder") from e
        raise FileNotFoundError(f"could not reach the Hugging Face hub for {at}, and it is not in the cache at {cache} "
                                f"({e}); check the network connection, or pass a local folder") from e
    except GatedRepoError as e:
        raise PermissionError(f"{at} is gated on the Hugging Face hub: accept its terms on huggingface.co/{name} and "
                              "log in (`hf auth login`, or set HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{at} is neither a local folder nor a model on the Hugging Face hub (if it is "
                                "private, log in with `hf auth login` or set HF_TOKEN); check the name") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{name!r} has no revision {revision!r} on the Hugging Face hub; pass an existing "
                                "branch, tag or commit") from e
    folder = pathlib.Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"hub repo {at} has no {CONFIG_FILE} (looked in {folder}): it is not a transformers "
                                "checkpoint; if a download was interrupted, run again with network access")
    return folder


# ---------------------------------------------------------------------------------------------
# load: folder -> model
# ---------------------------------------------------------------------------------------------


def load(name_or_path, *, device=None, dtype=None, revision: str | None = None, cache_dir=None,
         local_files_only: bool | None = None) -> nn.Module:
    """The model of a checkpoint folder or hub id, in eval mode, with its weights on `device`
    (default "cpu") in `dtype` (None: as stored, i.e. the dtype of most of the checkpoint's floating
    elements, the odd tensors cast to it with one warning; "auto": config.json's dtype; or a torch.dtype /
    "float32" / "float16" / "bfloat16"). `model.checkpoint_dir` is the resolved folder."""
    device = _device(device)
    folder = resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        config = config_lib.from_file(folder / CONFIG_FILE)
    except ValueError as e:
        raise ValueError(f"{folder / CONFIG_FILE}: {e}") from e
    dtype = _dtype(dtype, config)
    files = weight_files(folder)
    headers = {file: _read_header(file) for file in files}  # file -> {key: (shape, stored dtype)}

    with torch.device("meta"):  # shapes only: the real tensors come from the checkpoint
        model = model_lib.build(config)
    expected = model.state_dict(keep_vars=True)
    targets = map_keys(headers, expected, config.architecture, folder)
    stored = _stored_dtype(headers, targets)
    dtype = stored if dtype is None else dtype
    odd = Counter()  # stored dtype -> tensors stored unlike the rest (cast to `dtype`, warned)
    odd_names = []

    for file, names in targets.items():
        with _open(file, device) as f:
            for key, name in names.items():
                tensor = f.get_tensor(key)
                # Every tensor of a floating parameter / buffer gets the model's dtype; a legitimately
                # integer one (an index buffer; fastsiglip's models have none) is kept as stored.
                if expected[name].is_floating_point() and tensor.dtype != dtype:
                    if tensor.dtype != stored:
                        odd[str(tensor.dtype).removeprefix("torch.")] += 1
                        odd_names.append(name)
                    tensor = tensor.to(dtype)  # one tensor at a time: never a second copy of the model
                _assign(model, name, tensor)
    if odd:
        _warn_cast(folder, odd, odd_names, stored, dtype)

    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # only a model with state outside its state_dict gets here
        raise CheckpointError(f"after loading {folder}, these tensors are still on the meta device: {', '.join(left)}")
    model.checkpoint_dir = folder
    return model.eval()


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}: pass e.g. 'cpu', 'cuda' or 'cuda:1'") from e
    if device.type == "meta":
        raise ValueError("device='meta' holds no weights; to build a model without memory use "
                         "fastsiglip.model.build under torch.device('meta')")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available; pass device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _dtype(dtype, config) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if dtype == "auto":  # as transformers' dtype="auto": the dtype config.json records, else as stored
        return _DTYPES.get(str(config.dtype).removeprefix("torch."))
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be None, 'auto', a floating torch.dtype or one of {', '.join(_DTYPES)}; "
                     f"got {dtype!r}")


def weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint folder: model.safetensors, or the shards that
    model.safetensors.index.json names (each checked to exist)."""
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".msgpack", ".h5")]
        hint = (f" It has {', '.join(sorted(other))}: load it once with transformers and save_pretrained() it again, "
                "which writes model.safetensors.") if other else " Download the checkpoint again."
        raise FileNotFoundError(f"{folder} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}; fastsiglip reads "
                                f"safetensors weights only.{hint}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (JSON with a 'weight_map' of key -> shard "
                              f"file; {type(e).__name__}: {e}); download the checkpoint again") from e
    bad = [s for s in shards if not isinstance(s, str) or pathlib.Path(s).name != s]
    if bad:
        raise CheckpointError(f"{index} names shard files outside its folder: {bad}; download the checkpoint again")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names {len(missing)} shard(s) that are not in {folder}: "
                                f"{', '.join(missing)}; the download is incomplete: download the checkpoint again")
    return [folder / s for s in shards]


def checkpoint_fingerprint(folder) -> str:
    """sha256 of a checkpoint folder's config, tokenizer and weight files (see FINGERPRINT_BYTES):
    what an embedding job or a training run records, to refuse resuming with other weights."""
    h = hashlib.sha256()
    folder = pathlib.Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in FINGERPRINT_SUFFIXES and p.is_file()
                   and not p.name.startswith("."))
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def _open(file: pathlib.Path, device: torch.device):
    try:
        return safetensors.safe_open(os.fspath(file), framework="pt", device=str(device))
    except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}): it is corrupt or truncated (an "
                              "interrupted download?); delete it and download the checkpoint again") from e


def _read_header(file: pathlib.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype name such as "F32")} from a safetensors header, reading no tensor data."""
    with _open(file, torch.device("cpu")) as f:
        return {key: (tuple((s := f.get_slice(key)).get_shape()), s.get_dtype()) for key in f.keys()}


def _stored_dtype(headers: dict, targets: dict) -> torch.dtype:
    """The checkpoint's dtype: that of most of the loaded floating elements (one float16 LayerNorm
    among float32 weights does not make it a float16 checkpoint)."""
    sizes = Counter()
    for file, names in targets.items():
        for key in names:
            shape, stored = headers[file][key]
            if stored in _STORED_FLOATS:
                sizes[_STORED_FLOATS[stored]] += math.prod(shape)
    return sizes.most_common(1)[0][0] if sizes else torch.get_default_dtype()


def _warn_cast(folder, odd: Counter, names: list[str], stored: torch.dtype, dtype: torch.dtype) -> None:
    """One warning for the tensors stored in another dtype than the checkpoint's.

    They are cast to the model's dtype, integer ones included: transformers' from_pretrained
    (5.x) casts every floating parameter's checkpoint tensor to the parameter's dtype, an int64
    one too, and silently; fastsiglip computes what transformers computes (an integer tensor
    cast to float holds the same values), and says so here, since an integer weight usually
    means a quantized or otherwise foreign checkpoint."""
    count = sum(odd.values())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    origin = ", ".join(f"{n} from {name}" for name, n in sorted(odd.items()))
    stored, dtype = (str(d).removeprefix("torch.") for d in (stored, dtype))
    warnings.warn(f"{folder}: cast {count} checkpoint tensor(s) stored unlike the rest ({stored}) to {dtype} "
                  f"({origin}): {shown}", stacklevel=3)


def map_keys(headers: dict, expected: dict, architecture: str, folder) -> dict[pathlib.Path, dict[str, str]]:
    """{file: {checkpoint key: model key}} for every tensor to load, after checking that the
    mapped keys are exactly `expected`'s (name -> meta tensor) with the same shapes; otherwise
    one CheckpointError listing every missing, unexpected, duplicate or mis-shaped key."""
    rules = [(re.compile(p), r) for p, r in KEY_RULES.get(architecture, [])]
    ignored = [re.compile(p) for p in IGNORED_KEYS]
    targets: dict[pathlib.Path, dict[str, str]] = {}
    seen: dict[str, str] = {}  # model key -> checkpoint key (and file) it came from
    unexpected, duplicate, shapes = [], [], []
    for file, keys in headers.items():
        for key, (shape, _) in keys.items():
            if any(p.search(key) for p in ignored):
                continue
            name = next((p.sub(r, key, count=1) for p, r in rules if p.search(key)), key)
            shown = key if name == key else f"{key} (as {name})"
            if name not in expected:
                unexpected.append(f"{shown} in {file.name}")
            elif name in seen:
                duplicate.append(f"{name}: from {seen[name]} and from {key} in {file.name}")
            else:
                seen[name] = f"{key} in {file.name}"
                if shape != tuple(expected[name].shape):
                    shapes.append(f"{shown}: checkpoint {list(shape)}, model {list(expected[name].shape)}")
                targets.setdefault(file, {})[key] = name
    missing = [name for name in expected if name not in seen]
    problems = [(f"missing from the checkpoint ({len(missing)})", missing),
                (f"unexpected in the checkpoint ({len(unexpected)})", unexpected),
                (f"in the checkpoint twice ({len(duplicate)})", duplicate),
                (f"shape mismatch ({len(shapes)})", shapes)]
    problems = [(title, keys) for title, keys in problems if keys]
    if problems:
        lines = [f"{folder} does not match the {architecture} its {CONFIG_FILE} describes; fastsiglip loads strictly "
                 "and never re-initializes a weight:"]
        for title, keys in problems:
            lines += [f"  {title}:", *(f"    {k}" for k in keys)]
        lines.append("Check that config.json belongs to these weights, or download the checkpoint again.")
        raise CheckpointError("\n".join(lines))
    return targets


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the model's (meta) parameter or buffer `name`, no copy."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
    setattr(owner, attr, tensor)  # nn.Module.__setattr__ replaces the registered parameter / buffer
