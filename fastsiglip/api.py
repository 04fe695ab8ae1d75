"""One-call jobs on a loaded model: embeddings, zero-shot classification, embedding files.

    model = fastsiglip.load("google/siglip2-base-patch16-224")
    fastsiglip.encode_images(model, ["cat.jpg"])        # [N, D] float32, L2-normalized
    fastsiglip.encode_texts(model, ["a cat", "a dog"])  # [N, D] float32, L2-normalized
    fastsiglip.zero_shot(model, ["cat.jpg"], ["cat", "dog"])
    # [[{"score": 0.93, "label": "cat"}, {"score": 0.01, "label": "dog"}]]

The processor (tokenizer + image settings) comes from the checkpoint the model was loaded
from, unless one is passed. Texts are tokenized as the models were trained (big_vision):
padded to the checkpoint's length, and encoded WITHOUT an attention mask, so the padding is
attended to and the last position (padding for short texts) is pooled.

Differences from transformers' zero-shot-image-classification pipeline (5.23), on purpose
(tests/test_api.py checks each one):
  * SigLIP 2: the Gemma tokenizers transformers builds (GemmaTokenizer, Siglip2Tokenizer)
    return an ``attention_mask`` and the pipeline passes it on, so transformers masks the
    padding that the SigLIP 2 text tower attended to in training (huggingface/transformers#39269).
    Scores here equal the pipeline's with the mask left out (tokenizer.model_input_names =
    ["input_ids"], what the SigLIP 1 checkpoints declare). The pipeline's
    ``tokenizer_kwargs`` cannot do this: 5.23 accepts it and then drops it.
  * SigLIP 2 FixRes (config.json model_type "siglip" + tokenizer.model): transformers loads
    a GemmaTokenizer, which keeps case; SigLIP 2 lowercases (Siglip2Tokenizer, used for the
    NaFlex checkpoints, does). Scores here equal the pipeline's on lowercased prompts;
    ``load_processor(..., lowercase=False)`` gives the pipeline's own.
  * The pipeline pads texts to 64 tokens whatever the checkpoint; here to the checkpoint's
    text length (text_config.max_position_embeddings), the length it was trained with. The
    two agree for length-64 checkpoints; for others the pipeline's input does not fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from . import files
from .loading import checkpoint_fingerprint

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATE = "This is a photo of {}."
# embed: a decoding worker that delivers no batch for this long is taken as stuck (a hung network
# read, a deadlock): the job stops with an error, its finished batches kept for --resume.
WORKER_TIMEOUT_S = 600
DECODE_MODES = ("exact", "draft", "gpu")


def _processor(model, processor):
    if processor is not None:
        return processor
    cached = getattr(model, "_fastsiglip_processor", None)
    if cached is not None:
        return cached
    folder = getattr(model, "checkpoint_dir", None)
    if folder is None:
        raise ValueError("this model was not loaded from a checkpoint (fastsiglip.load), so it has no tokenizer "
                         "or image settings: pass processor=fastsiglip.load_processor(...)")
    from .processing import load_processor

    model._fastsiglip_processor = load_processor(folder)
    return model._fastsiglip_processor


def _pixels_to_model(inputs: dict, model) -> dict:
    """Pixel values onto the model's device, in its dtype (bf16 model: bf16 pixels, half the copy).
    NaFlex's mask and shapes stay where they are: the vision tower moves them itself."""
    param = next(model.parameters())
    return dict(inputs, pixel_values=inputs["pixel_values"].to(param.device, param.dtype))


def _encode_image_batch(model, processor, images, max_num_patches=None, skip_errors=False):
    """(L2-normalized embeddings [n, D] of the readable images, their indices, [(image, error)])."""
    batch = processor.process_images(images, max_num_patches=max_num_patches, skip_errors=skip_errors)
    if batch.pixel_inputs is None:
        return None, [], batch.failed
    with torch.inference_mode():
        emb = model.get_image_features(**_pixels_to_model(batch.pixel_inputs, model))
    return F.normalize(emb.float(), dim=-1), batch.indices, batch.failed


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _as_list(items):
    return list(items) if isinstance(items, (list, tuple)) else [items]


def encode_images(model, images, *, processor=None, batch_size: int = 32, max_num_patches=None) -> torch.Tensor:
    """L2-normalized image embeddings [N, D] (float32, on the model's device).

    max_num_patches: NaFlex patch budget for this call (default: the processor's)."""
    _check_batch_size(batch_size)
    images = _as_list(images)
    if not images:
        raise ValueError("encode_images got no images")
    proc = _processor(model, processor)
    return torch.cat([_encode_image_batch(model, proc, images[i:i + batch_size], max_num_patches)[0]
                      for i in range(0, len(images), batch_size)])


def encode_texts(model, texts, *, processor=None, batch_size: int = 256) -> torch.Tensor:
    """L2-normalized text embeddings [N, D] (float32, on the model's device); texts padded (and
    truncated, EOS kept) to the checkpoint's length, no attention mask (module doc)."""
    _check_batch_size(batch_size)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("encode_texts got no texts")
    proc = _processor(model, processor)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids = proc(text=texts[i:i + batch_size], padding="max_length", truncation=True)["input_ids"]  # [b, L]
        with torch.inference_mode():
            out.append(F.normalize(model.get_text_features(input_ids=ids.to(device)).float(), dim=-1))
    return torch.cat(out)


