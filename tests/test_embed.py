"""`fastsiglip embed` at scale and `fastsiglip embed-text`: decoding in DataLoader workers
(bit-identical to the main process), file lists, manifests and tar shards as inputs, text
corpora, and what an existing output needs (--resume or --overwrite). Tiny checkpoint
(conftest.siglip_checkpoint), CPU."""

import io
import pathlib
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import fastsiglip
from fastsiglip import api, cli

pytest.importorskip("transformers")  # the checkpoint fixture writes with save_pretrained


@pytest.fixture(autouse=True)
def one_thread_and_no_hang(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with the DataLoader workers
    monkeypatch.setattr(api, "WORKER_TIMEOUT_S", 60)  # a stuck worker fails the test instead of hanging it
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(siglip_checkpoint):
    return fastsiglip.load(siglip_checkpoint)


def _photo(seed, size=(64, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i in range(7):
        _photo(i, (40 + 9 * i, 30 + 5 * i)).save(folder / f"p{i}.{'jpg' if i % 2 else 'png'}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


def _run(folder, command, *args):
    return cli.main([command, *map(str, args), "--model", str(folder), "--quiet"])


def _read(out):
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        return f.get_tensor("embeddings"), {k: json.loads(v) for k, v in f.metadata().items()}


@pytest.mark.parametrize("batch_size", [3, 10])  # 10: DataLoader items of 5 images, two per batch (data.regroup)
def test_workers_bit_identical_to_main_process(siglip_checkpoint, model, photos, tmp_path, capsys, batch_size):
    results = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.safetensors"
        assert _run(siglip_checkpoint, "embed", photos, "--out", out, "--workers", workers, "--batch-size",
                    batch_size) == 1  # done in part
        assert "broken.jpg" in capsys.readouterr().err  # skipped and listed
        results[workers] = _read(out)
    (emb0, meta0), (emb2, meta2) = results[0], results[2]
    assert torch.equal(emb0, emb2), "decoding in worker processes must give the very same embeddings"
    good = sorted(str(p) for p in photos.iterdir() if p.name != "broken.jpg")
    assert meta0["paths"] == meta2["paths"] == good
    assert [k for k, _ in meta2["failed"]] == [str(photos / "broken.jpg")]
    assert torch.allclose(emb2, fastsiglip.encode_images(model, good), atol=1e-6)
    assert emb2.dtype == torch.float32 and torch.allclose(emb2.norm(dim=-1), torch.ones(len(good)))


def test_workers_interrupted_then_resumed(siglip_checkpoint, photos, tmp_path, monkeypatch):
    out = tmp_path / "e.safetensors"
    real, calls = api._encode_pixels, {"n": 0}

    def crash_on_second_batch(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(api, "_encode_pixels", crash_on_second_batch)
    assert _run(siglip_checkpoint, "embed", photos, "--out", out, "--workers", 2, "--batch-size", 3) == 130  # Ctrl-C
    assert not out.exists()
    seen = []
    monkeypatch.setattr(api, "_encode_pixels", lambda m, c, batch: seen.extend(batch["keys"]) or real(m, c, batch))
    assert _run(siglip_checkpoint, "embed", photos, "--out", out, "--workers", 2, "--batch-size", 3, "--resume") == 1
    files = sorted(str(p) for p in photos.iterdir())
    assert seen == [f for f in files[3:] if not f.endswith("broken.jpg")], "only what the first run had not done"
    fresh = tmp_path / "fresh.safetensors"
    monkeypatch.setattr(api, "_encode_pixels", real)
    assert _run(siglip_checkpoint, "embed", photos, "--out", fresh, "--workers", 0, "--batch-size", 3) == 1
    (emb, meta), (emb_fresh, meta_fresh) = _read(out), _read(fresh)
    assert meta["paths"] == meta_fresh["paths"] and torch.equal(emb, emb_fresh)
    assert meta["failed"] == meta_fresh["failed"] and not (tmp_path / "e.safetensors.partial").exists()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _png(seed):
    buf = io.BytesIO()
    _photo(seed).save(buf, format="PNG")
    return buf.getvalue()


def test_inputs_file_list_manifest_and_tar_shards(siglip_checkpoint, model, photos, tmp_path, capsys):
    names = ["p0.png", "p1.jpg", "p2.png"]
    (tmp_path / "list.txt").write_text(f"# my photos\n{photos / names[0]}\n\n{photos / names[1]}\n")
    (tmp_path / "m.csv").write_text("image,other\n" + "".join(f"{photos / n},x\n" for n in names[1:]))
    for shard, seeds in (("s-0.tar", (10, 11)), ("s-1.tar", (12,))):
        with tarfile.open(tmp_path / shard, "w") as tar:
            for seed in seeds:
                _add(tar, f"dir/k{seed}.png", _png(seed))
                _add(tar, f"dir/k{seed}.txt", b"a caption, unused")
            if shard == "s-1.tar":
                _add(tar, "dir/orphan.txt", b"a caption without an image")
                _add(tar, "dir/bad.jpg", b"not an image")
    out = tmp_path / "e.npy"
    assert _run(siglip_checkpoint, "embed", tmp_path / "list.txt", tmp_path / "m.csv", tmp_path / "s-{0..1}.tar",
                "--out", out, "--workers", 2, "--batch-size", 2) == 1  # dir/bad and dir/orphan skipped
    err = capsys.readouterr().err
    assert "skipped dir/orphan" in err and "no image member" in err and "skipped dir/bad" in err
    meta = json.loads((tmp_path / "e.npy.json").read_text())
    # Keys: the list's lines, the manifest's values (p1 twice: the same file, embedded once), __key__.
    expected = [str(photos / n) for n in names] + ["dir/k10", "dir/k11", "dir/k12"]
    assert meta["paths"] == expected
    assert sorted(k for k, _ in meta["failed"]) == ["dir/bad", "dir/orphan"]
    want = fastsiglip.encode_images(model, [str(photos / n) for n in names] + [_photo(s) for s in (10, 11, 12)])
    assert torch.allclose(torch.from_numpy(np.load(out)), want, atol=1e-6)
    (tmp_path / "no_image_column.csv").write_text("path\nx.png\n")
    assert _run(siglip_checkpoint, "embed", tmp_path / "no_image_column.csv", "--out", tmp_path / "x.npy") == 2
    assert "--image-column" in capsys.readouterr().err


def test_existing_output_needs_resume_or_overwrite(siglip_checkpoint, photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "e.safetensors"
    assert _run(siglip_checkpoint, "embed", photos / "p0.png", "--out", out, "--workers", 0) == 0
    before = out.read_bytes()
    assert _run(siglip_checkpoint, "embed", photos / "p1.jpg", "--out", out, "--workers", 0) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--resume" in err and "--overwrite" in err and out.read_bytes() == before
    assert _run(siglip_checkpoint, "embed", photos / "p1.jpg", "--out", out, "--resume", "--overwrite") == 2
    assert "not both" in capsys.readouterr().err
    assert _run(siglip_checkpoint, "embed", photos / "p1.jpg", "--out", out, "--workers", 0, "--overwrite") == 0
    assert _read(out)[1]["paths"] == [str(photos / "p1.jpg")]
    # An unfinished run's work is not thrown away by accident either.
    monkeypatch.setattr(api, "_encode_pixels", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _run(siglip_checkpoint, "embed", photos, "--out", tmp_path / "u.safetensors", "--workers", 0) == 130  # Ctrl-C
    monkeypatch.undo()
    assert (tmp_path / "u.safetensors.partial").is_dir()
    assert _run(siglip_checkpoint, "embed", photos, "--out", tmp_path / "u.safetensors", "--workers", 0) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert _run(siglip_checkpoint, "embed", photos, "--out", tmp_path / "u.safetensors", "--workers", 0,
                "--overwrite") == 1
    assert not (tmp_path / "u.safetensors.partial").exists()


LONG = " ".join(["red car on the big house"] * 40)  # far more than the checkpoint's 64 tokens


def test_embed_text_round_trip(siglip_checkpoint, model, tmp_path, capsys):
    texts = ["a photo of a cat", "", "two dogs", LONG, LONG + " and then something else entirely"]
    (tmp_path / "t.txt").write_text("\r\n".join(texts) + "\r\n")
    out = tmp_path / "t.safetensors"
    assert _run(siglip_checkpoint, "embed-text", tmp_path / "t.txt", "--out", out, "--batch-size", 2) == 0
    assert "wrote 5 embeddings" in capsys.readouterr().out
    emb, meta = _read(out)
    assert meta["keys"] == ["1", "2", "3", "4", "5"], "one row per line, empty lines kept"
    assert torch.allclose(emb, fastsiglip.encode_texts(model, texts), atol=1e-6)
    # Over-long texts are truncated as the tokenizer does (to the checkpoint's 64 tokens, EOS kept): the
    # two long lines differ only past that point, so they get the same ids and embedding.
    ids = fastsiglip.load_processor(siglip_checkpoint)(text=texts[3:])["input_ids"]
    assert ids.shape == (2, 64) and torch.equal(ids[0], ids[1])
    assert torch.allclose(emb[3], emb[4], atol=1e-6)
    assert not torch.allclose(emb[1], emb[0])
    # .jsonl and .csv: a named column, keys from an id column or the row number.
    rows = [{"id": f"doc-{i}", "body": t} for i, t in enumerate(texts[:3])]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_j = tmp_path / "j.npy"
    assert _run(siglip_checkpoint, "embed-text", tmp_path / "t.jsonl", "--out", out_j, "--column", "body",
                "--id-column", "id") == 0
    assert json.loads((tmp_path / "j.npy.json").read_text())["keys"] == ["doc-0", "doc-1", "doc-2"]
    # other batches (3 texts in one, against 2 + 1): the same numbers up to float rounding
    assert torch.allclose(torch.from_numpy(np.load(out_j)), emb[:3], atol=1e-6)
    (tmp_path / "t.csv").write_text('text,n\n"two dogs",1\n"a photo of a cat",2\n')
    report = api.embed_texts(model, tmp_path / "t.csv", tmp_path / "c.safetensors", progress=False)
    assert report["keys"] == ["1", "2"] and torch.allclose(_read(tmp_path / "c.safetensors")[0], emb[[2, 0]], atol=1e-6)
    # Bad input: a missing column, repeated ids.
    assert _run(siglip_checkpoint, "embed-text", tmp_path / "t.jsonl", "--out", tmp_path / "x.npy") == 2
    assert "no column 'text'" in capsys.readouterr().err
    (tmp_path / "dup.csv").write_text("text,id\na,1\nb,1\n")
    assert _run(siglip_checkpoint, "embed-text", tmp_path / "dup.csv", "--out", tmp_path / "x.npy",
                "--id-column", "id") == 2
    assert "repeats '1'" in capsys.readouterr().err


def test_embed_text_interrupted_then_resumed(siglip_checkpoint, model, tmp_path, monkeypatch):
    texts = [f"text number {i} {'cat' if i % 2 else 'dog'}" for i in range(7)]
    (tmp_path / "t.txt").write_text("\n".join(texts))  # no final newline: still 7 lines
    out = tmp_path / "t.safetensors"
    real, seen = api.encode_texts, []

    def crash_on_third_batch(m, batch, **kwargs):
        if len(seen) == 4:
            raise KeyboardInterrupt
        seen.extend(batch)
        return real(m, batch, **kwargs)

    monkeypatch.setattr(api, "encode_texts", crash_on_third_batch)
    assert _run(siglip_checkpoint, "embed-text", tmp_path / "t.txt", "--out", out, "--batch-size", 2) == 130  # Ctrl-C
    assert not out.exists() and seen == texts[:4]
    seen.clear()
    monkeypatch.setattr(api, "encode_texts", lambda m, batch, **k: seen.extend(batch) or real(m, batch, **k))
    assert _run(siglip_checkpoint, "embed-text", tmp_path / "t.txt", "--out", out, "--batch-size", 2,
                "--resume") == 0
    assert seen == texts[4:]
    emb, meta = _read(out)
    assert meta["keys"] == [str(i) for i in range(1, 8)]
    assert torch.allclose(emb, real(model, texts), atol=1e-6)
    assert _run(siglip_checkpoint, "embed-text", tmp_path / "t.txt", "--out", out) == 2  # exists: --resume/--overwrite
    # A line inserted: every later line number now names another text, so --resume is refused.
    (tmp_path / "t.txt").write_text("\n".join(texts[:2] + ["an inserted line"] + texts[2:]))
    with pytest.raises(ValueError, match="written from other texts.*another --out"):
        api.embed_texts(model, tmp_path / "t.txt", out, resume=True, progress=False)


# Loaded by the torchrun processes of the test below (PYTHONPATH): rank 1 dies without any cleanup,
# as under SIGKILL, when it is about to embed its third batch.
KILL_RANK_1 = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("FASTSIGLIP_TEST_KILL"):
    import fastsiglip.api as api
    real, calls = api._encode_pixels, [0]
    def dying(*args):
        calls[0] += 1
        if calls[0] == 3:
            os._exit(9)
        return real(*args)
    api._encode_pixels = dying
"""


def test_torchrun_two_processes_equal_one(siglip_checkpoint, model, photos, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    out = tmp_path / "two" / "e.safetensors"
    out.parent.mkdir()
    common = ["--model", str(siglip_checkpoint), "--workers", "0", "--batch-size", "1", "--quiet"]
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_RANK_1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path / "hook"))
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "fastsiglip", "embed", str(photos), "--out", str(out), *common]
    # Rank 1 killed midway: the job fails, rank 1's two finished batches are kept.
    run = subprocess.run(command, env=dict(env, FASTSIGLIP_TEST_KILL="1"), capture_output=True, text=True,
                         timeout=240)
    assert run.returncode != 0 and not api.index_path(out).exists()
    assert len(list((out.parent / "e-00001-of-00002.safetensors.partial").glob("0*.safetensors"))) == 2
    run = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stderr[-3000:]  # done in part: broken.jpg skipped
    one = tmp_path / "one.safetensors"
    assert cli.main(["embed", str(photos), "--out", str(one), *common]) == 1
    emb_one, meta_one = _read(one)
    index = json.loads(api.index_path(out).read_text())
    assert [s["file"] for s in index["files"]] == ["e-00000-of-00002.safetensors", "e-00001-of-00002.safetensors"]
    shards = [_read(out.parent / s["file"]) for s in index["files"]]
    assert [s["rows"] for s in index["files"]] == [len(m["paths"]) for _, m in shards]
    assert index["rows"] == len(meta_one["paths"]) and not out.exists()
    assert [k for _, m in shards for k in m["paths"]] == meta_one["paths"], "the union of the shards, in order"
    assert torch.equal(torch.cat([e for e, _ in shards]), emb_one)
    assert [k for k, _ in index["failed"]] == [k for k, _ in meta_one["failed"]] == [str(photos / "broken.jpg")]
    # Each shard resumes on its own: rank 1's share, interrupted, then resumed (rank and world size
    # given directly, as torchrun would set them; without a process group no index is written).
    real, calls, seen = api._encode_pixels, {"n": 0}, []

    def crash_on_third_batch(m, c, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        seen.extend(batch["keys"])
        return real(m, c, batch)

    monkeypatch.setattr(api, "_encode_pixels", crash_on_third_batch)
    again = tmp_path / "again" / "e.safetensors"
    again.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        api.embed_files(model, photos, again, rank=1, world_size=2, workers=0, batch_size=1, progress=False)
    assert len(seen) == 2
    report = api.embed_files(model, photos, again, rank=1, world_size=2, workers=0, batch_size=1, progress=False,
                             resume=True)
    assert report["new"] == 2 and not api.index_path(again).exists()
    emb, meta = _read(api.shard_path(again, 1, 2))
    assert meta["paths"] == shards[1][1]["paths"] and torch.equal(emb, shards[1][0])
    assert seen == meta["paths"], "nothing lost, nothing embedded twice"
    # Other inputs would move rows between shards: resuming a shard over them is refused.
    with pytest.raises(ValueError, match="same inputs"):
        api.embed_files(model, [photos / "p0.png", photos / "p1.jpg"], again, rank=1, world_size=2, workers=0,
                        progress=False, resume=True)


def _smooth_photo(seed, size=(256, 192)):
    """Gradients plus mild noise: JPEG-friendly, like a photo (draft decoding is meant for those)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    channels = [127 + 100 * np.sin(x / size[0] * rng.uniform(1, 4) + c) * np.cos(y / size[1] * rng.uniform(1, 4))
                for c in range(3)]
    pixels = np.stack(channels, -1) + rng.normal(0, 4, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_decode_draft(siglip_checkpoint, model, tmp_path, capsys):
    from fastsiglip import data
    from fastsiglip.processing import Processor, ImageProcessor

    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(2):
        _smooth_photo(i).save(folder / f"{i}.jpg", quality=92)
    _smooth_photo(2).save(folder / "2.png")
    # Pixels: JPEGs decoded at 1/4 scale (256x192 -> 64x48, still >= 32) then resized: close, not equal;
    # the PNG is untouched.
    pairs = api.image_inputs(folder)
    codec = data.PixelCodec(fastsiglip.load_processor(siglip_checkpoint).image_processor)
    exact = torch.from_numpy(data.ImageBatches(pairs, codec, batch_size=3)[0]["pixels"]).float()
    draft = torch.from_numpy(data.ImageBatches(pairs, codec, batch_size=3, draft=(32, 32))[0]["pixels"]).float()
    diff = (exact - draft).abs().flatten(1).mean(1)
    assert diff[0] > 0 and diff[1] > 0 and diff[2] == 0 and diff.max() < 4, diff
    outs = {}
    for mode in ("exact", "draft"):
        outs[mode] = tmp_path / f"{mode}.safetensors"
        assert _run(siglip_checkpoint, "embed", folder, "--out", outs[mode], "--decode", mode, "--workers", 0) == 0
    (e_exact, _), (e_draft, meta) = _read(outs["exact"]), _read(outs["draft"])
    assert "decode=draft" in meta["processing"]
    cosine = (e_exact * e_draft).sum(-1)
    assert torch.equal(e_exact[2], e_draft[2]) and (cosine > 0.99).all() and not torch.equal(e_exact, e_draft)
    # A run is resumed only with the decode mode it was started with.
    assert _run(siglip_checkpoint, "embed", folder, "--out", outs["exact"], "--decode", "draft", "--resume") == 2
    assert "another processing" in capsys.readouterr().err
    naflex = Processor(None, ImageProcessor(naflex=True))
    with pytest.raises(ValueError, match="FixRes"):
        api.embed_files(model, folder, tmp_path / "n.safetensors", processor=naflex, decode="draft", workers=0)


def test_shard_size_files_index_and_resume(siglip_checkpoint, model, photos, tmp_path, monkeypatch):
    common = ["--workers", "0", "--batch-size", "1"]
    one = tmp_path / "one.safetensors"
    assert _run(siglip_checkpoint, "embed", photos, "--out", one, *common) == 1
    emb_one, meta_one = _read(one)
    out = tmp_path / "s" / "e.safetensors"
    out.parent.mkdir()
    real, calls = api._encode_pixels, {"n": 0}

    def crash_on_fifth_batch(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args)

    # 8 inputs (broken.jpg among them) in files of 3: groups 0-2, 3-5, 6-7; interrupted in the second.
    monkeypatch.setattr(api, "_encode_pixels", crash_on_fifth_batch)
    assert _run(siglip_checkpoint, "embed", photos, "--out", out, "--shard-size", 3, *common) == 130  # Ctrl-C
    names = [f"e-0000{k}-of-00003.safetensors" for k in range(3)]
    assert (out.parent / names[0]).is_file() and not (out.parent / names[1]).exists()
    seen = []
    monkeypatch.setattr(api, "_encode_pixels", lambda m, c, batch: seen.extend(batch["keys"]) or real(m, c, batch))
    assert _run(siglip_checkpoint, "embed", photos, "--out", out, "--shard-size", 3, "--resume", *common) == 1
    files = sorted(str(p) for p in photos.iterdir())
    assert seen == files[5:], "the finished file is kept, the unfinished one continued"
    index = json.loads(api.index_path(out).read_text())
    assert [f["file"] for f in index["files"]] == names and index["rows"] == 7
    parts = [_read(out.parent / name) for name in names]
    assert [len(m["paths"]) for _, m in parts] == [2, 3, 2]  # broken.jpg, first in order, left group 0 shorter
    assert [k for _, m in parts for k in m["paths"]] == meta_one["paths"]
    assert torch.equal(torch.cat([e for e, _ in parts]), emb_one)
    # The files do not depend on the number of processes: rank 1 of 2 does groups 1 and 2.
    other = tmp_path / "r" / "e.safetensors"
    other.parent.mkdir()
    report = api.embed_files(model, photos, other, rank=1, world_size=2, shard_size=3, workers=0, batch_size=1,
                             progress=False)
    assert [pathlib.Path(p).name for p in report["shards"]] == names[1:] and report["index"] is None
    for name in names[1:]:
        assert torch.equal(_read(other.parent / name)[0], _read(out.parent / name)[0])
    # Texts too; the index lists the files.
    (tmp_path / "t.txt").write_text("a\nb\n\nc d\ne\n")
    report = api.embed_texts(model, tmp_path / "t.txt", tmp_path / "t.npy", shard_size=2, batch_size=3,
                             progress=False)
    assert report["keys"] == ["1", "2", "3", "4", "5"] and len(report["shards"]) == 3
    assert json.loads(api.index_path(tmp_path / "t.npy").read_text())["rows"] == 5


def test_naflex_workers_bit_identical(photos, tmp_path):
    import dataclasses

    from fastsiglip import config as config_lib
    from fastsiglip.model import build
    from fastsiglip.processing import ImageProcessor, Processor

    cfg = config_lib.preset("siglip2-base-patch16-naflex")
    cfg = dataclasses.replace(cfg, text=None, architecture="SiglipVisionModel",
                              vision=dataclasses.replace(cfg.vision, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                                                         num_patches=16))
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = build(cfg).eval()
    processor = Processor(None, ImageProcessor(naflex=True, patch_size=8, max_num_patches=16, resample=2))
    rows = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.safetensors"
        report = api.embed_files(model, photos, out, processor=processor, workers=workers, batch_size=10,
                                 progress=False)  # items of 5 images regrouped: masks and shapes merged too
        rows[workers] = _read(out)
    assert torch.equal(rows[0][0], rows[2][0]) and rows[0][1]["paths"] == rows[2][1]["paths"] == report["paths"]
    assert torch.allclose(rows[2][0], fastsiglip.encode_images(model, report["paths"], processor=processor), atol=1e-6)


def test_bench_embed_script(tmp_path, capsys):
    """bench/embed.py end to end on the real test photos: rows for each decode mode it can run
    here (gpu is skipped on a CPU, and says so), embeddings identical across workers."""
    import importlib.util

    root = pathlib.Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("bench_embed", root / "bench" / "embed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "embed.json"
    assert bench.main(["--tiny", "--threads", "1", "--images", "9", "--batch-size", "4", "--workers", "0", "2",
                       "--decode", "exact", "draft", "gpu", "--photos", str(root / "tests" / "data" / "photos"),
                       "--json", str(out)]) == 0
    assert "gpu   skipped" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["decode"], r["workers"]) for r in rows] == [("exact", 0), ("exact", 2), ("draft", 0), ("draft", 2)]
    assert all(r["bit_identical_to_first"] for r in rows) and rows[2]["cosine_min"] > 0.99
