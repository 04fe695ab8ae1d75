"""`--decode gpu`: JPEGs decoded and resized on the GPU (torchvision's nvjpeg), the rest on the CPU.

    dataset = JpegBatches(pairs, codec, batch_size=64)        # DataLoader workers: bytes + headers
    decoder = GpuDecoder(codec, "cuda")                       # main process: decode, resize
    batch = decoder(dataset[0])                               # a compact batch on the GPU (PixelCodec)

Who does what
  * The DataLoader workers (JpegBatches) read each image's bytes and look at its header with
    Pillow, which decodes nothing. A JPEG that needs nothing but decoding and resizing (YCbCr
    colour, no EXIF rotation, not an MPO) travels on as bytes.
    Every other image (PNG, WebP, a grayscale or CMYK JPEG, a rotated photo) is decoded and
    resized in the worker exactly as `--decode exact` does (PixelCodec.encode).
  * The main process (GpuDecoder) decodes the JPEGs of a batch with batched
    `torchvision.io.decode_jpeg(..., device="cuda")` calls (one per group of at most
    MAX_DECODE_PIXELS at full resolution), resizes each on the GPU with torch's
    antialiased `interpolate` in the processor's filter (bilinear or bicubic: the antialiased
    kernels are Pillow's) and in Pillow's order (the width, rounded to uint8, then the height),
    and assembles the compact batch that
    `PixelCodec.to_model` turns into the model's inputs on the device.
  * decode_jpeg returns nothing when one image of the list fails. The group's JPEGs are then
    decoded one at a time, and one that nvjpeg rejects is decoded by Pillow on the CPU (the
    exact path's decoder) instead, with one warning per decoder. One that Pillow cannot read either is reported unreadable, as in the
    exact path.

Not the exact path's pixels: nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's, and
torch's antialiased resize, done in Pillow's order (width, 8-bit rounding, height), still
differs from Pillow's fixed-point arithmetic by a level here and there. The embeddings are
close, not equal; the README gives the measured difference. `--decode gpu` is
part of an embedding job's identity, as every decode mode is.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import Pairs, PixelCodec
from .processing import EXIF_ORIENTATION, RESAMPLE_NAMES, ImageLoadError, load_image

UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what Image.open raises

RESIZE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL filter number -> torch's antialiased interpolate mode
# Pixels decoded at full resolution at once (a group of one decode_jpeg call): 3 bytes each, so
# 400 MB of GPU memory, a hundred 4 MP photos, before each is resized to the model's size.
MAX_DECODE_PIXELS = 2**27


def check_supported(codec: PixelCodec, device) -> None:
    """ValueError, saying what to do instead, when `--decode gpu` cannot serve this job."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"--decode gpu decodes on the model's CUDA device, and this model is on {device}; "
                         "load it with --device cuda, or use --decode exact (or draft)")
    resample = codec.processor.resample
    if codec.processor.do_resize and resample not in RESIZE_MODES:
        raise ValueError(f"--decode gpu resizes bilinear or bicubic, and this checkpoint's processor asks for "
                         f"{RESAMPLE_NAMES[resample]} (resample={resample}); use --decode exact")


