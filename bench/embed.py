"""End-to-end `fastsiglip embed` throughput: JPEG files on disk -> embeddings on disk, per number
of decoding workers, beside the model-only rate, so one can see which side is the bottleneck.

    python bench/embed.py                          # 256 640x480 JPEGs, workers 0 1 2 4 8 16
    python bench/embed.py --tiny --workers 0 2     # a 2-layer, 64-wide vision tower: the decode side alone
    python bench/embed.py --preset siglip2-base-patch16-224 --device cuda --dtype bfloat16
    python bench/embed.py --decode exact draft      # also Pillow's JPEG draft mode (gpu: nvjpeg, on CUDA)
    python bench/embed.py --photos tests/data/photos --images 448   # real photos, each used in turn

Random weights (no download); the images are synthetic photo-like JPEGs (smooth gradients plus
noise, quality 90) or, with --photos, copies of the JPEGs of a folder taken in turn, written
once to a temporary folder. Each run's embeddings are compared with
the first run of the same decode mode: they must be bit-identical whatever the workers and
however often it runs (--repeat: each configuration N times, interleaved, the median reported); draft
rows also give the cosine similarity to the exact embeddings (random weights: indicative only,
a trained model on real photos is the real test). Numbers depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import fastsiglip
from fastsiglip import api, config as config_lib
from fastsiglip.model import build
from fastsiglip.processing import ImageProcessor, Processor


def make_photos(folder: pathlib.Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """`count` JPEGs of `size` (width, height): gradients and blobs plus noise, so the JPEG decoder
    does about the work a real photo takes (flat or pure-noise images would be far off)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        channels = []
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.3)]
            wave = np.sin(x / w * fx * 6.28 + phase) * np.cos(y / h * fy * 6.28)
            channels.append(127 + 90 * wave + rng.normal(0, 12, (h, w)))
        pixels = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def copy_photos(source: pathlib.Path, folder: pathlib.Path, count: int) -> None:
    """`count` files: the JPEGs of `source` (sorted), each copied in turn under a new name."""
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not photos:
        raise SystemExit(f"--photos {source}: no .jpg / .jpeg files there")
    for i in range(count):
        photo = photos[i % len(photos)]
        (folder / f"{i:06d}-{photo.name}").write_bytes(photo.read_bytes())


def bench_model(args, device, dtype) -> tuple[torch.nn.Module, Processor]:
    cfg = config_lib.preset(args.preset)
    if args.tiny:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, hidden_size=64, intermediate_size=128,
                                                                   num_hidden_layers=2, num_attention_heads=2))
    torch.manual_seed(0)
    with torch.device(device):
        model = build(cfg)
    size = cfg.vision.image_size
    return model.to(dtype).eval(), Processor(None, ImageProcessor(size=(size, size)))


