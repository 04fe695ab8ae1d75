"""Contrastive fine-tuning: `finetune(...)`, the loop behind `fastsiglip train`.

    fastsiglip.finetune("google/siglip2-base-patch16-224", train="pairs.csv", val="val.csv",
                        out="runs/a", batch_size=4096, micro_batch_size=256, steps=1000)

Pieces: loss.py (SigmoidLoss, distributed_sigmoid_loss), step.py (the exact large-batch step),
checkpoint.py (atomic resume checkpoints, final export), evaluate.py (recall@k, zero-shot);
data order and batches come from fastsiglip.data.

Under torchrun (`torchrun --nproc-per-node N -m fastsiglip train ...`) every process runs this
loop; the process group is created here (NCCL on GPUs, gloo on CPUs) unless the caller made
one. The global batch is split evenly across ranks, the loss is the exact global-batch loss
(distributed_sigmoid_loss), tower gradients are averaged by DDP, logit gradients by hand.
Rank 0 evaluates, logs and writes the files; every rank reads the checkpoint on --resume.

The output folder: OUT must be missing, empty, or an earlier run's (checkpoint.check_output,
before anything is written); rank 0 holds files.output_lock(OUT) for the whole job, removes the
`.tmp-*` leftovers of a killed run and marks OUT as a run (checkpoint.MARKER).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch import nn

from .. import data as data_lib
from .. import files
from ..loading import checkpoint_fingerprint, load
from ..processing import load_processor
from . import checkpoint as ckpt
from .evaluate import retrieval_recall, zero_shot_top1
from .lora import TARGETS as LORA_TARGETS
from .lora import apply_lora, is_peft, merged_state_dict, save_adapter
from .lora import check_options as check_lora_options
from .loss import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT, SigmoidLoss, distributed_sigmoid_loss
from .step import ExactStep, Towers, average_logit_grads, logit_param_names

PRECISIONS = ("auto", "bf16", "fp32")
METRICS_FILE = ckpt.METRICS_FILE
MAX_BAD_EXAMPLES = 5
# Options that must not change when a run is resumed (they change what the run computes);
# the others (micro-batch size, world size, workers, evaluation, saving, precision) may.
RESUME_FIXED = ("train", "train_pairs", "batch_size", "steps", "lr", "warmup_steps", "weight_decay", "grad_clip",
                "seed", "lock_image", "lock_text", "freeze_logit_scale", "max_num_patches", "image_column",
                "text_column", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


class _Stop:
    """SIGTERM / SIGINT -> finish the current step, save a checkpoint, return. A second signal
    raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _setup_distributed(device):
    """(world, rank, device, created): joins torchrun's process group when launched by it."""
    created = False
    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        dist.init_process_group(backend)
        created = True
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return world, rank, device, created


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _finite(name, value, *, low, low_ok=True, hint=""):
    """A real number >= low (> low when not low_ok), not NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (value == low and not low_ok):
        bound = f">= {low}" if low_ok else f"> {low}"
        raise ValueError(f"{name} must be a finite number {bound}{hint}, got {value!r}")
    return value


def _check_options(o: dict) -> None:
    """The arguments of finetune that can be checked without reading anything: one ValueError
    each, before OUT is locked or touched."""
    if o["precision"] not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {o['precision']!r}")
    check_lora_options(rank=o["lora_rank"], alpha=o["lora_alpha"], dropout=o["lora_dropout"], targets=o["lora_targets"])
    micro = o["batch_size"] // o["world"] if o["micro_batch_size"] is None else o["micro_batch_size"]
    _check_sizes(o["batch_size"], micro, o["world"])
    _positive_int("--steps", o["steps"])
    for name in ("workers", "save_every", "eval_every", "warmup_steps"):
        _positive_int("--" + name.replace("_", "-"), o[name], minimum=0)
    if o["warmup_steps"] > o["steps"]:
        raise ValueError(f"--warmup-steps {o['warmup_steps']} is more than --steps {o['steps']}; "
                         f"use at most {o['steps']}")
    _positive_int("--keep-last", o["keep_last"])
    _finite("--lr", o["lr"], low=0, low_ok=False)
    _finite("--weight-decay", o["weight_decay"], low=0, hint=" (0: no weight decay)")
    _finite("--grad-clip", o["grad_clip"], low=0, hint=" (the max gradient norm; 0 disables clipping)")
    _finite("--max-bad-fraction", o["max_bad_fraction"], low=0)
    if o["max_bad_fraction"] > 1:
        raise ValueError(f"--max-bad-fraction must lie in [0, 1], got {o['max_bad_fraction']}")
    if o["lock_image"] and o["lock_text"]:
        raise ValueError("--lock-image and --lock-text together leave nothing to train")


def _check_sizes(batch_size, micro_batch_size, world):
    _positive_int("--batch-size", batch_size)
    _positive_int("--micro-batch-size", micro_batch_size)
    if micro_batch_size > batch_size:
        raise ValueError(f"--micro-batch-size {micro_batch_size} is larger than --batch-size {batch_size} (the "
                         "global batch); the micro-batch is what one process encodes at once: make it <= batch / "
                         "number of processes")
    if batch_size % (world * micro_batch_size):
        raise ValueError(f"--batch-size {batch_size} is not divisible by number of processes x micro-batch = {world} "
                         f"x {micro_batch_size} = {world * micro_batch_size}: every process takes batch / "
                         f"{world} pairs in whole micro-batches; pick sizes that divide evenly")


def _param_groups(model: nn.Module, weight_decay: float):
    """Weight decay on weight matrices (Linear, Conv, token embeddings) only: not on biases,
    LayerNorm parameters, position tables, the pooling probe, logit_scale / logit_bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "position_embedding" in name or name.endswith("probe") or "logit_" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, *, lr: float, warmup_steps: int, steps: int) -> float:
    """Linear warmup over `warmup_steps` (step 0 gets lr / warmup), then cosine decay to 0 at `steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _autocast(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return precision, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return precision, contextlib.nullcontext


def _model(model_or_name, device):
    if isinstance(model_or_name, nn.Module):
        model = model_or_name
        if getattr(model, "checkpoint_dir", None) is None:
            raise ValueError("finetune needs the model's checkpoint folder (for its processor, fingerprint and the "
                             "final export): pass a name or folder, or a model from fastsiglip.load")
        dtypes = {p.dtype for p in model.parameters()}
        if not dtypes <= {torch.float32, torch.float64}:
            raise ValueError(f"the model's weights are {sorted(map(str, dtypes))}: fine-tuning keeps float32 master "
                             "weights (bf16 runs under autocast, --precision bf16); load it with dtype=torch.float32")
        model = model.to(device)
    else:
        model = load(model_or_name, device=device, dtype=torch.float32)
    if not (hasattr(model, "logit_scale") and hasattr(model, "get_image_features")
            and hasattr(model, "get_text_features")):
        raise ValueError(f"contrastive fine-tuning needs a two-tower SiglipModel; got {type(model).__name__}")
    return model


def _metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity (dropped on resume) for a blank line or one a
    killed process left half-written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class _Metrics:
    """OUT/metrics.jsonl (and TensorBoard) on rank 0; a resumed run first drops the lines after
    its checkpoint's step, so the file reads as one uninterrupted run."""

    def __init__(self, out: pathlib.Path, keep_until: int | None, tensorboard: bool, active: bool):
        self.active, self.path, self.writer = active, out / METRICS_FILE, None
        if not active:
            return
        lines = []
        if keep_until is not None and self.path.is_file():
            lines = [x for x in self.path.read_text().splitlines() if _metrics_step(x) <= keep_until]
        files.atomic_write(self.path, lambda tmp: tmp.write_text("".join(x + "\n" for x in lines)))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(f"--tensorboard needs the tensorboard package ({e}); pip install tensorboard") from e
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _where(path) -> str | None:
    """An absolute path (or pattern) for the run's record; None stays None."""
    return None if path is None else os.path.abspath(os.fspath(path))


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def finetune(model, *, train, out, batch_size: int, steps: int, micro_batch_size: int | None = None, val=None,
             lr: float = 1e-5, warmup_steps: int = 0, weight_decay: float = 0.1, grad_clip: float = 1.0,
             precision: str = "auto", seed: int = 0, workers: int = 2, save_every: int = 0, keep_last: int = 2,
             eval_every: int = 0, resume: bool = False, lock_image: bool = False, lock_text: bool = False,
             freeze_logit_scale: bool = False, grad_checkpointing: bool = False, zero_shot=None,
             max_num_patches: int | None = None, image_column: str = "image", text_column: str = "text",
             max_bad_fraction: float = 0.01, tensorboard: bool = False, eval_batch_size: int = 256,
             lora_rank: int | None = None, lora_alpha: float | None = None, lora_dropout: float = 0.0,
             lora_targets=LORA_TARGETS, device=None, progress: bool = True, callback=None) -> dict:
    """Fine-tune a two-tower SigLIP model on image-text pairs with the sigmoid loss.

    model: a hub id or checkpoint folder, or a model from fastsiglip.load (float32; float64 is
    kept as it is). train / val: a manifest (.csv, .tsv, .jsonl) or tar shards (fastsiglip.data).
    batch_size: the global batch (all processes); micro_batch_size: what one process encodes at
    once (default batch / processes); the step is exact either way (train/step.py). precision:
    "auto" (bf16 on CUDA, fp32 on CPU), "bf16" (autocast, float32 master weights) or "fp32".
    save_every: resume checkpoints every N steps (0: only at the end and on SIGTERM/SIGINT),
    keep_last of them. eval_every: evaluation every N steps (always at step 0 and at the end
    when val or zero_shot is given). resume: continue from the newest checkpoint in `out`
    (none: start fresh). callback(step, record): called on every process after each step.
    What trains: the parameters the model has requires_grad on (all of a freshly loaded one),
    less a locked tower (lock_image / lock_text) and logit_scale / logit_bias with
    freeze_logit_scale; nothing is switched on, so a peft model trains its adapters only.
    lora_rank: wrap the model in peft LoRA adapters of that rank first (lora_alpha, default the
    rank; lora_dropout; lora_targets, names of lora.TARGETS), training only them; OUT/final/
    then holds the merged model and OUT/final/adapter/ the adapter (also for a peft model passed
    in).
    out: a missing or empty folder, or an earlier run's (anything else is refused before a file
    is written); the job holds files.output_lock(out) (rank 0), so a second job on it is
    refused with files.OutputBusy. Every step's pairs are distinct: batch_size <= the number of
    training pairs, and an epoch's tail that does not fill a batch is not used (fastsiglip.data).
    Returns {"step", "metrics" (the last record), "final" (OUT/final or None), "interrupted"}
    (and "signal", its number, when a signal stopped the run).
    """
    world, rank, device, created = _setup_distributed(device)
    options = dict(locals())  # every argument, plus world, rank, the device and `created`
    try:
        _check_options(options)
        with _locked(out, rank, world):
            return _finetune(**options)
    finally:
        if created:
            dist.destroy_process_group()


