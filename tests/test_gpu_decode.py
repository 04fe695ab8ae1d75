"""`--decode gpu` (fastsiglip/gpu_decode.py) on the real photos of tests/data/photos plus the
cases it routes elsewhere: a PNG, a grayscale, a CMYK and an EXIF-rotated JPEG (decoded exactly
on the CPU), a progressive JPEG the decoder rejects (Pillow fallback), a truncated JPEG and a
file that is no image (unreadable, as in the exact path).

Without a GPU the pipeline runs with device="cpu" and the decode step done by torchvision's CPU
decode_jpeg when a matching torchvision is installed, else by Pillow through decode_jpeg's
contract (a list of uint8 [3, h, w], RuntimeError when any fails): everything but nvjpeg itself.
The test marked gpu runs the real thing (nvjpeg on CUDA) and is skipped without one."""

import io
import pathlib
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fastsiglip
from fastsiglip import api, data, gpu_decode
from fastsiglip.processing import ImageProcessor, Processor

PHOTOS = pathlib.Path(__file__).parent / "data" / "photos"
# torch's resize against Pillow's, both width first and rounded to 8 bits between the passes:
# measured on these photos at 64, 224 and 384, at most 2 levels apart, 0.001 (bicubic) and
# 0.05 (bilinear) on average.
MAX_LEVELS, MEAN_LEVELS = 2, 0.06


def pillow_decode(datas):
    """decode_jpeg's contract, by Pillow, refusing progressive JPEGs (as a decoder without
    progressive support would): exercises the per-image fallback."""
    out = []
    for d in datas:
        image = Image.open(io.BytesIO(d.numpy().tobytes()))
        if image.info.get("progressive"):
            raise RuntimeError("progressive JPEG not supported")
        try:
            image.load()
        except OSError as e:
            raise RuntimeError(str(e)) from e
        out.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
    return out


def _torchvision_cpu():
    try:
        return gpu_decode.torchvision_decoder("cpu")
    except ImportError as e:
        pytest.skip(f"torchvision not importable beside this torch ({e})")


