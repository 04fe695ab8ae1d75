"""fastsiglip.processing against transformers' PIL-backend image processors.

transformers 5 ships two backends per processor: ``SiglipImageProcessor`` /
``Siglip2ImageProcessor`` need torchvision (absent here), ``SiglipImageProcessorPil`` /
``Siglip2ImageProcessorPil`` run on Pillow + numpy and are the oracle. Pixel values must be
equal to 1e-6 (they are in fact bitwise equal); where fastsiglip differs on purpose the test
says why and checks the difference is the documented one (see fastsiglip/processing.py).
"""

import io
import json
import os
import pathlib
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fastsiglip import config as fconfig
from fastsiglip.processing import (
    ImageLoadError,
    ImageProcessor,
    Processor,
    load_image,
    load_processor,
    naflex_size,
)

transformers = pytest.importorskip("transformers")
from transformers import Siglip2ImageProcessorPil, SiglipImageProcessorPil  # noqa: E402
from transformers.models.siglip2.image_processing_pil_siglip2 import (  # noqa: E402
    get_image_size_for_max_num_patches,
)

ATOL = 1e-6
# (height, width): degenerate, extreme aspect ratios both ways, landscape, portrait, square, odd.
SIZES = [(1, 1), (10, 10000), (10000, 10), (480, 640), (640, 480), (224, 224), (37, 91), (333, 17)]
FIXRES_CONFIGS = {
    "siglip-224": {"image_processor_type": "SiglipImageProcessor", "size": {"height": 224, "width": 224},
                   "resample": 3, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                   "do_resize": True, "do_rescale": True, "do_normalize": True},
    # a second size, another filter and per-channel statistics, to exercise every setting
    "other-96": {"image_processor_type": "SiglipImageProcessor", "size": {"height": 96, "width": 96},
                 "resample": 2, "rescale_factor": 1 / 255, "image_mean": [0.485, 0.456, 0.406],
                 "image_std": [0.229, 0.224, 0.225]},
}
NAFLEX_CONFIG = {"image_processor_type": "Siglip2ImageProcessor", "patch_size": 16, "max_num_patches": 256,
                 "resample": 2, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                 "do_resize": True, "do_rescale": True, "do_normalize": True}
# transformers composites transparency onto white in convert_to_rgb, and reads 4-channel arrays as
# RGBA, from 5.21 on; before, convert("RGB") dropped the alpha (the hidden colour shows) and a
# 4-channel array was "Unable to infer channel dimension format". fastsiglip does what 5.21 does.
ALPHA = pytest.mark.transformers("5.21", reason="older versions drop the alpha channel instead of "
                                                "compositing onto white, and reject 4-channel arrays")
HF_KEYS = ("size", "resample", "rescale_factor", "image_mean", "image_std", "do_resize", "do_rescale",
           "do_normalize", "patch_size", "max_num_patches")


def _hf(cls, cfg):
    return cls(**{k: v for k, v in cfg.items() if k in HF_KEYS})


def _noise(height, width, seed=0, channels=3):
    rng = np.random.default_rng(seed + height * 7 + width)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _rgb(height, width, seed=0):
    return Image.fromarray(_noise(height, width, seed))


def _assert_equal(expected: dict, actual: dict):
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for key, want in expected.items():
        got = actual[key]
        assert got.dtype == want.dtype, f"{key}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        err = (got.double() - want.double()).abs().max().item()
        assert err <= ATOL, f"{key}: max abs diff {err}"


