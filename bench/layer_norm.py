"""The LayerNorm kernel (plain and fused with the residual add) against PyTorch, torch.compile, Liger.

    python bench/layer_norm.py [--widths 768 1152] [--rows 16384 32768 65536] [--dtype bf16] [--out-dir DIR]

For each width (768: ViT-B, 1152: So400m) and row count, in `--dtype` (parameters in that dtype
too, as the model holds them):
- forward: effective bandwidth (minimum bytes read + written / time) against the measured copy
  bandwidth (targets >= 2.5 TB/s and >= 80% of copy);
- forward + backward (dx, dweight, dbias) against eager F.layer_norm (target >= 1.3x), against
  torch.compile of the same (target >= 1.0x) and against Liger's LigerLayerNormFunction when
  liger-kernel is importable ("not installed" recorded otherwise);
- the fused residual variant (y, s = LN(x + r), x + r), forward and forward + backward with
  gradients on both y and s, against eager add + LN and torch.compile(add + LN).
Each time sits beside its floor, the minimum bytes over the copy bandwidth. A correctness check
against float32 eager comes first. Writes bench/results/layer_norm-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES, floor_ms, measure_ceilings, optional_peer, parse_args, peak_memory_mb, require_cuda, time_ms,
    write_results,
)

EPS = 1e-6
DEVICE = "cuda"
TARGET_TBPS = 2.5  # forward, effective
TARGET_COPY_FRAC = 0.8  # forward effective bandwidth / copy bandwidth
TARGET_VS_EAGER = 1.3  # forward + backward
TARGET_VS_COMPILE = 1.0


def liger_layer_norm():
    """Liger's LayerNorm as fn(x, w, b, eps, residual=None), or None when not installed."""
    LigerLayerNormFunction = optional_peer("liger_kernel.ops.layer_norm", "LigerLayerNormFunction")
    if isinstance(LigerLayerNormFunction, str):
        return None
    return lambda x, w, b, eps, residual=None: LigerLayerNormFunction.apply(x, w, b, eps)


def compiled(fn):
    """torch.compile with static shapes; enough recompiles for every shape and grad mode here."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    return torch.compile(fn, dynamic=False)


def fwd_bwd(fn, x, w, b, r, dy, ds):
    """One training step of the op: forward, then every input's gradient."""
    if r is None:
        return torch.autograd.grad(fn(x, w, b, EPS), (x, w, b), dy)
    y, s = fn(x, w, b, EPS, r)
    return torch.autograd.grad((y, s), (x, w, b, r), (dy, ds))


def check_correctness(kernel, reference, x, w, b, r):
    """Max |out - out_fp32| for the kernel and for eager in the same dtype (both vs fp32 eager)."""
    with torch.no_grad():
        ref32 = reference(x.float(), w.float(), b.float(), EPS, None if r is None else r.float())
        ref32 = ref32 if r is not None else (ref32,)
        err = {}
        for impl, fn in (("fastsiglip", kernel), ("eager", reference)):
            out = fn(x, w, b, EPS, r)
            out = out if r is not None else (out,)
            err[impl] = max((o.float() - e).abs().max().item() for o, e in zip(out, ref32))
    return err