def classify(model, images, labels, *, template: str = DEFAULT_TEMPLATE, processor=None, batch_size: int = 32,
             max_num_patches=None, skip_errors: bool = True) -> dict:
    """`zero_shot` with its failures: {"results": per image a sorted list, or None for an
    unreadable one, "failed": [(image, error message)]}. The `fastsiglip classify` job.
    Without skip_errors the first unreadable image raises ImageLoadError."""
    _check_batch_size(batch_size)
    if not hasattr(model, "logit_scale"):
        raise ValueError(f"zero-shot classification needs a two-tower SiglipModel (image and text towers, "
                         f"logit_scale, logit_bias); got {type(model).__name__}")
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels:
        raise ValueError("zero_shot needs at least one label")
    check_template(template)
    images = _as_list(images)
    proc = _processor(model, processor)
    text = encode_texts(model, [template.format(label) for label in labels], processor=proc)  # [L, D]
    # SigLIP's logits: cosine * exp(t') + b (Zhai et al. 2023, eq. 1); sigmoid gives each
    # label's own probability, as the pipeline reports.
    scale, bias = model.logit_scale.float().exp(), model.logit_bias.float()
    results, failed = [None] * len(images), []
    for start in range(0, len(images), batch_size):
        emb, indices, bad = _encode_image_batch(model, proc, images[start:start + batch_size], max_num_patches,
                                                skip_errors=skip_errors)
        failed += bad
        if emb is None:
            continue
        scores = torch.sigmoid(emb @ text.t() * scale + bias).tolist()  # [b, L]
        for i, row in zip(indices, scores):
            results[start + i] = [{"score": s, "label": label}
                                  for s, label in sorted(zip(row, labels), key=lambda x: -x[0])]
    return {"results": results, "failed": failed}


def check_template(template) -> None:
    """A prompt template holds exactly one '{}' (where the label goes) and nothing else str.format
    would read: '{} {}', '{0}', '{label}' or a lone '{' are errors, not a crash mid-job."""
    import string

    if not isinstance(template, str):
        raise ValueError(f"template must be a string with one '{{}}' where the label goes, got {template!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a format string ({e}); write a literal brace as '{{{{' or "
                         "'}}}}'") from None
    if fields != [""]:
        raise ValueError(f"template {template!r} must hold exactly one '{{}}' where the label goes (it has "
                         f"{len(fields)} replacement fields); write literal braces as '{{{{' and '}}}}'")
    template.format("label")  # a format spec such as '{:d}' fails here, on the first label, not mid-job


def zero_shot(model, images, labels, *, template: str = DEFAULT_TEMPLATE, processor=None, batch_size: int = 32,
              skip_errors: bool = False, max_num_patches=None):
    """Per image, [{"score", "label"}, ...] sorted by score, scores = sigmoid(logits_per_image).

    The labels, order and scores of transformers' zero-shot-image-classification pipeline, but
    for the SigLIP 2 differences listed in the module doc. An unreadable image raises
    ImageLoadError (naming it); with skip_errors it gives None in its place instead.
    """
    return classify(model, images, labels, template=template, processor=processor, batch_size=batch_size,
                    max_num_patches=max_num_patches, skip_errors=skip_errors)["results"]


# ---------------------------------------------------------------------------------------------
# embed_files and embed_texts: the `fastsiglip embed` and `embed-text` jobs. Resumable, the
# output appears atomically, one file or shards plus an index.
# ---------------------------------------------------------------------------------------------


def list_images(inputs) -> list[str]:
    """Files as given, folders searched recursively for image files (symlinked folders followed,
    each real folder once); sorted, de-duplicated. A folder that cannot be read is an error
    (embed_files lists it as skipped instead)."""
    found, unreadable = _list_images(inputs)
    if unreadable:
        raise PermissionError(f"cannot read folder {unreadable[0][0]}: {unreadable[0][1]}")
    return found


