"""Resume checkpoints (atomic, no pickle) and the final export in the hub layout.

OUT/checkpoints/step-<n>/
    model.safetensors        the weights (float32 master weights), transformers' key names
    optimizer.safetensors    the optimizer's per-parameter tensors, "state.<i>.<name>"
    optimizer.json           its hyper-parameter groups (JSON)
    rng.safetensors          every rank's CPU (and CUDA) random state, "cpu.<rank>", "cuda.<rank>"
    trainer_state.json       step, data position, counters, the run's arguments, the model's
                             fingerprint; written last
A checkpoint is written into a temporary folder (`.tmp-<pid>-step-<n>`, every file fsynced), then
renamed into place and the parent folder fsynced: a crash mid-write leaves a stray `.tmp-*` folder
(ignored, removed by the next run) and the previous checkpoint as it was. Only the newest
`keep_last` are kept. Nothing is pickled: safetensors and JSON only.

What is ours. `check_output(out)` accepts a missing or empty folder, or one holding only what
`fastsiglip train` writes (RUN_ENTRIES, `.tmp-*` leftovers; checkpoints/ holding step-<n>
folders of CHECKPOINT_FILES; final/ holding FINAL_FILES) and marked as a run (MARKER, or a
checkpoint from before the marker existed). Anything else is refused before a file is written, and
a checkpoint or final/ folder is only ever replaced or deleted when it holds our files alone.

OUT/final/: config.json and the tokenizer / preprocessor files of the source checkpoint, plus
model.safetensors, so that `fastsiglip.load` and transformers' `from_pretrained` read it; after
LoRA fine-tuning the weights have the adapters merged in, and OUT/final/adapter/ holds the
adapter itself (peft's files: peft.PeftModel.from_pretrained on the base model reads them).
"""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import re
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import TMP_PREFIX, atomic_write, fsync_dir, fsync_file, is_tmp, tmp_path
from ..loading import HUB_FILES, WEIGHTS_FILE

CHECKPOINTS = "checkpoints"
FINAL = "final"
ADAPTER = "adapter"  # OUT/final/adapter/: a LoRA run's peft adapter
STATE_FILE = "trainer_state.json"
MARKER = "fastsiglip-train.json"  # OUT/fastsiglip-train.json: written first, marks OUT as a train run's
METRICS_FILE = "metrics.jsonl"
RUN_ENTRIES = (MARKER, METRICS_FILE, CHECKPOINTS, FINAL, "tensorboard")
CHECKPOINT_FILES = (WEIGHTS_FILE, "optimizer.safetensors", "optimizer.json", "rng.safetensors", STATE_FILE)
FINAL_FILES = (*HUB_FILES, ADAPTER)  # fnmatch patterns: what export_final writes into final/
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")  # peft's
FORMAT = 2  # 2: data_position counts whole steps of distinct pairs (an epoch's tail unused)
SHOWN = 5  # entries named in a refusal
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(ValueError):
    """--resume cannot continue from what OUT holds; the message says why."""


def _foreign(folder: pathlib.Path, allowed) -> list[str]:
    """The entries of `folder` that match none of the `allowed` patterns (nor `.tmp-<pid>-*`)."""
    return sorted(p.name for p in folder.iterdir()
                  if not is_tmp(p.name) and not any(fnmatch.fnmatch(p.name, a) for a in allowed))


def _refuse_foreign(folder: pathlib.Path, allowed, what: str) -> None:
    """ValueError unless `folder` holds only what fastsiglip writes there (then it may be replaced)."""
    if folder.is_dir() and (found := _foreign(folder, allowed)):
        raise ValueError(f"refusing to replace {folder}: it holds files fastsiglip did not write as {what} "
                         f"({_names(found)}); move them out, or choose another --out")


def _names(entries: list[str]) -> str:
    shown = ", ".join(entries[:SHOWN])
    return shown + (f" and {len(entries) - SHOWN} more" if len(entries) > SHOWN else "")


def check_output(out) -> None:
    """ValueError (naming what is there) unless OUT is missing, empty, or a fastsiglip train
    output holding nothing else (see the module doc). Reads only."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose an empty or new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    entries = sorted(p.name for p in out.iterdir())
    marked = (out / MARKER).is_file() or bool(list_checkpoints(out)) or all(is_tmp(e) for e in entries)
    foreign = _foreign(out, RUN_ENTRIES) if marked else entries
    if marked:  # our folders must be folders
        foreign += [n for n in (CHECKPOINTS, FINAL, "tensorboard") if (out / n).exists() and not (out / n).is_dir()]
    if marked and (out / CHECKPOINTS).is_dir():
        for path in sorted((out / CHECKPOINTS).iterdir()):
            if is_tmp(path.name):
                continue
            if not (_STEP_DIR.match(path.name) and path.is_dir()):
                foreign.append(f"{CHECKPOINTS}/{path.name}")
            else:
                foreign += [f"{CHECKPOINTS}/{path.name}/{n}" for n in _foreign(path, CHECKPOINT_FILES)]
    if marked and (out / FINAL).is_dir():
        foreign += [f"{FINAL}/{n}" for n in _foreign(out / FINAL, FINAL_FILES)]
        if (out / FINAL / ADAPTER).is_dir():
            foreign += [f"{FINAL}/{ADAPTER}/{n}" for n in _foreign(out / FINAL / ADAPTER, ADAPTER_FILES)]
    if foreign:
        raise ValueError(f"--out {out} holds files fastsiglip train did not write ({_names(foreign)}); choose an "
                         "empty or new folder (or the --out of an earlier fastsiglip train run, to --resume it)")


def mark_output(out) -> None:
    """Create OUT (if needed) and its marker; after check_output, under the output lock."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        atomic_write(out / MARKER, lambda tmp: tmp.write_text(json.dumps({"written_by": "fastsiglip train",
                                                                          "format": FORMAT}) + "\n"))


