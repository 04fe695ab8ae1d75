"""Where image-text pairs come from: manifests and WebDataset-style tar shards, read in a
seeded, resumable order that does not depend on the number of processes.

    pairs = open_pairs("train.csv")                       # or .tsv, .jsonl, a folder of .tar,
    pairs = open_pairs("shards/train-{000000..000099}.tar")  # a brace pattern, one .tar
    key, image, text = pairs.read(0)                      # PIL image (RGB), caption

Sources
  * Manifest (.csv, .tsv, .jsonl): one pair per row, columns `image` (a path, relative to the
    manifest's folder or absolute) and `text` (other names: image_column / text_column).
  * Tar shards (WebDataset layout): members `<key>.jpg|jpeg|png|webp` with `<key>.txt`, or
    `<key>.json` holding the caption under text_column (default "text") or "caption"; the key
    is the member path up to the first dot of its file name. The shards are indexed once
    (headers only, standard library tarfile) and members are then read by their byte offset.

Order. Pair positions 0, 1, 2, ... run through epoch after epoch; epoch e visits every pair once
in an order seeded by (seed, e): a full permutation for a manifest; for shards, the shards in a
seeded order, each one's members in a seeded order (a step then reads one or two shards). Every
step comes from one epoch, so its pairs are distinct: with N pairs and global batch B (B <= N),
an epoch gives S = N // B steps and its last N mod B pairs (the tail that does not fill a batch)
are not used that epoch; step k reads positions [e N + j B, e N + (j + 1) B) with (e, j) =
divmod(k, S). Rank r of W takes the slice starting r B/W pairs into the step's, B/W long, cut
into micro-batches. So the pairs of a step are the same set whatever the world size and
micro-batch size, and a resumed run continues exactly where it stopped: the data position is a
function of the step number.

We do not split the data by shard across ranks and workers (WebDataset's way): that makes the
contents of a global batch depend on the number of ranks and workers. Reading by offset keeps
the order independent of both and still reads each shard front to back within a step's slice.

Bad images. An image that cannot be read (missing, truncated, not an image) is skipped and
counted; its place in the batch is taken by another pair chosen from (seed, position, attempt),
one outside the step's own pairs when B < N, so every batch stays full and still does not depend
on the world size (two bad images of one step may, rarely, draw the same substitute). The counts and examples
travel with each batch (`bad`); the training loop stops when too many are bad.

Compact batches. A training batch holds uint8 pixels (FixRes [b, 3, H, W], NaFlex patches
[b, N, 3 p p] plus mask and shapes) and int64 token ids; `PixelCodec.to_model` turns them into
the float32 inputs the processor would have given (same lookup table, bit for bit) on the device,
one micro-batch at a time. Float32 copies of a whole batch never exist.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import pathlib
import re
import signal
import sys
import tarfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .processing import ImageLoadError, load_image, load_processor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSIONS = (".txt", ".json")
MANIFEST_DELIMITERS = {".csv": ",", ".tsv": "\t"}
MAX_SUBSTITUTES = 20  # tries to find a readable replacement for a bad image before giving up
MAX_CHUNK = 8  # images per DataLoader item at most when items are regrouped into batches (chunk_size)
JSON_CAPTION_FALLBACK = "caption"


class DataError(ValueError):
    """The training or validation data cannot be used as given; the message says why."""


@dataclass(frozen=True)
class TarMember:
    """A member of a tar shard, read by byte offset."""

    shard: str
    offset: int
    size: int
    kind: str = ""  # the member's extension without the dot: "jpg", "txt", "json", ...

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class Record:
    key: str
    image: str | TarMember  # a file path or a shard member
    text: str | TarMember  # the caption, or the .txt / .json member holding it


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class Pairs:
    """An indexed list of image-text pairs (`open_pairs` builds one)."""

    def __init__(self, records: list[Record], groups: list[range], source: str, text_column: str = "text"):
        if not records:
            raise DataError(f"{source} holds no image-text pairs; check the path (and, for shards, that each "
                            f"image <key>.jpg|jpeg|png|webp has a <key>.txt or <key>.json caption)")
        self.records = records
        self.groups = groups  # the order shuffles inside each group and shuffles the groups
        self.source = source
        self.text_column = text_column
        self.skipped: list[tuple[str, str]] = []  # (key, why): members left out (index_shards images_only)
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"Pairs({self.source!r}, {len(self)} pairs)"

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """int64 [N]: the record visited at each position of `epoch` (cached, the last two)."""
        key = (seed, epoch)
        if key not in self._orders:
            g = torch.Generator().manual_seed(_mix(seed, epoch))
            groups = [self.groups[i] for i in torch.randperm(len(self.groups), generator=g).tolist()]
            parts = [torch.arange(grp.start, grp.stop)[torch.randperm(len(grp), generator=g)] for grp in groups]
            while len(self._orders) >= 2:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = torch.cat(parts)
        return self._orders[key]

    def index_at(self, position: int, seed: int) -> int:
        """The record at a position of the endless epoch-after-epoch stream."""
        epoch, i = divmod(position, len(self.records))
        return int(self.order(seed, epoch)[i])

    def read(self, index: int, *, draft: tuple[int, int] | None = None) -> tuple[str, Image.Image, str]:
        """(key, upright RGB image, caption); ImageLoadError (naming the pair) when unreadable.
        draft: JPEG draft-mode decoding at least this (width, height) (processing.load_image)."""
        rec = self.records[index]
        text = rec.text if isinstance(rec.text, str) else self._caption(rec.text, rec.key)
        if isinstance(rec.image, TarMember):
            try:
                data = rec.image.read()
                image = Image.open(io.BytesIO(data))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise ImageLoadError(f"cannot read image {rec.key} in {rec.image.shard}: {e}") from e
            try:
                image = load_image(image, draft=draft)
            except ImageLoadError as e:
                raise ImageLoadError(f"cannot read image {rec.key} in {rec.image.shard}: {e}") from e
        else:
            image = load_image(rec.image, draft=draft)
        return rec.key, image, text

    def where(self, index: int) -> str:
        """The image of a pair as error messages name it: 'path' or `key in shard`."""
        rec = self.records[index]
        return f"{rec.key} in {rec.image.shard}" if isinstance(rec.image, TarMember) else repr(rec.image)

    def read_bytes(self, index: int) -> tuple[str, bytes]:
        """(key, the image file's bytes, not decoded); ImageLoadError (naming the pair) when they
        cannot be read. For decoders other than Pillow (--decode gpu)."""
        rec, where = self.records[index], self.where(index)
        try:
            data = rec.image.read() if isinstance(rec.image, TarMember) else pathlib.Path(rec.image).read_bytes()
        except OSError as e:
            raise ImageLoadError(f"cannot read image {where}: {e.strerror or e}") from e
        if not data:
            raise ImageLoadError(f"cannot read image {where}: the file is empty (0 bytes)")
        return rec.key, data

    def _caption(self, member: TarMember, key: str) -> str:
        raw = member.read().decode("utf-8", errors="replace")
        if member.kind == "txt":
            return raw.strip()
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ImageLoadError(f"caption {key}.json in {member.shard} is not valid JSON ({e})") from e
        for name in (self.text_column, JSON_CAPTION_FALLBACK):
            if isinstance(obj, dict) and isinstance(obj.get(name), str):
                return obj[name]
        raise ImageLoadError(f"caption {key}.json in {member.shard} has no string field {self.text_column!r} "
                             f"or {JSON_CAPTION_FALLBACK!r}")


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs, unlike hash())."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def open_pairs(spec, *, image_column: str = "image", text_column: str = "text") -> Pairs:
    """The pairs of a manifest (.csv / .tsv / .jsonl), a .tar shard, a folder of .tar shards, or a
    brace pattern of shards (shards/train-{000000..000099}.tar)."""
    text = os.fspath(spec)
    path = pathlib.Path(text)
    if path.suffix.lower() in (*MANIFEST_DELIMITERS, ".jsonl"):
        if not path.is_file():
            raise DataError(f"manifest {text} does not exist")
        return read_manifest(path, image_column=image_column, text_column=text_column)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise DataError(f"{text} is a folder without .tar shards; pass a manifest (.csv, .tsv, .jsonl), a "
                            "folder of WebDataset .tar shards or a brace pattern such as shards/train-{000..009}.tar")
        return index_shards(shards, text_column=text_column, source=text)
    if path.suffix.lower() == ".tar" or "{" in text:
        shards = expand_braces(text)
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"{len(missing)} of the {len(shards)} shards of {text} do not exist, e.g. {missing[0]}")
        return index_shards(shards, text_column=text_column, source=text)
    raise DataError(f"cannot tell what {text} is: pass a manifest (.csv, .tsv, .jsonl), a .tar shard, a folder of "
                    ".tar shards or a brace pattern such as shards/train-{000000..000099}.tar")


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as the shell and WebDataset do it: {000..099} (zero-padded ranges) and
    {a,b,c} (alternatives), any number of them, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise DataError(f"empty range {{{body}}} in {pattern}")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"cannot expand {{{body}}} in {pattern}: use {{000..099}} or {{a,b}}")
    return [x for item in items for x in expand_braces(head + item + tail)]


def read_table(path) -> list[tuple[int, object]]:
    """The rows of a .jsonl (one JSON value a line, blank lines skipped) or .csv / .tsv file (a
    header row, then one dict a row), each with its number: the line number in a .jsonl, the row
    number after the header in a .csv / .tsv. UTF-8 (a byte-order mark is not data). The one reader
    of manifests (training, `fastsiglip embed`) and of `fastsiglip embed-text` tables."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if suffix != ".jsonl":
                return list(enumerate(csv.DictReader(f, delimiter=MANIFEST_DELIMITERS[suffix]), 1))
            rows = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((number, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {number}: not valid JSON ({e})") from e
            return rows
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def read_manifest(path, *, image_column: str = "image", text_column: str | None = "text") -> Pairs:
    """text_column None: images only (`fastsiglip embed`), every caption ""."""
    path = pathlib.Path(path)
    numbered = read_table(path)
    rows = [row for _, row in numbered]
    columns = set().union(*(r.keys() for r in rows if isinstance(r, dict)))
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    for role, column, option in (("image", image_column, "--image-column"), ("text", text_column, "--text-column")):
        if column is not None and column not in columns:
            raise DataError(f"manifest {path} has no {role} column {column!r} (its columns: "
                            f"{', '.join(sorted(map(str, columns)))}); name it with {option}")
    folder = path.parent.resolve()
    records, skipped = [], []
    for number, row in numbered:
        where = f"manifest {path}, {'line' if path.suffix.lower() == '.jsonl' else 'row'} {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a {type(row).__name__}, not an object with an {image_column!r} field")
        image, text = row.get(image_column), row.get(text_column) if text_column is not None else ""
        if image in (None, "") and text_column is None:  # embedding images: the row is skipped and listed
            skipped.append((f"{path}:{number}", f"{where}: empty {image_column!r} cell"))
            continue
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: empty or non-string {image_column!r} cell ({image!r}); every training pair "
                            "needs an image path")
        if text is None:
            raise DataError(f"{where}: no {text_column!r} value; every training pair needs a text")
        file = pathlib.Path(image).expanduser()
        records.append(Record(image, str(file if file.is_absolute() else folder / file), str(text)))
    if not records:
        raise DataError(f"manifest {path}: no row has an {image_column!r} value")
    pairs = Pairs(records, [range(len(records))], str(path), text_column)
    pairs.skipped = skipped
    return pairs


def index_shards(shards: list[str], *, text_column: str = "text", source: str | None = None,
                 images_only: bool = False) -> Pairs:
    """Index WebDataset-style shards: read every member header (not the data) once.

    images_only (`fastsiglip embed`): every image is a record (caption ""), and the keys that
    have members but no image are listed in the result's `skipped`."""
    records, groups, skipped = [], [], []
    for shard in shards:
        images, captions = {}, {}
        try:
            with tarfile.open(shard, mode="r:") as tar:  # uncompressed only: members read by offset
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, _, name = info.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    key, ext = (f"{folder}/{stem}" if folder else stem), ("." + ext.lower() if dot else "")
                    member = TarMember(shard, info.offset_data, info.size, ext[1:])
                    if ext in IMAGE_EXTENSIONS:
                        images[key] = member
                    elif ext == ".txt":
                        captions.setdefault(key, member)
                    elif ext == ".json":
                        captions[key] = member  # a .json caption wins over a .txt one
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"cannot index shard {shard} ({e}); only uncompressed .tar shards are read") from e
        start = len(records)
        if images_only:
            records += [Record(key, images[key], "") for key in images]
            skipped += [(key, f"{shard}: no image member (<key>.jpg|jpeg|png|webp)") for key in captions
                        if key not in images]
        else:
            records += [Record(key, images[key], captions[key]) for key in images if key in captions]
        if len(records) > start:
            groups.append(range(start, len(records)))
    pairs = Pairs(records, groups, source or ", ".join(shards), text_column)
    pairs.skipped = skipped
    return pairs