def torchvision_decoder(device):
    """decode(list of uint8 byte tensors) -> list of uint8 [3, h, w] RGB tensors on `device`,
    by torchvision's decode_jpeg (nvjpeg on CUDA); ImportError saying what to install without it."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision built for another torch
        raise ImportError(f"--decode gpu needs torchvision, the build that matches your torch {torch.__version__} "
                          f"(pip install torchvision; it could not be imported: {e}); or use --decode exact or "
                          "draft") from e
    device = torch.device(device)

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    return decode


def _is_plain_jpeg(image: Image.Image) -> bool:
    """A JPEG that needs nothing but decoding and resizing: YCbCr, upright, one frame (not an MPO).
    Grayscale, CMYK and rotated ones take the exact path (load_image converts or turns them)."""
    return (image.format == "JPEG" and image.mode == "RGB" and image.info.get("adobe_transform", 1) == 1
            and image.getexif().get(EXIF_ORIENTATION, 1) == 1)  # adobe_transform 0: RGB stored untransformed


class JpegBatches(torch.utils.data.Dataset):
    """Item i -> the images of records indices[i b : (i + 1) b] of `pairs`, for GpuDecoder:
    {"items": [(key, where, kind, payload)]} in record order, kind "jpeg" (payload: the file's
    bytes and its pixel count), "pixels" (PixelCodec.encode's array, decoded exactly here) or
    "bad" (payload: the error); `where` names the image in error messages (Pairs.where)."""

    def __init__(self, pairs: Pairs, codec: PixelCodec, *, batch_size: int, indices: list[int] | None = None):
        self.pairs, self.codec, self.batch_size = pairs, codec, batch_size
        self.indices = list(range(len(pairs))) if indices is None else list(indices)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, i: int) -> dict:
        items = []
        for index in self.indices[i * self.batch_size:(i + 1) * self.batch_size]:
            key, where = self.pairs.records[index].key, self.pairs.where(index)
            try:
                _, data = self.pairs.read_bytes(index)
                items.append((key, where, *self._route(where, data)))
            except ImageLoadError as e:
                items.append((key, where, "bad", str(e)))
        return {"items": items}

    def _route(self, where: str, data: bytes) -> tuple[str, object]:
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except UNREADABLE as e:
            raise ImageLoadError(f"cannot read image {where}: {e}") from e
        if _is_plain_jpeg(image):
            # bytes, not a tensor: the DataLoader would give every tensor its own shared-memory
            # file descriptor, thousands of them in flight with many workers and large batches
            return "jpeg", (data, image.width * image.height)
        try:
            return "pixels", self.codec.encode(load_image(image))
        except ImageLoadError as e:
            raise _unreadable(where, e) from e


def _unreadable(where: str, error: Exception) -> ImageLoadError:
    """An ImageLoadError naming the file, with the decoder's own reason (load_image names the
    in-memory image it was given instead)."""
    return ImageLoadError(f"cannot read image {where}: {error.__cause__ or error}")


class GpuDecoder:
    """A JpegBatches item -> the compact batch of `PixelCodec.collate_tensors` on `device`, plus
    "keys" (the images in it, in order) and "bad" [(key, error)] (in order: unreadable files and
    JPEGs no decoder could read).

    decode: list of byte tensors -> list of uint8 [3, h, w] on `device`, raising RuntimeError
    when any fails (torchvision's decode_jpeg behaviour); default: torchvision_decoder(device).
    JPEGs are decoded in groups of at most MAX_DECODE_PIXELS, each image resized as soon as its
    group is decoded, so a batch of large photos never sits on the GPU at full resolution."""

    def __init__(self, codec: PixelCodec, device, decode=None):
        self.codec, self.device = codec, torch.device(device)
        self.mode = RESIZE_MODES.get(codec.processor.resample)
        self.decode = decode if decode is not None else torchvision_decoder(self.device)
        self.fallbacks = 0  # JPEGs `decode` rejected that Pillow read instead

    def __call__(self, item: dict) -> dict:
        items = item["items"]
        jpegs = [i for i, (_, _, kind, _) in enumerate(items) if kind == "jpeg"]
        decoded = {}
        for group in _groups(jpegs, [items[i][3][1] for i in jpegs], MAX_DECODE_PIXELS):
            datas = [torch.frombuffer(bytearray(items[i][3][0]), dtype=torch.uint8) for i in group]
            decoded.update(zip(group, self._decode_all(datas, [items[i][1] for i in group])))
        keys, tensors, bad = [], [], []
        for i, (key, _, kind, payload) in enumerate(items):
            pixels = decoded.get(i) if kind == "jpeg" else payload
            if kind == "bad" or isinstance(pixels, ImageLoadError):
                bad.append((key, str(pixels)))
                continue
            tensors.append(self.codec.patches(pixels) if kind == "jpeg" else torch.from_numpy(pixels).to(self.device))
            keys.append(key)
        batch = self.codec.collate_tensors(tensors) if tensors else {}
        batch.update(keys=keys, bad=bad)
        return batch

    def _decode_all(self, datas: list[torch.Tensor], wheres: list[str]) -> list:
        """Per JPEG: uint8 [3, H, W] on the device at the model's size, or the ImageLoadError of one
        that could not be decoded or resized."""
        try:
            images = self.decode(datas)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # one bad JPEG fails the whole call: decode them one by one
            images = [self._decode_one(data, where) for data, where in zip(datas, wheres)]
        out = []
        for image, where in zip(images, wheres):
            try:
                if isinstance(image, Exception):
                    raise image
                out.append(self._resize(image))
            except (ImageLoadError, *UNREADABLE) as e:
                out.append(_unreadable(where, e))
        return out

    def _decode_one(self, data: torch.Tensor, where: str):
        """uint8 [3, h, w] on the device, by `decode` or else by Pillow; or the exception."""
        try:
            return self.decode([data])[0]
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            reason = e
        try:  # what nvjpeg rejects, Pillow may still read (the exact path's decoder)
            image = load_image(Image.open(io.BytesIO(data.numpy().tobytes())))
        except (ImageLoadError, *UNREADABLE) as e:
            return e
        self.fallbacks += 1
        if self.fallbacks == 1:
            warnings.warn(f"--decode gpu: the GPU decoder could not decode {where} ({reason}); Pillow decoded it on "
                          "the CPU instead, as it will any later such JPEG (counted, not reported again)",
                          stacklevel=2)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(self.device)

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] -> uint8 [3, H, W] at the model's size (the processor's rule), Pillow's
        way: the width first, rounded to 8 bits, then the height (one 2-D float resize differs
        from Pillow's by up to 7 levels at sharp edges; this, by at most 2 and 0.001 on average)."""
        h, w = image.shape[-2:]
        height, width = self.codec.processor.target_size(h, w, self.codec.max_num_patches)
        if width != w:
            image = self._interpolate(image, (h, width))
        if height != h:
            image = self._interpolate(image, (height, width))
        return image

    def _interpolate(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        resized = F.interpolate(image[None].float(), size=size, mode=self.mode, antialias=True, align_corners=False)
        return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def _groups(indices: list[int], sizes: list[int], limit: int):
    """`indices` cut, in order, into runs whose `sizes` add up to at most `limit` (an index larger
    than the limit alone makes a run of its own)."""
    run, total = [], 0
    for index, size in zip(indices, sizes):
        if run and total + size > limit:
            yield run
            run, total = [], 0
        run.append(index)
        total += size
    if run:
        yield run
