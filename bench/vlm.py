"""The SigLIP vision towers of VLMs: fastsiglip.patch against transformers, forward and
forward + backward, side by side.

    python bench/vlm.py [--towers so400m-224 so400m-448 so400m-896 smolvlm-512] [--batch N]
                        [--dtype bf16] [--layers N] [--forward-only] [--rep N]

Towers (random weights, transformers' classes built from configs):
- so400m-<size>: PaliGemma 2 / Gemma 3's tower, SigLIP So400m/14 (SiglipVisionModel, hidden
  1152, 27 layers, head dim 72) at 224, 448 and 896 pixels (256, 1024, 4096 tokens);
- smolvlm-512: SmolVLM / Idefics3's tower (Idefics3VisionTransformer, SigLIP B/16 at 512: 1024
  tokens), a batch of tiles of which every other one is half padding (patch_attention_mask).
Implementations, same weights and inputs: transformers with attn_implementation "sdpa" and
"flash_attention_2" (when flash-attn is installed), transformers with Liger-Kernel's LayerNorm
in the tower (what its PaliGemma / Gemma 3 / SmolVLM patches swap in; when liger-kernel is
installed), and fastsiglip.patch of the sdpa model. Every ratio is against transformers sdpa.

On a CPU this times the reference path (fastsiglip's pure-PyTorch ops), and the rows say so:
use --layers 2 --batch 2 there. Floors (FLOPs and bytes over the ceilings measured here) come
with the GPU rows. Writes bench/results/vlm-<device>.json and .md, again after each tower (a
run cut short keeps the towers it finished).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, device_slug, parse_args, write_results  # noqa: E402

import fastsiglip  # noqa: E402
from fastsiglip import benchmarks  # noqa: E402

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
BASE16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)
# pytest-benchmark's entries (bench/test_vlm.py): (tower, batch) x implementation x pass
BENCH_CASES = [("so400m-224", 32), ("so400m-448", 8), ("smolvlm-512", 8)]
BENCH_IMPLEMENTATIONS = ["transformers sdpa", "fastsiglip.patch"]
BENCH_PASSES = ["fwd", "fwd+bwd"]
TOWERS = {"so400m-224": ("siglip", SO400M, 224), "so400m-448": ("siglip", SO400M, 448),
          "so400m-896": ("siglip", SO400M, 896), "smolvlm-512": ("idefics3", BASE16, 512)}
DEFAULT_BATCH = {224: 64, 448: 16, 512: 16, 896: 4}


def build_tower(name: str, attn: str = "sdpa", layers: int | None = None):
    """transformers' tower for `name` (random weights, eval mode) and its kind and image size."""
    import transformers

    kind, sizes, image = TOWERS[name]
    sizes = dict(sizes, num_hidden_layers=layers or sizes["num_hidden_layers"], image_size=image)
    if kind == "idefics3":
        config = transformers.Idefics3VisionConfig(**sizes)
        config._attn_implementation = attn
        model = transformers.models.idefics3.modeling_idefics3.Idefics3VisionTransformer(config)
    else:
        config = transformers.SiglipVisionConfig(**sizes, vision_use_head=False)  # PaliGemma / Gemma 3 use no head
        config._attn_implementation = attn
        model = transformers.SiglipVisionModel(config)
    return model.eval(), kind, image


