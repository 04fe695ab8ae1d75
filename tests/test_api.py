"""The one-call API (encode_images, encode_texts, zero_shot) and the `fastsiglip` command,
end to end on a tiny random-weight checkpoint folder (conftest.siglip_checkpoint)."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastsiglip
from fastsiglip import api, cli

transformers = pytest.importorskip("transformers")
LABELS = ["cat", "dog", "red car", "a photo of two trees"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (size, color) in enumerate([((50, 40), (200, 30, 40)), ((32, 32), (10, 200, 30)), ((17, 90), (0, 0, 250)),
                                       ((64, 48), (120, 120, 120)), ((40, 41), (250, 250, 0))]):
        path = folder / f"img{i}.png"
        Image.new("RGB", size, color).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def model(siglip_checkpoint):
    return fastsiglip.load(siglip_checkpoint)


def test_zero_shot_equals_transformers_pipeline(siglip_checkpoint, model, images):
    pipe = transformers.pipeline(task="zero-shot-image-classification", model=str(siglip_checkpoint))
    ours = fastsiglip.zero_shot(model, images, LABELS)
    for path, result in zip(images, ours):
        expected = pipe(Image.open(path), candidate_labels=LABELS)
        assert [r["label"] for r in result] == [e["label"] for e in expected]
        for r, e in zip(result, expected):
            assert abs(r["score"] - e["score"]) <= 1e-5


def test_encode_equals_transformers_features(siglip_checkpoint, model, images):
    hf = transformers.SiglipModel.from_pretrained(siglip_checkpoint).eval()
    hf_proc = transformers.AutoProcessor.from_pretrained(siglip_checkpoint)
    inputs = hf_proc(text=LABELS, images=[Image.open(p) for p in images], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(hf.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output, dim=-1)
        txt = F.normalize(hf.get_text_features(input_ids=inputs["input_ids"]).pooler_output, dim=-1)
    ours_img = fastsiglip.encode_images(model, images, batch_size=2)
    ours_txt = fastsiglip.encode_texts(model, LABELS, batch_size=3)
    assert (ours_img - img).abs().max() < 1e-5
    assert (ours_txt - txt).abs().max() < 1e-5
    assert torch.allclose(ours_img.norm(dim=-1), torch.ones(len(images)))


def test_api_errors(model, images):
    with pytest.raises(ValueError, match="at least one label"):
        fastsiglip.zero_shot(model, images, [])
    with pytest.raises(ValueError, match="no '{}'"):
        fastsiglip.zero_shot(model, images, ["cat"], template="a photo")
    with pytest.raises(ValueError, match="batch_size"):
        fastsiglip.encode_images(model, images, batch_size=0)
    with pytest.raises(ValueError, match="no images"):
        fastsiglip.encode_images(model, [])


def test_cli_classify_json(siglip_checkpoint, model, images, capsys):
    assert cli.main(["classify", *images[:2], "--labels", *LABELS, "--model", str(siglip_checkpoint), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = fastsiglip.zero_shot(model, images[:2], LABELS)
    assert [p["image"] for p in printed] == images[:2]
    for p, e in zip(printed, expected):
        assert [r["label"] for r in p["results"]] == [r["label"] for r in e]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(p["results"], e)) < 1e-6


def test_cli_classify_unreadable_image(siglip_checkpoint, images, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    assert cli.main(["classify", images[0], str(bad), "--labels", "cat", "dog", "--model", str(siglip_checkpoint)]) == 1
    out = capsys.readouterr()
    assert images[0] in out.out and "broken.png" not in out.out


def _embed(folder, inputs, out, *extra):
    return cli.main(["embed", *map(str, inputs), "--out", str(out), "--model", str(folder), "--quiet", *extra])


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_cli_embed_skips_bad_files(siglip_checkpoint, model, images, tmp_path, suffix, capsys):
    source = tmp_path / "photos"
    source.mkdir()
    for p in images:
        (source / p.split("/")[-1]).write_bytes(open(p, "rb").read())
    (source / "zero.jpg").write_bytes(b"")
    (source / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / f"emb{suffix}"
    assert _embed(siglip_checkpoint, [source], out, "--batch-size", "2") == 0
    assert "zero.jpg" in capsys.readouterr().err
    files = sorted(str(source / p.split("/")[-1]) for p in images)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(out), framework="pt") as f:
            emb, meta = f.get_tensor("embeddings"), f.metadata()
        assert json.loads(meta["paths"]) == files
    else:
        import numpy as np

        emb = torch.from_numpy(np.load(out))
        assert json.loads((tmp_path / f"emb{suffix}.json").read_text())["paths"] == files
    assert torch.allclose(emb, fastsiglip.encode_images(model, files), atol=1e-6)
    assert not list(tmp_path.glob("*.partial*")) and not list(tmp_path.glob(".*tmp*"))


def test_cli_embed_interrupted_then_resumed(siglip_checkpoint, model, images, tmp_path, monkeypatch):
    out = tmp_path / "emb.safetensors"
    calls = {"n": 0}
    real = api._encode_image_batch

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the run
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "_encode_image_batch", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _embed(siglip_checkpoint, images, out, "--batch-size", "2")
    assert not out.exists(), "an interrupted run must leave no output file"
    partial = tmp_path / "emb.safetensors.partial.safetensors"
    assert partial.exists()
    monkeypatch.setattr(api, "_encode_image_batch", real)
    seen = []
    monkeypatch.setattr(api, "_encode_image_batch", lambda m, p, batch, *a, **k: seen.extend(batch) or real(m, p, batch, *a, **k))
    assert _embed(siglip_checkpoint, images, out, "--batch-size", "2", "--resume") == 0
    assert seen == images[4:], "resume must only do the images not done before the interruption"
    from safetensors.torch import load_file

    assert torch.allclose(load_file(str(out))["embeddings"], fastsiglip.encode_images(model, images), atol=1e-6)
    assert not partial.exists()


def test_cli_embed_errors(siglip_checkpoint, tmp_path, capsys):
    assert _embed(siglip_checkpoint, [tmp_path / "missing"], tmp_path / "e.safetensors") == 2
    assert "no such file" in capsys.readouterr().err
    assert _embed(siglip_checkpoint, [tmp_path], tmp_path / "e.pt") == 2
    assert ".safetensors or .npy" in capsys.readouterr().err


def test_cli_bench_preset(capsys):
    assert cli.main(["bench", "--preset", "siglip-base-patch16-224", "--batch-size", "1", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "texts/s" in out


def test_cli_bench_checkpoint(siglip_checkpoint, capsys):
    assert cli.main(["bench", "--model", str(siglip_checkpoint), "--batch-size", "2", "--iters", "1"]) == 0
    assert "images/s" in capsys.readouterr().out
