"""Images -> pixel values (FixRes and NaFlex), and the processor that adds the tokenizer.

Pillow, numpy and torch only: no transformers, no torchvision. The pixel values equal those of
transformers' PIL-backend processors (``SiglipImageProcessorPil``, ``Siglip2ImageProcessorPil``)
bit for bit on RGB images, with the deliberate differences listed below.

FixRes (SigLIP 1, SigLIP 2 FixRes; preprocessor_config.json of a ``SiglipImageProcessor``):
  RGB -> resize to ``size`` (height, width) with ``resample`` (from the file; without one,
  bicubic for SigLIP 1 and bilinear for SigLIP 2 FixRes, as the published files say) ->
  rescale by ``rescale_factor`` -> normalize with ``image_mean`` / ``image_std`` (0.5 / 0.5)
  -> ``pixel_values`` float32 [B, 3, H, W].
NaFlex (``Siglip2ImageProcessor``): the size with at most ``max_num_patches`` patches keeping
  the aspect ratio (`naflex_size`) -> bilinear resize -> rescale, normalize -> patches in
  (py, px, c) order -> zero rows up to ``max_num_patches``:
  ``pixel_values`` float32 [B, N, 3*p*p], ``pixel_attention_mask`` int32 [B, N] (1 = real
  patch), ``spatial_shapes`` int64 [B, 2] (patch rows, patch columns); dtypes as transformers.

Rescale and normalize are one table lookup: a uint8 pixel takes only 256 values, so each
channel's 256 outputs are computed once with transformers' arithmetic (float64 multiply by
``rescale_factor``, cast to float32, then ``(x - mean) / std`` in float32) and gathered.

Inputs: PIL images, file paths (str or pathlib.Path), numpy arrays [H, W, C] or [H, W]
(C = 1, 3 or 4), torch tensors [C, H, W] (C = 1, 3 or 4). Arrays and tensors are uint8 in
[0, 255] or floating point in [0, 1]; floats are quantized to uint8 with ``round(x * 255)``
first (PIL resamples 8-bit images), so a float input gives exactly what its uint8 rounding
gives. One channel is grey, four are RGBA.

Deliberate differences from transformers 5.23 (each tested in tests/test_processing.py):
  * EXIF orientation is applied to file paths AND to PIL images (``ImageOps.exif_transpose``),
    so an image gives the same pixels however it is passed. transformers applies it to paths
    only (``load_image``); a PIL image with an orientation tag is used as stored.
  * Transparency is composited onto white for every input. transformers does so for PIL
    images and arrays, but a file path goes through ``load_image``'s plain ``convert("RGB")``,
    which drops the alpha channel (transparent pixels keep their hidden colour, often black).
  * 16-bit greyscale (modes ``I;16*``, what Pillow opens 16-bit PNGs as) is mapped linearly
    to 8 bits, ``round(v * 255 / 65535)``. Pillow's ``convert("RGB")``, which transformers
    uses, clips at 255, turning nearly every 16-bit image white. Modes ``I`` (32-bit int) and
    ``F`` (float) have no defined range: they follow Pillow (clip to [0, 255]) as transformers.
  * Premultiplied modes (``RGBa``) are un-premultiplied before compositing onto white.
  * NaFlex images are always converted to RGB. ``Siglip2ImageProcessorPil`` has no
    ``do_convert_rgb`` default and feeds grey or RGBA images through with 1 or 4 channels,
    which then fail in normalize (3 means for 1 or 4 channels).
  * Float arrays in [0, 1] are rounded to uint8. transformers truncates them and, with
    ``do_rescale``, rescales them a second time (every pixel ends near -1).
  * The output is always float32, even with do_rescale and do_normalize both off.

An unreadable, truncated, empty (zero-byte or 0-pixel) image raises `ImageLoadError` (a
ValueError) naming the input. `ImageProcessor.process_images` decodes and resizes in worker
threads (Pillow releases the GIL while decoding and resampling) and returns the good images'
tensors plus the (input, error) pairs of the bad ones, for jobs that skip unreadable files.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin

# Pillow's resampling filters, by the integer transformers stores in preprocessor_config.json.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
FIXRES_RESAMPLE = 3  # bicubic: SiglipImageProcessor's default, and what google/siglip-* files say
SIGLIP2_FIXRES_RESAMPLE = 2  # bilinear: what the google/siglip2-*-patch*-224/-256/.../-512 files say
NAFLEX_RESAMPLE = 2  # bilinear: Siglip2ImageProcessor's default
GEMMA_VOCAB_SIZE = 256_000  # SigLIP 2's text vocabulary (Gemma); SigLIP 1's is 32,000 (or 250,000 i18n)
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)  # maps [0, 1] to [-1, 1], as big_vision's value_range(-1, 1)
DEFAULT_RESCALE = 1 / 255
DEFAULT_MAX_NUM_PATCHES = 256
EXIF_ORIENTATION = 0x0112  # EXIF tag; 1 = upright, 2..8 = mirrored and/or rotated
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
MAX_WORKERS = 8  # decoding threads by default; more rarely helps a JPEG decoder bound by memory
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"  # transformers 5 save_pretrained: {"image_processor": {...}}
NAFLEX_SEARCH_EPS = 1e-5  # Siglip2ImageProcessor's binary-search tolerance on the scale


class ImageLoadError(ValueError):
    """An input could not be read as an image; the message names the input."""


# ---------------------------------------------------------------------------------------------
# One image: decode -> upright -> RGB (uint8)
# ---------------------------------------------------------------------------------------------


def describe(image) -> str:
    """A short name for an input in error messages: the path, or the type and shape."""
    if isinstance(image, (str, pathlib.Path)):
        return repr(os.fspath(image))
    if isinstance(image, Image.Image):
        return f"PIL image (mode {image.mode}, {image.width}x{image.height})"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"{type(image).__name__} of shape {tuple(image.shape)} and dtype {image.dtype}"
    return type(image).__name__


def load_image(image, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Any supported input -> an upright RGB PIL image (alpha composited onto white).

    draft (width, height): a JPEG not yet decoded is decoded at the smallest of 1/2, 1/4, 1/8
    scale that stays at least this large (Pillow's draft mode: DCT scaling, faster and close to,
    not equal to, the full decode followed by the resize); other formats are unaffected.
    Raises ImageLoadError (naming the input) when it cannot be read, and TypeError for an
    unsupported input type.
    """
    try:
        if isinstance(image, (str, pathlib.Path)):
            return _open_rgb(image, draft)
        if isinstance(image, Image.Image):
            _draft(image, draft)
            image.load()  # a lazily opened file decodes here, so its errors are caught here
            return _to_rgb(image)
        if isinstance(image, (np.ndarray, torch.Tensor)):
            return _to_rgb(_from_array(image))
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        raise ImageLoadError(f"cannot read image {describe(image)}: {e}") from e
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a PIL image, a file path, a numpy "
                    "array [H, W, C] or a torch tensor [C, H, W]")


