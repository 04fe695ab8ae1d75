"""The one-call API (encode_images, encode_texts, zero_shot) and the `fastsiglip` command,
end to end on a tiny random-weight checkpoint folder (conftest.siglip_checkpoint)."""

import json
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastsiglip
from fastsiglip import api, cli

transformers = pytest.importorskip("transformers")
LABELS = ["cat", "dog", "red car", "a photo of two trees"]
# From 5.20 transformers' AutoTokenizer gives a NaFlex folder (model_type "siglip2") Siglip2Tokenizer,
# which lowercases as SigLIP 2 was trained; older versions take the GemmaTokenizer its
# tokenizer_config.json names and keep case (transformers' bug, fixed in 5.20). There the NaFlex
# comparisons name Siglip2Tokenizer, the class 5.20 picks (tests/test_tokenizer.py checks the pick).
AUTO_PICKS_SIGLIP2 = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2]) >= (5, 20)


def _hf_image_processor(folder):
    """The Pillow backend of the folder's image processor (e.g. SiglipImageProcessorPil), whether or
    not torchvision is installed: with it transformers picks its torchvision backend, whose resize
    differs, and without it 5.17's AutoImageProcessor refuses a Siglip2 folder."""
    name = json.loads((pathlib.Path(folder) / "preprocessor_config.json").read_text())["image_processor_type"]
    return getattr(transformers, name.removesuffix("Fast") + "Pil").from_pretrained(folder)


def _hf_processor(folder):
    return transformers.AutoProcessor.from_pretrained(folder, image_processor=_hf_image_processor(folder))


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
    pipe = transformers.pipeline(task="zero-shot-image-classification", model=str(siglip_checkpoint),
                                 image_processor=_hf_image_processor(siglip_checkpoint))
    ours = fastsiglip.zero_shot(model, images, LABELS)
    for path, result in zip(images, ours):
        expected = pipe(Image.open(path), candidate_labels=LABELS)
        assert [r["label"] for r in result] == [e["label"] for e in expected]
        for r, e in zip(result, expected):
            assert abs(r["score"] - e["score"]) <= 1e-5


def test_encode_equals_transformers_features(siglip_checkpoint, model, images):
    hf = transformers.SiglipModel.from_pretrained(siglip_checkpoint).eval()
    hf_proc = _hf_processor(siglip_checkpoint)
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
    with pytest.raises(ValueError, match=r"exactly one '\{\}'.*has 0"):
        fastsiglip.zero_shot(model, images, ["cat"], template="a photo")
    with pytest.raises(ValueError, match="batch_size"):
        fastsiglip.encode_images(model, images, batch_size=0)
    with pytest.raises(ValueError, match="no images"):
        fastsiglip.encode_images(model, [])
    with pytest.raises(ValueError, match="two-tower"):
        fastsiglip.zero_shot(model.vision_model, images, ["cat"])
    with pytest.raises(fastsiglip.processing.ImageLoadError, match="missing.png"):
        fastsiglip.zero_shot(model, [images[0], "missing.png"], ["cat"])
    assert fastsiglip.zero_shot(model, [images[0], "missing.png"], ["cat"], skip_errors=True)[1] is None


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
    assert _embed(siglip_checkpoint, [source], out, "--batch-size", "2") == 1  # done in part: zero.jpg
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
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "photos")
    assert leftovers == sorted([out.name] + ([out.name + ".json"] if suffix == ".npy" else []))


def test_cli_embed_interrupted_then_resumed(siglip_checkpoint, model, images, tmp_path, monkeypatch):
    out = tmp_path / "emb.safetensors"
    calls = {"n": 0}
    real = api._encode_pixels

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the run
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "_encode_pixels", crash_on_third_batch)
    assert _embed(siglip_checkpoint, images, out, "--batch-size", "2") == 130  # Ctrl-C
    assert not out.exists(), "an interrupted run must leave no output file"
    partial = tmp_path / "emb.safetensors.partial"
    assert len(list(partial.glob("*.safetensors"))) == 2, "one file per finished batch"
    monkeypatch.setattr(api, "_encode_pixels", real)
    seen = []
    monkeypatch.setattr(api, "_encode_pixels", lambda m, c, batch: seen.extend(batch["keys"]) or real(m, c, batch))
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


