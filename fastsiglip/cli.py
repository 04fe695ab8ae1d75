"""The `fastsiglip` command: bench, classify, embed, embed-text, train.

    fastsiglip bench --preset siglip2-base-patch16-224      # random weights, no download (= bench model)
    fastsiglip bench kernels [--op attention|mlp|layer_norm|loss] [--plot x.png]   # vs the peers installed
    fastsiglip bench loss --batch 65536
    fastsiglip classify IMG... --labels cat dog [--model ID] [--json] [--max-num-patches N]
    fastsiglip embed INPUTS... --out emb.safetensors [--model ID] [--batch-size N] [--workers N] [--resume|--overwrite]
        # INPUTS: images, folders, file lists (.txt), manifests (.csv/.tsv/.jsonl, --image-column), .tar shards
    fastsiglip embed-text texts.txt|.jsonl|.csv|.tsv --out emb.safetensors [--column text] [--id-column id]
    torchrun --nproc-per-node N -m fastsiglip embed ... --out emb.safetensors   # N shards + emb.safetensors.index.json
    fastsiglip train --model ID --train pairs.csv --out runs/a --batch-size 4096 --micro-batch-size 256 --steps 1000

Exit status (main): 0 done; 1 done in part (classify: some images unreadable; embed: some inputs
skipped, listed on stderr, the output holds the rest); 2 an error stopped the command (one line
on stderr; --debug or FASTSIGLIP_DEBUG=1 adds the traceback), e.g. an existing output without
--resume (add what it lacks) or --overwrite (start over); 130 / 143 on Ctrl-C / SIGTERM, after
keeping what was finished (embed: OUT.partial/, train: a resume checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import traceback

import torch

DEFAULT_MODEL = "google/siglip2-base-patch16-224"
WORKER_TRACEBACK = "Original Traceback (most recent call last):"  # torch.utils.data's ExceptionWrapper


class _Parser(argparse.ArgumentParser):
    """argparse's parser with one-line errors (`fastsiglip embed: error: ...`, exit 2), as every
    other error of the command, instead of a usage block first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


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
    from .benchmarks import sync

    fn()  # warm-up (kernel compilation, allocator)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return batch * iters / (time.perf_counter() - start)