def tower_inputs(kind: str, image: int, batch: int, device, dtype, seed: int = 0) -> dict:
    gen = torch.Generator(device).manual_seed(seed)
    pixels = torch.randn(batch, 3, image, image, device=device, dtype=dtype, generator=gen)
    if kind != "idefics3":
        return {"pixel_values": pixels}
    patch = TOWERS["smolvlm-512"][1]["patch_size"]
    mask = torch.ones(batch, image // patch, image // patch, dtype=torch.bool, device=device)
    mask[1::2, :, image // patch // 2:] = False  # every other tile: its right half is padding
    return {"pixel_values": pixels, "patch_attention_mask": mask}


def with_liger(model):
    """The tower with Liger-Kernel's LayerNorm in place of every nn.LayerNorm (as its VLM patches
    do), or why not."""
    cls = benchmarks.optional_peer("liger_kernel.transformers", "LigerLayerNorm")
    if isinstance(cls, str):
        return cls
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.LayerNorm:
                new = cls(child.normalized_shape[0], eps=child.eps).to(child.weight.device, child.weight.dtype)
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
    return model


def implementations(name: str, device, dtype, layers=None) -> dict:
    """{implementation: model or the reason it is unavailable}, all with the same weights."""
    import transformers

    sdpa, kind, image = build_tower(name, "sdpa", layers)
    sdpa = sdpa.to(device, dtype)
    found = {"transformers sdpa": sdpa}
    if transformers.utils.is_flash_attn_2_available() and device.type == "cuda":
        flash, _, _ = build_tower(name, "flash_attention_2", layers)
        flash.load_state_dict(sdpa.state_dict())
        found["transformers flash_attention_2"] = flash.to(device, dtype)
    else:
        found["transformers flash_attention_2"] = "flash-attn not installed (or no CUDA)"
    found["transformers + Liger LayerNorm"] = with_liger(sdpa) if device.type == "cuda" else "Liger needs CUDA"
    found["fastsiglip.patch"] = fastsiglip.patch(copy.deepcopy(sdpa))
    return found, kind, image


def tower_flops_and_bytes(name: str, batch: int, dtype, layers=None) -> tuple[float, float]:
    """Forward FLOPs (the GEMMs and attention's two products, every query of every image) and the
    minimum bytes (weights read once, the hidden states in and out of each layer)."""
    _, sizes, image = TOWERS[name]
    c, i, n_layers = sizes["hidden_size"], sizes["intermediate_size"], layers or sizes["num_hidden_layers"]
    tokens = (image // sizes["patch_size"]) ** 2
    per_token = 2 * (4 * c * c + 2 * c * i) + 2 * 2 * tokens * c
    flops = n_layers * batch * tokens * per_token
    size = torch.finfo(dtype).bits // 8
    nbytes = size * n_layers * (4 * c * c + 2 * c * i + 2 * batch * tokens * c)
    return float(flops), float(nbytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--towers", nargs="+", default=list(TOWERS), choices=list(TOWERS))
    parser.add_argument("--batch", type=int, help="images per batch (default: by size, 64 at 224 to 4 at 896)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--layers", type=int, help="fewer encoder layers (a quick run, e.g. on a CPU)")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--rep", type=int, default=20, help="CUDA: milliseconds of timing (do_bench); CPU: a tenth as many calls")
    args = parse_args(parser)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    path = "kernels" if device.type == "cuda" else "CPU reference path"
    ceilings = benchmarks.measure_ceilings(dtype, device) if device.type == "cuda" else None
    rows = []
    for name in args.towers:
        found, kind, image = implementations(name, device, dtype, args.layers)
        batch = args.batch or (DEFAULT_BATCH[image] if device.type == "cuda" else 2)
        x = tower_inputs(kind, image, batch, device, dtype)
        flops, nbytes = tower_flops_and_bytes(name, batch, dtype, args.layers)
        for pass_ in ("fwd",) if args.forward_only else ("fwd", "fwd+bwd"):
            base = None
            for impl, model in found.items():
                if isinstance(model, str):
                    rows.append({"tower": name, "pass": pass_, "impl": impl, "skipped": model})
                    continue

                def step(model=model, pass_=pass_):
                    if pass_ == "fwd":
                        with torch.no_grad():
                            return model(**x).last_hidden_state
                    model.zero_grad(set_to_none=True)
                    model(**x).last_hidden_state.float().square().mean().backward()

                ms = benchmarks.time_ms(step, device, warmup=3, rep=args.rep)
                base = base or ms
                row = {"tower": name, "pass": pass_, "impl": impl, "path": path, "batch": batch,
                       "layers": args.layers or TOWERS[name][1]["num_hidden_layers"], "ms": ms,
                       "images_per_s": batch / ms * 1e3, "speedup_vs_sdpa": base / ms}
                if ceilings is not None:
                    mult = 3 if pass_ == "fwd+bwd" else 1
                    row["floor_ms"] = benchmarks.floor_ms(mult * flops, mult * nbytes, ceilings)
                rows.append(row)
                print(row, flush=True)
        del found
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_results("vlm", rows, {"dtype": str(dtype).removeprefix("torch."), "path": path,
                                    "device_slug": device_slug()}, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