DECODERS = {"pillow": lambda: pillow_decode, "torchvision": _torchvision_cpu}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for photo in PHOTOS.glob("*.jpg"):
        (folder / photo.name).write_bytes(photo.read_bytes())
    coffee = Image.open(PHOTOS / "coffee.jpg")
    coffee.save(folder / "coffee-progressive.jpg", quality=90, progressive=True)
    coffee.save(folder / "coffee.png")
    coffee.convert("CMYK").save(folder / "coffee-cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.open(PHOTOS / "rocket.jpg").save(folder / "rocket-rotated.jpg", quality=90, exif=exif)
    rocket = (PHOTOS / "rocket.jpg").read_bytes()
    (folder / "rocket-truncated.jpg").write_bytes(rocket[: len(rocket) // 2])
    (folder / "not-an-image.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    return folder


ON_GPU = {"astronaut.jpg", "chelsea.jpg", "coffee.jpg", "hubble_deep_field.jpg", "retina.jpg", "rocket.jpg"}
EXACT_ON_CPU = {"camera.jpg", "coffee.png", "coffee-cmyk.jpg", "rocket-rotated.jpg"}
UNREADABLE = {"rocket-truncated.jpg", "not-an-image.jpg"}


def _both(folder, processor, decode, max_num_patches=None):
    pairs = api.image_inputs(folder)
    codec = data.PixelCodec(processor, max_num_patches)
    exact = data.merge([data.ImageBatches(pairs, codec, batch_size=len(pairs))[0]])  # numpy -> torch
    item = gpu_decode.JpegBatches(pairs, codec, batch_size=len(pairs))[0]
    routes = {pathlib.Path(key).name: kind for key, _, kind, _ in item["items"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Pillow fallback's warning: test_fallback_warns_once
        return exact, gpu_decode.GpuDecoder(codec, "cpu", decode=decode)(item), routes


@pytest.mark.parametrize("decoder", ["pillow", "torchvision"])
def test_fixres_pixels_close_and_routed(folder, decoder, monkeypatch):
    monkeypatch.setattr(gpu_decode, "MAX_DECODE_PIXELS", 2_000_000)  # several decode groups
    processor = ImageProcessor(size=(224, 224), resample=3)  # SigLIP 1: bicubic
    exact, gpu, routes = _both(folder, processor, DECODERS[decoder]())
    names = [pathlib.Path(k).name for k in gpu["keys"]]
    assert gpu["keys"] == exact["keys"] and set(names) == ON_GPU | EXACT_ON_CPU | {"coffee-progressive.jpg"}
    assert [k for k, _ in gpu["bad"]] == [k for k, _ in exact["bad"]]  # in record order, as the exact path
    assert {pathlib.Path(k).name for k, _ in gpu["bad"]} == UNREADABLE
    assert {n for n, kind in routes.items() if kind == "jpeg"} == ON_GPU | {"coffee-progressive.jpg", "rocket-truncated.jpg"}
    assert gpu["pixels"].dtype == torch.uint8 and gpu["pixels"].shape == exact["pixels"].shape
    for name, a, b in zip(names, exact["pixels"], gpu["pixels"]):
        diff = (a.int() - b.int()).abs()
        if name in EXACT_ON_CPU:
            assert torch.equal(a, b), name
        else:
            assert diff.max() <= MAX_LEVELS and diff.float().mean() <= MEAN_LEVELS, (name, diff.max(), diff.float().mean())


def test_naflex_patches_mask_and_shapes(folder):
    processor = ImageProcessor(naflex=True, patch_size=16, max_num_patches=256, resample=2)  # SigLIP 2: bilinear
    exact, gpu, _ = _both(folder, processor, pillow_decode, 256)
    assert gpu["keys"] == exact["keys"]
    for field in ("pixel_attention_mask", "spatial_shapes"):
        assert torch.equal(gpu[field], exact[field]), field
    diff = (gpu["pixels"].int() - exact["pixels"].int()).abs()
    assert diff.max() <= MAX_LEVELS and diff.float().mean() <= MEAN_LEVELS
    codec = data.PixelCodec(processor, 256)
    inputs = codec.to_model(gpu, "cpu")  # the model's inputs, as from the exact path
    assert inputs["pixel_values"].shape == codec.to_model(exact, "cpu")["pixel_values"].shape


def test_fallback_warns_once_and_groups_split(folder):
    pairs = api.image_inputs(folder)
    codec = data.PixelCodec(ImageProcessor(size=(64, 64)))
    item = gpu_decode.JpegBatches(pairs, codec, batch_size=len(pairs))[0]
    decoder = gpu_decode.GpuDecoder(codec, "cpu", decode=pillow_decode)
    with pytest.warns(UserWarning, match="coffee-progressive.jpg.*Pillow decoded it") as seen:
        decoder(item)
        decoder(item)
    assert len(seen) == 1 and decoder.fallbacks == 2
    assert list(gpu_decode._groups([0, 1, 2, 3], [5, 5, 20, 1], 10)) == [[0, 1], [2], [3]]


@pytest.mark.filterwarnings("ignore:--decode gpu. the GPU decoder")  # the progressive JPEG's fallback
def test_embed_decode_gpu_through_the_job(siglip_checkpoint, folder, tmp_path, monkeypatch):
    """embed_files(decode="gpu") end to end on the CPU: CUDA check and nvjpeg replaced by Pillow."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(gpu_decode, "check_supported", lambda codec, device: None)
    monkeypatch.setattr(gpu_decode, "torchvision_decoder", lambda device: pillow_decode)
    model = fastsiglip.load(siglip_checkpoint)
    torch.set_num_threads(1)
    reports, rows = {}, {}
    for mode, workers in (("exact", 0), ("gpu", 0), ("gpu", 2)):
        out = tmp_path / f"{mode}{workers}.safetensors"
        reports[mode, workers] = api.embed_files(model, folder, out, decode=mode, workers=workers, batch_size=4,
                                                 progress=False)
        from safetensors.torch import load_file

        rows[mode, workers] = load_file(str(out))["embeddings"]
    exact, gpu = reports["exact", 0], reports["gpu", 0]
    assert exact["paths"] == gpu["paths"] == reports["gpu", 2]["paths"]
    assert [k for k, _ in exact["failed"]] == [k for k, _ in gpu["failed"]]
    for (key, error), (_, exact_error) in zip(gpu["failed"], exact["failed"]):
        assert error.startswith(f"cannot read image {key!r}: ") and error.count("cannot read") == 1, error
        if key.endswith("not-an-image.jpg"):
            assert error == exact_error  # the same header check, the same words
    assert torch.equal(rows["gpu", 0], rows["gpu", 2])  # workers change nothing
    cosine = (rows["exact", 0] * rows["gpu", 0]).sum(-1)
    assert cosine.min() > 0.99, cosine
    on_cpu = [i for i, p in enumerate(gpu["paths"]) if pathlib.Path(p).name in EXACT_ON_CPU]
    assert torch.allclose(rows["exact", 0][on_cpu], rows["gpu", 0][on_cpu], atol=1e-6)
    # A run is resumed only with the decode mode it started with.
    with pytest.raises(ValueError, match="another processing"):
        api.embed_files(model, folder, tmp_path / "exact0.safetensors", decode="gpu", workers=0, resume=True,
                        progress=False)


def test_decode_gpu_says_what_it_needs(siglip_checkpoint, folder, tmp_path, monkeypatch, capsys):
    from fastsiglip import cli

    pytest.importorskip("transformers")
    model = fastsiglip.load(siglip_checkpoint)
    with pytest.raises(ValueError, match="CUDA device.*--device cuda.*--decode exact"):
        api.embed_files(model, folder, tmp_path / "e.safetensors", decode="gpu", workers=0)
    assert cli.main(["embed", str(folder), "--out", str(tmp_path / "c.safetensors"), "--model",
                     str(siglip_checkpoint), "--decode", "gpu", "--quiet"]) == 2
    assert "--device cuda" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with pytest.raises(ImportError, match="pip install torchvision"):
        gpu_decode.torchvision_decoder("cuda")
    nearest = data.PixelCodec(ImageProcessor(size=(32, 32), resample=0))
    with pytest.raises(ValueError, match="bilinear or bicubic.*nearest"):
        gpu_decode.check_supported(nearest, "cuda")


@pytest.mark.gpu
def test_decode_gpu_on_cuda(folder, tmp_path):
    """nvjpeg for real: embeddings close to the exact path's, the same keys and failures."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (nvjpeg)")
    try:
        gpu_decode.torchvision_decoder("cuda")
    except ImportError as e:
        pytest.skip(str(e))
    import dataclasses

    from fastsiglip import config as config_lib
    from fastsiglip.model import build

    cfg = config_lib.preset("siglip-base-patch16-224")
    cfg = dataclasses.replace(cfg, text=None, architecture="SiglipVisionModel")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build(cfg).eval()
    processor = Processor(None, ImageProcessor(size=(224, 224), resample=3))
    exact, gpu = (api.embed_files(model, folder, tmp_path / f"{m}.safetensors", decode=m, processor=processor,
                                  workers=2, progress=False) for m in ("exact", "gpu"))
    assert exact["paths"] == gpu["paths"] and [k for k, _ in exact["failed"]] == [k for k, _ in gpu["failed"]]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / f"{m}.safetensors"))["embeddings"] for m in ("exact", "gpu"))
    assert ((a * b).sum(-1) > 0.99).all()