# ---------------------------------------------------------------------------------------------
# SigLIP 2: Gemma tokenizer.model, FixRes (model_type "siglip") and NaFlex (model_type "siglip2")
# ---------------------------------------------------------------------------------------------

GEMMA_TOKENIZER_CONFIG = {  # as in google/siglip2-* (no model_input_names: transformers returns a mask)
    "add_bos_token": False, "add_eos_token": True, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
    "padding_side": "right", "processor_class": "Siglip2Processor", "tokenizer_class": "GemmaTokenizer",
    "unk_token": "<unk>", "model_max_length": 1000000000000000019884624838656,
}
GEMMA_VOCAB = 300
NAFLEX_PATCHES = 16  # tiny patch budget: 4x4 position grid, patch 8
IMAGE_SETTINGS = {"resample": 2, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                  "do_resize": True, "do_rescale": True, "do_normalize": True, "processor_class": "Siglip2Processor"}
MIXED_CASE_LABELS = ["Cat", "dog", "RED car", "a photo of two Trees"]


def _train_gemma_spm(folder):
    """A Gemma-layout BPE model (<pad>=0, <eos>=1, <bos>=2, <unk>=3, byte fallback, identity
    normalization, no dummy prefix), as tests/test_tokenizer.py trains at full size."""
    import random

    import sentencepiece as spm

    rng = random.Random(2)
    words = "this is a photo of the cat dog red blue car two trees house sky This Cat RED Trees".split()
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(1500)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "gemma"), model_type="bpe", vocab_size=GEMMA_VOCAB, pad_id=0,
        eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    corpus.unlink()
    return (folder / "gemma.model").read_bytes()


@pytest.fixture(scope="module")
def siglip2_checkpoints(tmp_path_factory):
    """{"fixres": folder, "naflex": folder}: tiny random-weight SigLIP 2 checkpoints (text length
    64, as the pipeline pads to 64) written by transformers, sharing one Gemma-layout tokenizer.model."""
    base = tmp_path_factory.mktemp("siglip2")
    spm_bytes = _train_gemma_spm(base)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    text = dict(tower, vocab_size=GEMMA_VOCAB, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                bos_token_id=2)
    folders = {}
    for kind in ("fixres", "naflex"):
        folder = base / kind
        torch.manual_seed(1)
        if kind == "naflex":
            config = transformers.Siglip2Config(text_config=text, vision_config=dict(tower, patch_size=8,
                                                                                     num_patches=NAFLEX_PATCHES))
            transformers.Siglip2Model(config).eval().save_pretrained(folder)
            image = dict(IMAGE_SETTINGS, image_processor_type="Siglip2ImageProcessor", patch_size=8,
                         max_num_patches=NAFLEX_PATCHES)
        else:
            config = transformers.SiglipConfig(text_config=text, vision_config=dict(tower, image_size=32, patch_size=8))
            transformers.SiglipModel(config).eval().save_pretrained(folder)
            image = dict(IMAGE_SETTINGS, image_processor_type="SiglipImageProcessor", resample=3,
                         size={"height": 32, "width": 32})
        (folder / "preprocessor_config.json").write_text(json.dumps(image))
        (folder / "tokenizer_config.json").write_text(json.dumps(GEMMA_TOKENIZER_CONFIG))
        (folder / "tokenizer.model").write_bytes(spm_bytes)
        folders[kind] = folder
    return folders


