"""The fused MLP kernel against cuBLAS, PyTorch eager and torch.compile, same shapes, same dtype.

    python bench/mlp.py [--tokens 50000] [--layers 12] [--dtype bf16] [--out-dir DIR]

For ViT-B (768 -> 3072) and So400m (1152 -> 4304) at `--tokens` rows:
- fc1 + bias + GELU (inference, the kernel writes only gelu(h)) against a plain cuBLAS
  `x @ W1.T` with no bias and no GELU (target: within 5%) and against eager
  `F.gelu(F.linear(x, W1, b1), approximate="tanh")`;
- the whole MLP with residual, forward only and forward + backward, against eager
  reference.mlp and torch.compile(reference.mlp) (targets >= 1.2x eager, >= 1.0x compile);
- peak memory of a 12-layer stack of residual MLPs, forward then backward, against eager.
Each time sits beside its floor: FLOPs over the measured matmul peak (bytes over the copy
bandwidth where that is larger). A correctness check against eager comes first. Writes
bench/results/mlp-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES, floor_ms, measure_ceilings, parse_args, peak_memory_mb, require_cuda, time_ms, write_results,
)

SHAPES = {"vit-b": (768, 3072), "so400m": (1152, 4304)}  # hidden C -> intermediate I


def make_params(C, I, dtype, gen, layers=1):
    """[layers] x (fc1_weight [I, C], fc1_bias [I], fc2_weight [C, I], fc2_bias [C]), requiring grad."""
    def p(*shape, scale):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype).requires_grad_()

    return [(p(I, C, scale=C**-0.5), p(I, scale=0.02), p(C, I, scale=I**-0.5), p(C, scale=0.02))
            for _ in range(layers)]


def fwd_bwd(fn, x, params, res, dy):
    y = fn(x, *params, res)
    return torch.autograd.grad(y, (x, *params, res), dy)


def bench_shape(name, C, I, M, dtype, ceilings, compiled):
    from fastsiglip import reference
    from fastsiglip.kernels import mlp as kmlp
    from fastsiglip.kernels.mlp import EPI_GELU, _matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    (w1, b1, w2, b2), = make_params(C, I, dtype, gen)
    x = torch.randn(M, C, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    res = torch.randn(M, C, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(M, C, device="cuda", dtype=dtype, generator=gen)
    params = (w1, b1, w2, b2)
    rows = []
    el = torch.finfo(dtype).bits // 8

    def row(part, impl, ms, flops, bytes_moved, **extra):
        fl = floor_ms(flops, bytes_moved, ceilings)
        rows.append({"shape": name, "tokens": M, "C": C, "I": I, "part": part, "impl": impl, "ms": ms,
                     "tflops": flops / ms / 1e9, "floor_ms": fl, "floor_frac": fl / ms, **extra})

    # Correctness first: the kernel against eager in the same dtype (both vs float32 eager).
    with torch.no_grad():
        y32 = reference.mlp(*(t.float() for t in (x, *params, res)))
        err_kernel = (kmlp(x, *params, res).float() - y32).abs().max().item()
        err_eager = (reference.mlp(x, *params, res).float() - y32).abs().max().item()
    print(f"{name}: max |y - y_fp32| kernel {err_kernel:.3e}, eager {err_eager:.3e}")

    # fc1 + bias + GELU vs plain cuBLAS x @ W1^T.
    xd, w1d, b1d = x.detach(), w1.detach(), b1.detach()
    a = torch.empty(M, I, device="cuda", dtype=dtype)
    fc1_flops = 2 * M * C * I
    fc1_bytes = (M * C + I * C + M * I) * el
    t_cublas = time_ms(lambda: xd @ w1d.t())
    t_fused = time_ms(lambda: _matmul(xd, w1d.t(), a, bias=b1d, epilogue=EPI_GELU.value))
    t_eager = time_ms(lambda: F.gelu(F.linear(xd, w1d, b1d), approximate="tanh"))
    row("fc1+bias+gelu", "cublas x@W1.T (no bias/gelu)", t_cublas, fc1_flops, fc1_bytes)
    row("fc1+bias+gelu", "fastsiglip", t_fused, fc1_flops, fc1_bytes, vs_cublas=t_fused / t_cublas)
    row("fc1+bias+gelu", "eager", t_eager, fc1_flops, fc1_bytes, fastsiglip_speedup=t_eager / t_fused)

    # Whole MLP: forward (inference) and forward + backward (training).
    mlp_bytes = (3 * M * C + 2 * I * C + 2 * M * I) * el  # x, res, y, weights, a written + read
    impls = {"fastsiglip": kmlp, "eager": reference.mlp, "torch.compile": compiled}
    fwd, train = {}, {}
    for impl, fn in impls.items():
        with torch.no_grad():
            fwd[impl] = time_ms(lambda: fn(xd, *(p.detach() for p in params), res.detach()))
        fwd_bwd(fn, x, params, res, dy)  # warm-up (compiles the backward graph)
        train[impl] = time_ms(lambda: fwd_bwd(fn, x, params, res, dy))
    for part, times, flops, nbytes in (("mlp fwd", fwd, 4 * M * C * I, mlp_bytes),
                                       ("mlp fwd+bwd", train, 12 * M * C * I, 3 * mlp_bytes)):
        for impl, ms in times.items():
            base = impl != "fastsiglip"
            row(part, impl, ms, flops, nbytes, fastsiglip_speedup=ms / times["fastsiglip"] if base else None)
    return rows


def stack_memory(name, C, I, M, layers, dtype):
    """Peak MiB of `layers` residual MLPs, forward then backward, kernels vs eager."""
    from fastsiglip import reference
    from fastsiglip.kernels import mlp as kmlp

    gen = torch.Generator(device="cuda").manual_seed(1)
    params = make_params(C, I, dtype, gen, layers)
    x0 = torch.randn(M, C, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    out = []
    for impl, fn in {"fastsiglip": kmlp, "eager": reference.mlp}.items():
        def step():
            x = x0
            for p in params:
                x = fn(x, *p, x)  # y = mlp(x) + x
            x.float().sum().backward()

        step()  # warm-up (autotuning allocates)
        for p in (x0, *(t for ps in params for t in ps)):
            p.grad = None
        out.append({"shape": name, "tokens": M, "C": C, "I": I, "part": f"{layers}-layer stack fwd+bwd",
                    "impl": impl, "peak_mib": peak_memory_mb(step)})
        for p in (x0, *(t for ps in params for t in ps)):
            p.grad = None
    out[1]["memory_ratio_vs_fastsiglip"] = out[1]["peak_mib"] / out[0]["peak_mib"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    args = parse_args(parser)
    require_cuda("bench/mlp.py")
    from fastsiglip import reference

    dtype = DTYPES[args.dtype]
    ceilings = measure_ceilings(dtype)
    compiled = torch.compile(reference.mlp)
    rows = []
    for name in args.shapes:
        C, I = SHAPES[name]
        rows += bench_shape(name, C, I, args.tokens, dtype, ceilings, compiled)
        rows += stack_memory(name, C, I, args.tokens, args.layers, dtype)
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    write_results("mlp", rows, {"dtype": args.dtype, "ceilings": ceilings,
                                "targets": "fc1 vs_cublas <= 1.05; fwd+bwd fastsiglip_speedup >= 1.2 (eager), >= 1.0 (torch.compile)"},
                  out_dir=args.out_dir)


if __name__ == "__main__":
    main()
