"""The chunked sigmoid-loss kernel against the naive loss and the named peers, forward + backward.

    python bench/sigmoid_loss.py [--dims 768 1152] [--batches 4096 16384 65536 262144]
                                 [--chunks 4096 8192 16384] [--out-dir DIR]

For each embedding width D and batch B (square, bf16 L2-normalized embeddings, float32 0-dim
logit_scale = log 10 and logit_bias = -10 as at the paper's init), the loss and all four
gradients (one `torch.autograd.grad` call) of:
- fastsiglip: kernels.sigmoid_loss (default chunk; `--chunks` adds a chunk-size sweep at the
  target shape B = 65,536, D = 768);
- naive eager: the B x B logits, labels 2 eye - 1, -sum logsigmoid / B (transformers' form);
- naive torch.compile of the same function (B <= COMPILE_MAX_B: one compile per shape);
- open_clip's SigLipLoss and the `siglip-kernel` package's fused_siglip_loss, when importable
  ("not installed" otherwise).
Each time sits beside the floor, 3 GEMMs (logits, G @ T, G^T @ I) = 3 * 2 B^2 D FLOPs over the
measured matmul peak, with peak extra memory (above the inputs) and the loss value's relative
difference from fastsiglip's (a correctness check). An out-of-memory run is recorded as "OOM".
Targets at B = 65,536, D = 768: <= 30 ms, >= 1.5x siglip-kernel, >= 3x naive eager, peak extra
<= 1.5 GB; B = 262,144 runs. Writes bench/results/sigmoid_loss-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastsiglip.benchmarks import naive_loss  # the textbook B x B loss, shared with the benchmark suite

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    floor_ms, measure_ceilings, optional_peer, parse_args, peak_memory_mb, require_cuda, time_ms, write_results,
)

COMPILE_MAX_B = 65536  # torch.compile per batch size costs ~30 s each; larger B OOMs anyway
TARGET_B, TARGET_D = 65536, 768
TARGET_MS, TARGET_VS_PEER, TARGET_VS_EAGER, TARGET_MEM_MB = 30.0, 1.5, 3.0, 1536.0


def peers():
    """name -> loss(img, txt, logit_scale (raw, log of the scale), logit_bias), or a reason string."""
    from fastsiglip.kernels import sigmoid_loss

    out = {"fastsiglip": sigmoid_loss, "naive eager": naive_loss, "naive compile": torch.compile(naive_loss)}
    SigLipLoss = optional_peer("open_clip.loss", "SigLipLoss")
    if isinstance(SigLipLoss, str):
        out["open_clip"] = SigLipLoss
    else:
        oc = SigLipLoss()  # takes the scale already exponentiated, as open_clip's model returns it
        out["open_clip"] = lambda i, t, s, b: oc(i, t, s.exp(), b)
    # (img, txt, log_temp, bias), as documented
    out["siglip-kernel"] = optional_peer("siglip_kernel", "fused_siglip_loss")
    return out


def make_inputs(B, D, gen):
    img = F.normalize(torch.randn(B, D, device="cuda", generator=gen), dim=-1).bfloat16().requires_grad_()
    txt = F.normalize(torch.randn(B, D, device="cuda", generator=gen), dim=-1).bfloat16().requires_grad_()
    scale = torch.tensor(math.log(10.0), device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    return img, txt, scale, bias


def run_one(name, fn, inputs, ceilings, ref_loss=None, **extra):
    B, D = inputs[0].shape
    flops = 3 * 2 * B * B * D
    row = {"impl": name, "B": B, "D": D, **extra}

    def step():
        return torch.autograd.grad(fn(*inputs), inputs)

    oom = False
    try:
        loss = fn(*inputs).item()
        row["peak_extra_mb"] = peak_memory_mb(step)
        row["ms"] = time_ms(step, warmup=5, rep=50 if B >= 65536 else 100)
    except torch.cuda.OutOfMemoryError:
        oom = True
    if oom:  # outside the except block: its traceback no longer holds the failed run's tensors
        torch.cuda.empty_cache()
        row["status"] = "OOM"
        return row, None
    el = inputs[0].element_size()
    row["floor_ms"] = floor_ms(flops, 2 * 2 * B * D * el, ceilings)  # bytes: read both inputs, write both grads
    row["x_floor"] = row["ms"] / row["floor_ms"]
    row["tflops_3gemm"] = flops / row["ms"] / 1e9
    if ref_loss is not None:
        row["loss_rel_diff"] = abs(loss - ref_loss) / abs(ref_loss)
    row["status"] = "ok"
    return row, loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[768, 1152])
    ap.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 65536, 131072, 262144])
    ap.add_argument("--chunks", type=int, nargs="*", default=[4096, 8192, 16384])
    args = parse_args(ap)
    require_cuda("bench/sigmoid_loss.py")
    from fastsiglip.kernels import sigmoid_loss

    ceilings = measure_ceilings(torch.bfloat16)
    impls = peers()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for D in args.dims:
        for B in args.batches:
            inputs = make_inputs(B, D, gen)
            ours, ref_loss = run_one("fastsiglip", impls["fastsiglip"], inputs, ceilings)
            rows.append(ours)
            print(ours, flush=True)
            for name, fn in impls.items():
                if name == "fastsiglip":
                    continue
                if isinstance(fn, str):
                    rows.append({"impl": name, "B": B, "D": D, "status": fn})
                    continue
                if name == "naive compile" and B > COMPILE_MAX_B:
                    rows.append({"impl": name, "B": B, "D": D, "status": f"skipped (B > {COMPILE_MAX_B})"})
                    continue
                row, _ = run_one(name, fn, inputs, ceilings, ref_loss)
                if row.get("status") == "ok" and ours.get("status") == "ok":
                    row["speedup_fastsiglip"] = row["ms"] / ours["ms"]
                rows.append(row)
                print(row, flush=True)
            if B == TARGET_B and D == TARGET_D:
                for chunk in args.chunks:
                    row, _ = run_one(f"fastsiglip chunk={chunk}", lambda *a, c=chunk: sigmoid_loss(*a, chunk_size=c),
                                     inputs, ceilings, ref_loss, chunk_size=chunk)
                    rows.append(row)
                    print(row, flush=True)
            del inputs
            torch.cuda.empty_cache()
    meta = {"dtype": "bfloat16", "ceilings": ceilings, "flops": "3 * 2 * B^2 * D (three GEMMs)",
            "targets": {"B": TARGET_B, "D": TARGET_D, "max_ms": TARGET_MS, "min_x_siglip_kernel": TARGET_VS_PEER,
                        "min_x_naive_eager": TARGET_VS_EAGER, "max_peak_extra_mb": TARGET_MEM_MB}}
    write_results("sigmoid_loss", rows, meta, args.out_dir)


if __name__ == "__main__":
    main()
