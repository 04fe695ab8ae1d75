"""`fastsiglip train` and its output folder: nothing of the user's is lost (unrelated --out
refused, only our own final/ and checkpoints replaced), one job per output (the lock), distinct
pairs in every step (epoch tails), clear errors for garbage checkpoints and bad numbers, and a
killed run's temporary files removed by the next one.

Same tiny checkpoint and synthetic data as tests/test_train.py (its fixtures and helpers).
"""

import dataclasses
import errno
import math
import pathlib
import subprocess
import sys

import pytest

import fastsiglip
from fastsiglip import data as data_lib
from fastsiglip import files
from fastsiglip.train import checkpoint as ckpt

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))  # for tests.test_train (last: kernels/ stays theirs)
from tests.test_train import FAST, write_shapes  # noqa: E402
from tests.test_train import one_thread as one_thread  # noqa: E402 (autouse fixture)
from tests.test_train import tiny as tiny  # noqa: E402 (fixture: the tiny checkpoint)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return {"train": write_shapes(folder, "train", 64, 0), "5": write_shapes(folder, "five", 5, 3)}


def _tree(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run(tiny, train, out, **kw):
    return fastsiglip.finetune(tiny, train=train, out=out, **dict(dict(batch_size=16, steps=1, **FAST), **kw))


# ---------------------------------------------------------------------------------------------
# 1. An unrelated --out is refused before anything is written; only our own files are replaced
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user_files", [["notes.txt", "photos/a.jpg"], ["final/model_card.md"],
                                        ["fastsiglip-train.json", "checkpoints"], [".tmp-notes"],
                                        ["fastsiglip-train.json", "final/adapter/mine.txt"]])
def test_unrelated_out_is_refused_untouched(tiny, shapes, tmp_path, user_files):
    out = tmp_path / "mine"
    for name in user_files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's")
    before = _tree(out)
    with pytest.raises(ValueError, match=r"empty or new folder.*--resume") as refused:
        _run(tiny, shapes["train"], out)
    assert all(name.split("/")[0] in str(refused.value) for name in user_files if name != ckpt.MARKER)
    with pytest.raises(ValueError, match="empty or new folder"):
        _run(tiny, shapes["train"], out, resume=True)
    assert _tree(out) == before and not files.lock_path(out).exists()


def test_user_file_in_a_run_is_kept(tiny, shapes, tmp_path):
    """A file added to a finished run's final/ (or a checkpoint) stops the next run from replacing it."""
    out = tmp_path / "run"
    _run(tiny, shapes["train"], out)
    assert (out / ckpt.MARKER).is_file() and {p.name for p in out.iterdir()} <= set(ckpt.RUN_ENTRIES)
    (out / "final" / "my_notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"final/my_notes\.txt"):
        _run(tiny, shapes["train"], out, resume=True)
    assert (out / "final" / "my_notes.txt").read_text() == "keep me"
    # export_final itself refuses too (the library call, whatever checked OUT before)
    with pytest.raises(ValueError, match=r"refusing to replace .*final.*my_notes\.txt"):
        ckpt.export_final(out, fastsiglip.load(tiny).state_dict(), tiny)
    assert (out / "final" / "my_notes.txt").read_text() == "keep me"
    (out / "final" / "my_notes.txt").unlink()
    step = ckpt.list_checkpoints(out)[-1]
    (step / "extra.bin").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"checkpoints/step-1/extra\.bin"):
        _run(tiny, shapes["train"], out, resume=True)
    assert (step / "extra.bin").read_bytes() == b"mine"


def test_resume_of_an_earlier_run_and_empty_out_are_fine(tiny, shapes, tmp_path):
    (tmp_path / "empty").mkdir()
    assert _run(tiny, shapes["train"], tmp_path / "empty")["step"] == 1
    assert _run(tiny, shapes["train"], tmp_path / "empty", resume=True)["step"] == 1  # done already: re-exported


# ---------------------------------------------------------------------------------------------
# 2. One job per output
# ---------------------------------------------------------------------------------------------


