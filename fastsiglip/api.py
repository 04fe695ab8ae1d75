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
import shutil
import sys
import time

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATE = "This is a photo of {}."
# A checkpoint's fingerprint reads these files whole when small, else their first and last MiB
# (the safetensors header and the first and last tensors' data): cheap for a 4 GB model, and any
# change of weights, config or tokenizer shows up in practice.
FINGERPRINT_SUFFIXES = (".json", ".model", ".safetensors")
FINGERPRINT_BYTES = 1 << 20


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
    if not isinstance(template, str) or "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' where the label goes")
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
# embed_files: the `fastsiglip embed` job. Resumable, and the output appears atomically.
# ---------------------------------------------------------------------------------------------


def list_images(inputs) -> list[str]:
    """Files as given, folders searched recursively for image files; sorted, de-duplicated."""
    found = []
    for item in _as_list(inputs):
        path = pathlib.Path(item)
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(str(path))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return list(dict.fromkeys(found))


def checkpoint_fingerprint(folder) -> str:
    """sha256 of a checkpoint folder's config, tokenizer and weight files (see FINGERPRINT_BYTES)."""
    h = hashlib.sha256()
    folder = pathlib.Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in FINGERPRINT_SUFFIXES and p.is_file()
                   and not p.name.startswith("."))
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def _job_identity(model, proc, max_num_patches) -> dict:
    """What must not change between an interrupted run and its resumption."""
    folder = getattr(model, "checkpoint_dir", None)
    image = proc.image_processor
    settings = repr(image)
    if image is not None and image.naflex:
        settings += f" max_num_patches={max_num_patches or image.max_num_patches}"
    return {"model": str(folder or ""), "fingerprint": checkpoint_fingerprint(folder) if folder else "",
            "dtype": str(next(model.parameters()).dtype), "processing": settings}


