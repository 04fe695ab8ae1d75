"""Resume checkpoints (atomic, no pickle) and the final export in the hub layout.

OUT/checkpoints/step-<n>/
    model.safetensors        the weights (float32 master weights), transformers' key names
    optimizer.safetensors    the optimizer's per-parameter tensors, "state.<i>.<name>"
    optimizer.json           its hyper-parameter groups (JSON)
    rng.safetensors          every rank's CPU (and CUDA) random state, "cpu.<rank>", "cuda.<rank>"
    trainer_state.json       step, data position, counters, the run's arguments, the model's
                             fingerprint; written last
A checkpoint is written into a temporary folder (every file fsynced), then renamed into place
and the parent folder fsynced: a crash mid-write leaves a stray `.tmp-*` folder (ignored, removed
by the next save) and the previous checkpoint as it was. Only the newest `keep_last` are kept.
Nothing is pickled: safetensors and JSON only.

OUT/final/: config.json and the tokenizer / preprocessor files of the source checkpoint, plus
model.safetensors, so that `fastsiglip.load` and transformers' `from_pretrained` read it; after
LoRA fine-tuning the weights have the adapters merged in, and OUT/final/adapter/ holds the
adapter itself (peft's files: peft.PeftModel.from_pretrained on the base model reads them).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..loading import HUB_FILES, WEIGHTS_FILE

CHECKPOINTS = "checkpoints"
FINAL = "final"
ADAPTER = "adapter"  # OUT/final/adapter/: a LoRA run's peft adapter
STATE_FILE = "trainer_state.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(ValueError):
    """--resume cannot continue from what OUT holds; the message says why."""


def _fsync_file(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_tensors(module_state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module_state.items()}


def save_weights(path: pathlib.Path, model: torch.nn.Module) -> None:
    save_file(_state_tensors(model.state_dict()), str(path), metadata={"format": "pt"})


def _optimizer_files(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain}


def load_optimizer(folder: pathlib.Path, optimizer) -> None:
    """Restore the per-parameter state; the current hyper-parameter groups are kept (lr is set
    by the schedule every step; fused/foreach follow this machine), their sizes checked."""
    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text())
    current = optimizer.state_dict()
    saved_sizes = [len(g["params"]) for g in meta["param_groups"]]
    sizes = [len(g["params"]) for g in current["param_groups"]]
    if saved_sizes != sizes:
        raise ResumeError(f"{folder}: the optimizer state holds parameter groups of {saved_sizes} tensors, this run "
                          f"has {sizes} (other locked towers or frozen logit parameters?); resume with the same "
                          "options or start a new --out")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["plain_state"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def save_resume(out, step: int, model, optimizer, trainer_state: dict, rng: dict[str, torch.Tensor],
                keep_last: int) -> pathlib.Path:
    """Write OUT/checkpoints/step-<step>/ atomically, then keep only the newest `keep_last`."""
    root = pathlib.Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stray in root.glob(".tmp-*"):  # a save that crashed before its rename
        shutil.rmtree(stray, ignore_errors=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    tmp.mkdir()
    save_weights(tmp / WEIGHTS_FILE, model)
    tensors, meta = _optimizer_files(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    (tmp / STATE_FILE).write_text(json.dumps(dict(trainer_state, format=FORMAT, step=step), indent=1))
    for path in tmp.iterdir():
        _fsync_file(path)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out) -> list[pathlib.Path]:
    """Complete checkpoints (trainer_state.json present), oldest first."""
    root = pathlib.Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def read_resume(folder: pathlib.Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainer state, weights, rng tensors) of a checkpoint folder."""
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ResumeError(f"{folder} was written by another version of fastsiglip (format {state.get('format')}, "
                          f"this one reads {FORMAT}); start a new --out")
    return state, load_file(str(folder / WEIGHTS_FILE)), load_file(str(folder / "rng.safetensors"))


def export_final(out, state: dict[str, torch.Tensor], source, write_adapter=None) -> pathlib.Path:
    """OUT/final/ in the hub layout: the source's config.json, tokenizer and preprocessor
    files, and `state` (transformers' keys) as model.safetensors; with `write_adapter`, also
    OUT/final/adapter/ (write_adapter(folder) writes it). Written into a temporary folder,
    every file fsynced, then renamed into place, like a checkpoint."""
    out, source = pathlib.Path(out), pathlib.Path(source)
    final, tmp = out / FINAL, out / f".tmp-{FINAL}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    skip = {WEIGHTS_FILE, "model.safetensors.index.json", "model-*-of-*.safetensors"}
    for name in HUB_FILES:
        if name not in skip and (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
    save_file(_state_tensors(state), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    if write_adapter is not None:
        write_adapter(tmp / ADAPTER)
    for path in sorted(tmp.rglob("*")):
        (_fsync_file if path.is_file() else _fsync_dir)(path)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(out)
    return final