def _list_images(inputs) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files, [(folder, error)] of the folders that could not be read)."""
    found, unreadable = [], []
    for item in _as_list(inputs):
        path = pathlib.Path(item)
        if path.is_dir():
            found += _walk_images(path, unreadable)
        elif path.exists():
            found.append(str(path))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return list(dict.fromkeys(found)), unreadable


def _walk_images(root: pathlib.Path, unreadable: list) -> list[str]:
    """Image files under `root`, sorted; symlinked subfolders followed except into a folder
    already walked (a link loop, or a second link to one folder), unreadable folders noted."""
    files, seen = [], set()

    def failed(error: OSError):
        unreadable.append((error.filename or str(root), error.strerror or str(error)))

    for folder, subfolders, names in os.walk(root, onerror=failed, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        files += [os.path.join(folder, n) for n in names if pathlib.Path(n).suffix.lower() in IMAGE_SUFFIXES
                  and os.path.isfile(os.path.join(folder, n))]
    return sorted(str(pathlib.Path(f)) for f in files)


def _text_lines(path: pathlib.Path) -> list[str]:
    """The lines of a UTF-8 text file: "\n", "\r\n" or a lone "\r" ends a line (as Python's
    universal newlines); a byte-order mark is dropped; a final line ending adds no line. Not
    UTF-8: an error naming the file and the line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset "
                         f"{e.start}); save it as UTF-8") from None
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def image_inputs(inputs, *, image_column: str = "image"):
    """The images of `fastsiglip embed`'s inputs as a data.Pairs (captions unused), each keyed:

      * a folder: its image files, recursively, sorted (key: the path);
      * an image file (any other suffix but those below): itself (key: the path);
      * a file list (.txt): one path a line, relative to the list's folder unless absolute;
        blank lines and lines starting with # ignored (key: the line as written);
      * a manifest (.csv / .tsv / .jsonl) with an `image_column` column, paths as above (key: the
        column's value);
      * WebDataset-style tar shards (.tar, or a brace pattern shards/x-{000..009}.tar): every
        <key>.jpg|jpeg|png|webp member (key: the WebDataset __key__); keys that have other
        members (.txt, .json) but no image are skipped and listed.

    The same file given twice is embedded once; a key seen before for another image (a key
    repeated across shards, a list line equal to another file's manifest value) is skipped and
    listed. Returns the Pairs; its `skipped` lists (key, reason) of what was left out while listing.
    """
    from . import data

    records, skipped = [], []
    for item in _as_list(inputs):
        text = os.fspath(item)
        path = pathlib.Path(text)
        suffix = path.suffix.lower()
        if path.is_dir():
            found, unreadable = _list_images([path])
            records += [data.Record(f, f, "") for f in found]
            skipped += [(folder, f"folder not readable: {error}") for folder, error in unreadable]
        elif suffix in (".tar",) or ("{" in text and not path.exists()):
            shards = data.expand_braces(text)
            missing = [s for s in shards if not os.path.isfile(s)]
            if missing:
                raise FileNotFoundError(f"{text}: {len(missing)} of its {len(shards)} shards do not exist, e.g. "
                                        f"{missing[0]}")
            pairs = data.index_shards(shards, source=text, images_only=True)
            records += pairs.records
            skipped += pairs.skipped
        elif not path.is_file():
            raise FileNotFoundError(f"{text}: no such file or folder")
        elif suffix in (".csv", ".tsv", ".jsonl"):
            manifest = data.read_manifest(path, image_column=image_column, text_column=None)
            records += manifest.records
            skipped += manifest.skipped
        elif suffix == ".txt":
            folder = path.parent.resolve()
            for line in _text_lines(path):
                line = line.strip()
                if line and not line.startswith("#"):
                    file = pathlib.Path(line).expanduser()
                    records.append(data.Record(line, str(file if file.is_absolute() else folder / file), ""))
        else:
            records.append(data.Record(text, text, ""))
    unique, seen = [], {}
    for rec in records:
        if rec.key not in seen:
            seen[rec.key] = rec.image
            unique.append(rec)
        elif seen[rec.key] != rec.image:  # the same file given twice is simply embedded once
            skipped.append((rec.key, f"duplicate key: an earlier input already has {rec.key!r}"))
    if not unique:
        raise ValueError(f"no images found in {', '.join(map(os.fspath, _as_list(inputs)))}")
    pairs = data.Pairs(unique, [range(len(unique))], ", ".join(map(os.fspath, _as_list(inputs))))
    pairs.skipped = skipped
    return pairs