def _atomic_write(path: pathlib.Path, write) -> None:
    """write(tmp_path), then rename over `path`: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_safetensors(path, embeddings, meta):
    from safetensors.torch import save_file

    _atomic_write(path, lambda tmp: save_file({"embeddings": embeddings.contiguous()}, str(tmp),
                                              metadata={k: json.dumps(v) for k, v in meta.items()}))


def _save_npy(path, embeddings, meta):
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, embeddings.numpy())

    side = path.with_name(path.name + ".json")  # the row -> file map, which .npy cannot hold
    _atomic_write(side, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    _atomic_write(path, write)


def _read_output(path: pathlib.Path):
    """(embeddings [N, D], meta) of a finished output file (or a partial chunk)."""
    if path.suffix == ".npy":
        import numpy as np

        side = path.with_name(path.name + ".json")
        if not side.is_file():
            raise ValueError(f"{path} has no {side.name} (its row -> file map): cannot resume from it")
        emb, meta = torch.from_numpy(np.load(path)), json.loads(side.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            emb, meta = f.get_tensor("embeddings"), {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    if "paths" not in meta or (meta["paths"] and emb.shape[0] != len(meta["paths"])):
        raise ValueError(f"{path}: its rows and its list of paths disagree (not written by fastsiglip embed, or "
                         "a .npy and its .json from different runs); delete it or run without --resume")
    return emb, meta


def _check_same_job(what, meta: dict, identity: dict) -> None:
    if meta.get("fingerprint") != identity["fingerprint"]:
        raise ValueError(f"{what} was written with other checkpoint files (model {meta.get('model')!r}; "
                         f"now {identity['model']!r}, whose config, tokenizer or weights differ: fingerprint "
                         f"{str(meta.get('fingerprint'))[:12]} != {identity['fingerprint'][:12]}); its embeddings "
                         "would not match new ones: delete it or run without --resume")
    for key, value in identity.items():
        if meta.get(key) != value:
            raise ValueError(f"{what} was written with another {key} ({meta.get(key)!r}, now {value!r}): "
                             "its embeddings would not match new ones; delete it or run without --resume")


class _Partial:
    """`<out>.partial/`: the work of an unfinished run, one safetensors file per batch (each
    written once, atomically: a run of N images writes O(N) bytes however often it stops)."""

    def __init__(self, out: pathlib.Path, identity: dict):
        self.folder = out.with_name(out.name + ".partial")
        self.identity = identity
        self.count = 0

    def chunks(self):
        return sorted(self.folder.glob("[0-9]*.safetensors"))

    def load(self):
        """(embedding chunks, done paths, failures) saved by an earlier run of the same job."""
        _check_same_job(str(self.folder), json.loads((self.folder / "job.json").read_text()), self.identity)
        files, chunks, done, failed = self.chunks(), [], [], []
        for path in files:
            emb, meta = _read_output(path)
            if len(meta["paths"]):
                chunks.append(emb)
            done += meta["paths"]
            failed += [tuple(x) for x in meta["failed"]]
        self.count = len(files)
        return chunks, done, failed

    def start(self):
        """A fresh partial folder (an old one of an earlier, un-resumed run is removed)."""
        self.remove()
        self.folder.mkdir()
        (self.folder / "job.json").write_text(json.dumps(self.identity))

    def add(self, embeddings, paths, failed):
        emb = embeddings if embeddings is not None else torch.zeros(0, 0)
        _save_safetensors(self.folder / f"{self.count:08d}.safetensors", emb, {"paths": paths, "failed": failed})
        self.count += 1

    def exists(self) -> bool:
        return (self.folder / "job.json").is_file()

    def remove(self):
        if self.folder.is_dir():
            for path in self.chunks():
                path.unlink()
            (self.folder / "job.json").unlink(missing_ok=True)
            shutil.rmtree(self.folder, ignore_errors=True)  # leftovers: .tmp files of a killed write


def embed_files(model, inputs, out, *, batch_size: int = 32, resume: bool = False, progress: bool = True,
                processor=None, max_num_patches=None) -> dict:
    """Embed every image of `inputs` into `out` (.safetensors or .npy + .npy.json): L2-normalized
    float32 rows, in the order of the "paths" the metadata lists (file order for one run).

    The work done so far is kept in `<out>.partial/` after every batch, so `resume=True`
    continues an interrupted run; `out` itself is written once, atomically, at the end. With
    `resume=True` and a finished `out`, only files not in it are embedded (and appended). A
    partial or output of another checkpoint (fingerprint of its files), dtype or image
    settings is refused. Unreadable files are skipped and listed (returned, and stored in the
    metadata). Returns {"count", "paths", "failed", "new"}; progress goes to stderr.
    """
    _check_batch_size(batch_size)
    out = pathlib.Path(out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out {out}: the output must end in .safetensors or .npy")
    files = list_images(inputs)
    if not files:
        raise ValueError(f"no image files found in {', '.join(map(str, _as_list(inputs)))}")
    proc = _processor(model, processor)
    identity = _job_identity(model, proc, max_num_patches)
    partial = _Partial(out, identity)
    chunks, done, failed = [], [], []
    resuming = resume and partial.exists()
    from_output = resume and not resuming and out.exists()
    if resuming:
        chunks, done, failed = partial.load()
    elif from_output:  # a finished run: embed only the files added since
        emb, meta = _read_output(out)
        _check_same_job(str(out), meta, identity)
        chunks, done, failed = [emb], list(meta["paths"]), [tuple(x) for x in meta["failed"]]
    seen = set(done) | {p for p, _ in failed}
    todo = [f for f in files if f not in seen]
    if not resuming and todo:
        partial.start()
        if from_output:
            partial.add(chunks[0], done, failed)
    start, total, new = time.perf_counter(), len(done) + len(failed) + len(todo), 0
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        emb, indices, batch_failures = _encode_image_batch(model, proc, batch, max_num_patches, skip_errors=True)
        paths, bad = [batch[j] for j in indices], [(str(p), err) for p, err in batch_failures]
        if emb is not None:
            emb = emb.cpu()
            chunks.append(emb)
        partial.add(emb, paths, bad)
        done, failed, new = done + paths, failed + bad, new + len(batch)
        if progress:
            rate = new / (time.perf_counter() - start)
            print(f"\r{len(done) + len(failed)}/{total} images  {rate:.1f} images/s", end="", file=sys.stderr,
                  flush=True)
    if progress and todo:
        print(file=sys.stderr)
    if not chunks:
        partial.remove()
        raise ValueError(f"none of the {total} files could be read; first error: {failed[0][1] if failed else '?'}")
    if todo or not out.exists():
        meta = dict(identity, paths=done, failed=failed)
        (_save_safetensors if out.suffix == ".safetensors" else _save_npy)(out, torch.cat(chunks), meta)
    partial.remove()
    return {"count": len(done), "paths": done, "failed": failed, "new": len(todo)}
