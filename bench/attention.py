"""Flash attention kernel: fastsiglip against SDPA, PyTorch's varlen paths and nn.MultiheadAttention.

    python bench/attention.py [--batch 256] [--cases naflex dense pool] [--out-dir DIR]

bf16 on CUDA. Cases (each timed side by side in this process, forward and forward+backward):
- naflex: a NaFlex batch of mixed aspect ratios under a patch budget (256 and 1024), head dims
  64 (base, 12 heads) and 72 (so400m, 16 heads). fastsiglip on packed tokens + cu_seqlens (bound =
  the budget, as the model passes it) against the transformers way (padded [B, N] batch, SDPA with
  a 4D additive mask, best backend SDPA picks) and PyTorch's varlen paths where available
  (torch.nn.attention.varlen.varlen_attn; nested jagged tensors through SDPA).
- dense: fixed lengths 196, 256, 576, 729, 1024 at head dim 64 against SDPA's flash backend;
  the same at head dim 72 to compare throughput per useful FLOP with 64.
- pool: the MAP pooling head, one query per image over its patches: projections + kernel on
  packed tokens against nn.MultiheadAttention with a key-padding mask on the padded batch (both
  sides include the projections; their TFLOP/s count the attention FLOPs only).
FLOPs are useful FLOPs (true head dim, real tokens only): 4 * sum_b(Lq_b Lk_b) * H * D forward,
2.5x that backward. The floor is max(FLOPs / matmul peak, bytes / copy bandwidth), both measured
here. Writes bench/results/attention-<device>.json and .md. Each new (lengths bucket, head dim)
autotunes and compiles three kernels, so all cases together take several minutes: `--cases`
runs a subset (e.g. one per 10-minute device call; each run rewrites the results file).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    floor_ms, measure_ceilings, parse_args, peak_memory_mb, require_cuda, time_ms, write_results,
)

from fastsiglip import ops, reference  # noqa: E402
from fastsiglip.kernels import attention  # noqa: E402

DTYPE = torch.bfloat16
BWD_FLOP_FACTOR = 2.5  # backward = 5 matmuls of the forward's 2
DENSE_LENGTHS = (196, 256, 576, 729, 1024)
NAFLEX_BUDGETS = (256, 1024)
CASES = ("naflex", "dense", "pool")
HEADS = {64: 12, 72: 16}  # base (768 = 12 x 64) and so400m (1152 = 16 x 72)


def naflex_lengths(batch, budget, gen):
    """Patch counts of `batch` images with aspect ratios log-uniform in [1/4, 4], each resized to
    the largest h x w grid with h * w <= budget (what the NaFlex processor does)."""
    ratios = torch.exp((torch.rand(batch, generator=gen) * 2 - 1) * math.log(4)).tolist()
    lens = []
    for r in ratios:
        h = max(1, min(budget, int(math.sqrt(budget * r))))
        lens.append(h * max(1, budget // h))
    return lens


def padding_mask(lens, budget):
    """[B, budget] bool, True on each image's first lens[b] patches (the padded batch's valid tokens)."""
    return torch.arange(budget, device="cuda") < torch.tensor(lens, device="cuda")[:, None]


def flops_fwd(lens_q, lens_k, heads, head_dim):
    return 4.0 * sum(a * b for a, b in zip(lens_q, lens_k)) * heads * head_dim


def bytes_moved(tq, tk, heads, head_dim, backward):
    elt = torch.finfo(DTYPE).bits // 8
    fwd = (2 * tq + 2 * tk) * heads * head_dim * elt  # read q, k, v; write o
    # backward: read q, k, v, o, dO; write dq, dk, dv
    return fwd + ((3 * tq + 2 * tk) + (tq + 2 * tk)) * heads * head_dim * elt if backward else fwd


def timed(fn, backward, inputs):
    """ms of fn() (forward) or of fn().backward(grad) with grads reset (forward + backward)."""
    if not backward:
        with torch.no_grad():
            return time_ms(fn), peak_memory_mb(fn)
    out = fn()
    grad = torch.randn_like(out)

    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad)

    return time_ms(step), peak_memory_mb(step)


def rows_for(case, impls, lens_q, lens_k, heads, head_dim, ceilings, backward, extra=None):
    """Time each (name, fn, leaves) side by side; ratios are against fastsiglip (the first)."""
    flops = flops_fwd(lens_q, lens_k, heads, head_dim) * ((1 + BWD_FLOP_FACTOR) if backward else 1)
    floor = floor_ms(flops, bytes_moved(sum(lens_q), sum(lens_k), heads, head_dim, backward), ceilings)
    rows, ours = [], None
    for name, fn, leaves in impls:
        try:
            ms, mem = timed(fn, backward, leaves)
        except Exception as e:  # a baseline this torch build lacks: say so, keep going
            print(f"  {case} {name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        ours = ms if name == "fastsiglip" else ours  # no ratios against a baseline if ours failed
        speedup = ms / ours if ours is not None else None
        rows.append({"case": case, "pass": "fwd+bwd" if backward else "fwd", "impl": name, "heads": heads,
                     "head_dim": head_dim, "ms": ms, "tflops": flops / ms / 1e9, "floor_ms": floor,
                     "floor_frac": floor / ms, "fastsiglip_speedup": speedup, "peak_mb": mem, **(extra or {})})
        print(f"  {case:24s} {rows[-1]['pass']:8s} {name:22s} {ms:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s"
              + (f"  x{speedup:.2f}" if speedup is not None else ""))
    return rows


def leaves(*shapes, gen):
    return [torch.randn(*s, device="cuda", dtype=DTYPE, generator=gen).requires_grad_() for s in shapes]


def naflex_cases(batch, ceilings, gen):
    rows = []
    for budget in NAFLEX_BUDGETS:
        for head_dim, heads in HEADS.items():
            lens = naflex_lengths(batch, budget, torch.Generator().manual_seed(budget))
            total = sum(lens)
            cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
            q, k, v = leaves(*[(total, heads, head_dim)] * 3, gen=gen)
            # The transformers way: padded [B, N, H, D], additive mask [B, 1, N, N] (built once per
            # forward in transformers, so outside the timing), SDPA picks its backend.
            mask = padding_mask(lens, budget)
            packing = ops.packing_from_mask(mask)
            qp, kp, vp = (ops.unpack(t.detach(), packing).transpose(1, 2).contiguous().requires_grad_()
                          for t in (q, k, v))  # [B, H, N, D]
            add_mask = torch.zeros(batch, 1, budget, budget, device="cuda", dtype=DTYPE)
            add_mask.masked_fill_(~mask[:, None, None, :], torch.finfo(DTYPE).min)
            impls = [
                ("fastsiglip", lambda: attention(q, k, v, cu, cu, budget, budget), (q, k, v)),
                ("sdpa_padded_4d_mask", lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=add_mask),
                 (qp, kp, vp)),
            ]
            try:
                from torch.nn.attention.varlen import varlen_attn

                impls.append(("torch_varlen_attn", lambda: varlen_attn(q, k, v, cu, cu, budget, budget), (q, k, v)))
            except ImportError:
                print("  torch.nn.attention.varlen.varlen_attn: not in this torch")
            offsets = cu.long()

            def nested():
                nt = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v)]
                return F.scaled_dot_product_attention(*nt).transpose(1, 2).values()

            impls.append(("torch_nested_jagged_sdpa", nested, (q, k, v)))
            case = f"naflex{budget}_b{batch}"
            extra = {"tokens": total, "padding_frac": 1 - total / (batch * budget)}
            for backward in (False, True):
                rows += rows_for(case, impls, lens, lens, heads, head_dim, ceilings, backward, extra)
    return rows


def dense_cases(ceilings, gen, tokens_per_batch=32768):
    rows = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for head_dim in (64, 72):
        heads = 16
        for n in DENSE_LENGTHS:
            batch = max(1, tokens_per_batch // n)
            q, k, v = leaves(*[(batch, n, heads, head_dim)] * 3, gen=gen)  # [B, N, H, D]
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

            def flash(qt=qt, kt=kt, vt=vt):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt)

            impls = [("fastsiglip", lambda q=q, k=k, v=v: attention(q, k, v), (q, k, v)),
                     ("sdpa_flash", flash, (qt, kt, vt))]
            for backward in (False, True):
                rows += rows_for(f"dense{n}", impls, [n] * batch, [n] * batch, heads, head_dim, ceilings,
                                 backward, {"batch": batch})
    return rows


def pooling_cases(batch, ceilings, gen):
    """MAP head: probe [1, C] attends over each image's patches; projections included on both sides."""
    rows = []
    head_dim, heads = 72, 16
    hidden = head_dim * heads
    for budget in NAFLEX_BUDGETS:
        lens = naflex_lengths(batch, budget, torch.Generator().manual_seed(budget))
        mask = padding_mask(lens, budget)
        packing = ops.packing_from_mask(mask)
        mha = torch.nn.MultiheadAttention(hidden, heads, batch_first=True, device="cuda", dtype=DTYPE)
        probe = torch.randn(1, 1, hidden, device="cuda", dtype=DTYPE, generator=gen)
        x = torch.randn(batch, budget, hidden, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
        tokens = ops.pack(x.detach(), packing).requires_grad_()  # [T, C]
        cu_q = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

        def ours():
            q = F.linear(probe[0], w_q, b_q).expand(batch, hidden).reshape(batch, heads, head_dim)
            k = F.linear(tokens, w_k, b_k).view(-1, heads, head_dim)
            v = F.linear(tokens, w_v, b_v).view(-1, heads, head_dim)
            o = attention(q, k, v, cu_q, packing.cu_seqlens, 1, budget)  # [B, H, D]
            return mha.out_proj(o.reshape(batch, hidden))

        def torch_mha():
            return mha(probe.expand(batch, 1, hidden), x, x, key_padding_mask=~mask, need_weights=False)[0]

        with torch.no_grad():  # the same computation on both sides, before timing it
            err = (ours().float() - torch_mha().float().view(batch, hidden)).abs().max().item()
        assert err < 5e-2, f"pooling head: fastsiglip and nn.MultiheadAttention differ by {err:.3e}"
        impls = [("fastsiglip", ours, (tokens,)), ("nn_multihead_attention", torch_mha, (x,))]
        for backward in (False, True):
            rows += rows_for(f"pool{budget}_b{batch}", impls, [1] * batch, lens, heads, head_dim, ceilings, backward)
    return rows


def check_correctness(gen):
    """One NaFlex-like case against SDPA in float32 before timing anything."""
    lens = [256, 100, 1, 0, 257]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    errs = {}
    for head_dim in (64, 72):
        q, k, v = (torch.randn(sum(lens), 4, head_dim, device="cuda", dtype=DTYPE, generator=gen) for _ in range(3))
        o = attention(q, k, v, cu, cu)
        ref = reference.attention(q.float(), k.float(), v.float(), cu, cu)
        errs[head_dim] = (o.float() - ref).abs().max().item()
        assert errs[head_dim] < 2e-2, f"head dim {head_dim}: max error {errs[head_dim]:.3e} against float32 SDPA"
    print(f"correctness (max |err| vs float32): {errs}")
    return errs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="images per NaFlex / pooling batch")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which case groups to run")
    args = parse_args(parser)
    require_cuda("bench/attention.py")
    gen = torch.Generator(device="cuda").manual_seed(0)
    errs = check_correctness(gen)
    ceilings = measure_ceilings(DTYPE)
    runners = {"naflex": lambda: naflex_cases(args.batch, ceilings, gen), "dense": lambda: dense_cases(ceilings, gen),
               "pool": lambda: pooling_cases(args.batch, ceilings, gen)}
    rows = [row for case in args.cases for row in runners[case]()]
    # Head dim 72 against 64 per useful FLOP, dense forward and forward + backward.
    by = {(r["case"], r["pass"], r["impl"], r["head_dim"]): r for r in rows}
    for (case, p, impl, d), r in list(by.items()):
        base = by.get((case, p, impl, 64))
        if d == 72 and impl == "fastsiglip" and base is not None and case.startswith("dense"):
            r["tflops_vs_d64"] = r["tflops"] / base["tflops"]
    meta = {"dtype": str(DTYPE), "ceilings": ceilings, "batch": args.batch, "cases": args.cases,
            "max_abs_err_vs_fp32": errs}
    write_results("attention", rows, meta, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
