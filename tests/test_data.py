"""fastsiglip.data: manifests and tar shards, the seeded order, compact batches, bad images."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastsiglip import data as data_lib
from fastsiglip.processing import ImageProcessor, load_image, load_processor


def _image(seed, size=(20, 14)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(10):
        _image(i).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


def test_manifest_formats_and_columns(folder):
    rows = [{"path": f"img/{i}.png", "caption": f"caption {i}"} for i in range(10)]
    rows[1]["path"] = str(folder / "img" / "1.png")  # absolute paths are kept
    (folder / "m.csv").write_text("path,caption\n" + "".join(f'{r["path"]},"{r["caption"]}, with a comma"\n'
                                                              for r in rows))
    (folder / "m.tsv").write_text("path\tcaption\n" + "".join(f'{r["path"]}\t{r["caption"]}\n' for r in rows))
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("m.csv", "m.tsv", "m.jsonl"):
        pairs = data_lib.open_pairs(folder / name, image_column="path", text_column="caption")
        assert len(pairs) == 10
        key, image, text = pairs.read(3)
        assert key == "img/3.png" and text.startswith("caption 3") and image.size == (20, 14)
        assert np.array_equal(np.asarray(pairs.read(1)[1]), np.asarray(_image(1)))
    with pytest.raises(data_lib.DataError, match="no image column 'image'.*--image-column"):
        data_lib.open_pairs(folder / "m.csv")
    (folder / "empty.jsonl").write_text("")
    with pytest.raises(data_lib.DataError, match="no rows"):
        data_lib.open_pairs(folder / "empty.jsonl")
    with pytest.raises(data_lib.DataError, match="does not exist"):
        data_lib.open_pairs(folder / "nope.csv")
    # A spreadsheet's UTF-8 byte-order mark is not part of the first column's name.
    (folder / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (folder / "m.csv").read_bytes())
    assert len(data_lib.open_pairs(folder / "bom.csv", image_column="path", text_column="caption")) == 10
    (folder / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n\n{not json\n")
    with pytest.raises(data_lib.DataError, match="bad.jsonl, line 3: not valid JSON"):
        data_lib.open_pairs(folder / "bad.jsonl", image_column="path", text_column="caption")


def _write_shard(path, start, count, caption="txt"):
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            def add(name, payload):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

            buf = io.BytesIO()
            _image(i).save(buf, format="JPEG" if i % 2 else "PNG")
            add(f"{i:06d}.{'jpg' if i % 2 else 'png'}", buf.getvalue())
            if caption == "txt":
                add(f"{i:06d}.txt", f"caption {i}\n".encode())
            else:
                add(f"{i:06d}.json", json.dumps({"text": f"caption {i}", "width": 20}).encode())
        info = tarfile.TarInfo("lonely.txt")  # a caption without an image is ignored
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))


def test_tar_shards_folder_and_brace_pattern(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        _write_shard(shards / f"train-{s:06d}.tar", s * 4, 4, caption="txt" if s != 1 else "json")
    by_folder = data_lib.open_pairs(shards)
    by_pattern = data_lib.open_pairs(str(shards / "train-{000000..000002}.tar"))
    assert len(by_folder) == len(by_pattern) == 12
    texts = sorted(by_pattern.read(i)[2] for i in range(12))
    assert texts == sorted(f"caption {i}" for i in range(12))
    key, image, _ = by_folder.read(4)  # shard 1's first member: a PNG, read back exactly
    assert key == "000004" and np.array_equal(np.asarray(image), np.asarray(_image(4)))
    assert by_folder.read(5)[1].size == (20, 14)  # a JPEG
    # An epoch visits the shards one after the other, each one's members in a seeded order.
    order = by_folder.order(seed=0, epoch=0).tolist()
    assert sorted(order) == list(range(12))
    assert all(len({k // 4 for k in order[i:i + 4]}) == 1 for i in (0, 4, 8))
    with pytest.raises(data_lib.DataError, match="do not exist"):
        data_lib.open_pairs(str(shards / "train-{000000..000005}.tar"))


def test_expand_braces():
    assert data_lib.expand_braces("a/t-{008..011}.tar") == ["a/t-008.tar", "a/t-009.tar", "a/t-010.tar", "a/t-011.tar"]
    assert data_lib.expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert data_lib.expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("naflex", [False, True])
def test_compact_pixels_equal_the_processor(naflex):
    """uint8 in the workers, the lookup table on the device: the processor's floats, bit for bit."""
    if naflex:
        processor = ImageProcessor(naflex=True, patch_size=8, max_num_patches=24, resample=2)
    else:
        processor = ImageProcessor(size=(32, 32), image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.25))
    images = [_image(i, size) for i, size in enumerate([(20, 14), (64, 30), (9, 40)])]
    want = processor(images)
    codec = data_lib.PixelCodec(processor)
    batch = codec.collate([codec.encode(load_image(im)) for im in images])
    assert batch["pixels"].dtype == torch.uint8
    got = codec.to_model(batch, "cpu")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def _manifest(folder, count=40):
    (folder / "img").mkdir(exist_ok=True)
    lines = ["image,text"]
    for i in range(count):
        _image(i, (8, 8)).save(folder / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,caption {i}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return folder / "m.csv"


def _step_keys(pairs, checkpoint, step, world, micro, batch=16, seed=3):
    batches = data_lib.TrainBatches(pairs, checkpoint, seed=seed, batch_size=batch, world_size=world,
                                    micro_batch_size=micro)
    return [k for r in range(world) for m in range(batch // world // micro) for k in batches[(step, r, m)]["keys"]]


def test_step_contents_do_not_depend_on_world_or_micro_size(tmp_path, siglip_checkpoint):
    pairs = data_lib.open_pairs(_manifest(tmp_path))
    for step in (0, 2, 3):  # 40 pairs, batch 16: 2 steps an epoch (its last 8 pairs unused), step 2 starts epoch 1
        want = _step_keys(pairs, siglip_checkpoint, step, 1, 16)
        assert len(want) == 16
        for world, micro in ((1, 4), (2, 8), (4, 2), (8, 1)):
            assert _step_keys(pairs, siglip_checkpoint, step, world, micro) == want, (step, world, micro)
    epoch0 = [data_lib.TrainBatches(pairs, siglip_checkpoint, seed=3, batch_size=40, world_size=1,
                                    micro_batch_size=40)[(e, 0, 0)]["keys"] for e in (0, 1)]
    assert sorted(epoch0[0]) == sorted(epoch0[1]) and epoch0[0] != epoch0[1]  # every pair once, reshuffled
    assert _step_keys(pairs, siglip_checkpoint, 0, 1, 16, seed=4) != _step_keys(pairs, siglip_checkpoint, 0, 1, 16)


def test_bad_images_are_replaced_the_same_way_everywhere(tmp_path, siglip_checkpoint):
    manifest = _manifest(tmp_path)
    (tmp_path / "img" / "7.png").write_bytes(b"garbage")
    (tmp_path / "img" / "8.png").unlink()
    pairs = data_lib.open_pairs(manifest)
    batches = data_lib.TrainBatches(pairs, siglip_checkpoint, seed=3, batch_size=40, world_size=1,
                                    micro_batch_size=40)
    item = batches[(0, 0, 0)]
    assert sorted(k for k, _ in item["bad"]) == ["img/7.png", "img/8.png"]
    assert "no such file" in dict(item["bad"])["img/8.png"]
    assert len(item["keys"]) == 40 and "img/7.png" not in item["keys"] and item["pixels"].shape[0] == 40
    split = [k for m in range(4) for k in data_lib.TrainBatches(pairs, siglip_checkpoint, seed=3, batch_size=40,
                                                                world_size=2, micro_batch_size=10)[(0, m // 2, m % 2)]
             ["keys"]]
    assert split == item["keys"]


def test_worker_processes_give_the_same_batches(tmp_path, siglip_checkpoint):
    pairs = data_lib.open_pairs(_manifest(tmp_path))
    batches = data_lib.TrainBatches(pairs, siglip_checkpoint, seed=0, batch_size=8, world_size=1, micro_batch_size=4)
    items = data_lib.StepItems(1, 4, 0, 2)
    assert len(items) == 6
    serial = list(data_lib.loader(batches, items, workers=0))
    parallel = list(data_lib.loader(batches, items, workers=2))
    assert [b["keys"] for b in serial] == [b["keys"] for b in parallel]
    for a, b in zip(serial, parallel):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["input_ids"], b["input_ids"])
    tokens = load_processor(siglip_checkpoint)(text=["caption 0"])["input_ids"]
    assert tokens.shape[1] == serial[0]["input_ids"].shape[1]


def test_chunks_regrouped_into_the_same_batches():
    assert [data_lib.chunk_size(b, 2) for b in (1, 3, 8, 10, 32, 64, 97, 100)] == [1, 3, 8, 5, 8, 8, 1, 5]
    assert data_lib.chunk_size(64, 0) == 64  # no workers: whole batches
    parts = [{"pixels": torch.full((2, 3), i), "keys": [f"{i}a", f"{i}b"], "bad": []} for i in range(3)]
    parts.insert(1, {"keys": [], "bad": [("x", "unreadable")]})  # a chunk whose images all failed
    merged = list(data_lib.regroup(iter(parts), 3))
    assert [m["keys"] for m in merged] == [["0a", "0b", "1a", "1b"], ["2a", "2b"]]
    assert merged[0]["bad"] == [("x", "unreadable")] and merged[0]["pixels"].tolist() == [[0] * 3] * 2 + [[1] * 3] * 2
    assert merged[1]["pixels"] is parts[3]["pixels"]  # one part: no copy
    # numpy parts (what ImageBatches sends through the DataLoader) come out as one torch tensor
    arrays = [{"pixels": np.full((2, 3), i, dtype=np.uint8), "keys": [i, i]} for i in range(2)]
    batch = data_lib.merge(arrays)
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].tolist() == [[0] * 3] * 2 + [[1] * 3] * 2
