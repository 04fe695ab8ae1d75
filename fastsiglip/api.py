"""One-call jobs on a loaded model: embeddings, zero-shot classification, embedding files.

    model = fastsiglip.load("google/siglip2-base-patch16-224")
    fastsiglip.encode_images(model, ["cat.jpg"])        # [N, D] float32, L2-normalized
    fastsiglip.encode_texts(model, ["a cat", "a dog"])  # [N, D] float32, L2-normalized
    fastsiglip.zero_shot(model, ["cat.jpg"], ["cat", "dog"])
    # [[{"score": 0.93, "label": "cat"}, {"score": 0.01, "label": "dog"}]]

The processor (tokenizer + image settings) comes from the checkpoint the model was loaded
from, unless one is passed. Texts are tokenized as the models were trained: padded to the
checkpoint's length, no attention mask.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATE = "This is a photo of {}."


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


def _to_model(inputs: dict, model) -> dict:
    param = next(model.parameters())
    out = {}
    for key, value in inputs.items():
        if key == "pixel_values":
            value = value.to(param.device, param.dtype)
        elif isinstance(value, torch.Tensor):
            value = value.to(param.device)
        out[key] = value
    return out


def _encode_image_batch(model, processor, images, max_num_patches=None, skip_errors=False):
    """(L2-normalized embeddings [n, D] of the readable images, their indices, [(image, error)])."""
    batch = processor.process_images(images, max_num_patches=max_num_patches, skip_errors=skip_errors)
    if batch.pixel_inputs is None:
        return None, [], batch.failed
    with torch.inference_mode():
        emb = model.get_image_features(**_to_model(batch.pixel_inputs, model))
    return F.normalize(emb.float(), dim=-1), batch.indices, batch.failed


def _check_batch_size(batch_size):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def encode_images(model, images, *, processor=None, batch_size: int = 32, max_num_patches=None) -> torch.Tensor:
    """L2-normalized image embeddings [N, D] (float32, on the model's device)."""
    _check_batch_size(batch_size)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("encode_images got no images")
    proc = _processor(model, processor)
    return torch.cat([_encode_image_batch(model, proc, images[i:i + batch_size], max_num_patches)[0]
                      for i in range(0, len(images), batch_size)])


def encode_texts(model, texts, *, processor=None, batch_size: int = 256) -> torch.Tensor:
    """L2-normalized text embeddings [N, D] (float32, on the model's device)."""
    _check_batch_size(batch_size)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("encode_texts got no texts")
    proc = _processor(model, processor)
    out = []
    for i in range(0, len(texts), batch_size):
        ids = proc(text=texts[i:i + batch_size], padding="max_length", return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out.append(F.normalize(model.get_text_features(input_ids=ids.to(next(model.parameters()).device)).float(), dim=-1))
    return torch.cat(out)


def zero_shot(model, images, labels, *, template: str = DEFAULT_TEMPLATE, processor=None, batch_size: int = 32,
              skip_errors: bool = False):
    """Per image, [{"score", "label"}, ...] sorted by score, scores = sigmoid(logits_per_image).

    The same scores and order as transformers' zero-shot-image-classification pipeline.
    With skip_errors, an unreadable image gives None in its place instead of an exception.
    """
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels:
        raise ValueError("zero_shot needs at least one label")
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' where the label goes")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    proc = _processor(model, processor)
    text = encode_texts(model, [template.format(label) for label in labels], processor=proc)
    scale, bias = model.logit_scale.float().exp(), model.logit_bias.float()
    results = [None] * len(images)
    for start in range(0, len(images), batch_size):
        emb, indices, _ = _encode_image_batch(model, proc, images[start:start + batch_size], skip_errors=skip_errors)
        if emb is None:
            continue
        scores = torch.sigmoid(emb @ text.t() * scale + bias).tolist()
        for i, row in zip(indices, scores):
            results[start + i] = [{"score": s, "label": label}
                                  for s, label in sorted(zip(row, labels), key=lambda x: -x[0])]
    return results


# ---------------------------------------------------------------------------------------------
# embed_files: the `fastsiglip embed` job. Resumable, and the output appears atomically.
# ---------------------------------------------------------------------------------------------


def list_images(inputs) -> list[str]:
    """Files as given, folders searched recursively for image files; sorted, de-duplicated."""
    found = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(str(path))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return list(dict.fromkeys(found))


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
    try:
        import numpy as np
    except ImportError as e:
        raise RuntimeError("writing .npy needs numpy (pip install numpy); or write .safetensors") from e

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, embeddings.numpy())

    _atomic_write(path, write)
    side = path.with_name(path.name + ".json")  # the row -> file map, which .npy cannot hold
    _atomic_write(side, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


def _load_partial(partial: pathlib.Path, model_id: str):
    from safetensors import safe_open

    with safe_open(str(partial), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        emb = f.get_tensor("embeddings")
    if meta.get("model") != model_id:
        raise ValueError(f"{partial} was written with model {meta.get('model')!r}, not {model_id!r}; "
                         "delete it or run without --resume")
    return emb, meta


def embed_files(model, inputs, out, *, batch_size: int = 32, resume: bool = False, progress: bool = True,
                processor=None) -> dict:
    """Embed every image of `inputs` into `out` (.safetensors or .npy), rows in file order.

    The work done so far is kept in `<out>.partial.safetensors` after every batch (written
    atomically), so `resume=True` continues an interrupted run; `out` itself is written once,
    atomically, at the end. Unreadable files are skipped and listed (returned, and stored in
    the output's metadata). Returns {"count", "paths", "failed"}.
    """
    _check_batch_size(batch_size)
    out = pathlib.Path(out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out {out}: the output must end in .safetensors or .npy")
    files = list_images(inputs)
    if not files:
        raise ValueError(f"no image files found in {', '.join(map(str, inputs))}")
    model_id = str(getattr(model, "checkpoint_dir", ""))
    partial = out.with_name(out.name + ".partial.safetensors")
    chunks, done, failed = [], [], []
    if resume and partial.exists():
        emb, meta = _load_partial(partial, model_id)
        chunks, done, failed = [emb], meta["paths"], [tuple(x) for x in meta["failed"]]
    seen = set(done) | {p for p, _ in failed}
    todo = [f for f in files if f not in seen]
    proc = _processor(model, processor)
    start, total = time.perf_counter(), len(files)
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        emb, indices, batch_failures = _encode_image_batch(model, proc, batch, skip_errors=True)
        if emb is not None:
            chunks.append(emb.cpu())
            done += [batch[j] for j in indices]
        failed += [(str(p), err) for p, err in batch_failures]
        _save_safetensors(partial, torch.cat(chunks), {"model": model_id, "paths": done, "failed": failed})
        if progress:
            n = len(done) + len(failed)
            rate = (i + len(batch)) / (time.perf_counter() - start)
            print(f"\r{n}/{total} images  {rate:.1f} images/s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if not chunks:
        raise ValueError(f"none of the {total} files could be read; first error: {failed[0][1] if failed else '?'}")
    embeddings = torch.cat(chunks)
    meta = {"model": model_id, "paths": done, "failed": failed}
    (_save_safetensors if out.suffix == ".safetensors" else _save_npy)(out, embeddings, meta)
    partial.unlink(missing_ok=True)
    return {"count": len(done), "paths": done, "failed": failed}