def _pipeline(folder, *, attention_mask: bool):
    naflex = json.loads((pathlib.Path(folder) / "config.json").read_text())["model_type"] == "siglip2"
    extra = {"tokenizer": transformers.Siglip2Tokenizer.from_pretrained(folder)} if naflex and not AUTO_PICKS_SIGLIP2 else {}
    pipe = transformers.pipeline(task="zero-shot-image-classification", model=str(folder),
                                 image_processor=_hf_image_processor(folder), **extra)
    if not attention_mask:
        # What the SigLIP 1 checkpoints declare in tokenizer_config.json; the pipeline's own
        # tokenizer_kwargs={"return_attention_mask": False} is accepted and dropped by 5.23.
        pipe.tokenizer.model_input_names = ["input_ids"]
    return pipe


def _assert_same_ranking(ours, expected, atol=1e-5):
    assert [r["label"] for r in ours] == [e["label"] for e in expected]
    assert max(abs(r["score"] - e["score"]) for r, e in zip(ours, expected)) <= atol


def _score_gap(ours, expected) -> float:
    by_label = {e["label"]: e["score"] for e in expected}
    return max(abs(r["score"] - by_label[r["label"]]) for r in ours)


@pytest.mark.parametrize("kind", ["fixres", "naflex"])
def test_siglip2_zero_shot_equals_pipeline_without_text_mask(siglip2_checkpoints, images, kind):
    folder = siglip2_checkpoints[kind]
    model = fastsiglip.load(folder)
    pipe = _pipeline(folder, attention_mask=False)
    # NaFlex: Siglip2Tokenizer lowercases as SigLIP 2 does. FixRes: transformers picks a
    # GemmaTokenizer, which keeps case, so it gets lowercased prompts (api.py module doc).
    template, labels = ("This is a photo of {}.", MIXED_CASE_LABELS) if kind == "naflex" else \
        ("this is a photo of {}.", [label.lower() for label in MIXED_CASE_LABELS])
    ours = fastsiglip.zero_shot(model, images, MIXED_CASE_LABELS)
    assert len(ours) == len(images)
    for path, result in zip(images, ours):
        expected = pipe(Image.open(path), candidate_labels=labels, hypothesis_template=template)
        expected = [dict(e, label=MIXED_CASE_LABELS[labels.index(e["label"])]) for e in expected]
        _assert_same_ranking(result, expected)


def test_siglip2_fixres_case_kept_equals_gemma_tokenizer_pipeline(siglip2_checkpoints, images):
    folder = siglip2_checkpoints["fixres"]
    processor = fastsiglip.load_processor(folder, lowercase=False)
    ours = fastsiglip.zero_shot(fastsiglip.load(folder), images[:2], MIXED_CASE_LABELS, processor=processor)
    pipe = _pipeline(folder, attention_mask=False)
    for path, result in zip(images, ours):
        _assert_same_ranking(result, pipe(Image.open(path), candidate_labels=MIXED_CASE_LABELS))


def test_siglip2_pipeline_default_masks_text_padding(siglip2_checkpoints, images):
    """The documented difference: transformers' Gemma tokenizers return an attention_mask and its
    text model applies it, which SigLIP 2 was not trained with; fastsiglip does not."""
    folder = siglip2_checkpoints["naflex"]
    pipe = _pipeline(folder, attention_mask=True)
    assert "attention_mask" in pipe.tokenizer(["a cat"], padding="max_length", max_length=64)
    ours = fastsiglip.zero_shot(fastsiglip.load(folder), images[:1], MIXED_CASE_LABELS)[0]
    assert _score_gap(ours, pipe(Image.open(images[0]), candidate_labels=MIXED_CASE_LABELS)) > 1e-3
    unmasked = _pipeline(folder, attention_mask=False)(Image.open(images[0]), candidate_labels=MIXED_CASE_LABELS)
    assert _score_gap(ours, unmasked) <= 1e-5