def _modes():
    """One image per PIL mode fastsiglip handles, from the same noise."""
    base = Image.fromarray(_noise(29, 41, seed=3))
    alpha = Image.fromarray(_noise(29, 41, seed=4, channels=1))
    out = {"RGB": base, "L": base.convert("L"), "RGBA": base.copy(), "CMYK": base.convert("CMYK"),
           "1": base.convert("1"), "P": base.convert("P"), "RGBX": base.convert("RGBX")}
    out["RGBA"].putalpha(alpha)
    out["LA"] = Image.merge("LA", (out["L"], alpha))
    out["PA"] = out["RGBA"].convert("PA")
    transparent = base.convert("P")
    transparent.info["transparency"] = 7  # palette index 7 is see-through
    out["P+transparency"] = transparent
    grey = np.asarray(out["L"]).astype(np.int32)
    out["I"] = Image.fromarray(grey * 3 - 100, "I")  # outside [0, 255] on both sides: Pillow clips
    out["F"] = Image.fromarray((grey * 1.3 - 20.5).astype(np.float32), "F")
    return out


# ---------------------------------------------------------------------------------------------
# FixRes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FIXRES_CONFIGS))
def test_fixres_sizes_match_transformers(name):
    cfg = FIXRES_CONFIGS[name]
    images = [_rgb(h, w) for h, w in SIZES]
    expected = _hf(SiglipImageProcessorPil, cfg)(images, return_tensors="pt")
    actual = ImageProcessor.from_dict(cfg)(images, num_workers=2)
    _assert_equal(dict(expected), actual)
    assert actual["pixel_values"].shape == (len(SIZES), 3, cfg["size"]["height"], cfg["size"]["width"])