def remove_stale_tmp(out) -> None:
    """The `.tmp-*` files and folders a killed run left in OUT and OUT/checkpoints (under the
    output lock, so no live process is writing them)."""
    for folder in (pathlib.Path(out), pathlib.Path(out) / CHECKPOINTS):
        if folder.is_dir():
            for stray in (p for p in folder.glob(f"{TMP_PREFIX}*") if is_tmp(p.name)):
                if stray.is_dir() and not stray.is_symlink():
                    shutil.rmtree(stray, ignore_errors=True)
                else:
                    stray.unlink(missing_ok=True)


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
    tensors = read_tensors(folder / "optimizer.safetensors")
    meta = read_json(folder / "optimizer.json")
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
    for stray in root.glob(f"{TMP_PREFIX}*"):  # a save that crashed before its rename
        if is_tmp(stray.name):
            shutil.rmtree(stray, ignore_errors=True)
    final = root / f"step-{step}"
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        _refuse_foreign(final, CHECKPOINT_FILES, "a checkpoint")

    def fill(tmp: pathlib.Path) -> None:
        save_weights(tmp / WEIGHTS_FILE, model)
        tensors, meta = _optimizer_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(dict(trainer_state, format=FORMAT, step=step), indent=1))

    _write_folder(final, fill)
    for old in list_checkpoints(out)[:-keep_last]:
        if not _foreign(old, CHECKPOINT_FILES):  # a checkpoint someone added files to stays
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_folder(final: pathlib.Path, fill) -> None:
    """fill(tmp) writes the folder's files into `.tmp-<pid>-<name>`; then every file is fsynced
    and the folder takes `final`'s place. An older `final` is first renamed aside (a crash
    between the two renames leaves it there as a `.tmp-*` folder, not half of a new one) and
    deleted after. A failed fill (a full disk) removes the temporary folder and leaves `final`."""
    tmp = tmp_path(final)
    old = tmp.with_name(f"{tmp.name}-old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        for path in sorted(tmp.rglob("*")):
            (fsync_file if path.is_file() else fsync_dir)(path)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


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
    """(trainer state, weights, rng tensors) of a checkpoint folder; ResumeError naming the file
    when one is missing or unreadable (truncated, not JSON / safetensors)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _unreadable(folder / STATE_FILE, e) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else None
        raise ResumeError(f"{folder} was written by another version of fastsiglip (format {got}, "
                          f"this one reads {FORMAT}); start a new --out")
    missing = [k for k in ("step", "samples_seen", "skipped", "args", "model") if k not in state]
    if missing:
        raise _unreadable(folder / STATE_FILE, ValueError(f"it lacks {', '.join(missing)}"))
    return state, read_tensors(folder / WEIGHTS_FILE), read_tensors(folder / "rng.safetensors")


def _unreadable(path: pathlib.Path, error: Exception) -> ResumeError:
    why = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    return ResumeError(f"cannot resume from {path}: {why} (truncated or not written by fastsiglip?); delete its "
                       f"folder {path.parent} to resume from the checkpoint before it, or start a new --out")


def read_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """load_file, with ResumeError naming the file when it is missing, truncated or not safetensors."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise _unreadable(path, e) from None


def read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _unreadable(path, e) from None


def export_final(out, state: dict[str, torch.Tensor], source, write_adapter=None) -> pathlib.Path:
    """OUT/final/ in the hub layout: the source's config.json, tokenizer and preprocessor
    files, and `state` (transformers' keys) as model.safetensors; with `write_adapter`, also
    OUT/final/adapter/ (write_adapter(folder) writes it). Written into a temporary folder,
    every file fsynced, then renamed into place, like a checkpoint."""
    out, source = pathlib.Path(out), pathlib.Path(source)
    final = out / FINAL
    _refuse_foreign(final, FINAL_FILES, "final/")  # before anything is written
    _refuse_foreign(final / ADAPTER, ADAPTER_FILES, "final/adapter/")
    skip = {WEIGHTS_FILE, "model.safetensors.index.json", "model-*-of-*.safetensors"}

    def fill(tmp: pathlib.Path) -> None:
        for name in HUB_FILES:
            if name not in skip and (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        save_file(_state_tensors(state), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if write_adapter is not None:
            write_adapter(tmp / ADAPTER)

    _write_folder(final, fill)
    return final