def _draft(image: Image.Image, size) -> None:
    if size is not None and isinstance(image, JpegImagePlugin.JpegImageFile):  # JPEG and MPO
        image.draft(None, tuple(size))  # no-op once decoded


def _open_rgb(path, draft=None) -> Image.Image:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageLoadError(f"cannot read image {path!r}: no such file")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(f"cannot read image {path!r}: the file is empty (0 bytes)")
    # Our own file object, closed on return: Pillow keeps the files of multi-frame images
    # (GIF, TIFF, a phone's MPO JPEG) open after load() when it opened them itself.
    with open(path, "rb") as f:
        image = Image.open(f)
        _draft(image, draft)
        image.load()  # decode fully now (Image.open is lazy): truncated files fail here
        return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"cannot read image {describe(image)}: it has no pixels")
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.uint32)  # [H, W] in 0..65535
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode == "RGBa":
        image = image.convert("RGBA")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _from_array(array) -> Image.Image:
    if isinstance(array, torch.Tensor):
        if array.ndim != 3:
            raise ImageLoadError(f"cannot read image {describe(array)}: a tensor must be [C, H, W]")
        array = array.detach().cpu().permute(1, 2, 0).numpy()  # [H, W, C]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"cannot read image {describe(array)}: expected [H, W, C] (numpy) or [C, H, W] "
                             "(torch) with C = 1, 3 or 4")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ImageLoadError(f"cannot read image {describe(array)}: pixel arrays must be uint8 in [0, 255] "
                                 "or float in [0, 1]")
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ImageLoadError(f"cannot read image {describe(array)}: float pixels must lie in [0, 1] (got "
                                 f"[{array.min()}, {array.max()}]); pass uint8 for [0, 255]")
        array = np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    return Image.fromarray(np.ascontiguousarray(array[:, :, 0] if mode == "L" else array), mode)


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """(height, width), multiples of `patch_size`, of at most `max_num_patches` patches.

    The rule of transformers' Siglip2ImageProcessor (get_image_size_for_max_num_patches): a
    bisection on the scale s in [1e-6, 100] until the interval is under 1e-5, each side
    becoming max(p, ceil(side * s / p) * p); the largest s whose patch count fits wins. The
    same float steps are taken so that every size agrees with transformers'.
    """
    for name, value in (("height", height), ("width", width), ("patch_size", patch_size),
                        ("max_num_patches", max_num_patches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = NAFLEX_SEARCH_EPS / 10, 100.0
    while high - low >= NAFLEX_SEARCH_EPS:
        mid = (low + high) / 2
        if (side(mid, height) / patch_size) * (side(mid, width) / patch_size) <= max_num_patches:
            low = mid
        else:
            high = mid
    return side(low, height), side(low, width)


# ---------------------------------------------------------------------------------------------
# The image processor
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageBatch:
    """What `ImageProcessor.process_images` returns.

    pixel_inputs: the model's pixel arguments for the good images, in input order (None when
      no image could be read); indices: the positions of those images in the input list;
      failed: (input, error message) for every image that could not be read.
    """

    pixel_inputs: dict[str, torch.Tensor] | None
    indices: list[int] = field(default_factory=list)
    failed: list[tuple[object, str]] = field(default_factory=list)


@dataclass
class ImageProcessor:
    """Pixel preprocessing of one checkpoint (preprocessor_config.json)."""

    naflex: bool = False
    size: tuple[int, int] = (224, 224)  # FixRes (height, width)
    patch_size: int = 16  # NaFlex
    max_num_patches: int = DEFAULT_MAX_NUM_PATCHES  # NaFlex default; overridable per call
    resample: int = FIXRES_RESAMPLE
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = DEFAULT_RESCALE
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = DEFAULT_MEAN
    image_std: tuple[float, float, float] = DEFAULT_STD

    def __post_init__(self):
        if self.resample not in RESAMPLE_NAMES:
            raise ValueError(f"resample must be a PIL filter number {RESAMPLE_NAMES}, got {self.resample!r}")
        self.size = tuple(int(s) for s in self.size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) of positive ints, got {self.size!r}")
        self.image_mean = _per_channel(self.image_mean, "image_mean")
        self.image_std = _per_channel(self.image_std, "image_std")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        _check_patches(self.max_num_patches)

    @classmethod
    def from_dict(cls, d: dict, *, naflex: bool | None = None, image_size: int | None = None,
                  patch_size: int | None = None) -> "ImageProcessor":
        """From a preprocessor_config.json dictionary. `naflex` defaults to the file's
        image_processor_type; `image_size` / `patch_size` (from config.json) fill what it lacks."""
        kind = str(d.get("image_processor_type", ""))
        if naflex is None:
            naflex = kind.startswith("Siglip2")
        if d.get("do_center_crop"):
            raise ValueError("preprocessor_config.json asks for do_center_crop, which SigLIP processors never do; "
                             "fastsiglip does not implement it")
        kwargs = {k: d[k] for k in ("do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                                    "image_std") if d.get(k) is not None}
        kwargs["resample"] = int(d.get("resample") if d.get("resample") is not None
                                 else NAFLEX_RESAMPLE if naflex else FIXRES_RESAMPLE)
        if naflex:
            kwargs["patch_size"] = int(d.get("patch_size") or patch_size or 16)
            kwargs["max_num_patches"] = int(d.get("max_num_patches") or DEFAULT_MAX_NUM_PATCHES)
            if patch_size is not None and kwargs["patch_size"] != patch_size:
                raise ValueError(f"preprocessor patch_size {kwargs['patch_size']} != the model's patch_size "
                                 f"{patch_size} (config.json): the checkpoint's files disagree")
        else:
            kwargs["size"] = _parse_size(d.get("size"), image_size)
            if image_size is not None and kwargs["size"] != (image_size, image_size):
                raise ValueError(f"preprocessor size {kwargs['size']} != the model's image_size {image_size} "
                                 "(config.json): the checkpoint's files disagree")
        return cls(naflex=naflex, **kwargs)

    def lookup_table(self) -> np.ndarray:
        """float32 [3, 256]: the rescaled, normalized value of each uint8 level, per channel."""
        # transformers: rescale = float32(float64(v) * factor); normalize = (x - mean) / std in float32
        values = np.arange(256, dtype=np.float64)
        values = (values * self.rescale_factor).astype(np.float32) if self.do_rescale else values.astype(np.float32)
        values = np.broadcast_to(values, (3, 256))
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            values = (values - mean) / std
        return np.ascontiguousarray(values, dtype=np.float32)

    # -- calling -------------------------------------------------------------------------------

    def __call__(self, images, *, max_num_patches: int | None = None, num_workers: int | None = None) -> dict:
        """Pixel inputs of a batch (one image or a list). Raises ImageLoadError on a bad image."""
        batch = self.process_images(images, max_num_patches=max_num_patches, num_workers=num_workers,
                                    skip_errors=False)
        return batch.pixel_inputs

    def process_images(self, images, *, max_num_patches: int | None = None, num_workers: int | None = None,
                       skip_errors: bool = True) -> ImageBatch:
        """Decode and resize in `num_workers` threads (default: min(8, CPUs, images); 0 or 1: in
        this thread). With skip_errors, unreadable images are left out and listed in `failed`;
        without, the first one (in input order) raises ImageLoadError."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no images given")
        if max_num_patches is not None and not self.naflex:
            raise ValueError(f"max_num_patches is for NaFlex checkpoints; this one is FixRes {self.size}")
        n_patches = self.max_num_patches if max_num_patches is None else _check_patches(max_num_patches)
        if num_workers is None:
            num_workers = min(MAX_WORKERS, os.cpu_count() or 1, len(images))
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")

        lut = self.lookup_table()  # [3, 256], built per call: the fields may have been changed

        def work(image):
            try:
                return self._pixels(load_image(image), lut, n_patches), None
            except ImageLoadError as e:
                if not skip_errors:
                    raise
                return None, str(e)

        if num_workers <= 1 or len(images) == 1:
            results = [work(image) for image in images]
        else:
            with ThreadPoolExecutor(num_workers, thread_name_prefix="fastsiglip-images") as pool:
                results = list(pool.map(work, images))
        good = [(i, pixels) for i, (pixels, _) in enumerate(results) if pixels is not None]
        failed = [(images[i], err) for i, (_, err) in enumerate(results) if err is not None]
        if not good:
            return ImageBatch(None, [], failed)
        arrays = [pixels for _, pixels in good]
        inputs = self._naflex_batch(arrays, n_patches) if self.naflex else self._fixres_batch(arrays)
        return ImageBatch(inputs, [i for i, _ in good], failed)

    # -- pieces (run in the worker threads up to the batching) -----------------------------------

    def _pixels(self, image: Image.Image, lut: np.ndarray, max_num_patches: int) -> np.ndarray:
        """RGB image -> float32 [3, H, W] (FixRes) or the image's patches [hp, wp, 3*p*p] (NaFlex)."""
        pixels = self._resized(image, max_num_patches)  # uint8 [H, W, 3]
        # Rescale + normalize by table lookup; gathering channel by channel also gives [3, H, W].
        chw = np.stack([lut[c][pixels[:, :, c]] for c in range(3)])  # [3, H, W] float32
        if not self.naflex:
            return chw
        p = self.patch_size
        hp, wp = chw.shape[1] // p, chw.shape[2] // p
        # [3, hp, p, wp, p] -> [hp, wp, p(y), p(x), 3]: patches row-major, (py, px, c) inside one
        return np.ascontiguousarray(chw.reshape(3, hp, p, wp, p).transpose(1, 3, 2, 4, 0)).reshape(hp, wp, -1)

    def target_size(self, height: int, width: int, max_num_patches: int) -> tuple[int, int]:
        """(height, width) the model takes for an upright image of this size (the resize rule, or
        the image's own size without do_resize); ImageLoadError when NaFlex cannot take it."""
        if not self.do_resize:
            if self.naflex:
                p = self.patch_size
                if height % p or width % p or (height // p) * (width // p) > max_num_patches:
                    raise ImageLoadError(f"with do_resize=False a NaFlex image must be a multiple of patch_size "
                                         f"{p} with at most {max_num_patches} patches, got {width}x{height}")
            return height, width
        if self.naflex:
            return naflex_size(height, width, self.patch_size, max_num_patches)
        return self.size

    def _resized(self, image: Image.Image, max_num_patches: int) -> np.ndarray:
        """RGB image -> uint8 [H, W, 3] at the size the model takes."""
        height, width = self.target_size(image.height, image.width, max_num_patches)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=self.resample)
        return np.asarray(image)

    @staticmethod
    def _fixres_batch(arrays: list[np.ndarray]) -> dict:
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"with do_resize=False all images of a batch must have one size, got {sorted(shapes)}")
        return {"pixel_values": torch.from_numpy(np.stack(arrays))}  # [B, 3, H, W]

    def _naflex_batch(self, arrays: list[np.ndarray], max_num_patches: int) -> dict:
        # Filled in numpy, handed to torch once: per-row torch copies run through torch's
        # intra-op thread pool and took half the NaFlex time on a busy 2-core machine.
        b, n = len(arrays), max_num_patches
        pixel_values = np.zeros((b, n, 3 * self.patch_size**2), dtype=np.float32)  # [B, N, 3*p*p], padding 0
        mask = np.zeros((b, n), dtype=np.int32)  # [B, N]
        shapes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64).reshape(b, 2)  # [B, 2]
        for i, patches in enumerate(arrays):  # [hp, wp, 3*p*p]
            count = patches.shape[0] * patches.shape[1]
            pixel_values[i, :count] = patches.reshape(count, -1)
            mask[i, :count] = 1
        return {"pixel_values": torch.from_numpy(pixel_values), "pixel_attention_mask": torch.from_numpy(mask),
                "spatial_shapes": shapes}


def _per_channel(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must be one number or three (RGB), got {value}")
    return value


def _check_patches(max_num_patches) -> int:
    if isinstance(max_num_patches, bool) or not isinstance(max_num_patches, int) or max_num_patches < 1:
        raise ValueError(f"max_num_patches must be a positive int (e.g. 256, 576, 784, 1024), got {max_num_patches!r}")
    return max_num_patches


def _parse_size(size, image_size: int | None) -> tuple[int, int]:
    if size is None:
        if image_size is None:
            raise ValueError("preprocessor_config.json has no size and no image_size was given")
        return image_size, image_size
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"preprocessor_config.json size {size!r} is not supported: SigLIP resizes to "
                     "{'height': H, 'width': W}")


def load_image_processor(folder, *, model_config=None) -> ImageProcessor:
    """The image processor of a checkpoint folder.

    Settings come from preprocessor_config.json (what the hub checkpoints hold), else from the
    "image_processor" entry of processor_config.json (what transformers 5 save_pretrained
    writes), else the family's published defaults with the image/patch size of `model_config`
    (resample: `_default_resample`).
    """
    folder = pathlib.Path(folder)
    vision = getattr(model_config, "vision", None)
    naflex = None if model_config is None else model_config.naflex
    extra = {} if vision is None else {"image_size": vision.image_size, "patch_size": vision.patch_size}
    for name, key in ((PREPROCESSOR_FILE, None), (PROCESSOR_FILE, "image_processor")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
        if key is not None:
            if not isinstance(d.get(key), dict):
                continue
            d = d[key]
        return ImageProcessor.from_dict(d, naflex=naflex, **extra)
    if vision is None:
        raise FileNotFoundError(f"{folder} has no {PREPROCESSOR_FILE} and no config.json vision settings")
    resample, family = _default_resample(folder, model_config)
    what = "NaFlex" if naflex else f"{vision.image_size}x{vision.image_size}"
    warnings.warn(f"{folder} has no {PREPROCESSOR_FILE}; using the {family} defaults (mean = std = 0.5, "
                  f"{RESAMPLE_NAMES[resample]} {what})", stacklevel=2)
    return ImageProcessor.from_dict({"resample": resample}, naflex=naflex, **extra)


def _default_resample(folder: pathlib.Path, model_config) -> tuple[int, str]:
    """The resample filter of a checkpoint whose folder says none, and the family it follows.

    NaFlex: bilinear. FixRes: SigLIP 2 checkpoints (told by Gemma's tokenizer.model in the
    folder or the 256,000-token vocabulary in config.json) publish bilinear (``"resample": 2``
    in google/siglip2-base-patch16-224 and the others), SigLIP 1 bicubic (``3``). A vision-only
    folder without a tokenizer can't be told apart: it gets SigLIP 1's bicubic.
    """
    from .tokenizer import GEMMA_VOCAB_FILE

    if model_config.naflex:
        return NAFLEX_RESAMPLE, "SigLIP 2 NaFlex"
    text = model_config.text
    if (folder / GEMMA_VOCAB_FILE).is_file() or (text is not None and text.vocab_size == GEMMA_VOCAB_SIZE):
        return SIGLIP2_FIXRES_RESAMPLE, "SigLIP 2"
    return FIXRES_RESAMPLE, "SigLIP"


# ---------------------------------------------------------------------------------------------
# The processor: tokenizer + image processor, transformers' calling convention
# ---------------------------------------------------------------------------------------------


class Processor:
    """``processor(text=..., images=...)`` -> the dict of model inputs, as transformers'
    SiglipProcessor / Siglip2Processor. Texts give ``input_ids`` int64 [B, L] (padded to the
    checkpoint's length by default, as the models were trained; ``attention_mask`` only when
    asked: the SigLIP towers were trained without one, while transformers' Siglip2Processor
    returns it by default, and its text model applies it). Images give the pixel inputs of
    `ImageProcessor`. Arguments are keywords only: transformers 5 takes images first when
    positional, so a positional call here would be ambiguous."""

    def __init__(self, tokenizer, image_processor: ImageProcessor | None, *, folder=None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.folder = folder

    def __repr__(self) -> str:
        return (f"Processor(folder={str(self.folder)!r}, tokenizer={self.tokenizer!r}, "
                f"image_processor={self.image_processor!r})")

    def __call__(self, *, text=None, images=None, padding="max_length", max_length: int | None = None,
                 truncation: bool = True, return_tensors="pt", max_num_patches: int | None = None,
                 return_attention_mask: bool = False, num_workers: int | None = None) -> dict:
        if text is None and images is None:
            raise ValueError("pass text=..., images=..., or both")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: fastsiglip returns torch tensors only ('pt')")
        out = {}
        if text is not None:
            if self.tokenizer is None:
                raise ValueError(f"this checkpoint ({self.folder}) has no text tower / tokenizer: pass images only")
            if padding is True:
                padding = "longest"
            out.update(self.tokenizer(text, max_length=max_length, padding=padding, truncation=truncation,
                                      return_attention_mask=return_attention_mask))
        if images is not None:
            if self.image_processor is None:
                raise ValueError(f"this checkpoint ({self.folder}) has no vision tower: pass text only")
            out.update(self.image_processor(images, max_num_patches=max_num_patches, num_workers=num_workers))
        return out

    def process_images(self, images, **kwargs) -> ImageBatch:
        """`ImageProcessor.process_images` of this checkpoint (skips unreadable images)."""
        if self.image_processor is None:
            raise ValueError(f"this checkpoint ({self.folder}) has no vision tower")
        return self.image_processor.process_images(images, **kwargs)


def load_processor(name_or_path, *, revision: str | None = None, cache_dir=None, local_files_only: bool | None = None,
                   max_num_patches: int | None = None, lowercase: bool | None = None) -> Processor:
    """The processor of a checkpoint: a hub id or a local folder holding config.json,
    preprocessor_config.json and the tokenizer's SentencePiece file.

    max_num_patches: NaFlex default for this processor (else preprocessor_config.json's);
    lowercase: the tokenizer's lowercasing (None: the family's training default).
    """
    from .config import from_file
    from .loading import resolve

    # a folder is used as it is; a hub id is downloaded (or found in the cache)
    folder = pathlib.Path(resolve(name_or_path, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only))
    config = from_file(folder / "config.json")
    image_processor = None
    if config.vision is not None:
        image_processor = load_image_processor(folder, model_config=config)
        if max_num_patches is not None:
            if not image_processor.naflex:
                raise ValueError(f"max_num_patches is for NaFlex checkpoints; {folder} is FixRes "
                                 f"({image_processor.size[0]}x{image_processor.size[1]})")
            image_processor.max_num_patches = _check_patches(max_num_patches)
    elif max_num_patches is not None:
        raise ValueError(f"max_num_patches given, but {folder} has no vision tower")
    tokenizer = None
    if config.text is not None:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(folder, max_length=config.text.max_position_embeddings, lowercase=lowercase)
    return Processor(tokenizer, image_processor, folder=folder)