def test_siglip2_naflex_encode_images_max_num_patches(siglip2_checkpoints, images):
    folder = siglip2_checkpoints["naflex"]
    model = fastsiglip.load(folder)
    hf = transformers.Siglip2Model.from_pretrained(folder).eval()
    hf_proc = _hf_image_processor(folder)
    # The checkpoint's 16, and a smaller budget per call (12, not 9: a 17x90 image would become
    # 6x1 patches, where torch's CPU antialiased resize of the position grid is wrong; model.py).
    for patches in (None, 12):
        kwargs = {} if patches is None else {"max_num_patches": patches}
        inputs = hf_proc([Image.open(p) for p in images], return_tensors="pt", **kwargs)
        with torch.no_grad():
            expected = F.normalize(hf.get_image_features(**inputs).pooler_output, dim=-1)
        ours = fastsiglip.encode_images(model, images, batch_size=2, **kwargs)
        assert (ours - expected).abs().max() < 1e-5
    with pytest.raises(ValueError, match="NaFlex"):
        fastsiglip.encode_images(fastsiglip.load(siglip2_checkpoints["fixres"]), images, max_num_patches=12)


def test_encode_texts_pads_and_truncates_to_checkpoint_length(siglip2_checkpoints):
    folder = siglip2_checkpoints["naflex"]
    model = fastsiglip.load(folder)
    processor = fastsiglip.load_processor(folder)
    long_text = " ".join(["red car"] * 100)  # far beyond 64 tokens: truncated, EOS kept last
    ids = processor(text=["a cat", long_text])["input_ids"]
    assert ids.shape == (2, 64) and ids[1, -1].item() == processor.tokenizer.eos_id
    with torch.no_grad():
        expected = F.normalize(model.get_text_features(input_ids=ids), dim=-1)
    assert (fastsiglip.encode_texts(model, ["a cat", long_text], batch_size=1) - expected).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# CLI: NaFlex, JSON shape, exit codes, progress, resume corner cases
# ---------------------------------------------------------------------------------------------


def test_cli_classify_naflex_json_with_bad_image(siglip2_checkpoints, images, tmp_path, capsys):
    folder = siglip2_checkpoints["naflex"]
    bad = tmp_path / "truncated.png"
    bad.write_bytes(open(images[0], "rb").read()[:60])
    argv = ["classify", images[0], str(bad), images[2], "--labels", *MIXED_CASE_LABELS, "--model", str(folder),
            "--json", "--max-num-patches", "9"]
    assert cli.main(argv) == 1, "exit status 1: some images could not be read"
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert [p["image"] for p in printed] == [images[0], str(bad), images[2]]
    assert set(printed[1]) == {"image", "error"} and "truncated.png" in printed[1]["error"]
    assert "truncated.png" in captured.err
    expected = fastsiglip.zero_shot(fastsiglip.load(folder), [images[0], images[2]], MIXED_CASE_LABELS,
                                    max_num_patches=9)
    for p, e in zip([printed[0], printed[2]], expected):
        assert set(p) == {"image", "results"} and all(set(r) == {"score", "label"} for r in p["results"])
        _assert_same_ranking(p["results"], e, atol=1e-6)
    assert cli.main(argv[:-2] + ["--max-num-patches", "0"]) == 2
    assert "--max-num-patches must be at least 1" in capsys.readouterr().err


def test_cli_classify_exit_codes(siglip_checkpoint, images, tmp_path, capsys):
    base = ["--labels", "cat", "dog", "--model", str(siglip_checkpoint)]
    assert cli.main(["classify", images[0], *base]) == 0
    assert cli.main(["classify", str(tmp_path / "missing.jpg"), *base]) == 1
    assert "missing.jpg" in capsys.readouterr().err
    assert cli.main(["classify", images[0], *base, "--template", "no slot"]) == 2
    assert "must hold exactly one '{}'" in capsys.readouterr().err
    assert cli.main(["classify", images[0], *base, "--template", "{} and {}"]) == 2
    assert "it has 2" in capsys.readouterr().err
    assert cli.main(["classify", images[0], "--labels", "cat", "--model", str(tmp_path / "nothing")]) == 2
    assert cli.main(["classify", images[0], *base, "--dtype", "float33"]) == 2
    assert "float33" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --labels is required
        cli.main(["classify", images[0]])


