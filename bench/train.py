"""Training-step throughput and memory: fastsiglip's exact large-batch step against transformers.

    python bench/train.py [--presets siglip2-base-patch16-224 siglip2-so400m-patch14-224]
                          [--batches 4096 16384 32768] [--micro 256] [--iters 1]
    python bench/train.py --tiny --device cpu --out-dir /tmp/bench   # a smoke test of the script

For each preset (random weights, float32 master weights, bf16 autocast, fused AdamW):
  * fastsiglip: one optimizer step at each global batch, micro-batched (fastsiglip.train.step:
    pass 1 without autograd, one chunked sigmoid loss, pass 2 re-encoding) -> pairs/s and the
    peak memory of the step;
  * transformers: SiglipModel with the same weights and its own loss (return_loss=True, the full
    B x B logits) at the largest batch that fits (doubling from 64 until out of memory);
  * the largest global batch per GPU without micro-batching (micro = batch) and with it (micro
    fixed, the batch doubled until out of memory or --max-batch).
The inputs are random compact batches (uint8 pixels, token ids), as the data loader gives them;
the same micro-batch tensors are reused to keep host memory flat, which does not change the
work. A step of So400m/14 at 32k pairs is about 4 forward passes of 32k images and texts: on one
H100-class GPU expect minutes per step; pick --iters 1 and the batches you need.
Writes bench/results/train-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_slug, parse_args, write_results  # noqa: E402

from fastsiglip import config as config_lib  # noqa: E402
from fastsiglip.benchmarks import sync, transformers_twin  # noqa: E402
from fastsiglip.data import PixelCodec  # noqa: E402
from fastsiglip.model import build  # noqa: E402
from fastsiglip.processing import ImageProcessor  # noqa: E402
from fastsiglip.train.step import ExactStep, Towers  # noqa: E402

DEFAULT_PRESETS = ["siglip2-base-patch16-224", "siglip2-so400m-patch14-224"]
DEFAULT_BATCHES = [4096, 16384, 32768]


def tiny_config():
    """A few-layer model for checking the script on a CPU (no numbers worth keeping)."""
    vision = config_lib.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, patch_size=8, image_size=32)
    text = config_lib.TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 vocab_size=300, max_position_embeddings=16)
    return config_lib.ModelConfig(model_type="siglip", architecture="SiglipModel", vision=vision, text=text)


def compact_micro(cfg, micro: int, gen) -> dict:
    """One micro-batch as the loader yields it: uint8 pixels [m, 3, H, W], int64 token ids."""
    size = cfg.vision.image_size
    pixels = torch.randint(0, 256, (micro, 3, size, size), dtype=torch.uint8, generator=gen)
    ids = torch.randint(0, cfg.text.vocab_size, (micro, cfg.text.max_position_embeddings), generator=gen)
    if torch.cuda.is_available():
        pixels, ids = pixels.pin_memory(), ids.pin_memory()
    return {"pixels": pixels, "input_ids": ids}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def fastsiglip_step(model, cfg, batch: int, micro: int, device, autocast):
    """A closure running one exact training step (gradients + fused AdamW update)."""
    codec = PixelCodec(ImageProcessor(size=(cfg.vision.image_size,) * 2))
    gen = torch.Generator().manual_seed(0)
    one = compact_micro(cfg, micro, gen)
    micros = [one] * (batch // micro)

    def to_inputs(m):
        return codec.to_model(m, device), m["input_ids"].to(device, non_blocking=True)

    exact = ExactStep(Towers(model), to_inputs, device=device, autocast=autocast)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda" or None)

    def step():
        opt.zero_grad(set_to_none=True)
        exact(micros)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def transformers_step(hf, cfg, batch: int, device, autocast):
    gen = torch.Generator().manual_seed(0)
    one = compact_micro(cfg, batch, gen)
    pixels = (one["pixels"].to(device).float() / 127.5 - 1.0)
    ids = one["input_ids"].to(device)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=device.type == "cuda" or None)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = hf(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()

    return step


def measure(make_step, device, iters: int, model) -> dict:
    """{"ms", "peak_mb"} of one step (after one warm-up step), or {"oom": True}. The model's
    gradients are dropped afterwards, so that a step that ran out of memory leaves none behind."""
    step = None
    try:
        step = make_step()
        step()  # warm-up: kernel compilation, optimizer state
        peak_reset(device)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        ms = (time.perf_counter() - start) / iters * 1e3 if iters else None
        return {"ms": ms, "peak_mb": peak_mb(device)}
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        return {"oom": True}
    finally:
        del step
        model.zero_grad(set_to_none=True)
        free(device)


def largest_batch(make_step, device, start: int, limit: int, model) -> int | None:
    """The largest power-of-two multiple of `start` (<= limit) whose step runs; None if none.
    Each probe runs one full step: bound the search with --max-batch on big models."""
    best, batch = None, start
    while batch <= limit:
        if measure(lambda b=batch: make_step(b), device, 0, model).get("oom"):
            break
        best, batch = batch, batch * 2
    return best


def bench_preset(name, cfg, args, device, autocast, log) -> list[dict]:
    torch.manual_seed(0)
    with torch.device(device):
        model = build(cfg)
    model.train()
    rows = []
    for batch in args.batches:
        micro = min(args.micro, batch)
        r = measure(lambda: fastsiglip_step(model, cfg, batch, micro, device, autocast), device, args.iters, model)
        rows.append({"model": name, "impl": "fastsiglip", "batch": batch, "micro": micro, **_rate(r, batch)})
        log(rows[-1])
    no_micro = largest_batch(lambda b: fastsiglip_step(model, cfg, b, b, device, autocast), device, args.start,
                             args.max_batch, model)
    with_micro = largest_batch(lambda b: fastsiglip_step(model, cfg, b, min(args.micro, b), device, autocast),
                               device, args.micro, args.max_batch, model)
    rows.append({"model": name, "impl": "fastsiglip", "max_batch_no_micro": no_micro,
                 "max_batch_micro": with_micro, "micro": args.micro, "max_batch_limit": args.max_batch})
    log(rows[-1])
    hf = transformers_twin(model, cfg)
    if isinstance(hf, str):
        rows.append({"model": name, "impl": "transformers", "skipped": hf})
    else:
        hf.train()
        fits = largest_batch(lambda b: transformers_step(hf, cfg, b, device, autocast), device, args.start,
                             args.max_batch, hf)
        if fits is None:
            rows.append({"model": name, "impl": "transformers", "batch": None, "oom": True})
        else:
            r = measure(lambda: transformers_step(hf, cfg, fits, device, autocast), device, args.iters, hf)
            rows.append({"model": name, "impl": "transformers", "batch": fits, "micro": fits, **_rate(r, fits)})
        del hf
    log(rows[-1])
    del model
    free(device)
    return rows


def _rate(r: dict, batch: int) -> dict:
    if r.get("oom"):
        return {"oom": True}
    return {"ms": round(r["ms"], 1), "pairs_per_s": round(batch / r["ms"] * 1e3, 1), "peak_mb": r["peak_mb"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--batches", nargs="+", type=int, default=DEFAULT_BATCHES, help="global batches to time")
    parser.add_argument("--micro", type=int, default=256, help="micro-batch size of the micro-batched steps")
    parser.add_argument("--iters", type=int, default=1, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--start", type=int, default=64, help="first batch of the largest-batch searches")
    parser.add_argument("--max-batch", type=int, default=65536, help="stop the largest-batch searches here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the presets (script check)")
    args = parse_args(parser)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/train.py: no CUDA device; for a smoke test run it with --tiny --device cpu")
    dtype_note = "bf16 autocast" if device.type == "cuda" else "fp32 (CPU)"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    models = [("tiny", tiny_config())] if args.tiny else [(n, config_lib.preset(n)) for n in args.presets]
    rows = []
    for name, cfg in models:
        rows += bench_preset(name, cfg, args, device, autocast, log=lambda r: print(r, flush=True))
    out = write_results("train", rows, {"precision": dtype_note, "device_slug": device_slug(),
                                        "note": "one optimizer step; peak_mb = max allocated during the step"},
                        out_dir=args.out_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