def bench_shape(N, M, dtype, ceilings, impls, liger):
    from fastsiglip import reference
    from fastsiglip.kernels import layer_norm as kernel

    gen = torch.Generator(device=DEVICE).manual_seed(N + M)
    el = torch.finfo(dtype).bits // 8

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale + shift).to(dtype)

    x, r, dy, ds = rand(M, N, scale=2, shift=0.5), rand(M, N), rand(M, N), rand(M, N)
    w, b = rand(N, scale=0.1, shift=1.0), rand(N, scale=0.1)
    rows, summary = [], []

    for variant, res in (("plain", None), ("residual", r)):
        errs = check_correctness(kernel, reference.layer_norm, x, w, b, res)
        print(f"N={N} M={M} {variant}: max |out - out_fp32| fastsiglip {errs['fastsiglip']:.3e}, "
              f"eager {errs['eager']:.3e}")
        # Minimum traffic: plain fwd reads x, writes y; bwd reads x, dy, writes dx.
        # residual fwd reads x, r, writes y, s; bwd reads s, dy, ds, writes one ds (x's and r's).
        tensors_fwd, tensors_bwd = (2, 3) if res is None else (4, 4)
        param_bytes = 2 * N * el
        bytes_fwd = tensors_fwd * M * N * el + param_bytes
        bytes_train = (tensors_fwd + tensors_bwd) * M * N * el + 3 * param_bytes
        these = dict(impls[variant])
        if variant == "plain":
            these["liger"] = liger
        fwd_args = (x, w, b, EPS) if res is None else (x, w, b, EPS, res)
        times = {}  # impl -> (fwd ms, fwd+bwd ms); fastsiglip is timed first
        for impl, fn in these.items():
            if fn is None:
                rows.append({"N": N, "rows": M, "variant": variant, "impl": impl, "note": "not installed"})
                continue
            with torch.no_grad():
                fn(*fwd_args)  # warm-up: compile, autotune
                t_fwd = time_ms(lambda: fn(*fwd_args))
            xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
            rg = None if res is None else res.detach().requires_grad_()
            fwd_bwd(fn, xg, wg, bg, rg, dy, ds)  # warm-up: compiles the backward graph, autotunes
            t_train = time_ms(lambda: fwd_bwd(fn, xg, wg, bg, rg, dy, ds))
            peak = peak_memory_mb(lambda: fwd_bwd(fn, xg, wg, bg, rg, dy, ds))
            times[impl] = (t_fwd, t_train)
            ours_fwd, ours_train = times["fastsiglip"]
            for part, ms, ours, nbytes in (("fwd", t_fwd, ours_fwd, bytes_fwd),
                                           ("fwd+bwd", t_train, ours_train, bytes_train)):
                tbps = nbytes / ms / 1e9
                rows.append({"N": N, "rows": M, "variant": variant, "part": part, "impl": impl, "ms": ms,
                             "TB/s": tbps, "copy_frac": tbps * 1e3 / ceilings["copy_gbps"],
                             "floor_ms": floor_ms(0, nbytes, ceilings),
                             "floor_frac": floor_ms(0, nbytes, ceilings) / ms,
                             **({"peak_mib": peak} if part == "fwd+bwd" else {}),
                             # on a baseline's row: how many times faster fastsiglip is
                             **({"fastsiglip_speedup": ms / ours} if impl != "fastsiglip" else {})})
        fwd_tbps = bytes_fwd / ours_fwd / 1e9
        check = {
            "N": N, "rows": M, "variant": variant, "max_err": errs["fastsiglip"], "eager_err": errs["eager"],
            "fwd_TB/s": fwd_tbps, "fwd_copy_frac": fwd_tbps * 1e3 / ceilings["copy_gbps"],
            "train_vs_eager": times["eager"][1] / ours_train, "train_vs_compile": times["torch.compile"][1] / ours_train,
        }
        check["targets_met"] = (check["fwd_TB/s"] >= TARGET_TBPS and check["fwd_copy_frac"] >= TARGET_COPY_FRAC
                                and check["train_vs_eager"] >= TARGET_VS_EAGER
                                and check["train_vs_compile"] >= TARGET_VS_COMPILE)
        summary.append(check)
    return rows, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[768, 1152])
    parser.add_argument("--rows", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parse_args(parser)
    require_cuda("bench/layer_norm.py")
    from fastsiglip import reference
    from fastsiglip.kernels import layer_norm as kernel

    dtype = DTYPES[args.dtype]
    ceilings = measure_ceilings(dtype)
    # eager LN is F.layer_norm; eager "add + LN" is reference.layer_norm with a residual (x + r, then LN).
    ref_compiled = compiled(reference.layer_norm)
    impls = {variant: {"fastsiglip": kernel, "eager": reference.layer_norm, "torch.compile": ref_compiled}
             for variant in ("plain", "residual")}
    liger = liger_layer_norm()
    print("liger-kernel:", "installed" if liger is not None else "not installed")
    rows, summary = [], []
    for N in args.widths:
        for M in args.rows:
            r, s = bench_shape(N, M, dtype, ceilings, impls, liger)
            rows += r
            summary += s
    for s in summary:
        print(f"N={s['N']} rows={s['rows']} {s['variant']}: fwd {s['fwd_TB/s']:.2f} TB/s "
              f"({s['fwd_copy_frac']:.0%} of copy), fwd+bwd {s['train_vs_eager']:.2f}x eager, "
              f"{s['train_vs_compile']:.2f}x compile -> targets {'met' if s['targets_met'] else 'NOT met'}")
    write_results("layer_norm", rows, {
        "dtype": args.dtype, "eps": EPS, "ceilings": ceilings, "liger": "installed" if liger else "not installed",
        "targets": {"fwd_TB/s": TARGET_TBPS, "fwd_copy_frac": TARGET_COPY_FRAC,
                    "train_vs_eager": TARGET_VS_EAGER, "train_vs_compile": TARGET_VS_COMPILE},
        "summary": summary,
    }, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