def model_rate(model, batch: int, size: int, device, iters: int = 3) -> float:
    """Images/s of get_image_features alone on random pixels (the ceiling the pipeline feeds)."""
    param = next(model.parameters())
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=param.dtype)
    with torch.inference_mode():
        model.get_image_features(pixel_values=pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            model.get_image_features(pixel_values=pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return batch * iters / (time.perf_counter() - start)


def unavailable_modes(modes, device) -> dict[str, str]:
    """Decode modes this machine cannot run, with why."""
    if "gpu" not in modes:
        return {}
    if device.type != "cuda":
        return {"gpu": "--decode gpu needs the model on CUDA"}
    from fastsiglip import gpu_decode

    try:
        gpu_decode.torchvision_decoder(device)
    except ImportError as e:
        return {"gpu": str(e)}
    return {}


def report_row(args, decode, workers, seconds, same, emb, first, rows) -> dict:
    """The row of one configuration (median of its runs), printed."""
    median = statistics.median(seconds)
    row = {"decode": decode, "workers": workers, "images_per_s": args.images / median, "seconds": median,
           "seconds_each": seconds, "bit_identical_to_first": same}
    extra = ""
    if decode != "exact" and "exact" in first:
        cosine = (emb * first["exact"]).sum(-1)
        row.update(cosine_min=cosine.min().item(), cosine_mean=cosine.mean().item())
        extra = f"; cosine to exact: min {row['cosine_min']:.5f}, mean {row['cosine_mean']:.5f}"
    speedup = row["images_per_s"] / (rows[0] if rows else row)["images_per_s"]
    print(f"{decode:5s} workers {workers:2d}: {row['images_per_s']:10.1f} images/s end to end  "
          f"({speedup:.2f}x the first row; embeddings {'identical' if same else 'DIFFER'}{extra})", flush=True)
    return row


def write_json(args, device, ceiling, rows) -> None:
    if not args.json:
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    pathlib.Path(args.json).write_text(json.dumps({
        "device": str(device), "device_name": name, "torch": torch.__version__, "preset": args.preset,
        "tiny": args.tiny, "images": args.images, "photos": str(args.photos) if args.photos else None,
        "batch_size": args.batch_size, "model_images_per_s": ceiling, "rows": rows}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEGs (default: %(default)s)")
    parser.add_argument("--photos", type=pathlib.Path, help="use the JPEGs of this folder (each in turn) instead "
                        "of synthetic ones")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    parser.add_argument("--decode", nargs="+", default=["exact"], choices=api.DECODE_MODES)
    parser.add_argument("--preset", default="siglip2-base-patch16-224")
    parser.add_argument("--tiny", action="store_true", help="shrink the preset's vision tower to 2 layers of 64: "
                        "measures the decoding pipeline, not the model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--threads", type=int, help="torch threads of the main (encoding) process (default: "
                        "torch's); on a small CPU machine 1 leaves the other cores to the decoding workers")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration, interleaved; the median "
                        "is reported (default: %(default)s)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    width, height = (int(v) for v in args.size.lower().split("x"))
    model, processor = bench_model(args, device, dtype)
    size = processor.image_processor.size[0]
    rows, first, identical = [], {}, {}
    skipped = unavailable_modes(args.decode, device)
    with tempfile.TemporaryDirectory(prefix="fastsiglip-bench-embed-") as tmp:
        folder = pathlib.Path(tmp) / "photos"
        folder.mkdir()
        if args.photos:
            copy_photos(args.photos, folder, args.images)
        else:
            make_photos(folder, args.images, (width, height))
        ceiling = model_rate(model, args.batch_size, size, device)
        what = f"photos of {args.photos}" if args.photos else f"JPEGs {width}x{height}"
        print(f"{args.preset}{' (tiny vision tower)' if args.tiny else ''}, {device}, {str(dtype)[6:]}, "
              f"{torch.get_num_threads()} torch threads, batch {args.batch_size}, {args.images} {what}, "
              f"fastsiglip {fastsiglip.__version__}")
        print(f"model only: {ceiling:10.1f} images/s")
        configs = [(d, w) for d in args.decode if d not in skipped for w in args.workers]
        for decode, why in skipped.items():
            print(f"{decode:5s} skipped: {why}")
        seconds = {c: [] for c in configs}
        for repeat in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every config
            for decode, workers in configs:
                out = pathlib.Path(tmp) / f"{decode}-w{workers}.safetensors"
                start = time.perf_counter()
                api.embed_files(model, folder, out, batch_size=args.batch_size, workers=workers, progress=False,
                                processor=processor, overwrite=True, decode=decode)
                seconds[decode, workers].append(time.perf_counter() - start)
                emb = load_file(str(out))["embeddings"]
                same = bool(torch.equal(emb, first.setdefault(decode, emb)))
                identical[decode, workers] = identical.get((decode, workers), True) and same
                if repeat == args.repeat - 1:  # its last run: the row is complete (a cut run keeps what finished)
                    rows.append(report_row(args, decode, workers, seconds[decode, workers], identical[decode, workers],
                                           emb, first, rows))
                    write_json(args, device, ceiling, rows)
    return 0 if all(r["bit_identical_to_first"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