# ---------------------------------------------------------------------------------------------
# Compact pixels: uint8 out of the workers, float32 model inputs on the device
# ---------------------------------------------------------------------------------------------


class PixelCodec:
    """The checkpoint's image processing, split at the uint8 stage.

    `encode` (in a worker): image -> resized uint8 pixels, FixRes [3, H, W] or NaFlex patches
    [hp, wp, 3 p p] in the processor's (py, px, c) order; `collate` stacks them; `to_model` (on
    the device) applies the rescale/normalize lookup table, giving exactly the processor's floats.
    """

    def __init__(self, image_processor, max_num_patches: int | None = None):
        self.processor = image_processor
        self.naflex = image_processor.naflex
        self.max_num_patches = max_num_patches or image_processor.max_num_patches
        self.table = torch.from_numpy(image_processor.lookup_table())  # [3, 256] float32
        self._tables: dict[torch.device, torch.Tensor] = {}

    def encode(self, image: Image.Image) -> np.ndarray:
        # _resized is the processor's own resize (size rule, filter), so the pixels are its pixels.
        pixels = self.processor._resized(image, self.max_num_patches)  # uint8 [H, W, 3]
        if not self.naflex:
            return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # [3, H, W]
        p = self.processor.patch_size
        hp, wp = pixels.shape[0] // p, pixels.shape[1] // p
        patches = pixels.reshape(hp, p, wp, p, 3).transpose(0, 2, 1, 3, 4)  # [hp, wp, py, px, c]
        return np.ascontiguousarray(patches).reshape(hp, wp, -1)

    def collate(self, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        if not self.naflex:
            return {"pixels": torch.from_numpy(np.stack(arrays))}  # uint8 [b, 3, H, W]
        b, n = len(arrays), self.max_num_patches
        patches = np.zeros((b, n, arrays[0].shape[-1]), dtype=np.uint8)  # [b, N, 3 p p]
        mask = np.zeros((b, n), dtype=np.int32)
        for i, a in enumerate(arrays):
            count = a.shape[0] * a.shape[1]
            patches[i, :count] = a.reshape(count, -1)
            mask[i, :count] = 1
        shapes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64).reshape(b, 2)
        return {"pixels": torch.from_numpy(patches), "pixel_attention_mask": torch.from_numpy(mask),
                "spatial_shapes": shapes}

    @staticmethod
    def _lookup(table: torch.Tensor, pixels: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        index = (pixels.int() + offset).reshape(-1)
        return torch.index_select(table, 0, index).view(pixels.shape)

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """`encode`'s layout in torch: uint8 [3, H, W] -> FixRes the same, NaFlex [hp, wp, 3 p p]."""
        if not self.naflex:
            return pixels
        p = self.processor.patch_size
        hp, wp = pixels.shape[1] // p, pixels.shape[2] // p
        patches = pixels.permute(1, 2, 0).reshape(hp, p, wp, p, 3).permute(0, 2, 1, 3, 4)  # [hp, wp, py, px, c]
        return patches.reshape(hp, wp, -1)

    def collate_tensors(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`collate` of uint8 tensors (`encode`'s or `patches`' layout) on one device, kept there."""
        if not self.naflex:
            return {"pixels": torch.stack(tensors)}  # uint8 [b, 3, H, W]
        b, n, device = len(tensors), self.max_num_patches, tensors[0].device
        patches = torch.zeros((b, n, tensors[0].shape[-1]), dtype=torch.uint8, device=device)  # [b, N, 3 p p]
        mask = torch.zeros((b, n), dtype=torch.int32, device=device)
        for i, t in enumerate(tensors):
            count = t.shape[0] * t.shape[1]
            patches[i, :count] = t.reshape(count, -1)
            mask[i, :count] = 1
        shapes = torch.tensor([tuple(t.shape[:2]) for t in tensors], dtype=torch.int64).reshape(b, 2)
        return {"pixels": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}

    def to_model(self, batch: dict, device) -> dict[str, torch.Tensor]:
        """The model's pixel inputs (float32 on `device`) of a compact batch."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.table.to(device).reshape(-1)  # [3 * 256]: channel c at c * 256
        table = self._tables[device]
        pixels = batch["pixels"].to(device, non_blocking=True)
        # One index_select with int32 indices (level + 256 * channel): 6x faster on a CPU than
        # table[channel, pixels.long()], which took as long as a 2-layer vision tower's forward.
        if not self.naflex:
            offset = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=device).view(1, 3, 1, 1)
            return {"pixel_values": self._lookup(table, pixels, offset)}  # [b, 3, H, W]
        mask = batch["pixel_attention_mask"].to(device, non_blocking=True)
        offset = torch.arange(pixels.shape[-1], dtype=torch.int32, device=device) % 3 * 256  # (py, px, c): c fastest
        values = self._lookup(table, pixels, offset) * mask[..., None]  # padding rows are 0, as the processor's
        return {"pixel_values": values, "pixel_attention_mask": mask,
                "spatial_shapes": batch["spatial_shapes"].to(device, non_blocking=True)}


# ---------------------------------------------------------------------------------------------
# Batches for the training loop and for evaluation (map-style datasets for DataLoader workers)
# ---------------------------------------------------------------------------------------------


class _Encoder:
    """Per process (main or worker): the checkpoint's processor, loaded on first use."""

    def __init__(self, checkpoint, max_num_patches):
        self.checkpoint, self.max_num_patches = str(checkpoint), max_num_patches
        self._codec = self._tokenizer = None

    def _load(self):
        processor = load_processor(self.checkpoint, max_num_patches=self.max_num_patches)
        self._codec = PixelCodec(processor.image_processor, self.max_num_patches)
        self._tokenizer = processor.tokenizer

    @property
    def codec(self) -> PixelCodec:
        if self._codec is None:
            self._load()
        return self._codec

    def tokens(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            self._load()
        return self._tokenizer(texts, padding="max_length", truncation=True)["input_ids"]

    def __getstate__(self):  # workers started by spawn load their own
        return {"checkpoint": self.checkpoint, "max_num_patches": self.max_num_patches, "_codec": None,
                "_tokenizer": None}


class TrainBatches(torch.utils.data.Dataset):
    """Item (step, rank, micro) -> one compact micro-batch of that rank at that step.

    {"pixels", [NaFlex: "pixel_attention_mask", "spatial_shapes"], "input_ids", "keys",
     "bad": [(key, error)]}: `bad` lists the images skipped (each replaced, see the module doc).
    """

    def __init__(self, pairs: Pairs, checkpoint, *, seed: int, batch_size: int, world_size: int,
                 micro_batch_size: int, max_num_patches: int | None = None):
        if batch_size > len(pairs):
            raise DataError(f"the global batch ({batch_size} pairs) is larger than the {len(pairs)} training pairs of "
                            f"{pairs.source}: a step's pairs must be distinct; use a batch of at most {len(pairs)}")
        self.pairs, self.seed = pairs, seed
        self.batch_size, self.world_size, self.micro = batch_size, world_size, micro_batch_size
        self.steps_per_epoch = len(pairs) // batch_size  # an epoch's tail that does not fill a batch is not used
        self.encoder = _Encoder(checkpoint, max_num_patches)

    def step_start(self, step: int) -> int:
        """The stream position of the step's first pair: step j of epoch e starts at e N + j B."""
        epoch, j = divmod(step, self.steps_per_epoch)
        return epoch * len(self.pairs) + j * self.batch_size

    def positions(self, step: int, rank: int, micro: int) -> range:
        start = self.step_start(step) + rank * (self.batch_size // self.world_size) + micro * self.micro
        return range(start, start + self.micro)

    def _substitute(self, step: int, position: int, attempt: int) -> int:
        """The pair that replaces an unreadable one: from (seed, position, attempt), one that is
        not among the step's own pairs when there are others."""
        g = torch.Generator().manual_seed(_mix(self.seed, position, attempt))
        n, b = len(self.pairs), self.batch_size
        if b == n:
            return int(torch.randint(n, (1,), generator=g))
        epoch, first = divmod(self.step_start(step), n)
        k = int(torch.randint(n - b, (1,), generator=g))  # the k-th pair of the epoch outside the step
        return int(self.pairs.order(self.seed, epoch)[k if k < first else k + b])

    def __getitem__(self, item) -> dict:
        step, rank, micro = item
        keys, arrays, texts, bad = [], [], [], []
        for position in self.positions(step, rank, micro):
            index = self.pairs.index_at(position, self.seed)
            for attempt in range(MAX_SUBSTITUTES + 1):
                try:
                    key, image, text = self.pairs.read(index)
                    arrays.append(self.encoder.codec.encode(image))
                    break
                except ImageLoadError as e:
                    bad.append((self.pairs.records[index].key, str(e)))
                    index = self._substitute(step, position, attempt)
            else:
                raise DataError(f"{self.pairs.source}: {MAX_SUBSTITUTES + 1} images in a row could not be read "
                                f"(last: {bad[-1][1]}); check the data")
            keys.append(key)
            texts.append(text)
        batch = self.encoder.codec.collate(arrays)
        batch.update(input_ids=self.encoder.tokens(texts), keys=keys, bad=bad)
        return batch

    def __len__(self) -> int:  # not used for iteration (the sampler gives the items)
        return 0


class EvalBatches(torch.utils.data.Dataset):
    """Item i -> the pairs [i c, (i + 1) c) in file order (unreadable images dropped with their
    text, listed in `bad`); for retrieval evaluation."""

    def __init__(self, pairs: Pairs, checkpoint, *, chunk: int, max_num_patches: int | None = None):
        self.pairs, self.chunk = pairs, chunk
        self.encoder = _Encoder(checkpoint, max_num_patches)

    def __len__(self) -> int:
        return -(-len(self.pairs) // self.chunk)

    def __getitem__(self, i: int) -> dict:
        keys, arrays, texts, bad = [], [], [], []
        for index in range(i * self.chunk, min((i + 1) * self.chunk, len(self.pairs))):
            try:
                key, image, text = self.pairs.read(index)
                arrays.append(self.encoder.codec.encode(image))
            except ImageLoadError as e:
                bad.append((self.pairs.records[index].key, str(e)))
                continue
            keys.append(key)
            texts.append(text)
        batch = self.encoder.codec.collate(arrays) if arrays else {}
        batch.update(input_ids=self.encoder.tokens(texts) if texts else None, keys=keys, bad=bad)
        return batch


class ImageBatches(torch.utils.data.Dataset):
    """Item i -> the images of records indices[i b : (i + 1) b] of `pairs` (captions unused) as one
    compact batch {"pixels", [NaFlex: "pixel_attention_mask", "spatial_shapes"], "keys", "bad"}:
    unreadable images are left out and listed in `bad` as (key, error); no "pixels" when none
    could be read. For `fastsiglip embed` (each image decoded once, in file order). draft: see
    Pairs.read. The arrays are numpy: a DataLoader pickles them through its pipe, where each
    torch tensor would hold a shared-memory file descriptor in the main process while it waits
    there (thousands with many workers and small items); `merge` makes the torch batch."""

    def __init__(self, pairs: Pairs, codec: PixelCodec, *, batch_size: int, indices: list[int] | None = None,
                 draft: tuple[int, int] | None = None):
        self.pairs, self.codec, self.batch_size, self.draft = pairs, codec, batch_size, draft
        self.indices = list(range(len(pairs))) if indices is None else list(indices)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, i: int) -> dict:
        keys, arrays, bad = [], [], []
        for index in self.indices[i * self.batch_size:(i + 1) * self.batch_size]:
            try:
                key, image, _ = self.pairs.read(index, draft=self.draft)
                arrays.append(self.codec.encode(image))
            except ImageLoadError as e:
                bad.append((self.pairs.records[index].key, str(e)))
                continue
            keys.append(key)
        batch = {name: t.numpy() for name, t in self.codec.collate(arrays).items()} if arrays else {}
        batch.update(keys=keys, bad=bad)
        return batch


def _identity(x):
    return x


def _ignore_stop_signals(worker_id: int, parent: int | None = None) -> None:
    """DataLoader workers ignore SIGINT / SIGTERM: a Ctrl-C or a scheduler's SIGTERM reaches the
    whole process group, and the training process must still get its batches while it finishes
    the step and saves a checkpoint. Workers end when the loader is closed or their parent dies:
    a worker blocked on a full pipe never looks at its parent (torch's watchdog runs between
    items only), so each also asks the kernel for SIGKILL when its parent dies (Linux), and a
    thread checks the parent every second elsewhere. `parent`: the loader's process id, read when
    the loader was made (a parent that died before the worker started is caught too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int | None = None) -> None:
    """This process is killed when its parent (pid `parent`, default: the current one) dies,
    however that parent dies (kill -9 included)."""
    import threading

    parent = os.getppid() if parent is None else parent
    if os.getppid() != parent:  # gone already
        os._exit(1)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before the request: nobody will send it
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="fastsiglip-parent-watchdog", daemon=True).start()


def loader(dataset, items, *, workers: int = 0, pin_memory: bool = False, timeout: float = 0, prefetch: int = 2):
    """A DataLoader over the given items of `dataset` (each item is already a batch), in order,
    `workers` processes with `prefetch` items each in flight, pinned memory for CUDA. Touches
    no global RNG. timeout: seconds to wait for one item from the workers before raising (0:
    forever)."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=items, num_workers=workers,
                                       pin_memory=pin_memory, collate_fn=_identity,
                                       worker_init_fn=functools.partial(_ignore_stop_signals, parent=os.getpid()),
                                       generator=torch.Generator().manual_seed(0), timeout=timeout if workers else 0,
                                       persistent_workers=False, prefetch_factor=prefetch if workers else None)


def chunk_size(batch_size: int, workers: int) -> int:
    """Images per DataLoader item when the main process regroups items into batches of
    `batch_size`: the largest divisor of batch_size up to MAX_CHUNK with workers, the batch
    itself without. With whole batches per item, the first batch reaches the model only after
    one worker has decoded all of it (256 images at 8 ms each: 2 s, however many workers), and
    at the end all but one worker idle through the last batch; with chunks, every worker works
    on the first batch. (On this 2-core machine with batches of 32 the gain is within the noise:
    2.86 s against 2.91 s for 384 images.)"""
    if not workers:
        return batch_size
    return max(d for d in range(1, min(batch_size, MAX_CHUNK) + 1) if batch_size % d == 0)


def regroup(items, per_batch: int, *, pin_memory: bool = False):
    """Consecutive items (compact batches or JpegBatches items) merged `per_batch` at a time:
    lists concatenated, tensors concatenated along the batch dimension, in order; the tensors
    pinned for CUDA (torch's caching host allocator reuses the pinned blocks)."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == per_batch:
            yield merge(group, pin_memory)
            group = []
    if group:
        yield merge(group, pin_memory)


def merge(parts: list[dict], pin_memory: bool = False) -> dict:
    """Items of one dataset as one: lists concatenated; arrays (numpy or torch) concatenated along
    the batch dimension into one torch tensor, written straight into pinned memory for CUDA."""
    fields: dict[str, list] = {}
    for part in parts:  # a part whose images all failed has no arrays, only its lists
        for name, value in part.items():
            fields.setdefault(name, []).append(value)
    merged = {}
    for name, values in fields.items():
        if isinstance(values[0], (np.ndarray, torch.Tensor)):
            tensors = [torch.as_tensor(v) for v in values]  # numpy: no copy
            if len(tensors) == 1 and not pin_memory:
                merged[name] = tensors[0]
                continue
            shape = (sum(len(t) for t in tensors), *tensors[0].shape[1:])
            out = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=pin_memory)
            merged[name] = torch.cat(tensors, out=out)
        else:
            merged[name] = [x for v in values for x in v]
    return merged


class StepItems:
    """The items (step, rank, micro) of `TrainBatches` for steps [start, stop), in order; lazy."""

    def __init__(self, start: int, stop: int, rank: int, micro_per_step: int):
        self.start, self.stop, self.rank, self.micro = start, stop, rank, micro_per_step

    def __iter__(self):
        return ((s, self.rank, m) for s in range(self.start, self.stop) for m in range(self.micro))

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.micro


__all__ = ["DataError", "EvalBatches", "ImageBatches", "Pairs", "PixelCodec", "Record", "TarMember", "TrainBatches",
           "StepItems", "chunk_size", "expand_braces", "index_shards", "loader", "merge", "open_pairs", "read_manifest",
           "regroup"]