def test_second_job_on_the_same_out_is_refused(tiny, shapes, tmp_path):
    out = tmp_path / "busy"
    code = ("import sys; from fastsiglip import files\n"
            "with files.output_lock(sys.argv[1], 'train'):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-P", "-c", code, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(files.OutputBusy, match=rf"pid {holder.pid}.*wait for it"):
            _run(tiny, shapes["train"], out)
        assert not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert _run(tiny, shapes["train"], out)["step"] == 1  # free again once the holder is gone


# ---------------------------------------------------------------------------------------------
# 3. Every step's pairs are distinct
# ---------------------------------------------------------------------------------------------


def test_steps_across_epoch_boundaries_hold_distinct_pairs(tiny, shapes, tmp_path):
    pairs = data_lib.open_pairs(shapes["train"])
    batches = data_lib.TrainBatches(pairs, tiny, seed=0, batch_size=48, world_size=2, micro_batch_size=8)
    steps = [[k for r in range(2) for m in range(3) for k in batches[(s, r, m)]["keys"]] for s in range(4)]
    for keys in steps:
        assert len(keys) == 48 and len(set(keys)) == 48
    assert steps[0] != steps[1]  # step 1 is epoch 1's first batch (epoch 0's last 16 pairs are its tail)
    out = tmp_path / "run"
    result = _run(tiny, shapes["train"], out, batch_size=48, micro_batch_size=16, steps=2)
    assert result["metrics"]["samples_seen"] == 96 and math.isfinite(result["metrics"]["loss"])
    state, _, _ = ckpt.read_resume(ckpt.list_checkpoints(out)[-1])
    assert state["data_position"] == 2 * 64  # step 2 starts epoch 2


def test_bad_image_substitute_is_not_a_pair_of_the_step(tiny, shapes, tmp_path):
    pairs = data_lib.open_pairs(shapes["train"])
    index = pairs.index_at(5, 0)
    pairs.records[index] = dataclasses.replace(pairs.records[index], image=str(tmp_path / "missing.png"))
    batches = data_lib.TrainBatches(pairs, tiny, seed=0, batch_size=48, world_size=1, micro_batch_size=48)
    item = batches[(0, 0, 0)]
    assert len(item["bad"]) == 1 and len(item["keys"]) == 48 and len(set(item["keys"])) == 48


def test_batch_larger_than_the_data_is_an_error(tiny, shapes, tmp_path):
    with pytest.raises(ValueError, match=r"--batch-size 16 is larger than the 5 training pairs"):
        _run(tiny, shapes["5"], tmp_path / "run", batch_size=16, micro_batch_size=8)
    assert not (tmp_path / "run").exists()
    with pytest.raises(data_lib.DataError, match="5 training pairs"):
        data_lib.TrainBatches(data_lib.open_pairs(shapes["5"]), tiny, seed=0, batch_size=8, world_size=1,
                              micro_batch_size=8)


# ---------------------------------------------------------------------------------------------
# 4. --resume over garbage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, damage", [("model.safetensors", "truncate"), ("rng.safetensors", "garbage"),
                                          ("optimizer.safetensors", "truncate"), ("optimizer.json", "garbage"),
                                          ("trainer_state.json", "truncate")])
def test_resume_over_a_damaged_checkpoint_names_the_file(tiny, shapes, tmp_path, name, damage):
    out = tmp_path / "run"
    _run(tiny, shapes["train"], out, steps=2, save_every=1)
    path = out / "checkpoints" / "step-2" / name
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\x00garbage\xff" * 3)
    with pytest.raises(ckpt.ResumeError, match=rf"{name}.*delete its folder .*step-2"):
        _run(tiny, shapes["train"], out, steps=2, save_every=1, resume=True)


# ---------------------------------------------------------------------------------------------
# 5. A killed run's temporary files
# ---------------------------------------------------------------------------------------------


def test_stale_temporary_files_are_removed_by_the_next_run(tiny, shapes, tmp_path):
    out = tmp_path / "run"
    _run(tiny, shapes["train"], out, steps=2, save_every=1)
    stale = [out / ".tmp-99999-metrics.jsonl", out / ".tmp-99999-final", out / "checkpoints" / ".tmp-99999-step-3"]
    stale[0].write_text("half a line")
    for folder in stale[1:]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    result = _run(tiny, shapes["train"], out, steps=2, save_every=1, resume=True)
    assert result["step"] == 2 and not any(p.exists() for p in stale)


# ---------------------------------------------------------------------------------------------
# 6. Numbers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("grad_clip", -1.0, r"--grad-clip must be a finite number >= 0 \(.*0 disables clipping\), got -1"),
    ("grad_clip", math.nan, "--grad-clip must be a finite number"),
    ("lr", 0.0, r"--lr must be a finite number > 0, got 0"),
    ("lr", math.inf, "--lr must be a finite number"),
    ("weight_decay", -0.1, r"--weight-decay must be a finite number >= 0"),
    ("warmup_steps", -1, r"--warmup-steps must be an integer >= 0"),
    ("warmup_steps", 3, r"--warmup-steps 3 is more than --steps 2"),
    ("max_bad_fraction", math.nan, "--max-bad-fraction must be a finite number"),
])
def test_numbers_are_checked(tiny, shapes, tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        _run(tiny, shapes["train"], tmp_path / "run", steps=2, **{option: value})
    assert not (tmp_path / "run").exists() and not files.lock_path(tmp_path / "run").exists()


def test_grad_clip_zero_disables_clipping(tiny, shapes, tmp_path):
    assert _run(tiny, shapes["train"], tmp_path / "run", grad_clip=0)["step"] == 1



def test_disk_full_during_the_export_keeps_the_previous_final(tiny, shapes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(tiny, shapes["train"], out)
    before = (out / "final" / "model.safetensors").read_bytes()
    real = ckpt.save_file

    def full(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OSError, match="simulated"):
        _run(tiny, shapes["train"], out, resume=True)
    assert (out / "final" / "model.safetensors").read_bytes() == before
    monkeypatch.setattr(ckpt, "save_file", real)
    assert _run(tiny, shapes["train"], out, resume=True)["final"] == out / "final"
    assert not [p for p in out.iterdir() if p.name.startswith(files.TMP_PREFIX)]


def test_cli_refuses_an_unrelated_out_in_one_line(tiny, shapes, tmp_path, capsys):
    from fastsiglip import cli

    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    argv = ["train", "--model", str(tiny), "--train", str(shapes["train"]), "--out", str(out), "--batch-size", "16",
            "--steps", "1", "--workers", "0", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "thesis.tex" in err and "empty or new folder" in err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    argv[argv.index("--out") + 1] = str(tmp_path / "new")
    assert cli.main(argv + ["--grad-clip", "-1"]) == 2
    assert "0 disables clipping" in capsys.readouterr().err and not (tmp_path / "new").exists()