def _bench_model(args, device, dtype):
    """(model, config, label) for `bench model`: a checkpoint, or a preset with random weights."""
    from . import config as config_lib
    from .model import build

    if args.model:
        from .loading import load

        model = load(args.model, device=device, dtype=dtype)
        return model, model.config, args.model
    cfg = config_lib.preset(args.preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = build(cfg)
    return model.to(dtype).eval(), cfg, args.preset


def cmd_bench(args) -> int:
    """`fastsiglip bench [model] ...`: image and text encoding throughput of one model."""
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    model, cfg, name = _bench_model(args, device, dtype)
    batch = args.batch_size or (256 if device.type == "cuda" else 8)
    path = "" if device.type == "cuda" else " (CPU: the reference path, not the Triton kernels)"
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{device}, {dtype}, batch {batch}{path}", flush=True)
    runs = {"fastsiglip": model}
    if args.compile:
        runs["fastsiglip + torch.compile"] = torch.compile(model)
    with torch.inference_mode():
        images = _random_image_inputs(cfg, batch, device, dtype)
        ids = torch.randint(0, cfg.text.vocab_size, (batch, cfg.text.max_position_embeddings), device=device)
        for label, m in runs.items():
            img_s = _throughput(lambda: m.get_image_features(**images), batch, args.iters, device)
            txt_s = _throughput(lambda: m.get_text_features(input_ids=ids), batch, args.iters, device)
            suffix = "" if label == "fastsiglip" else f" [{label}]"
            print(f"image encoding: {img_s:10.1f} images/s{suffix}")
            print(f"text encoding:  {txt_s:10.1f} texts/s{suffix}")
    if args.plot or args.compare:
        from . import benchmarks

        sizes = (args.plot_batches or ([32, 64, 128, 256] if device.type == "cuda" else [1, 2, 4, 8])) \
            if args.plot else [batch]
        rows = benchmarks.model_sweep(model, cfg, sizes, device, dtype, _random_image_inputs, compile=args.compile,
                                      iters=args.iters)
        print(benchmarks.table(rows, value="items_per_s"))
        if args.plot:
            benchmarks.plot(rows, args.plot, f"{name} image encoding, {device}, {str(dtype).removeprefix('torch.')}"
                            + path, y="items_per_s")
            print(f"wrote {args.plot}")
    return 0


def cmd_bench_kernels(args) -> int:
    """`fastsiglip bench kernels|loss`: each op against the implementations found installed."""
    from . import benchmarks

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    ops = [args.op] if getattr(args, "op", None) else list(benchmarks.OPS)
    if args.command_bench == "loss":
        ops = ["loss"]
    if device.type != "cuda":
        print("no CUDA device: timing the reference path on the CPU (not the Triton kernels), small shapes")
    ceilings = benchmarks.measure_ceilings(dtype, device)
    print(f"ceilings: {ceilings['matmul_tflops']:.3g} TFLOP/s matmul, {ceilings['copy_gbps']:.3g} GB/s copy "
          f"({device}, {str(dtype).removeprefix('torch.')})")
    rows = []
    for op in ops:
        got = benchmarks.measure(op, device, dtype, backward=not args.forward_only, only=args.impl,
                                 batch=getattr(args, "batch", None), ceilings=ceilings,
                                 rep=args.rep, log=(lambda *_: None) if args.quiet else print)
        print(f"\n{op} ({'fwd' if args.forward_only else 'fwd+bwd'}, {str(dtype).removeprefix('torch.')}):")
        print(benchmarks.table(got))
        rows += got
    if args.json:
        import pathlib

        pathlib.Path(args.json).write_text(json.dumps({"device": str(device), "ceilings": ceilings, "rows": rows},
                                                      indent=1))
    if args.plot:
        where = str(device) if device.type == "cuda" else "cpu, reference path"
        benchmarks.plot(rows, args.plot, f"{', '.join(ops)}: time per {'forward' if args.forward_only else 'training step'}"
                        f" ({where}, {str(dtype).removeprefix('torch.')})")
        print(f"wrote {args.plot}")
    return 0


BENCH_COMMANDS = ("model", "kernels", "loss")


def _bench_argv(argv):
    """`fastsiglip bench --preset ...` (no subcommand) keeps meaning `fastsiglip bench model ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in (*BENCH_COMMANDS, "-h", "--help")):
        argv.insert(1, "model")
    return argv


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: model (encoding throughput; the default), kernels, loss",
                           description="fastsiglip bench [model] --preset NAME | bench kernels [--op OP] | "
                           "bench loss --batch N. Without a subcommand: model.")
    kinds = bench.add_subparsers(dest="command_bench", required=True)

    def common(p, dtype_help):
        p.add_argument("--device", help="default: cuda if available, else cpu")
        p.add_argument("--dtype", help=dtype_help)
        p.add_argument("--plot", metavar="FILE.png", help="draw the results (needs matplotlib: "
                       "pip install 'fastsiglip[plot]')")

    model = kinds.add_parser("model", help="image and text encoding throughput of one model")
    model.add_argument("--preset", default="siglip2-base-patch16-224", help="architecture, random weights (default: %(default)s)")
    model.add_argument("--model", help="a checkpoint (hub id or folder) instead of a preset")
    model.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 8 on a CPU")
    model.add_argument("--iters", type=int, default=3)
    model.add_argument("--compile", action="store_true", help="also time torch.compile of the model")
    model.add_argument("--compare", action="store_true", help="also time transformers' model with the same "
                       "weights (when installed) and print the ratios")
    model.add_argument("--plot-batches", type=int, nargs="+", help="batch sizes of the --plot sweep "
                       "(default: 32 64 128 256 on a GPU, 1 2 4 8 on a CPU)")
    common(model, "default: bfloat16 on a GPU, float32 on a CPU")
    model.set_defaults(func=cmd_bench)

    for kind in ("kernels", "loss"):
        p = kinds.add_parser(kind, help="each kernel against eager, torch.compile and the peers installed"
                             if kind == "kernels" else "the sigmoid loss against its peers (forward + backward)")
        if kind == "kernels":
            p.add_argument("--op", choices=["attention", "mlp", "layer_norm", "loss"], help="default: all")
        else:
            p.add_argument("--batch", type=int, help="the batch size B (default: 4096 16384 65536 on a GPU)")
        p.add_argument("--impl", nargs="+", help="only these implementations (e.g. fastsiglip eager)")
        p.add_argument("--forward-only", action="store_true", help="time the forward pass only")
        p.add_argument("--rep", type=int, default=50, help="timing repetitions (default: %(default)s)")
        p.add_argument("--json", help="write the rows to this file")
        p.add_argument("--quiet", action="store_true", help="only the tables")
        common(p, "default: bfloat16 on a GPU, float32 on a CPU")
        p.set_defaults(func=cmd_bench_kernels)


def _load_for_job(args):
    from .loading import load

    device = _device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU a process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return load(args.model, device=device, dtype=None if args.dtype is None else _dtype(args.dtype, device))


def cmd_classify(args) -> int:
    """Exit status 0: every image classified; 1: some could not be read (listed on stderr and,
    with --json, as {"image", "error"} entries); 2: nothing done (bad arguments, model)."""
    from .api import check_template, classify

    check_template(args.template)  # before the model loads: bad arguments fail at once
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
    from .api import check_output, embed_files

    check_output(args.out, resume=args.resume, overwrite=args.overwrite)  # before the model loads
    model = _load_for_job(args)
    report = embed_files(model, args.inputs, args.out, batch_size=args.batch_size, resume=args.resume,
                         overwrite=args.overwrite, progress=not args.quiet, max_num_patches=args.max_num_patches,
                         workers=args.workers, image_column=args.image_column, decode=args.decode,
                         shard_size=args.shard_size)
    return _embed_report(args, report, "files")


def _embed_report(args, report, what) -> int:
    for key, error in report["failed"]:
        print(f"skipped {key}: {error}", file=sys.stderr)
    skipped = f" ({len(report['failed'])} skipped)" if report["failed"] else ""
    shards = report.get("shards") or [args.out]  # torchrun / --shard-size: this rank's files
    target = shards[0] if len(shards) == 1 else f"{len(shards)} files ({shards[0]} .. {shards[-1]})"
    if report.get("index"):
        target += f", index {report['index']}"
    if report["new"] == 0:
        print(f"{target} is complete: {report['count']} embeddings, no new {what}{skipped}")
    else:
        print(f"wrote {report['count']} embeddings to {target}{skipped}")
    return 1 if report["failed"] else 0  # done in part: the skipped inputs are listed above


def cmd_embed_text(args) -> int:
    from .api import check_output, embed_texts

    check_output(args.out, resume=args.resume, overwrite=args.overwrite)
    model = _load_for_job(args)
    report = embed_texts(model, args.input, args.out, column=args.column, id_column=args.id_column,
                         batch_size=args.batch_size, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.quiet, shard_size=args.shard_size)
    return _embed_report(args, report, "texts")


def cmd_train(args) -> int:
    """Exit status 0: trained to --steps and exported; 128 + signal number: stopped by SIGTERM /
    SIGINT after saving a resume checkpoint; 2: an error stopped the job."""
    from .train import finetune

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "model", "quiet", "debug")}
    result = finetune(args.model, progress=not args.quiet, **options)
    if result["interrupted"]:
        return 128 + result["signal"]
    if result["final"] is not None:  # rank 0 (under torchrun the other ranks write nothing)
        print(f"trained {result['step']} steps; final model in {result['final']}")
    return 0


def _train_parser(sub) -> None:
    train = sub.add_parser("train", help="contrastive fine-tuning on image-text pairs (exact large batches, "
                           "torchrun for several GPUs)", description="Contrastive fine-tuning with the sigmoid loss. "
                           "Several GPUs or machines: torchrun --nproc-per-node N -m fastsiglip train ...")
    train.add_argument("--model", required=True, help="hub id or checkpoint folder to start from")
    train.add_argument("--train", required=True, help="manifest (.csv, .tsv, .jsonl with image and text columns), "
                       "a folder of WebDataset .tar shards, or a brace pattern such as shards/train-{000..099}.tar")
    train.add_argument("--val", help="validation pairs, same formats: recall@1/5/10 both ways")
    train.add_argument("--out", required=True, help="output folder: metrics.jsonl, checkpoints/, final/; new, "
                       "empty, or an earlier run's (--resume); locked while the job runs")
    train.add_argument("--batch-size", type=int, required=True, help="global batch (all processes together)")
    train.add_argument("--micro-batch-size", type=int, help="pairs one process encodes at once (default: batch / "
                       "processes); the step stays exact")
    train.add_argument("--steps", type=int, required=True)
    train.add_argument("--lr", type=float, default=1e-5)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    train.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="auto: bf16 autocast on CUDA, fp32 on CPU")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=2, help="data loading processes per training process")
    train.add_argument("--save-every", type=int, default=0, help="resume checkpoint every N steps (always at the "
                       "end and on SIGTERM / SIGINT)")
    train.add_argument("--keep-last", type=int, default=2)
    train.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (always at step 0 and at "
                       "the end with --val or --zero-shot)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.add_argument("--lock-image", action="store_true", help="freeze the vision tower (LiT)")
    train.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    train.add_argument("--freeze-logit-scale", action="store_true", help="keep logit_scale and logit_bias fixed")
    train.add_argument("--grad-checkpointing", action="store_true", help="recompute each encoder layer in backward")
    train.add_argument("--zero-shot", help="folder with one subfolder of images per class: top-1 accuracy")
    train.add_argument("--max-num-patches", type=int, help="NaFlex checkpoints: patch budget per image")
    train.add_argument("--image-column", default="image")
    train.add_argument("--text-column", default="text")
    train.add_argument("--max-bad-fraction", type=float, default=0.01, help="stop when more than this fraction "
                       "of the images read could not be read (default: %(default)s)")
    train.add_argument("--eval-batch-size", type=int, default=256)
    train.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    lora = train.add_argument_group("LoRA (peft: pip install 'fastsiglip[lora]')")
    lora.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank only (base weights frozen); "
                      "OUT/final/ gets the merged model, OUT/final/adapter/ the adapter")
    lora.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default: the rank, a scale of 1)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    lora.add_argument("--lora-targets", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()),
                      default=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
                      help="comma-separated, some of q_proj,k_proj,v_proj,out_proj,fc1,fc2 (default: all six)")
    train.add_argument("--device", help="default: cuda (this process's LOCAL_RANK) if available, else cpu")
    train.add_argument("--quiet", action="store_true", help="no progress line")
    train.set_defaults(func=cmd_train)


def _job_options(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id or checkpoint folder (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-num-patches", type=int, help="NaFlex checkpoints: patch budget per image "
                        "(default: the checkpoint's, usually 256)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as the checkpoint stores it)")


def _output_options(parser, what) -> None:
    parser.add_argument("--out", required=True, help="output file: .safetensors or .npy (+ .npy.json)")
    resume = (f"continue an interrupted run, or add new {what} to a finished output (same checkpoint and settings "
              "only)") if what == "files" else ("continue an interrupted run over the same, unchanged file (keys are "
                                                "line or row numbers: an edited or extended file is refused; embed "
                                                "the new texts into another --out)")
    parser.add_argument("--resume", action="store_true", help=resume)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (or the unfinished "
                        "run in OUT.partial/); without --resume or --overwrite an existing one is an error")
    parser.add_argument("--shard-size", type=int, help="write files of at most N inputs (OUT_STEM-KKKKK-of-NNNNN) "
                        "plus OUT.index.json, instead of one file; resumed only over the same inputs")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastsiglip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    _bench_parser(sub)

    classify = sub.add_parser("classify", help="zero-shot classification of images")
    classify.add_argument("images", nargs="+")
    classify.add_argument("--labels", nargs="+", required=True)
    classify.add_argument("--template", default="This is a photo of {}.")
    classify.add_argument("--json", action="store_true", help='print JSON: [{"image", "results": [{"score", '
                          '"label"}, ...]} or {"image", "error"}, ...] in the order of the images')
    _job_options(classify)
    classify.set_defaults(func=cmd_classify)

    embed = sub.add_parser("embed", help="L2-normalized image embeddings of files, folders, lists, manifests, "
                           "tar shards")
    embed.add_argument("inputs", nargs="+", help="image files, folders (searched recursively), file lists (.txt, "
                       "one path a line), manifests (.csv/.tsv/.jsonl with an image column), WebDataset .tar "
                       "shards or brace patterns (shards/x-{000..009}.tar)")
    embed.add_argument("--workers", type=int, help="decoding processes (default: the CPU cores; 0: decode in "
                       "the main process, one image at a time)")
    embed.add_argument("--decode", choices=("exact", "draft", "gpu"), default="exact", help="draft: JPEGs decoded "
                       "at a reduced scale (Pillow draft mode) before the exact resize (FixRes checkpoints; faster); gpu: "
                       "JPEGs decoded (nvjpeg, needs torchvision) and resized on the model's CUDA device, other "
                       "images exactly on the CPU (takes decoding off the CPU; not yet timed). Embeddings close "
                       "but not equal (see README)")
    embed.add_argument("--image-column", default="image", help="manifests: the column of image paths "
                       "(default: %(default)s)")
    _output_options(embed, "files")
    _job_options(embed)
    embed.set_defaults(func=cmd_embed)

    embed_text = sub.add_parser("embed-text", help="L2-normalized text embeddings of a .txt (one text a line), "
                                ".jsonl, .csv or .tsv file")
    embed_text.add_argument("input", help=".txt: one text a line (empty lines kept as empty texts; key: the line "
                            "number); .jsonl/.csv/.tsv: the --column column (key: the row number or --id-column)")
    embed_text.add_argument("--column", default="text", help="jsonl/csv/tsv: the column of texts (default: "
                            "%(default)s)")
    embed_text.add_argument("--id-column", help="jsonl/csv/tsv: a column of unique keys for the rows (default: "
                            "the line / row number)")
    _output_options(embed_text, "texts")
    _job_options(embed_text)
    embed_text.set_defaults(func=cmd_embed_text, batch_size=256)

    _train_parser(sub)
    _add_debug(parser)
    return parser


def _add_debug(parser) -> None:
    """--debug on every (sub)command: a traceback with the one-line error."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        parser.add_argument("--debug", action="store_true", help="print the traceback of an error "
                            "(also: FASTSIGLIP_DEBUG=1)")
    for action in actions:
        for child in dict.fromkeys(action.choices.values()):
            _add_debug(child)