def test_cli_embed_progress_on_stderr(siglip_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "emb.safetensors"
    assert cli.main(["embed", *images, "--out", str(out), "--model", str(siglip_checkpoint), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    last = captured.err.strip().split("\r")[-1]
    assert last.startswith("5/5 images") and last.endswith("images/s"), captured.err
    assert "images/s" not in captured.out and str(out) in captured.out


def test_cli_embed_resume_with_finished_output(siglip_checkpoint, model, images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "emb.npy"
    assert _embed(siglip_checkpoint, images[:3], out) == 0
    before = (out.stat().st_mtime_ns, out.read_bytes())
    # Nothing new: nothing embedded, the file left as it is.
    real, seen = api._encode_pixels, []
    monkeypatch.setattr(api, "_encode_pixels", lambda m, c, batch: seen.extend(batch["keys"]) or real(m, c, batch))
    assert _embed(siglip_checkpoint, images[:3], out, "--resume") == 0
    assert seen == [] and "complete" in capsys.readouterr().out
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before
    # Two more files: only they are embedded, appended after the rows already there.
    assert _embed(siglip_checkpoint, images, out, "--resume", "--batch-size", "2") == 0
    assert seen == images[3:]
    import numpy as np

    meta = json.loads((tmp_path / "emb.npy.json").read_text())
    assert meta["paths"] == images
    assert torch.allclose(torch.from_numpy(np.load(out)), fastsiglip.encode_images(model, images), atol=1e-6)
    assert not list(tmp_path.glob("*.partial*"))


def _change_weights(folder):
    """Change one weight of a checkpoint folder in place (same names, shapes and file size)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    name = sorted(weights)[-1]
    weights[name] = weights[name] + 0.5
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_cli_embed_refuses_work_of_another_checkpoint(siglip_checkpoint, siglip2_checkpoints, images, tmp_path,
                                                      monkeypatch, capsys):
    import shutil

    folder = shutil.copytree(siglip_checkpoint, tmp_path / "model")
    out = tmp_path / "emb.safetensors"
    real, calls = api._encode_pixels, {"n": 0}

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "_encode_pixels", crash_on_second_batch)
    assert _embed(folder, images, out, "--batch-size", "2") == 130  # Ctrl-C
    monkeypatch.setattr(api, "_encode_pixels", real)
    partial = tmp_path / "emb.safetensors.partial"
    # The weights change under the same folder name: the name cannot tell, the fingerprint does.
    _change_weights(folder)
    assert _embed(folder, images, out, "--resume") == 2
    assert "weights differ" in capsys.readouterr().err and not out.exists() and partial.is_dir()
    # Finished output of one checkpoint, resumed with another: refused too.
    assert _embed(folder, images, out, "--overwrite") == 0 and not partial.exists()
    assert _embed(siglip2_checkpoints["fixres"], images, out, "--resume") == 2
    assert "weights differ" in capsys.readouterr().err
    # With --overwrite the old work is replaced (without it, or --resume, an existing output is an error).
    assert _embed(siglip2_checkpoints["fixres"], images, out, "--overwrite") == 0


@pytest.mark.parametrize("kind", ["fixres", "naflex"])
def test_bfloat16_model_takes_float32_processor_output(siglip2_checkpoints, images, kind):
    # The processor gives float32 pixels (and int masks / shapes); the API moves them to the
    # model's device and dtype and returns float32 embeddings. bf16 keeps ~3 significant digits.
    folder = siglip2_checkpoints[kind]
    full, half = fastsiglip.load(folder), fastsiglip.load(folder, dtype="bfloat16")
    for encode, inputs in ((fastsiglip.encode_images, images), (fastsiglip.encode_texts, MIXED_CASE_LABELS)):
        low, exact = encode(half, inputs), encode(full, inputs)
        assert low.dtype == torch.float32 and (low - exact).abs().max() < 5e-2
    scores = fastsiglip.zero_shot(half, images[:1], MIXED_CASE_LABELS)[0]
    assert sorted(r["label"] for r in scores) == sorted(MIXED_CASE_LABELS)
