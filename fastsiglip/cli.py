"""The `fastsiglip` command: bench, classify, embed.

    fastsiglip bench --preset siglip2-base-patch16-224      # random weights, no download
    fastsiglip classify IMG... --labels cat dog [--model ID] [--json] [--max-num-patches N]
    fastsiglip embed DIR_OR_FILES... --out emb.safetensors [--model ID] [--batch-size N] [--resume]

classify exits 0 when every image was classified, 1 when some could not be read (listed on
stderr), 2 on an error that stopped the job (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DEFAULT_MODEL = "google/siglip2-base-patch16-224"


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:  # bf16 where the hardware has it, float32 on a CPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype {name!r} is not a torch dtype; use float32, bfloat16 or float16")
    return dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_image_inputs(config, batch: int, device, dtype) -> dict:
    """Pixel inputs the vision tower takes, at the preset's own resolution."""
    v = config.vision
    if not v.naflex:
        return {"pixel_values": torch.randn(batch, v.num_channels, v.image_size, v.image_size, device=device, dtype=dtype)}
    side = v.position_grid  # a square image that fills the preset's patch budget
    n = side * side
    return {
        "pixel_values": torch.randn(batch, n, v.num_channels * v.patch_size**2, device=device, dtype=dtype),
        "pixel_attention_mask": torch.ones(batch, n, dtype=torch.int32, device=device),
        "spatial_shapes": torch.tensor([[side, side]] * batch, dtype=torch.int64, device=device),
    }


def _throughput(fn, batch: int, iters: int, device) -> float:
    fn()  # warm-up (kernel compilation, allocator)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def cmd_bench(args) -> int:
    from . import config as config_lib
    from .model import build

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    if args.model:
        from .loading import load

        model = load(args.model, device=device, dtype=dtype)
        cfg = model.config
    else:
        cfg = config_lib.preset(args.preset)
        torch.manual_seed(0)
        with torch.device(device):
            model = build(cfg)
        model = model.to(dtype).eval()
    batch = args.batch_size or (256 if device.type == "cuda" else 8)
    print(f"{args.model or args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{device}, {dtype}, batch {batch}", flush=True)
    with torch.inference_mode():
        images = _random_image_inputs(cfg, batch, device, dtype)
        ids = torch.randint(0, cfg.text.vocab_size, (batch, cfg.text.max_position_embeddings), device=device)
        img_s = _throughput(lambda: model.get_image_features(**images), batch, args.iters, device)
        txt_s = _throughput(lambda: model.get_text_features(input_ids=ids), batch, args.iters, device)
    print(f"image encoding: {img_s:10.1f} images/s")
    print(f"text encoding:  {txt_s:10.1f} texts/s")
    return 0


def _load_for_job(args):
    from .loading import load

    device = _device(args.device)
    return load(args.model, device=device, dtype=None if args.dtype is None else _dtype(args.dtype, device))


def cmd_classify(args) -> int:
    """Exit status 0: every image classified; 1: some could not be read (listed on stderr and,
    with --json, as {"image", "error"} entries); 2: nothing done (bad arguments, model)."""
    from .api import classify

    model = _load_for_job(args)
    report = classify(model, args.images, args.labels, template=args.template, batch_size=args.batch_size,
                      max_num_patches=args.max_num_patches)
    errors = {str(image): error for image, error in report["failed"]}
    for image, error in errors.items():
        print(f"skipped {image}: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"image": str(img), "error": errors.get(str(img), "unreadable")} if res is None
                          else {"image": str(img), "results": res}
                          for img, res in zip(args.images, report["results"])], indent=2))
    else:
        for image, res in zip(args.images, report["results"]):
            if res is not None:
                print(image)
                for item in res:
                    print(f"  {item['score']:.4f}  {item['label']}")
    return 1 if report["failed"] else 0


def cmd_embed(args) -> int:
    from .api import embed_files

    model = _load_for_job(args)
    report = embed_files(model, args.inputs, args.out, batch_size=args.batch_size, resume=args.resume,
                         progress=not args.quiet, max_num_patches=args.max_num_patches)
    for path, error in report["failed"]:
        print(f"skipped {path}: {error}", file=sys.stderr)
    skipped = f" ({len(report['failed'])} skipped)" if report["failed"] else ""
    if report["new"] == 0:
        print(f"{args.out} is complete: {report['count']} embeddings, no new files{skipped}")
    else:
        print(f"wrote {report['count']} embeddings to {args.out}{skipped}")
    return 0


def _job_options(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id or checkpoint folder (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-num-patches", type=int, help="NaFlex checkpoints: patch budget per image "
                        "(default: the checkpoint's, usually 256)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as the checkpoint stores it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsiglip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="image and text encoding throughput")
    bench.add_argument("--preset", default="siglip2-base-patch16-224", help="architecture, random weights (default: %(default)s)")
    bench.add_argument("--model", help="a checkpoint (hub id or folder) instead of a preset")
    bench.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 8 on a CPU")
    bench.add_argument("--iters", type=int, default=3)
    bench.add_argument("--device", help="default: cuda if available, else cpu")
    bench.add_argument("--dtype", help="default: bfloat16 on a GPU, float32 on a CPU")
    bench.set_defaults(func=cmd_bench)

    classify = sub.add_parser("classify", help="zero-shot classification of images")
    classify.add_argument("images", nargs="+")
    classify.add_argument("--labels", nargs="+", required=True)
    classify.add_argument("--template", default="This is a photo of {}.")
    classify.add_argument("--json", action="store_true", help='print JSON: [{"image", "results": [{"score", '
                          '"label"}, ...]} or {"image", "error"}, ...] in the order of the images')
    _job_options(classify)
    classify.set_defaults(func=cmd_classify)

    embed = sub.add_parser("embed", help="L2-normalized image embeddings of files or folders")
    embed.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    embed.add_argument("--out", required=True, help="output file: .safetensors or .npy (+ .npy.json)")
    embed.add_argument("--resume", action="store_true", help="continue an interrupted run, or add new files "
                       "to a finished output (same checkpoint and settings only)")
    embed.add_argument("--quiet", action="store_true", help="no progress line")
    _job_options(embed)
    embed.set_defaults(func=cmd_embed)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for option in ("batch_size", "max_num_patches"):
        if getattr(args, option, None) is not None and getattr(args, option) < 1:
            print(f"fastsiglip {args.command}: error: --{option.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"fastsiglip {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
