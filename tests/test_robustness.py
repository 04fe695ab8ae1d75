"""The output contract of `fastsiglip embed` / `embed-text` and of every command's errors, case by
case (README, "What the commands promise"): a full disk (fault-injected writes), a second process
on one output (a real lock held by another process), a stale lock and stale temporary files, a
real `kill -9` / SIGTERM / SIGINT with the decoding workers' pids checked afterwards, read-only
and missing folders, bad inputs, and one-line errors with exit status 2. Tiny checkpoint, CPU."""

import contextlib
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import fastsiglip
from fastsiglip import api, cli, files

pytest.importorskip("transformers")  # the checkpoint fixture writes with save_pretrained

NOBODY = 65534


@pytest.fixture(autouse=True)
def one_thread_and_no_hang(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(api, "WORKER_TIMEOUT_S", 60)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(siglip_checkpoint):
    return fastsiglip.load(siglip_checkpoint)


@pytest.fixture
def shared_folder():
    """A folder outside pytest's private tmp tree, so that user nobody can reach it."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="fastsiglip-test-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder)


@pytest.fixture
def shared_model(siglip_checkpoint, shared_folder):
    """The tiny model, loaded from a copy user nobody can read (a job fingerprints its files)."""
    copy = shutil.copytree(siglip_checkpoint, shared_folder / "model")
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return fastsiglip.load(copy)


def _photo(seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _photos(folder, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        paths.append(folder / f"p{i:02d}.png")
        _photo(i).save(paths[-1])
    return paths


def _cli(checkpoint, command, *args):
    return cli.main([command, *map(str, args), "--model", str(checkpoint), "--quiet"])


def _one_error_line(err, command="embed"):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"fastsiglip {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _npy(out):
    return np.load(out), json.loads(pathlib.Path(str(out) + ".json").read_text())


def _tmp_files(folder):
    return sorted(p.name for p in pathlib.Path(folder).rglob(f"{files.TMP_PREFIX}*"))


def _fail_fsync(monkeypatch, wanted):
    """A full disk: fsync of any file whose path `wanted(path)` accepts fails with ENOSPC (what a
    write to a full filesystem reports, at the latest when the data is flushed)."""
    real = os.fsync

    def fsync(fd):
        if wanted(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# -- full disk: data first, metadata last, each atomic; the previous output and .partial/ stay ----------


@pytest.mark.parametrize("suffix, failing", [(".npy", ".npy"), (".npy", ".npy.json"),
                                             (".safetensors", ".safetensors")])
def test_full_disk_keeps_previous_output_and_partial(siglip_checkpoint, tmp_path, monkeypatch, capsys, suffix,
                                                     failing):
    images = _photos(tmp_path / "img", 4)
    out = tmp_path / f"e{suffix}"
    common = ["--workers", 0, "--batch-size", 2]  # the same batches in every run: the same bits
    assert _cli(siglip_checkpoint, "embed", *images[:2], "--out", out, *common) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    # The final write of the extended output fails (its temporary file: .tmp-<pid>-e.npy[.json]).
    with monkeypatch.context() as m:
        _fail_fsync(m, lambda path: files.TMP_PREFIX in path and path.endswith(f"-e{failing}"))
        assert _cli(siglip_checkpoint, "embed", *images, "--out", out, *common, "--resume") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and f"e{suffix}.partial" in line and "--resume" in line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before, "previous output changed"
    assert _tmp_files(tmp_path) == [] and (tmp_path / f"e{suffix}.partial").is_dir()
    # Space again: --resume finishes from .partial/ and equals a fresh run.
    assert _cli(siglip_checkpoint, "embed", *images, "--out", out, *common, "--resume") == 0
    fresh = tmp_path / f"fresh{suffix}"
    assert _cli(siglip_checkpoint, "embed", *images, "--out", fresh, *common) == 0
    got, want = api._read_output(out), api._read_output(fresh)
    assert torch.equal(got[0], want[0]) and got[1]["paths"] == want[1]["paths"] == [str(p) for p in images]
    assert not (tmp_path / f"e{suffix}.partial").exists() and _tmp_files(tmp_path) == []


def test_a_crash_between_the_npy_renames_never_pairs_new_rows_with_old_keys(siglip_checkpoint, tmp_path, monkeypatch,
                                                                           capsys):
    """--overwrite with as many other images: a crash after the new .npy is in place but before its
    .json leaves no .json (the old one, which would match the row count, is gone first) and the
    .partial/, from which --resume finishes."""
    first, second = _photos(tmp_path / "a", 2), _photos(tmp_path / "b", 2, start=5)
    out = tmp_path / "e.npy"
    assert _cli(siglip_checkpoint, "embed", *first, "--out", out, "--workers", 0) == 0
    real = os.replace

    def crash_at_the_json(src, dst):
        if str(dst).endswith(".npy.json"):
            raise OSError(errno.EIO, "simulated crash")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(api.os, "replace", crash_at_the_json)
        assert _cli(siglip_checkpoint, "embed", *second, "--out", out, "--workers", 0, "--overwrite") == 2
    capsys.readouterr()
    assert out.is_file() and not (tmp_path / "e.npy.json").exists() and (tmp_path / "e.npy.partial").is_dir()
    assert _cli(siglip_checkpoint, "embed", *second, "--out", out, "--workers", 0, "--resume") == 0  # from .partial/
    assert api._read_output(out)[1]["paths"] == [str(p) for p in second]


def test_full_disk_on_a_fresh_npy_leaves_neither_file(siglip_checkpoint, tmp_path, monkeypatch, capsys):
    images = _photos(tmp_path / "img", 2)
    out = tmp_path / "e.npy"
    _fail_fsync(monkeypatch, lambda path: path.endswith("-e.npy.json"))  # the metadata, written after the data
    assert _cli(siglip_checkpoint, "embed", *images, "--out", out, "--workers", 0) == 2
    _one_error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "e.npy.json").exists() and _tmp_files(tmp_path) == []


def test_full_disk_while_saving_a_batch(siglip_checkpoint, tmp_path, monkeypatch, capsys):
    images = _photos(tmp_path / "img", 4)
    out = tmp_path / "e.safetensors"
    saved = []

    def second_batch(path):  # batch files in .partial/: the first one fits, the second does not
        if ".partial/" in path and path.endswith(".safetensors"):
            saved.append(path)
            return len(saved) == 2
        return False

    with monkeypatch.context() as m:
        _fail_fsync(m, second_batch)
        assert _cli(siglip_checkpoint, "embed", *images, "--out", out, "--workers", 0, "--batch-size", 2) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left" in line and "--resume" in line and not out.exists()
    assert [p.name for p in (tmp_path / "e.safetensors.partial").glob("0*")] == ["00000000.safetensors"]
    assert _cli(siglip_checkpoint, "embed", *images, "--out", out, "--workers", 0, "--batch-size", 2,
                "--resume") == 0
    assert api._read_output(out)[1]["paths"] == [str(p) for p in images]


# -- one process per output: the lock ------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from fastsiglip import files
with files.output_lock(sys.argv[1], "embed"):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def _lock_held_elsewhere(out):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait(30)


def test_second_process_on_one_output_is_refused_and_a_dead_ones_lock_taken_over(siglip_checkpoint, tmp_path,
                                                                                 monkeypatch, capsys):
    images = _photos(tmp_path / "img", 3)
    out = tmp_path / "e.safetensors"
    monkeypatch.setattr(api, "_encode_pixels", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _cli(siglip_checkpoint, "embed", *images, "--out", out, "--workers", 0) == 130
    monkeypatch.undo()
    assert "interrupted (SIGINT)" in capsys.readouterr().err
    partial = tmp_path / "e.safetensors.partial"
    job = (partial / "job.json").read_bytes()
    with _lock_held_elsewhere(out) as holder:
        for flag in ("--overwrite", "--resume"):  # neither may touch the other process's work
            assert _cli(siglip_checkpoint, "embed", *images, "--out", out, "--workers", 0, flag) == 2
            line = _one_error_line(capsys.readouterr().err)
            assert f"being written by another fastsiglip embed (pid {holder.pid})" in line
            assert (partial / "job.json").read_bytes() == job and not out.exists()
        holder.kill()  # dies holding the lock: the kernel releases it, its lock file stays behind
        holder.wait(30)
    assert files.lock_path(out).exists()
    assert _cli(siglip_checkpoint, "embed", *images, "--out", out, "--workers", 0, "--resume") == 0
    assert not files.lock_path(out).exists() and not partial.exists()
    assert api._read_output(out)[1]["paths"] == [str(p) for p in images]


def test_stale_temporary_files_of_a_killed_write_are_removed(siglip_checkpoint, tmp_path):
    images = _photos(tmp_path / "img", 2)
    out = tmp_path / "e.safetensors"
    stale = [tmp_path / f"{files.TMP_PREFIX}999999-e.safetensors", tmp_path / f"{files.TMP_PREFIX}999999-e.npy"]
    for path in stale:
        path.write_bytes(b"half a file")
    assert _cli(siglip_checkpoint, "embed", *images, "--out", out, "--workers", 0) == 0
    assert not stale[0].exists(), "this output's leftover is removed"
    assert stale[1].exists(), "another output's temporary file is not ours to remove"


def test_stale_cleanup_spares_an_output_whose_name_ends_like_ours(tmp_path):
    """`.tmp-<pid>-a-e.safetensors` is a live job's write of a-e.safetensors (its own lock), not a
    leftover of e.safetensors."""
    other = tmp_path / f"{files.TMP_PREFIX}{os.getpid()}-a-e.safetensors"
    ours = tmp_path / f"{files.TMP_PREFIX}999999-e.safetensors"
    user = tmp_path / f"{files.TMP_PREFIX}notes-e.safetensors"
    for path in (other, ours, user):
        path.write_bytes(b"x")
    files.remove_stale_tmp(tmp_path, "e.safetensors")
    assert other.exists() and user.exists() and not ours.exists()
    assert files.is_tmp(ours.name) and not files.is_tmp(user.name) and not files.is_tmp(".tmp-notes")


def test_lock_of_dot_and_dot_dot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / ".")
    (tmp_path / "sub").mkdir()
    assert files.lock_path(".") == tmp_path.parent / f"{tmp_path.name}.lock"
    monkeypatch.chdir(tmp_path / "sub")
    assert files.lock_path("..") == tmp_path.parent / f"{tmp_path.name}.lock"
    with files.output_lock(".", "test") as held:
        assert held.exists()


# -- signals: kill -9, SIGTERM, Ctrl-C; no worker outlives the main process ------------------------------------

SLOW = """
import os, time
if os.environ.get("FASTSIGLIP_TEST_SLOW"):
    import fastsiglip.api as api
    real = api._encode_pixels
    def slow(*args):
        time.sleep(0.4)
        return real(*args)
    api._encode_pixels = slow
"""


def _children(pid):
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid):
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended (reaping is its parent's business)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the worker processes")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_signal_during_embed_with_workers(siglip_checkpoint, tmp_path, signum):
    images = [tmp_path / "img" / f"p{i:02d}.jpg" for i in range(48)]  # camera-sized: decoding takes a while
    (tmp_path / "img").mkdir()
    for path in images:
        _photo(0, (640, 480)).save(path, quality=90)
    out = tmp_path / "e.safetensors"
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path / "hook"), FASTSIGLIP_TEST_SLOW="1")
    command = [sys.executable, "-m", "fastsiglip", "embed", str(tmp_path / "img"), "--out", str(out), "--model",
               str(siglip_checkpoint), "--workers", "2", "--batch-size", "8", "--quiet"]
    # Once the main process is gone, a worker that still has items to send blocks in its queue's
    # feeder thread, where torch's own check of the parent never runs (the leak this test holds off).
    job = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        partial = tmp_path / "e.safetensors.partial"
        deadline = time.monotonic() + 120
        while not list(partial.glob("0*.safetensors")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _children(job.pid)
        assert job.poll() is None and len(workers) >= 2, "the job should be embedding, with its 2 workers"
        os.kill(job.pid, signum)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers)), f"decoding workers {workers} outlived the main process"
    assert not out.exists() and list(partial.glob("0*.safetensors")), "finished batches are kept"
    if signum == signal.SIGKILL:
        assert job.returncode == -signal.SIGKILL
    else:
        assert job.returncode == 128 + signum, err
        name = signal.Signals(signum).name
        assert f"fastsiglip embed: interrupted ({name}): the finished batches are kept in {partial}" in err
        assert "Traceback" not in err and "--resume" in err
    done = len(list(partial.glob("0*.safetensors")))
    assert done < len(images)
    run = subprocess.run(command + ["--resume"], env=dict(env, FASTSIGLIP_TEST_SLOW=""), capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert api._read_output(out)[1]["paths"] == [str(p) for p in images]


# -- folders: the output's, and the inputs' -------------------------------------------------------------------


@contextlib.contextmanager
def _as_another_user():
    """Root passes every permission check: as root, run the body as user nobody (effective uid)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


def test_output_folder_missing_read_only_or_a_file(siglip_checkpoint, shared_model, tmp_path, shared_folder,
                                                   capsys):
    images = _photos(shared_folder / "img", 2)
    (shared_folder / "img").chmod(0o755)
    deep = tmp_path / "new" / "deeper" / "e.npy"  # a missing folder is created
    assert _cli(siglip_checkpoint, "embed", *images, "--out", deep, "--workers", 0) == 0 and deep.is_file()
    (tmp_path / "a-file").write_text("x")
    assert _cli(siglip_checkpoint, "embed", *images, "--out", tmp_path / "a-file" / "e.npy", "--workers", 0) == 2
    assert "cannot create its folder" in _one_error_line(capsys.readouterr().err)
    read_only = shared_folder / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    with _as_another_user():
        with pytest.raises(ValueError, match=r"cannot write in its folder .*ro \(Permission denied\); choose another"):
            api.embed_files(shared_model, images, read_only / "e.npy", workers=0, progress=False)
    assert list(read_only.iterdir()) == []


def test_out_is_a_folder_is_refused_before_any_encoding(siglip_checkpoint, tmp_path, monkeypatch, capsys):
    images = _photos(tmp_path / "img", 2)
    (tmp_path / "emb.safetensors").mkdir()
    calls = []
    monkeypatch.setattr(api, "_encode_pixels", lambda *a: calls.append(1))
    assert _cli(siglip_checkpoint, "embed", *images, "--out", tmp_path / "emb.safetensors") == 2
    assert "is a folder: name a file inside it" in _one_error_line(capsys.readouterr().err) and calls == []


def test_symlinked_subfolders_followed_unreadable_ones_reported(shared_model, shared_folder):
    root = shared_folder / "photos"
    images = _photos(root, 2) + _photos(shared_folder / "elsewhere", 2, start=2)
    (root / "linked").symlink_to(shared_folder / "elsewhere", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a link loop is walked once
    (root / "locked").mkdir()
    _photo(9).save(root / "locked" / "hidden.png")
    for path in (root, shared_folder / "elsewhere"):
        path.chmod(0o755)
    (root / "locked").chmod(0o000)
    out = shared_folder / "out" / "e.npy"
    (shared_folder / "out").mkdir(mode=0o777)
    (shared_folder / "out").chmod(0o777)
    with _as_another_user():
        with pytest.raises(PermissionError, match="locked"):
            api.list_images(root)
        report = api.embed_files(shared_model, root, out, workers=0, progress=False)
    assert report["paths"] == [str(root / "linked" / "p02.png"), str(root / "linked" / "p03.png"),
                               str(images[0]), str(images[1])]
    assert [(k, "Permission denied" in why) for k, why in report["failed"]] == [(str(root / "locked"), True)]


# -- inputs ------------------------------------------------------------------------------------------------------


def test_resume_over_a_file_fastsiglip_did_not_write(siglip_checkpoint, tmp_path, capsys):
    images = _photos(tmp_path / "img", 2)
    for name in ("e.safetensors", "e.npy"):
        out = tmp_path / name
        out.write_bytes(b"my thesis, not embeddings")
        if name == "e.npy":
            (tmp_path / "e.npy.json").write_text("{}")
        assert _cli(siglip_checkpoint, "embed", *images, "--out", out, "--workers", 0, "--resume") == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "is not an embeddings file written by fastsiglip" in line and "--overwrite" in line
        assert out.read_bytes() == b"my thesis, not embeddings"
    (tmp_path / "x.npy").write_bytes(b"no row map")
    assert _cli(siglip_checkpoint, "embed", *images, "--out", tmp_path / "x.npy", "--resume") == 2
    assert "has no x.npy.json" in _one_error_line(capsys.readouterr().err)


def test_manifest_row_with_an_empty_image_cell_is_skipped_and_listed(siglip_checkpoint, tmp_path, capsys):
    images = _photos(tmp_path / "img", 2)
    (tmp_path / "m.csv").write_text(f"image,caption\n{images[0]},a\n,b\n{images[1]},c\n")
    out = tmp_path / "e.npy"
    assert _cli(siglip_checkpoint, "embed", tmp_path / "m.csv", "--out", out, "--workers", 0) == 1  # done in part
    err = capsys.readouterr().err
    assert "m.csv, row 2: empty 'image' cell" in err and "Traceback" not in err
    assert _npy(out)[1]["paths"] == [str(p) for p in images]


def test_invalid_utf8_names_the_file_and_line(siglip_checkpoint, tmp_path, capsys):
    images = _photos(tmp_path / "img", 1)
    (tmp_path / "list.txt").write_bytes(f"{images[0]}\n".encode() + b"caf\xe9.png\n")
    assert _cli(siglip_checkpoint, "embed", tmp_path / "list.txt", "--out", tmp_path / "e.npy") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "list.txt" in line and "line 2" in line and "UTF-8" in line
    (tmp_path / "t.txt").write_bytes(b"fine\nna\xefve\n")
    assert _cli(siglip_checkpoint, "embed-text", tmp_path / "t.txt", "--out", tmp_path / "t.npy") == 2
    line = _one_error_line(capsys.readouterr().err, "embed-text")
    assert "t.txt" in line and "line 2" in line and "UTF-8" in line


def test_cr_only_line_endings(siglip_checkpoint, model, tmp_path):
    (tmp_path / "t.txt").write_bytes(b"a cat\ra dog\r\ra bird\r")
    out = tmp_path / "t.safetensors"
    assert _cli(siglip_checkpoint, "embed-text", tmp_path / "t.txt", "--out", out) == 0
    emb, meta = api._read_output(out, "keys")
    assert meta["keys"] == ["1", "2", "3", "4"]
    assert torch.allclose(emb, fastsiglip.encode_texts(model, ["a cat", "a dog", "", "a bird"]), atol=1e-6)


def test_embed_text_resume_does_not_promise_appending(capsys):
    with pytest.raises(SystemExit):
        cli.main(["embed-text", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    resume = text[text.index("--resume continue"):text.index("--overwrite replace")]  # the option's help
    assert "another --out" in resume and "add" not in resume, resume


# -- every command: one line, exit 2; --debug / FASTSIGLIP_DEBUG=1 show the traceback ----------------------------


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    image = _photos(tmp_path / "img", 1)[0]
    argv = ["classify", str(image), "--labels", "cat", "--model", str(tmp_path / "no-such-model")]
    assert cli.main(argv) == 2
    _one_error_line(capsys.readouterr().err, "classify")
    assert cli.main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("fastsiglip classify: error: ")
    monkeypatch.setenv("FASTSIGLIP_DEBUG", "1")
    assert cli.main(argv) == 2 and "Traceback" in capsys.readouterr().err


def test_a_data_loader_workers_error_is_one_line():
    """torch re-raises a DataLoader worker's error with the worker's traceback inside the message:
    the CLI shows the error's own last line and where it happened."""
    try:
        raise ValueError("7 images in a row could not be read; last: x.png: truncated")
    except ValueError:
        wrapped = torch._utils.ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(ValueError) as caught:
        wrapped.reraise()
    assert "Original Traceback" in str(caught.value)
    assert cli._one_line(caught.value) == ("ValueError: 7 images in a row could not be read; last: x.png: truncated "
                                           "(in DataLoader worker process 1)")


@pytest.mark.parametrize("argv", [["embed", "x.png", "--out", "e.npy", "--batch-size", "abc"],
                                  ["embed", "x.png"], ["train", "--no-such-option"], ["nonsense"]])
def test_argument_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastsiglip") and ": error: " in lines[0], err
    assert "usage:" not in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "m", "--train", "t.csv", "--out", "o", "--batch-size", "2", "--steps", "1",
      "--eval-batch-size", "0"],
     "--eval-batch-size must be at least 1"),
    (["bench", "--preset", "siglip-base-patch16-224", "--iters", "0"], "--iters must be at least 1"),
    (["bench", "--preset", "siglip-base-patch16-224", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["embed", "x.png", "--out", "e.npy", "--workers", "-1"], "--workers must be at least 0"),
    (["embed", "x.png", "--out", "e.csv"], "must end in .safetensors or .npy"),
    (["classify", "x.png", "--labels", "a", "--template", "{} {}"], "exactly one '{}'"),
])
def test_bad_numbers_and_options(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in _one_error_line(capsys.readouterr().err, argv[0])