@contextlib.contextmanager
def _locked(out, rank: int, world: int):
    """files.output_lock(out) held by rank 0 for the whole job; under torchrun the other ranks
    learn that it is busy too (instead of waiting at the first barrier)."""
    with contextlib.ExitStack() as held:
        busy = None
        if rank == 0:
            try:
                held.enter_context(files.output_lock(out, "train"))
            except files.OutputBusy as e:
                busy = str(e)
        if world > 1:
            shared = [busy]
            dist.broadcast_object_list(shared, src=0)
            busy = shared[0]
        if busy is not None:
            raise files.OutputBusy(busy)
        yield


def _finetune(model, train, out, batch_size, steps, micro_batch_size, val, lr, warmup_steps, weight_decay,
              grad_clip, precision, seed, workers, save_every, keep_last, eval_every, resume, lock_image,
              lock_text, freeze_logit_scale, grad_checkpointing, zero_shot, max_num_patches, image_column,
              text_column, max_bad_fraction, tensorboard, eval_batch_size, lora_rank, lora_alpha, lora_dropout,
              lora_targets, device, progress, callback, world, rank, created) -> dict:
    micro_batch_size = batch_size // world if micro_batch_size is None else micro_batch_size  # checked (finetune)
    out = pathlib.Path(out)
    precision_used, autocast = _autocast(precision, device)
    micro_per_step = batch_size // world // micro_batch_size
    args = dict(model=str(model) if not isinstance(model, nn.Module) else str(model.checkpoint_dir),
                train=_where(train), val=_where(val), batch_size=batch_size, steps=steps,
                micro_batch_size=micro_batch_size, world_size=world, lr=lr, warmup_steps=warmup_steps,
                weight_decay=weight_decay, grad_clip=grad_clip, precision=precision_used, seed=seed,
                lock_image=lock_image, lock_text=lock_text, freeze_logit_scale=freeze_logit_scale,
                max_num_patches=max_num_patches, image_column=image_column, text_column=text_column,
                zero_shot=_where(zero_shot), lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                lora_targets=",".join(lora_targets) if lora_rank else None)

    # Data first: a bad path or manifest fails before the model is loaded.
    pairs = data_lib.open_pairs(train, image_column=image_column, text_column=text_column)
    val_pairs = None if val is None else data_lib.open_pairs(val, image_column=image_column, text_column=text_column)
    args["train_pairs"] = len(pairs)  # another manifest under the same name is another run
    if batch_size > len(pairs):
        raise ValueError(f"--batch-size {batch_size} is larger than the {len(pairs)} training pairs in {train}: a "
                         f"step's pairs must be distinct; use a batch of at most {len(pairs)} or more data")
    ckpt.check_output(out)  # an unrelated folder is refused before anything is loaded or written
    if not resume and (ckpt.list_checkpoints(out) or (out / METRICS_FILE).exists()):
        raise ValueError(f"{out} already holds a run ({METRICS_FILE} or checkpoints/); pass --resume to continue it, "
                         "or choose another --out")

    model = _model(model, device)
    source = pathlib.Path(model.checkpoint_dir)
    processor = load_processor(source, max_num_patches=max_num_patches)
    model_id = {"source": str(source), "fingerprint": checkpoint_fingerprint(source)}

    # What is trained: what the caller left trainable, less what the options freeze.
    if lora_rank is not None:
        if is_peft(model):
            raise ValueError("the model is a peft model already; drop --lora-rank to train its adapters")
        with torch.random.fork_rng(devices=[]):  # the adapters' random init depends on --seed alone
            torch.manual_seed(seed)
            model = apply_lora(model, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    for tower, lock in ((model.vision_model, lock_image), (model.text_model, lock_text)):
        if lock:
            tower.requires_grad_(False)
    if freeze_logit_scale:
        for p in (model.logit_scale, model.logit_bias):
            p.requires_grad_(False)
    train_image = any(p.requires_grad for p in model.vision_model.parameters())
    train_text = any(p.requires_grad for p in model.text_model.parameters())
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter of the model requires a gradient: nothing to train")
    if grad_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise RuntimeError("--grad-checkpointing: this fastsiglip model has no gradient_checkpointing_enable() "
                               "(per-layer activation checkpointing is not available in this version)")
        model.gradient_checkpointing_enable()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr,
                                  fused=True if device.type == "cuda" else None)

    # Resume, or check that OUT holds no other run.
    start, samples_seen, skipped, bad_examples = 0, 0, 0, []
    found = ckpt.list_checkpoints(out)
    torch.manual_seed(seed + rank)
    if resume and found:
        state, weights, rng = ckpt.read_resume(found[-1])
        if state["model"]["fingerprint"] != model_id["fingerprint"]:
            raise ckpt.ResumeError(f"{found[-1]} was trained from another model ({state['model']['source']}); this run "
                                   f"loads {source}, whose files differ: resume with --model "
                                   f"{state['model']['source']} or choose another --out")
        changed = [f"{k}: {state['args'].get(k)!r} -> {args[k]!r}" for k in RESUME_FIXED
                   if state["args"].get(k) != args[k]]
        if changed:
            raise ckpt.ResumeError(f"{found[-1]} was written by a run with other options ({'; '.join(changed)}); "
                                   "resume with the same options, or choose another --out")
        model.load_state_dict(weights)
        ckpt.load_optimizer(found[-1], optimizer)
        if f"cpu.{rank}" in rng:
            torch.set_rng_state(rng[f"cpu.{rank}"])
        if device.type == "cuda" and f"cuda.{rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda.{rank}"], device)
        start, samples_seen, skipped = state["step"], state["samples_seen"], state["skipped"]
        bad_examples = state.get("bad_examples", [])
    if world > 1:
        dist.barrier()  # every rank has looked at OUT before rank 0 writes to it
    if rank == 0:  # under the output lock: no live process writes OUT's temporary files
        ckpt.remove_stale_tmp(out)
        ckpt.mark_output(out)
    # A resumed run keeps the lines up to its checkpoint's step (none when it starts over).
    metrics = _Metrics(out, (start if start else -1) if resume else None, tensorboard, rank == 0)

    towers = Towers(model)
    if world > 1:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(towers, logit_param_names(towers))
        # The towers hold no buffers (model.py), so DDP has none to broadcast.
        device_ids = [device.index] if device.type == "cuda" else None
        towers = nn.parallel.DistributedDataParallel(towers, device_ids=device_ids)
    codec = data_lib.PixelCodec(processor.image_processor, max_num_patches)

    def to_inputs(micro):
        return codec.to_model(micro, device), micro["input_ids"].to(device, non_blocking=True)

    exact = ExactStep(towers, to_inputs, device=device, train_image=train_image, train_text=train_text,
                      autocast=autocast, distributed=world > 1)
    batches = data_lib.TrainBatches(pairs, source, seed=seed, batch_size=batch_size, world_size=world,
                                    micro_batch_size=micro_batch_size, max_num_patches=max_num_patches)
    pin = device.type == "cuda"

    def evaluate() -> dict:
        if rank != 0:
            return {}
        results = {}
        model.eval()
        if val_pairs is not None:
            results.update(_embed_and_recall(Towers(model), val_pairs, source, codec, to_inputs, eval_batch_size,
                                             max_num_patches, workers, pin, autocast))
        if zero_shot is not None:
            results.update(zero_shot_top1(model, processor, zero_shot, device=device, autocast=autocast,
                                          max_num_patches=max_num_patches))
        model.train()
        return results

    def save(step):
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        rng = {"cpu": torch.get_rng_state(), "cuda": cuda}
        gathered = [rng]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rng)
        if rank == 0:
            tensors = {f"{kind}.{r}": g[kind] for r, g in enumerate(gathered) for kind in ("cpu", "cuda")
                       if g[kind] is not None}
            state = {"step": step, "samples_seen": samples_seen, "skipped": skipped,
                     "data_position": batches.step_start(step), "bad_examples": bad_examples, "args": args,
                     "model": model_id}
            path = ckpt.save_resume(out, step, model, optimizer, state, tensors, keep_last)
        if world > 1:
            dist.barrier()
        return path if rank == 0 else None

    evaluating = val_pairs is not None or zero_shot is not None
    last = {}
    with _Stop() as stop:
        if start == 0 and evaluating:
            last = {"step": 0, "loss": None, "lr": lr_at(0, lr=lr, warmup_steps=warmup_steps, steps=steps),
                    "pairs_per_s": None, "samples_seen": 0, "skipped": 0, **evaluate()}
            metrics.write(last)
        items = data_lib.StepItems(start, steps, rank, micro_per_step)
        stream = iter(data_lib.loader(batches, items, workers=workers, pin_memory=pin))
        begin, done_here = time.perf_counter(), 0
        for index in range(start, steps):
            t0 = time.perf_counter()
            micros = [next(stream) for _ in range(micro_per_step)]
            bad = [b for m in micros for b in m["bad"]]
            step_lr = lr_at(index, lr=lr, warmup_steps=warmup_steps, steps=steps)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            optimizer.zero_grad(set_to_none=True)
            loss = exact(micros)
            average_logit_grads(model, world)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            optimizer.step()
            stats = torch.stack([loss.detach().double().cpu(), torch.tensor(float(len(bad)), dtype=torch.float64)])
            if world > 1:
                stats = stats.to(device)
                dist.all_reduce(stats)
                stats = stats.cpu()
            step = index + 1
            samples_seen += batch_size
            skipped += int(stats[1])
            if stats[1] > 0 and len(bad_examples) < MAX_BAD_EXAMPLES:
                bad_examples = _bad_examples(bad_examples, bad, world)
            if skipped > max_bad_fraction * (samples_seen + skipped):
                raise data_lib.DataError(
                    f"{skipped} of the {samples_seen + skipped} images read so far could not be read, more than "
                    f"--max-bad-fraction {max_bad_fraction}; e.g. " + "; ".join(f"{k}: {e}" for k, e in bad_examples))
            elapsed = time.perf_counter() - t0
            done_here += 1
            record = {"step": step, "loss": float(stats[0]) / world, "lr": step_lr, "pairs_per_s": batch_size / elapsed,
                      "samples_seen": samples_seen, "skipped": skipped}
            if evaluating and (step == steps or (eval_every and step % eval_every == 0)):
                record.update(evaluate())
            metrics.write(record)
            last = record
            if progress and rank == 0:
                eta = (time.perf_counter() - begin) / done_here * (steps - step)
                print(f"step {step}/{steps}  loss {record['loss']:.4f}  {record['pairs_per_s']:.1f} pairs/s  "
                      f"lr {step_lr:.2e}  ETA {_eta(eta)}", file=sys.stderr, flush=True)
            if callback is not None:
                callback(step, record)
            stopping = torch.tensor([float(stop.signum)], device=device if world > 1 else "cpu")
            if world > 1:
                dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
            if stopping.item() or step == steps or (save_every and step % save_every == 0):
                path = save(step)
            if stopping.item() and step < steps:
                if progress and rank == 0:
                    print(f"stopped by signal {int(stopping.item())} after step {step}: checkpoint {path}; continue "
                          "with --resume", file=sys.stderr, flush=True)
                metrics.close()
                return {"step": step, "metrics": last, "final": None, "interrupted": True,
                        "signal": int(stopping.item())}
        del stream
    final = None
    if rank == 0:
        if is_peft(model):  # the merged model (what fastsiglip.load and transformers read), and the adapter
            final = ckpt.export_final(out, merged_state_dict(model), source,
                                      lambda folder: save_adapter(model, folder, base=str(source)))
        else:
            final = ckpt.export_final(out, model.state_dict(), source)
    if world > 1:
        dist.barrier()
    metrics.close()
    return {"step": steps, "metrics": last, "final": final, "interrupted": False}


