"""End-to-end encoding throughput: fastsiglip against transformers, same weights, same inputs.

    python bench/end_to_end.py [--presets siglip2-base-patch16-224 ...] [--batch 256]

For each preset: random weights built by fastsiglip, copied into transformers' model (the
parameter names are the same), then image and text encoding timed side by side in bf16, plus
torch.compile of the transformers model. NaFlex presets use a batch of mixed aspect ratios
(padding inside the patch budget), which is where packing pays. Writes
bench/results/end_to_end-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_args, peak_memory_mb, require_cuda, time_ms, write_results  # noqa: E402

from fastsiglip.benchmarks import transformers_twin  # noqa: E402 -- fastsiglip's weights in transformers' model

DEFAULT_PRESETS = ["siglip2-base-patch16-224", "siglip2-so400m-patch14-384", "siglip2-base-patch16-naflex"]


def image_inputs(cfg, batch, device, dtype, gen):
    v = cfg.vision
    if not v.naflex:
        return {"pixel_values": torch.randn(batch, 3, v.image_size, v.image_size, device=device, dtype=dtype, generator=gen)}
    n = v.num_patches
    # Mixed aspect ratios inside the patch budget, as the NaFlex processor produces them.
    shapes = [(h, max(1, n // h)) for h in torch.randint(4, v.position_grid * 2, (batch,), generator=gen).tolist()]
    shapes = [(min(h, n), min(w, n // min(h, n))) for h, w in shapes]
    mask = torch.zeros(batch, n, dtype=torch.int32)
    for i, (h, w) in enumerate(shapes):
        mask[i, : h * w] = 1
    return {
        "pixel_values": torch.randn(batch, n, 3 * v.patch_size**2, device=device, dtype=dtype, generator=gen),
        "pixel_attention_mask": mask.to(device),
        "spatial_shapes": torch.tensor(shapes, dtype=torch.int64, device=device),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--no-compile", action="store_true")
    args = parse_args(parser)
    require_cuda("bench/end_to_end.py")
    from fastsiglip.config import preset
    from fastsiglip.model import build

    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for name in args.presets:
        cfg = preset(name)
        with torch.device(device):
            ours = build(cfg).to(dtype).eval()
        hf = transformers_twin(ours, cfg).to(device, dtype).eval()
        imgs = image_inputs(cfg, args.batch, device, dtype, gen)
        ids = torch.randint(0, cfg.text.vocab_size, (args.batch, cfg.text.max_position_embeddings), device=device, generator=gen)
        impls = {"fastsiglip": ours, "transformers": hf}
        if not args.no_compile:
            impls["transformers+compile"] = torch.compile(hf)
        with torch.inference_mode():
            for tower, call in (("image", lambda m: m.get_image_features(**imgs)),
                                ("text", lambda m: m.get_text_features(input_ids=ids))):
                base = None
                for impl, m in impls.items():
                    ms = time_ms(lambda: call(m), warmup=5, rep=20)
                    base = base or ms
                    rows.append({"preset": name, "tower": tower, "impl": impl, "batch": args.batch,
                                 "ms": ms, "items_per_s": args.batch / ms * 1e3,
                                 "peak_mb": peak_memory_mb(lambda: call(m)),
                                 "fastsiglip_speedup": ms / base})  # how many times faster fastsiglip is
        del ours, hf, impls
        torch.cuda.empty_cache()
    write_results("end_to_end", rows, {"dtype": "bfloat16"}, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