POSITIVE_OPTIONS = ("batch_size", "max_num_patches", "batch", "shard_size", "iters", "rep", "plot_batches",
                    "eval_batch_size")


def _check_numbers(args) -> str | None:
    for option in POSITIVE_OPTIONS:
        value = getattr(args, option, None)
        if value is not None and min(value if isinstance(value, list) else [value]) < 1:
            return f"--{option.replace('_', '-')} must be at least 1"
    if getattr(args, "workers", None) is not None and args.workers < 0:
        return "--workers must be at least 0 (0: decode in the main process)"
    return None


class Signalled(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) turned into an exception, so a job stops as on Ctrl-C: what it finished
    stays (embed: OUT.partial/), and the exit status is 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_signalled(signum, frame):
    raise Signalled(signum)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename and error.filename not in str(error.strerror):
        text = f"{error.strerror}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    if WORKER_TRACEBACK in text:  # torch re-raises a DataLoader worker's error with its traceback in the message
        where, _, original = text.partition(WORKER_TRACEBACK)
        last = original.strip().splitlines()[-1] if original.strip() else ""
        error_line = re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", last)  # "fastsiglip.data.DataError: ..." -> "DataError: ..."
        place = re.sub(r"^Caught \w+ ", "", where.strip()).rstrip(".")  # "in DataLoader worker process 1"
        text = f"{error_line} ({place})"
    if isinstance(error, (KeyError, IndexError, TypeError, AttributeError, AssertionError)) or type(error) in (
            Exception, RuntimeError):
        text = f"{type(error).__name__}: {text}"
    return " ".join(text.split())  # one line


