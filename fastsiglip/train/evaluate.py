"""Evaluation during fine-tuning: image-text retrieval recall@k and zero-shot top-1.

Recall is computed from the two embedding matrices in row chunks: a chunk of images against all
texts ([c, N] scores) at a time, never the full N x N matrix. Pair i is (image i, text i); the
rank of the right text of image i is the number of texts scoring strictly higher (ties count in
the model's favour, as in open_clip's retrieval metric, which uses a sort).
"""

from __future__ import annotations

import pathlib

import torch


RECALL_KS = (1, 5, 10)
CHUNK = 1024
ZERO_SHOT_TEMPLATES = (  # a few of CLIP's ImageNet prompts (Radford et al. 2021), lowercase as SigLIP saw
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a rendering of a {}.",
    "itap of a {}.",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def _ranks(queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each query i: how many keys score higher than key i. int64 [N]."""
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]  # [c, D]
        scores = q @ keys.t()  # [c, N]
        right = scores.gather(1, torch.arange(start, start + q.shape[0], device=q.device)[:, None])  # [c, 1]
        out.append((scores > right).sum(1))
    return torch.cat(out)


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, ks=RECALL_KS,
                     chunk: int = CHUNK, prefix: str = "val/") -> dict[str, float]:
    """{prefix + "i2t_recall@k": ..., prefix + "t2i_recall@k": ...} of paired embeddings [N, D]."""
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(f"retrieval_recall needs paired embeddings [N, D], got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    metrics = {}
    for name, q, k in (("i2t", image_embeds, text_embeds), ("t2i", text_embeds, image_embeds)):
        ranks = _ranks(q.float(), k.float(), chunk)
        for top in ks:
            metrics[f"{prefix}{name}_recall@{top}"] = (ranks < top).float().mean().item()
    return metrics


def class_folders(folder) -> list[tuple[str, list[pathlib.Path]]]:
    """(class name, its image files) per subfolder of `folder`, sorted; underscores read as spaces."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--zero-shot {folder}: not a folder (expected one subfolder of images per class)")
    classes = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes.append((sub.name.replace("_", " "), files))
    if len(classes) < 2:
        raise ValueError(f"--zero-shot {folder}: needs at least two subfolders holding images (one per class), "
                         f"found {len(classes)}")
    return classes


@torch.no_grad()
def zero_shot_top1(model, processor, folder, *, device, autocast, templates=ZERO_SHOT_TEMPLATES,
                   batch_size: int = 64, max_num_patches: int | None = None) -> dict[str, float]:
    """{"zeroshot/top1": accuracy} over the readable images of a class-per-subfolder tree (an
    unreadable one is left out, not counted; none readable is an error); each class's text
    embedding is the normalized mean of its prompts' embeddings (CLIP's prompt ensemble).
    max_num_patches: the NaFlex budget the run trains with."""
    classes = class_folders(folder)
    weights = []
    for name, _ in classes:
        ids = processor(text=[t.format(name) for t in templates])["input_ids"].to(device)
        with autocast():
            emb = model.get_text_features(input_ids=ids).float()
        emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
        weights.append(emb / emb.norm())
    weights = torch.stack(weights)  # [K, D]
    files = [(label, path) for label, (_, paths) in enumerate(classes) for path in paths]
    correct = total = 0
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = processor.process_images([str(p) for _, p in chunk], skip_errors=True, num_workers=0,
                                         max_num_patches=max_num_patches)
        if batch.pixel_inputs is None:
            continue
        inputs = {k: v.to(device) for k, v in batch.pixel_inputs.items()}
        with autocast():
            emb = model.get_image_features(**inputs).float()
        pred = (emb @ weights.t()).argmax(1).cpu()
        correct += int((pred == torch.tensor([chunk[i][0] for i in batch.indices])).sum())
        total += len(batch.indices)
    if total == 0:
        raise ValueError(f"--zero-shot {folder}: none of its {len(files)} images could be read")
    return {"zeroshot/top1": correct / total}