def _bad_examples(examples: list, bad: list, world: int) -> list:
    """Up to MAX_BAD_EXAMPLES (key, error) of skipped images, gathered from every rank."""
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, bad[:MAX_BAD_EXAMPLES])
        bad = [b for part in gathered for b in part]
    return (examples + [list(b) for b in bad])[:MAX_BAD_EXAMPLES]


@torch.no_grad()
def _embed_and_recall(towers, pairs, source, codec, to_inputs, chunk, max_num_patches, workers, pin, autocast):
    batches = data_lib.EvalBatches(pairs, source, chunk=chunk, max_num_patches=max_num_patches)
    images, texts = [], []
    for batch in data_lib.loader(batches, range(len(batches)), workers=workers, pin_memory=pin):
        if not batch["keys"]:
            continue
        pixels, ids = to_inputs(batch)
        with autocast():
            img, txt = towers(pixels, ids)
        images.append(img.float())
        texts.append(txt.float())
    if not images:
        raise data_lib.DataError(f"--val {pairs.source}: none of its images could be read")
    return retrieval_recall(torch.cat(images), torch.cat(texts))


__all__ = ["LOGIT_BIAS_INIT", "LOGIT_SCALE_INIT", "SigmoidLoss", "distributed_sigmoid_loss", "finetune", "lr_at"]