def main(argv=None) -> int:
    """Exit status, every command: 0 done; 1 done in part (classify: some images unreadable; embed,
    embed-text: some inputs skipped, the output holds the rest); 2 an error stopped the command,
    one line `fastsiglip <command>: error: ...` on stderr (FASTSIGLIP_DEBUG=1 or --debug adds the
    traceback); 130 Ctrl-C, 143 SIGTERM (128 + the signal), after keeping what was finished."""
    args = build_parser().parse_args(_bench_argv(argv))
    debug = getattr(args, "debug", False) or os.environ.get("FASTSIGLIP_DEBUG", "") not in ("", "0")
    problem = _check_numbers(args)
    if problem:
        print(f"fastsiglip {args.command}: error: {problem}", file=sys.stderr)
        return 2
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _raise_signalled)
    try:
        return args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM; api.JobInterrupted says what was kept
        signum = getattr(e, "signum", signal.SIGINT)
        if debug:
            traceback.print_exc()
        kept = str(e) if str(e) and not isinstance(e, Signalled) else ""
        print(f"fastsiglip {args.command}: interrupted ({signal.Signals(signum).name})" + (f": {kept}" if kept else ""),
              file=sys.stderr)
        return 128 + signum
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"fastsiglip {args.command}: error: {_one_line(e)}"
              + ("" if debug or _expected(e) else " (FASTSIGLIP_DEBUG=1 shows the traceback)"), file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _expected(error: Exception) -> bool:
    """An error whose message is the whole story (bad input, a file problem), not a bug of ours."""
    from .files import OutputBusy

    return isinstance(error, (ValueError, OSError, ImportError, OutputBusy))


if __name__ == "__main__":
    sys.exit(main())