def read_texts(path, *, column: str = "text", id_column: str | None = None) -> tuple[list[str], list[str]]:
    """(keys, texts) of `fastsiglip embed-text`'s input.

      * .txt: one text a line (UTF-8; "\\n", "\\r\\n" or a lone "\\r" ends a line); key: the line
        number (1-based). An empty line is kept as an empty text (the tokenizer gives EOS and
        padding), so that row i of the output is line i + 1 of the file; a final newline does not
        make an extra line.
      * .jsonl: one JSON object a line with a string `column` (blank lines ignored); key: the
        line number, or the `id_column` value.
      * .csv / .tsv: a header row naming `column`; key: the row number (1 = the first row after
        the header), or the `id_column` value.
    Keys must be unique (an id column with repeats is an error): resuming goes by key.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if suffix not in (".txt", ".jsonl", ".csv", ".tsv"):
        raise ValueError(f"{path}: embed-text reads .txt (one text a line), .jsonl, .csv or .tsv files")
    keys, texts = [], []
    if suffix == ".txt":
        texts = _text_lines(path)
        keys = [str(i + 1) for i in range(len(texts))]
    else:
        from . import data

        where = "line" if suffix == ".jsonl" else "row"
        for number, row in data.read_table(path):
            _add_text_row(path, f"{where} {number}", row, column, id_column, str(number), keys, texts)
    if not texts:
        raise ValueError(f"{path} holds no texts")
    if len(set(keys)) != len(keys):
        import collections

        repeated = next(k for k, n in collections.Counter(keys).items() if n > 1)
        raise ValueError(f"{path}: id column {id_column!r} repeats {repeated!r}; keys must be unique (resuming goes "
                         "by key): pass another --id-column or none (then the row number is the key)")
    return keys, texts


def _add_text_row(path, where, row, column, id_column, number, keys, texts):
    if not isinstance(row, dict) or column not in row:
        names = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{path}, {where}: no column {column!r} (found: {names}); name it with --column")
    if not isinstance(row[column], str):
        raise ValueError(f"{path}, {where}: {column!r} is {type(row[column]).__name__}, not a string")
    if id_column is not None and row.get(id_column) in (None, ""):
        raise ValueError(f"{path}, {where}: no value in id column {id_column!r}")
    keys.append(str(row[id_column]) if id_column is not None else number)
    texts.append(row[column])


def _job_identity(model, proc, max_num_patches, kind: str = "images", decode: str = "exact") -> dict:
    """What must not change between an interrupted run and its resumption."""
    folder = getattr(model, "checkpoint_dir", None)
    if kind == "texts":
        settings = f"texts: {proc.tokenizer!r}"
    else:
        image = proc.image_processor
        settings = repr(image)
        if image is not None and image.naflex:
            settings += f" max_num_patches={max_num_patches or image.max_num_patches}"
        if decode != "exact":
            settings += f" decode={decode}"
    return {"model": str(folder or ""), "fingerprint": checkpoint_fingerprint(folder) if folder else "",
            "dtype": str(next(model.parameters()).dtype), "processing": settings}


def _save_safetensors(path, embeddings, meta):
    from safetensors.torch import save_file

    files.atomic_write(path, lambda tmp: save_file({"embeddings": embeddings.contiguous()}, str(tmp),
                                                   metadata={k: json.dumps(v) for k, v in meta.items()}))


def _save_npy(path, embeddings, meta):
    """The rows (.npy) and their row -> key map (.npy.json), which .npy cannot hold: both written
    in full to temporary files first (a full disk fails here, changing nothing), then the data
    renamed into place, then the metadata. The previous .json goes first, so a crash between the
    renames leaves a .npy without a .json (refused on --resume, never read as a valid output),
    never a new .npy beside the old run's key map (which a run of as many rows would match)."""
    import numpy as np

    side = path.with_name(path.name + ".json")
    data_tmp, side_tmp = files.tmp_path(path), files.tmp_path(side)
    try:
        with open(data_tmp, "wb") as f:
            np.save(f, embeddings.numpy())
            f.flush()
            os.fsync(f.fileno())
        with open(side_tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        side.unlink(missing_ok=True)
        os.replace(data_tmp, path)
        os.replace(side_tmp, side)
        files.fsync_dir(path.parent)
    finally:
        for tmp in (data_tmp, side_tmp):
            if tmp.exists():
                tmp.unlink()


def _read_output(path: pathlib.Path, field: str = "paths", rows: bool = True):
    """(embeddings [N, D], meta) of a finished output file (or a partial chunk); rows=False: (None,
    meta), reading no embeddings (a .npy's row count is checked from its header). Anything that
    is not such a file is a ValueError naming it."""
    side = path.with_name(path.name + ".json")
    if path.suffix == ".npy" and not side.is_file():
        raise ValueError(f"{path} has no {side.name} (its row -> key map): cannot resume from it; delete it "
                         "or pass --overwrite")
    try:
        if path.suffix == ".npy":
            import numpy as np

            meta = json.loads(side.read_text(encoding="utf-8"))
            array = np.load(path, mmap_mode=None if rows else "r", allow_pickle=False)
            count, emb = array.shape[0], torch.from_numpy(array) if rows else None
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
                count = f.get_slice("embeddings").get_shape()[0]
                emb = f.get_tensor("embeddings") if rows else None
    except Exception as e:  # not safetensors / .npy, truncated, not JSON, no "embeddings" tensor
        raise ValueError(f"{path} is not an embeddings file written by fastsiglip ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); delete it, pass --overwrite, or "
                         "choose another --out") from None
    if not isinstance(meta, dict) or field not in meta or (meta[field] and count != len(meta[field])):
        raise ValueError(f"{path}: its rows and its list of {field} disagree (not written by this fastsiglip job, "
                         "or a .npy and its .json from different runs); delete it or pass --overwrite")
    return emb, meta


def _read_meta(path: pathlib.Path, field: str = "paths") -> dict:
    """The metadata of a finished output, without its embeddings."""
    return _read_output(path, field, rows=False)[1]


def _check_same_job(what, meta: dict, identity: dict) -> None:
    if meta.get("fingerprint") != identity["fingerprint"]:
        raise ValueError(f"{what} was written with other checkpoint files (model {meta.get('model')!r}; "
                         f"now {identity['model']!r}, whose config, tokenizer or weights differ: fingerprint "
                         f"{str(meta.get('fingerprint'))[:12]} != {identity['fingerprint'][:12]}); its embeddings "
                         "would not match new ones: pass --overwrite (overwrite=True) to replace it")
    if meta.get("inputs") != identity.get("inputs"):
        raise ValueError(f"{what} is a torchrun shard of another list of inputs: shards are resumed only over the "
                         "same inputs (others would move rows between shards); pass --overwrite or a new --out")
    if "texts_sha256" in identity and "texts_sha256" not in meta:
        raise ValueError(f"{what} was written by an earlier fastsiglip, which did not record the texts it embedded, "
                         "so resuming it cannot be checked; pass --overwrite to embed the file again")
    if "texts_sha256" in identity and meta.get("texts_sha256") != identity["texts_sha256"]:
        raise ValueError(f"{what} was written from other texts (the file was edited or extended since: keys are line "
                         "or row numbers, so a changed file would give keys other texts); embed the new texts into "
                         "another --out, or pass --overwrite to start over")
    for key, value in identity.items():
        if meta.get(key) != value:
            raise ValueError(f"{what} was written with another {key} ({meta.get(key)!r}, now {value!r}): "
                             "its embeddings would not match new ones; pass --overwrite (overwrite=True) to "
                             "replace it")


class _Partial:
    """`<out>.partial/`: the work of an unfinished run, one safetensors file per batch (each
    written once, atomically: a run of N items writes O(N) bytes however often it stops)."""

    def __init__(self, out: pathlib.Path, identity: dict, field: str = "paths"):
        self.folder = out.with_name(out.name + ".partial")
        self.identity = identity
        self.field = field
        self.count = 0

    def chunks(self):
        return sorted(self.folder.glob("[0-9]*.safetensors"))

    def load(self):
        """(embedding chunks, done keys, failures) saved by an earlier run of the same job."""
        try:
            job = json.loads((self.folder / "job.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.folder / 'job.json'} is unreadable ({e}); pass --overwrite to start "
                             "over") from None
        _check_same_job(str(self.folder), job if isinstance(job, dict) else {}, self.identity)
        files, chunks, done, failed = self.chunks(), [], [], []
        for path in files:
            emb, meta = _read_output(path, self.field)
            if len(meta[self.field]):
                chunks.append(emb)
            done += meta[self.field]
            failed += [tuple(x) for x in meta["failed"]]
        self.count = len(files)
        return chunks, done, failed

    def start(self):
        """A fresh partial folder (an old one is removed)."""
        self.remove()
        self.folder.mkdir()
        files.atomic_write(self.folder / "job.json", lambda tmp: tmp.write_text(json.dumps(self.identity)))

    def add(self, embeddings, keys, failed):
        emb = embeddings if embeddings is not None else torch.zeros(0, 0)
        _save_safetensors(self.folder / f"{self.count:08d}.safetensors", emb, {self.field: keys, "failed": failed})
        self.count += 1

    def exists(self) -> bool:
        return (self.folder / "job.json").is_file()

    def remove(self):
        if self.folder.is_dir():
            for path in self.chunks():
                path.unlink()
            (self.folder / "job.json").unlink(missing_ok=True)
            shutil.rmtree(self.folder, ignore_errors=True)  # leftovers: .tmp files of a killed write


def _run_job(out, identity, keys, encode, *, field, unit, resume, overwrite, progress, skipped=(),
             allow_empty=False) -> dict:
    """The resumable, atomic job behind embed_files and embed_texts.

    keys: every input's key, in input order; encode(todo) -> iterator of (embeddings [n, D] on
    the CPU or None, the n keys embedded, [(key, error)] of the ones that failed), batch after
    batch over the input positions `todo`. skipped: (key, reason) left out before encoding.
    allow_empty (a file of sharded output): no rows is an empty output, not an error."""
    out = check_output(out, resume=resume, overwrite=overwrite)
    with files.output_lock(out, f"embed job (field {field})"):
        return _run_locked(out, identity, keys, encode, field=field, unit=unit, resume=resume, overwrite=overwrite,
                           progress=progress, skipped=skipped, allow_empty=allow_empty)


def check_output(out, *, resume: bool = False, overwrite: bool = False) -> pathlib.Path:
    """The checks on an output path that need no work done: its suffix, not a folder, its folder
    writable (created if missing). Raises ValueError saying what to pass instead."""
    out = pathlib.Path(out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out {out}: the output must end in .safetensors or .npy")
    if resume and overwrite:
        raise ValueError("pass --resume (continue or extend the output) or --overwrite (start over), not both")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name a file inside it, e.g. {out / 'embeddings'}{out.suffix}")
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create its folder {folder} ({e.strerror})") from None
    try:  # a real probe: permissions, a read-only filesystem, root or not
        tempfile.TemporaryFile(dir=folder, prefix=files.TMP_PREFIX + "probe-").close()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in its folder {folder} ({e.strerror}); choose another --out") \
            from None
    return out


def _run_locked(out, identity, keys, encode, *, field, unit, resume, overwrite, progress, skipped, allow_empty):
    files.remove_stale_tmp(out.parent, out.name)  # a killed run's half-written output (we hold the lock)
    files.remove_stale_tmp(out.parent, out.name + ".json")
    partial = _Partial(out, identity, field)
    try:
        return _run_steps(out, partial, identity, keys, encode, field=field, unit=unit, resume=resume,
                          overwrite=overwrite, progress=progress, skipped=skipped, allow_empty=allow_empty)
    except OSError as e:  # a full disk, a folder gone read-only: the batches done so far stay in .partial/
        kept = f"; the finished batches are kept in {partial.folder}: fix it and rerun with --resume" \
            if partial.exists() else ""
        where = f" ({e.filename})" if e.filename else ""
        raise OSError(e.errno, f"cannot write {out}{where}: {e.strerror or e}{kept}") from e
    except KeyboardInterrupt as e:
        kept = f"the finished batches are kept in {partial.folder}: rerun with --resume to continue" \
            if partial.exists() else "nothing was written"
        raise JobInterrupted(kept, getattr(e, "signum", signal.SIGINT)) from None


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, when the CLI turned it into an exception carrying `signum`) during an
    embed job; the message says what was kept. The CLI exits 128 + signum (130, 143)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


def _run_steps(out, partial, identity, keys, encode, *, field, unit, resume, overwrite, progress, skipped,
               allow_empty):
    if not resume and not overwrite:
        if partial.exists():
            raise ValueError(f"{partial.folder} holds the work of an unfinished run: pass --resume (resume=True) to "
                             "continue it, or --overwrite (overwrite=True) to start over")
        if out.exists():
            raise ValueError(f"{out} exists: pass --resume (resume=True) to embed only what it lacks, or --overwrite "
                             "(overwrite=True) to replace it")
    chunks, done, failed = [], [], []
    resuming = resume and partial.exists()
    from_output = resume and not resuming and out.exists()
    if resuming:
        chunks, done, failed = partial.load()
    elif from_output:  # a finished run: embed only the inputs added since
        meta = _read_meta(out, field)
        _check_same_job(str(out), meta, identity)
        known = set(meta.get(field, ())) | {k for k, _ in meta.get("failed", ())}
        if all(k in known for k in keys):  # nothing new: the embeddings need not be read
            failed = list(dict.fromkeys([*map(tuple, meta["failed"]), *map(tuple, skipped)]))
            return {"count": len(meta[field]), field: list(meta[field]), "failed": failed, "new": 0}
        emb, meta = _read_output(out, field)
        chunks, done, failed = [emb], list(meta[field]), [tuple(x) for x in meta["failed"]]
    seen = set(done) | {k for k, _ in failed}
    todo = [i for i, k in enumerate(keys) if k not in seen]
    if not resuming and todo:
        partial.start()
        if from_output:
            partial.add(chunks[0], done, failed)
    start, total, new = time.perf_counter(), len(done) + len(failed) + len(todo), 0
    try:
        for emb, batch_keys, bad in encode(todo) if todo else ():
            if emb is not None:
                chunks.append(emb)
            partial.add(emb, batch_keys, bad)
            done.extend(batch_keys)  # in place: a new list per batch would copy O(rows) each time
            failed.extend(bad)
            new += len(batch_keys) + len(bad)
            if progress:
                rate = new / (time.perf_counter() - start)
                print(f"\r{len(done) + len(failed)}/{total} {unit}  {rate:.1f} {unit}/s", end="", file=sys.stderr,
                      flush=True)
    finally:  # also before an error or interruption, so that its message starts a line of its own
        if progress and new:
            print(file=sys.stderr)
    failed = list(dict.fromkeys([*failed, *map(tuple, skipped)]))
    if not chunks and allow_empty:
        chunks = [torch.zeros(0, 0)]
    if not chunks:
        partial.remove()
        raise ValueError(f"none of the {total} {unit} could be read; first error: {failed[0][1] if failed else '?'}")
    # Written even when nothing was left to do: .partial/ may hold everything (a run whose final
    # write failed), and it is removed only once the output holds it.
    meta = dict(identity, failed=failed, **{field: done})
    (_save_safetensors if out.suffix == ".safetensors" else _save_npy)(out, torch.cat(chunks), meta)
    partial.remove()
    return {"count": len(done), field: done, "failed": failed, "new": len(todo)}


def shard_path(out, rank: int, world_size: int) -> pathlib.Path:
    """Rank `rank`'s output under torchrun: emb.safetensors -> emb-00001-of-00004.safetensors."""
    out = pathlib.Path(out)
    return out.with_name(f"{out.stem}-{rank:05d}-of-{world_size:05d}{out.suffix}")


def index_path(out) -> pathlib.Path:
    """The index rank 0 writes under torchrun: emb.safetensors -> emb.safetensors.index.json."""
    out = pathlib.Path(out)
    return out.with_name(out.name + ".index.json")


def _check_shard_size(shard_size):
    if shard_size is not None and (isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1):
        raise ValueError(f"shard_size must be a positive integer (inputs per output file), got {shard_size!r}")
    return shard_size


def _world(rank, world_size) -> tuple[int, int]:
    """(rank, world size): as given, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = int(os.environ.get("RANK", "0")) if world_size > 1 else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    return rank, world_size


def _process_group():
    """(torch.distributed, whether started here): the default process group, started from
    torchrun's environment when there is none yet (gloo: a few small messages, whatever the
    model's device); (None, False) without a torchrun environment."""
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, False
    if "MASTER_ADDR" not in os.environ or not dist.is_available():
        return None, False
    # The ranks meet only at the end, so the fastest waits for the slowest: a long timeout.
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist, True


def _run_sharded(out, identity, keys, encode, *, rank, world_size, field, unit, resume, overwrite, progress,
                 skipped=(), shard_size=None) -> dict:
    """_run_job for one process writing one file, else for rank `rank` of `world_size` and/or in
    files of at most `shard_size` inputs.

    Files: without shard_size, rank r's contiguous share keys[N r / W : N (r + 1) / W] into
    shard_path(out, r, W); with it, input groups [k S, (k + 1) S) into shard_path(out, k, G), G
    groups, rank r doing groups [G r / W, G (r + 1) / W) (so the files do not depend on the number
    of processes). Each file has its own `.partial/` and resume. When every rank is done (a gather
    over torchrun's process group) rank 0 writes index_path(out): {"rows", "files": [{"file",
    "rows", "failed"}], "failed"}. The files in index order, concatenated, are the single-file
    output (same keys, same order). Unlike a single file, sharded output is resumed only over the
    same inputs (identity "inputs") and the same split (identity "share")."""
    if world_size == 1 and not shard_size:
        return _run_job(out, identity, keys, encode, field=field, unit=unit, resume=resume, overwrite=overwrite,
                        progress=progress, skipped=skipped)
    out = pathlib.Path(out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out {out}: the output must end in .safetensors or .npy")
    n = len(keys)
    if shard_size:
        count = -(-n // shard_size)
        targets = [(shard_path(out, k, count), k * shard_size, min((k + 1) * shard_size, n))
                 for k in range(count * rank // world_size, count * (rank + 1) // world_size)]
    else:
        targets = [(shard_path(out, rank, world_size), n * rank // world_size, n * (rank + 1) // world_size)]
    # The splits depend on the whole input list: a file is resumed only with the same inputs and
    # split (added or removed inputs would move others between files: lost or embedded twice).
    identity = dict(identity, inputs=hashlib.sha256(json.dumps(keys).encode()).hexdigest())
    reports, outcome, failure = [], {"files": []}, None
    try:
        for i, (path, lo, hi) in enumerate(targets):
            report = _run_job(path, dict(identity, share=[lo, hi]), keys[lo:hi],
                              lambda todo, lo=lo: encode([lo + j for j in todo]), field=field, unit=unit,
                              resume=resume, overwrite=overwrite, progress=progress and rank == 0,
                              allow_empty=True)
            reports.append(report)
            outcome["files"].append({"file": path.name, "rows": report["count"], "failed": report["failed"]})
    except Exception as e:  # every rank must reach the gather below, or the others wait for it
        expected = isinstance(e, (ValueError, FileNotFoundError, RuntimeError))
        outcome, failure = {"error": str(e) if expected else f"{type(e).__name__}: {e}"}, e
    group, started = (None, False) if world_size == 1 else _process_group()
    if group is None and world_size > 1:  # rank and world size given without torchrun: these files, no index
        outcomes = None
    elif group is None:
        outcomes = [outcome]
    else:
        if group.get_world_size() != world_size or group.get_rank() != rank:
            raise ValueError(f"rank {rank} of {world_size} given, but the process group is rank {group.get_rank()} "
                             f"of {group.get_world_size()}")
        outcomes = [None] * world_size
        group.all_gather_object(outcomes, outcome)
    errors = [f"rank {r}: {o['error']}" if world_size > 1 else o["error"]
              for r, o in enumerate(outcomes or [outcome]) if "error" in o]
    index = None
    if rank == 0 and outcomes is not None and not errors:
        entries = [f for o in outcomes for f in o["files"]]
        content = {"rows": sum(f["rows"] for f in entries), "world_size": world_size, "shard_size": shard_size,
                   "files": [{"file": f["file"], "rows": f["rows"], "failed": len(f["failed"])} for f in entries],
                   "failed": [*(x for f in entries for x in f["failed"]), *map(list, skipped)]}
        index = index_path(out)
        try:
            files.atomic_write(index, lambda tmp: tmp.write_text(json.dumps(dict(identity, **content), indent=1)))
        except OSError as e:
            errors.append(f"writing {index}: {e}; the shards are complete: rerun with --resume to write it")
    if group is not None:
        # No rank leaves before rank 0 wrote the index: torchrun stops every rank once one exits with
        # a status other than 0 (1 when some inputs were skipped), which would lose the index.
        group.barrier()
        if started:
            group.destroy_process_group()
    if errors:
        raise ValueError("; ".join(errors)) from failure
    return {"count": sum(r["count"] for r in reports), field: [k for r in reports for k in r[field]],
            "failed": [*(x for r in reports for x in r["failed"]), *(map(tuple, skipped) if rank == 0 else ())],
            "new": sum(r["new"] for r in reports),
            "shards": [str(path) for path, _, _ in targets], "index": str(index) if index else None}


def default_workers() -> int:
    """The CPU cores this process may use (its affinity mask, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _encode_pixels(model, codec, batch: dict) -> torch.Tensor:
    """L2-normalized float32 embeddings [b, D] on the CPU of a compact batch (data.PixelCodec)."""
    param = next(model.parameters())
    inputs = codec.to_model(batch, param.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    with torch.inference_mode():
        emb = model.get_image_features(**inputs)
    return F.normalize(emb.float(), dim=-1).cpu()


def embed_files(model, inputs, out, *, batch_size: int = 32, resume: bool = False, overwrite: bool = False,
                progress: bool = True, processor=None, max_num_patches=None, workers: int | None = None,
                image_column: str = "image", rank: int | None = None, world_size: int | None = None,
                decode: str = "exact", shard_size: int | None = None) -> dict:
    """Embed every image of `inputs` into `out` (.safetensors or .npy + .npy.json): L2-normalized
    float32 rows, in the order of the keys the metadata lists under "paths" (input order for one
    run). Inputs: folders, image files, file lists, manifests, tar shards (see image_inputs).

    Decoding and resizing run in `workers` DataLoader processes (default: the CPU cores; 0: in
    this process, one image after the other), a few images per DataLoader item (data.chunk_size)
    regrouped into batches here, two batches per worker prefetched while the model encodes,
    pixels moved between processes as uint8 (data.PixelCodec; the model sees exactly the
    processor's floats), pinned when the model is on CUDA. A batch holds the same images
    whatever the workers, so the embeddings are bit-identical.

    decode="draft" (FixRes checkpoints): JPEGs are decoded by Pillow's draft mode at the smallest
    1/2, 1/4 or 1/8 scale still at least the model's size, then resized exactly as usual: faster,
    and close to but not equal to the exact embeddings (README: measured effect). decode="gpu"
    (model on CUDA, torchvision installed): the workers only read bytes and headers, plain JPEGs
    are decoded (nvjpeg) and resized on the GPU, other images exactly in the workers (see
    gpu_decode). The mode is part of the job's identity: a run is resumed only with the same mode.

    The work done so far is kept in `<out>.partial/` after every batch, so `resume=True`
    continues an interrupted run; `out` itself is written once, atomically, at the end. With
    `resume=True` and a finished `out`, only inputs not in it are embedded (and appended). An
    existing `out` or partial run without resume=True or overwrite=True is an error (nothing is
    replaced by accident). A partial or output of another checkpoint (fingerprint of its files),
    dtype or image settings is refused. Unreadable images are skipped and listed (returned, and
    stored in the metadata under "failed"). Returns {"count", "paths", "failed", "new"} (sharded:
    plus "shards", this process's files, and "index"); progress goes to stderr.

    Under torchrun (or with rank / world_size given) each process embeds its contiguous share
    into its own shard file and rank 0 writes an index; with shard_size, files of at most that
    many inputs (see _run_sharded). --resume works per file, over the same inputs.
    """
    from . import data

    _check_batch_size(batch_size)
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0: decode in this process), got {workers!r}")
    check_output(out, resume=resume, overwrite=overwrite)  # before listing and encoding anything
    pairs = image_inputs(inputs, image_column=image_column)
    proc = _processor(model, processor)
    if proc.image_processor is None:
        raise ValueError(f"this checkpoint ({proc.folder}) has no vision tower: nothing to embed images with")
    if max_num_patches is not None and not proc.image_processor.naflex:
        raise ValueError(f"max_num_patches is for NaFlex checkpoints; this one is FixRes {proc.image_processor.size}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "draft" and (proc.image_processor.naflex or not proc.image_processor.do_resize):
        raise ValueError("--decode draft is for FixRes checkpoints that resize (a NaFlex image's size depends on "
                         "its full resolution); use --decode exact")
    side = max(proc.image_processor.size)  # square: whatever the EXIF rotation, both sides stay >= the target
    draft = (side, side) if decode == "draft" else None
    codec = data.PixelCodec(proc.image_processor, max_num_patches)
    device = next(model.parameters()).device
    gpu_decoder = None
    if decode == "gpu":
        from . import gpu_decode

        gpu_decode.check_supported(codec, device)
        gpu_decoder = gpu_decode.GpuDecoder(codec, device)  # ImportError without torchvision

    chunk = data.chunk_size(batch_size, workers)  # items of a few images, regrouped into batches here

    def encode(todo):
        if decode == "gpu":  # workers read bytes; the main process decodes them on the GPU
            dataset = gpu_decode.JpegBatches(pairs, codec, batch_size=chunk, indices=todo)
        else:
            dataset = data.ImageBatches(pairs, codec, batch_size=chunk, indices=todo, draft=draft)
        per_batch = batch_size // chunk
        items = data.loader(dataset, range(len(dataset)), workers=workers, prefetch=2 * per_batch,
                            timeout=WORKER_TIMEOUT_S)
        for batch in data.regroup(items, per_batch, pin_memory=device.type == "cuda" and decode != "gpu"):
            if gpu_decoder is not None:
                batch = gpu_decoder(batch)
            emb = _encode_pixels(model, codec, batch) if batch["keys"] else None
            yield emb, batch["keys"], [(str(k), err) for k, err in batch["bad"]]

    rank, world_size = _world(rank, world_size)
    return _run_sharded(out, _job_identity(model, proc, max_num_patches, decode=decode), [r.key for r in pairs.records],
                        encode, rank=rank, world_size=world_size, field="paths", unit="images", resume=resume,
                        overwrite=overwrite, progress=progress, skipped=pairs.skipped,
                        shard_size=_check_shard_size(shard_size))


def embed_texts(model, source, out, *, column: str = "text", id_column: str | None = None, batch_size: int = 256,
                resume: bool = False, overwrite: bool = False, progress: bool = True, processor=None,
                rank: int | None = None, world_size: int | None = None, shard_size: int | None = None) -> dict:
    """Embed the texts of `source` (.txt: one a line; .jsonl / .csv / .tsv: the `column` column; see
    read_texts) into `out`, as embed_files does images: L2-normalized float32 rows in the order of
    the keys listed under "keys" (line or row numbers, or the `id_column` values), resumable
    (`<out>.partial/`), written atomically, same refusals. Texts are tokenized as encode_texts
    does: lowercased where the checkpoint does, truncated to the checkpoint's length (EOS kept),
    padded, no attention mask. Empty lines are kept as empty texts. Returns {"count", "keys",
    "failed" (always empty), "new"}. Under torchrun: shards and an index, as embed_files."""
    _check_batch_size(batch_size)
    check_output(out, resume=resume, overwrite=overwrite)
    keys, texts = read_texts(source, column=column, id_column=id_column)
    proc = _processor(model, processor)
    if proc.tokenizer is None or not hasattr(model, "get_text_features"):
        raise ValueError(f"this model ({type(model).__name__}) has no text tower / tokenizer: embed-text needs one")

    def encode(todo):
        for i in range(0, len(todo), batch_size):
            part = todo[i:i + batch_size]
            emb = encode_texts(model, [texts[j] for j in part], processor=proc, batch_size=len(part)).cpu()
            yield emb, [keys[j] for j in part], []

    rank, world_size = _world(rank, world_size)
    # Keys are line or row numbers, so the texts themselves are part of the job: resuming over an
    # edited file (a line inserted: every later key now names another text) is refused.
    identity = dict(_job_identity(model, proc, None, kind="texts"),
                    texts_sha256=hashlib.sha256(json.dumps(texts).encode()).hexdigest())
    return _run_sharded(out, identity, keys, encode, rank=rank,
                        world_size=world_size, field="keys", unit="texts", resume=resume, overwrite=overwrite,
                        progress=progress, shard_size=_check_shard_size(shard_size))