@pytest.mark.parametrize("mode", [pytest.param(m, marks=ALPHA) if m in ("RGBA", "LA", "PA") else m for m in _modes()])
def test_fixres_modes_match_transformers(mode):
    image = _modes()[mode]
    cfg = FIXRES_CONFIGS["other-96"]
    _assert_equal(dict(_hf(SiglipImageProcessorPil, cfg)(image, return_tensors="pt")),
                  ImageProcessor.from_dict(cfg)(image))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    # Deliberate: Pillow's convert("RGB") (used by transformers) clips I;16 at 255, so a 16-bit
    # PNG comes out almost white; fastsiglip maps 0..65535 linearly onto 0..255.
    values = (_noise(30, 40, seed=5, channels=1).astype(np.uint16) * 257)  # full 16-bit range
    image16 = Image.fromarray(values)  # uint16 -> mode I;16
    png = io.BytesIO()
    image16.save(png, "PNG")
    reopened = Image.open(io.BytesIO(png.getvalue()))
    assert reopened.mode == "I;16"
    eight_bit = Image.fromarray((values // 257).astype(np.uint8), "L")
    cfg = FIXRES_CONFIGS["siglip-224"]
    hf = _hf(SiglipImageProcessorPil, cfg)
    ours = ImageProcessor.from_dict(cfg)
    _assert_equal(dict(hf(eight_bit, return_tensors="pt")), ours(reopened))
    clipped = hf(image16, return_tensors="pt")["pixel_values"]
    assert (clipped == 1.0).float().mean() > 0.9  # transformers: white
    assert not torch.equal(clipped, ours(image16)["pixel_values"])


def test_premultiplied_rgba_is_composited_like_rgba():
    # Deliberate: transformers sees no "A" band in RGBa and drops the (premultiplied) alpha.
    rgba = _modes()["RGBA"]
    ours = ImageProcessor()
    got = ours(rgba.convert("RGBa"))["pixel_values"]
    want = ours(rgba.convert("RGBa").convert("RGBA"))["pixel_values"]
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# NaFlex
# ---------------------------------------------------------------------------------------------


def test_naflex_size_matches_transformers():
    rng = random.Random(0)
    cases = [(h, w, 16, n) for h, w in SIZES for n in (1, 64, 256, 576, 784, 1024)]
    cases += [(rng.randint(1, 5000), rng.randint(1, 5000), rng.choice([14, 16, 32]), rng.randint(1, 2000))
              for _ in range(300)]
    for h, w, p, n in cases:
        assert naflex_size(h, w, p, n) == get_image_size_for_max_num_patches(h, w, p, n), (h, w, p, n)
        th, tw = naflex_size(h, w, p, n)
        assert th % p == 0 and tw % p == 0 and (th // p) * (tw // p) <= max(n, 1)


@pytest.mark.parametrize("max_num_patches", [256, 1024, 49])
def test_naflex_sizes_match_transformers(max_num_patches):
    images = [_rgb(h, w) for h, w in SIZES]
    expected = _hf(Siglip2ImageProcessorPil, NAFLEX_CONFIG)(images, max_num_patches=max_num_patches,
                                                            return_tensors="pt")
    ours = ImageProcessor.from_dict(NAFLEX_CONFIG)
    actual = ours(images, max_num_patches=max_num_patches, num_workers=2)  # per-call override
    _assert_equal(dict(expected), actual)
    assert actual["pixel_values"].shape == (len(SIZES), max_num_patches, 3 * 16 * 16)
    assert actual["pixel_attention_mask"].dtype == torch.int32 and actual["spatial_shapes"].dtype == torch.int64
    counts = actual["spatial_shapes"].prod(-1)
    assert torch.equal(actual["pixel_attention_mask"].sum(-1).long(), counts)
    assert (actual["pixel_values"][actual["pixel_attention_mask"] == 0] == 0).all()  # zero padding


def test_naflex_default_and_override():
    ours = ImageProcessor.from_dict({**NAFLEX_CONFIG, "max_num_patches": 64})
    image = _rgb(480, 640)
    assert ours(image)["pixel_values"].shape == (1, 64, 768)
    assert ours(image, max_num_patches=100)["pixel_values"].shape == (1, 100, 768)
    assert ours.max_num_patches == 64  # the override does not stick


@pytest.mark.parametrize("mode", ["L", pytest.param("RGBA", marks=ALPHA), "P+transparency", "CMYK", "1"])
def test_naflex_modes_are_converted_to_rgb(mode):
    # Deliberate: Siglip2ImageProcessorPil does not convert to RGB unless told (do_convert_rgb
    # unset): grey/RGBA inputs then crash in normalize. With do_convert_rgb=True it agrees.
    image = _modes()[mode]
    hf = _hf(Siglip2ImageProcessorPil, NAFLEX_CONFIG)
    expected = hf(image, do_convert_rgb=True, max_num_patches=64, return_tensors="pt")
    _assert_equal(dict(expected), ImageProcessor.from_dict(NAFLEX_CONFIG)(image, max_num_patches=64))


# ---------------------------------------------------------------------------------------------
# Inputs: arrays, tensors, paths, EXIF, alpha
# ---------------------------------------------------------------------------------------------


def test_array_and_tensor_inputs_equal_pil():
    ours = ImageProcessor(size=(64, 64))
    rgb = _noise(50, 70, seed=9)
    rgba = _noise(50, 70, seed=9, channels=4)
    grey = _noise(50, 70, seed=9, channels=1)
    want_rgb = ours(Image.fromarray(rgb))["pixel_values"]
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    for image in (rgb, chw, chw.float() / 255, chw.double() / 255, rgb.astype(np.float32) / 255):
        assert torch.equal(ours(image)["pixel_values"], want_rgb), type(image)
    want_grey = ours(Image.fromarray(grey, "L"))["pixel_values"]
    for image in (grey, grey[:, :, None], torch.from_numpy(grey)[None]):
        assert torch.equal(ours(image)["pixel_values"], want_grey)
    # 4 channels are RGBA composited by Pillow, exactly as a PIL RGBA image
    assert torch.equal(ours(rgba)["pixel_values"], ours(Image.fromarray(rgba, "RGBA"))["pixel_values"])
    # uint8 arrays agree with transformers too
    hf = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    for image in (rgb, chw):
        _assert_equal(dict(hf(image, return_tensors="pt")), ours(image))
    # Deliberate: float input in [0, 1] is rounded to uint8; transformers rescales it twice
    floats = hf(chw.float() / 255, return_tensors="pt")["pixel_values"]
    assert floats.max() < -0.98 and not torch.equal(floats, want_rgb)


@ALPHA
def test_four_channel_arrays_match_transformers():
    """A 4-channel uint8 array is RGBA for transformers too (its float composite rounds as Pillow's)."""
    rgba = _noise(50, 70, seed=9, channels=4)
    hf, ours = SiglipImageProcessorPil(size={"height": 64, "width": 64}), ImageProcessor(size=(64, 64))
    _assert_equal(dict(hf(rgba, return_tensors="pt")), ours(rgba))


def test_paths_match_transformers(tmp_path):
    ours = ImageProcessor.from_dict(FIXRES_CONFIGS["siglip-224"])
    hf = _hf(SiglipImageProcessorPil, FIXRES_CONFIGS["siglip-224"])
    png, jpg, gif = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.gif"
    _rgb(40, 60).save(png)
    _rgb(60, 40).save(jpg, quality=90)
    frames = [_rgb(33, 45, seed=s).convert("P") for s in (1, 2)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])  # multi-frame: the first is used
    expected = hf([str(png), str(jpg), str(gif)], return_tensors="pt")
    _assert_equal(dict(expected), ours([str(png), jpg, str(gif)]))  # str and pathlib.Path


def _oriented(tmp_path, orientation=6):
    """A PNG (lossless, so pixels compare exactly) stored sideways with an EXIF orientation tag."""
    stored = _rgb(30, 50, seed=11)
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 degrees clockwise to display
    path = tmp_path / f"oriented{orientation}.png"
    stored.save(path, exif=exif)
    return path, stored


def test_exif_orientation_applied_to_paths_and_pil_images(tmp_path):
    path, _ = _oriented(tmp_path)
    hf = _hf(Siglip2ImageProcessorPil, NAFLEX_CONFIG)
    ours = ImageProcessor.from_dict(NAFLEX_CONFIG)
    # transformers' load_image applies EXIF for paths: same as ours
    from_path = ours(str(path), max_num_patches=64)
    _assert_equal(dict(hf(str(path), max_num_patches=64, return_tensors="pt")), from_path)
    assert from_path["spatial_shapes"].tolist() == [[get_image_size_for_max_num_patches(50, 30, 16, 64)[0] // 16,
                                                     get_image_size_for_max_num_patches(50, 30, 16, 64)[1] // 16]]
    # Deliberate: a PIL image with the tag is also turned upright (transformers leaves it as stored)
    opened = Image.open(path)
    _assert_equal(from_path, ours(opened, max_num_patches=64))
    as_stored = hf(Image.open(path), max_num_patches=64, return_tensors="pt")
    assert not torch.equal(as_stored["spatial_shapes"], from_path["spatial_shapes"])
    upright = ImageOps.exif_transpose(Image.open(path))
    _assert_equal(dict(hf(upright, max_num_patches=64, return_tensors="pt")), from_path)
    assert load_image(str(path)).size == (30, 50)


# What each EXIF orientation asks a viewer to do to the stored pixels (EXIF 2.32, tag 0x0112),
# written out here rather than taken from ImageOps.exif_transpose, which fastsiglip itself uses.
EXIF_TO_UPRIGHT = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("orientation", sorted(EXIF_TO_UPRIGHT))
def test_exif_rotated_jpeg_equals_pre_rotated_image(tmp_path, orientation):
    # A camera JPEG stored sideways with its orientation tag gives exactly the pixels of the same
    # decoded JPEG turned upright by hand (JPEG is lossy, so the reference is the decoded file,
    # not the array it was saved from), as a path and as an opened PIL image, FixRes and NaFlex.
    stored = Image.fromarray(_noise(12, 20, seed=5)).resize((80, 48), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"camera{orientation}.jpg"
    stored.save(path, quality=92, exif=exif)
    with Image.open(path) as decoded:
        # Pixels only: a converted/transposed PIL image keeps the file's EXIF in .info, and
        # fastsiglip turns PIL images with an orientation tag upright (processing.py).
        upright = Image.fromarray(np.asarray(decoded.convert("RGB")))
        assert upright.size == (80, 48), "the file holds the sideways pixels"
    if EXIF_TO_UPRIGHT[orientation] is not None:
        upright = upright.transpose(EXIF_TO_UPRIGHT[orientation])
    assert upright.size == ((48, 80) if orientation >= 5 else (80, 48))
    for ours, kwargs in ((ImageProcessor.from_dict(FIXRES_CONFIGS["other-96"]), {}),
                         (ImageProcessor.from_dict(NAFLEX_CONFIG), {"max_num_patches": 24})):
        expected = ours(upright, **kwargs)
        _assert_equal(expected, ours(str(path), **kwargs))
        _assert_equal(expected, ours(Image.open(path), **kwargs))
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(upright))


@ALPHA
def test_alpha_in_files_composited_onto_white(tmp_path):
    # Deliberate: transformers' load_image does convert("RGB") on paths (alpha dropped, hidden
    # colour shows); fastsiglip composites onto white for paths as it does for PIL images.
    rgba = _modes()["RGBA"]
    path = tmp_path / "alpha.png"
    rgba.save(path)
    cfg = FIXRES_CONFIGS["other-96"]
    hf, ours = _hf(SiglipImageProcessorPil, cfg), ImageProcessor.from_dict(cfg)
    from_path = ours(str(path))
    _assert_equal(dict(hf(rgba, return_tensors="pt")), from_path)
    assert not torch.equal(hf(str(path), return_tensors="pt")["pixel_values"], from_path["pixel_values"])


# ---------------------------------------------------------------------------------------------
# Bad inputs, the threaded batch API
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path):
    png, jpg = io.BytesIO(), io.BytesIO()
    _rgb(64, 64).save(png, "PNG")
    _rgb(64, 64).save(jpg, "JPEG")
    files = {
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "truncated.jpg": jpg.getvalue()[: len(jpg.getvalue()) // 2],
        "empty.jpg": b"",
        "notes.txt": b"this is not an image\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [str(tmp_path / name) for name in files] + [str(tmp_path / "missing.png")]


def test_bad_files_raise_naming_the_input(bad_files):
    ours = ImageProcessor()
    for path in bad_files:
        with pytest.raises(ImageLoadError, match="cannot read image") as info:
            ours(path)
        assert os.path.basename(path) in str(info.value)
    with pytest.raises(ImageLoadError, match="empty"):
        ours(bad_files[2])
    with pytest.raises(ImageLoadError, match="no such file"):
        ours(bad_files[4])


def test_bad_arrays_and_types():
    ours = ImageProcessor()
    with pytest.raises(ImageLoadError, match="no pixels"):
        ours(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        ours(torch.full((3, 4, 4), 2.0))
    with pytest.raises(ImageLoadError, match="C = 1, 3 or 4"):
        ours(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageLoadError, match="uint8"):
        ours(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(TypeError, match="unsupported image type"):
        ours(123)
    with pytest.raises(ValueError, match="no images"):
        ours([])
    with pytest.raises(ValueError, match="max_num_patches"):
        ImageProcessor(naflex=True)(_rgb(4, 4), max_num_patches=0)
    with pytest.raises(ValueError, match="num_workers"):
        ours(_rgb(4, 4), num_workers=-1)
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor(resample=9)
    with pytest.raises(ValueError, match="size"):
        ImageProcessor.from_dict({"size": {"shortest_edge": 224}})
    with pytest.raises(ValueError, match="disagree"):
        ImageProcessor.from_dict(FIXRES_CONFIGS["siglip-224"], image_size=384)
    with pytest.raises(ValueError, match="disagree"):
        ImageProcessor.from_dict(NAFLEX_CONFIG, patch_size=14)
    with pytest.raises(ValueError, match="NaFlex"):
        ours(_rgb(4, 4), max_num_patches=64)


@pytest.mark.parametrize("naflex", [False, True])
def test_process_images_skips_bad_and_keeps_order(bad_files, naflex):
    ours = ImageProcessor.from_dict(NAFLEX_CONFIG if naflex else FIXRES_CONFIGS["other-96"])
    good = [_rgb(30 + i, 50, seed=i) for i in range(3)]
    mixed = [good[0], bad_files[0], good[1], bad_files[3], bad_files[4], good[2]]
    extra = {"max_num_patches": 64} if naflex else {}
    batch = ours.process_images(mixed, num_workers=3, **extra)
    assert batch.indices == [0, 2, 5]
    assert [item for item, _ in batch.failed] == [bad_files[0], bad_files[3], bad_files[4]]
    assert all("cannot read image" in err for _, err in batch.failed)
    _assert_equal(ours(good, num_workers=0, **extra), batch.pixel_inputs)
    assert ours.process_images(bad_files).pixel_inputs is None
    with pytest.raises(ImageLoadError, match="truncated.png"):
        ours(mixed, num_workers=3)


def test_threads_equal_serial(tmp_path):
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.jpg")
        _rgb(48 + 5 * i, 64, seed=i).save(paths[-1], quality=85)
    for cfg in (FIXRES_CONFIGS["siglip-224"], NAFLEX_CONFIG):
        ours = ImageProcessor.from_dict(cfg)
        _assert_equal(ours(paths, num_workers=0), ours(paths, num_workers=4))


# ---------------------------------------------------------------------------------------------
# The processor: config.json + preprocessor_config.json + tokenizer in one folder
# ---------------------------------------------------------------------------------------------


def _train_spiece(folder: pathlib.Path):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(1)
    words = ["cat", "dog", "photo", "of", "a", "the", "bird", "car", "red", "blue", "small", "big"]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=30,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", num_threads=1,
                                   minloglevel=2)
    corpus.unlink()
    (folder / "spiece.vocab").unlink()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(fixres, naflex) folders: tiny config.json, preprocessor_config.json, spiece.model."""
    folders = []
    for naflex in (False, True):
        folder = tmp_path_factory.mktemp("naflex" if naflex else "fixres")
        _train_spiece(folder)
        cfg = fconfig.preset("siglip2-base-patch16-naflex" if naflex else "siglip-base-patch16-224")
        cfg.text.max_position_embeddings = 12
        (folder / "config.json").write_text(json.dumps(fconfig.to_dict(cfg)))
        pre = NAFLEX_CONFIG if naflex else FIXRES_CONFIGS["siglip-224"]
        (folder / "preprocessor_config.json").write_text(json.dumps(pre))
        folders.append(folder)
    return folders


def test_load_processor_end_to_end(checkpoints):
    from fastsiglip.tokenizer import load_tokenizer

    texts = ["a photo of a cat", "A BIG red car, small dog and the blue bird of a photo"]
    images = [_rgb(h, w) for h, w in SIZES[:5]]
    for folder, cls, cfg in ((checkpoints[0], SiglipImageProcessorPil, FIXRES_CONFIGS["siglip-224"]),
                             (checkpoints[1], Siglip2ImageProcessorPil, NAFLEX_CONFIG)):
        processor = load_processor(str(folder))
        assert isinstance(processor, Processor)
        out = processor(text=texts, images=images, padding="max_length", return_tensors="pt")
        tok = load_tokenizer(folder, max_length=12)
        assert torch.equal(out["input_ids"], tok(texts)["input_ids"])
        assert out["input_ids"].shape == (2, 12) and "attention_mask" not in out
        pixels = {k: v for k, v in out.items() if k != "input_ids"}
        _assert_equal(dict(_hf(cls, cfg)(images, return_tensors="pt")), pixels)
        assert set(processor(images=images[0])) == set(pixels)
        only_text = processor(text="a cat", return_attention_mask=True, max_length=8)
        assert set(only_text) == {"input_ids", "attention_mask"} and only_text["input_ids"].shape == (1, 8)


def test_load_processor_matches_transformers_processor(tmp_path):
    # A folder written by transformers' own SiglipProcessor.save_pretrained (transformers 5 puts
    # the image settings in processor_config.json) gives the same model inputs as that processor.
    from transformers import SiglipProcessor, SiglipTokenizer

    _train_spiece(tmp_path)
    size = {"height": 64, "width": 64}
    hf = SiglipProcessor(image_processor=SiglipImageProcessorPil(size=size),
                         tokenizer=SiglipTokenizer(str(tmp_path / "spiece.model")))
    hf.save_pretrained(tmp_path)
    cfg = fconfig.preset("siglip-base-patch16-224")
    cfg.vision.image_size, cfg.text.max_position_embeddings = 64, 10
    (tmp_path / "config.json").write_text(json.dumps(fconfig.to_dict(cfg)))
    texts = ["a photo of a cat", "The big red car of the small dog"]
    images = [_rgb(h, w) for h, w in SIZES[:4]]
    expected = hf(text=texts, images=images, padding="max_length", max_length=10, truncation=True,
                  return_tensors="pt")
    processor = load_processor(tmp_path)
    actual = processor(text=texts, images=images, padding="max_length", return_tensors="pt",
                       return_attention_mask=True)
    _assert_equal(dict(expected), actual)
    # Deliberate: no attention_mask unless asked. transformers 5.23 returns one, but the SigLIP
    # text towers were trained without (big_vision attends over the padding, and the last
    # position, often padding, is pooled), and transformers' text model changes its output when given one.
    plain = processor(text=texts, images=images)
    assert set(plain) == {"input_ids", "pixel_values"}


def test_load_processor_max_num_patches(checkpoints):
    processor = load_processor(checkpoints[1], max_num_patches=144)
    image = _rgb(480, 640)
    assert processor(images=image)["pixel_values"].shape == (1, 144, 768)
    assert processor(images=image, max_num_patches=576)["pixel_values"].shape == (1, 576, 768)
    batch = processor.process_images([image, "/nonexistent.jpg"])
    assert batch.indices == [0] and batch.failed[0][0] == "/nonexistent.jpg"
    with pytest.raises(ValueError, match="NaFlex"):
        load_processor(checkpoints[0], max_num_patches=144)


def test_load_processor_errors(checkpoints, tmp_path):
    processor = load_processor(checkpoints[0])
    with pytest.raises(ValueError, match="text=..., images=..."):
        processor()
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text="a", return_tensors="np")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_processor(tmp_path)


@pytest.mark.parametrize("family", ["siglip2-tokenizer-file", "siglip2-vocab", "siglip"])
def test_fixres_without_preprocessor_file_uses_the_family_filter(tmp_path, family):
    # The published google/siglip2-* FixRes files say "resample": 2 (bilinear), google/siglip-*
    # say 3 (bicubic): a folder without preprocessor settings gets its family's filter. SigLIP 2
    # is told by Gemma's tokenizer.model in the folder, or by its 256,000-token vocabulary.
    from fastsiglip.processing import load_image_processor

    name = "siglip-base-patch16-224" if family == "siglip" else "siglip2-base-patch16-224"
    cfg = fconfig.preset(name)
    cfg.vision.image_size = 64
    if family == "siglip2-tokenizer-file":
        cfg.text.vocab_size = 300  # a tiny Gemma-layout vocabulary, as tests train
        (tmp_path / "tokenizer.model").write_bytes(b"present")  # only its presence is read here
    elif family == "siglip":
        (tmp_path / "spiece.model").write_bytes(b"present")
    (tmp_path / "config.json").write_text(json.dumps(fconfig.to_dict(cfg)))
    expected_resample = 3 if family == "siglip" else 2
    expected_word = "bicubic" if family == "siglip" else "bilinear"
    with pytest.warns(UserWarning, match=f"no preprocessor_config.json.*{expected_word} 64x64"):
        processor = load_image_processor(tmp_path, model_config=fconfig.from_file(tmp_path / "config.json"))
    assert processor.resample == expected_resample
    images = [_rgb(h, w, seed=i) for i, (h, w) in enumerate(SIZES[3:7])]
    hf = SiglipImageProcessorPil(size={"height": 64, "width": 64}, resample=expected_resample)
    _assert_equal(dict(hf(images, return_tensors="pt")), processor(images))
