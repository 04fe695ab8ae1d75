"""Kernel micro-benchmarks shared by `fastsiglip bench kernels|loss`, bench/'s pytest-benchmark
suite (bench/test_kernels.py) and the bench scripts: the real shapes of each op, every
implementation of it found installed, FLOPs and minimum bytes (the floor), timing, ratio tables
and plots.

    cases(op, device)                       the shapes: real ones on a GPU, small ones on a CPU
    implementations(op, case, device, ...)  name -> step() (a training step: forward + backward),
                                            or a string saying why it is unavailable
    measure(...)                            rows of {op, case, impl, ms, ...}, ratios to fastsiglip
    table(rows), plot(rows, path, ...)      what the CLI prints and draws

Implementations per op (peers only when importable; the reason is kept otherwise):
    layer_norm   fastsiglip, eager (F.layer_norm), torch.compile, liger
    mlp          fastsiglip, eager, torch.compile
    attention    fastsiglip, eager (math softmax), torch.compile, sdpa (flash / efficient /
                 cudnn / math backends), flash_attn
    loss         fastsiglip, eager (B x B logits), torch.compile, open_clip, siglip-kernel
On a CPU `fastsiglip` runs through ops.* with FASTSIGLIP_IMPL=auto, i.e. the reference
path (the kernels need CUDA): rows and plots say so ("fastsiglip (reference path)").
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import statistics
import textwrap
import time

import torch
import torch.nn.functional as F

OPS = ("attention", "mlp", "layer_norm", "loss")
PASSES = ("fwd", "fwd+bwd")
# Every implementation `implementations()` knows, per op (peers are skipped when not installed).
IMPLEMENTATIONS = {
    "attention": ["fastsiglip", "eager", "torch.compile", "sdpa flash", "sdpa efficient", "sdpa cudnn", "sdpa math",
                  "flash_attn"],
    "mlp": ["fastsiglip", "eager", "torch.compile"],
    "layer_norm": ["fastsiglip", "eager", "torch.compile", "liger"],
    "loss": ["fastsiglip", "eager", "torch.compile", "open_clip", "siglip-kernel"],
}
# One shape per model family and op, the ones the README quotes: what a short GPU session times.
QUICK = {
    "attention": {"d64 H12 N256", "d72 H16 N729", "d96 H16 N256"},
    "mlp": {"C768 I3072 M50176", "C1152 I4304 M50176"},
    "layer_norm": {"N768 M65536", "N1152 M65536"},
    "loss": {"D768 B16384", "D768 B65536"},
}
BWD_FLOP_FACTOR = 2.0  # a GEMM's backward is two GEMMs of the forward's size (attention: 2.5)


def optional_peer(module: str, attr: str):
    """`module.attr` from a peer package that may be absent, or "not installed (<error>)"."""
    try:
        found = importlib.import_module(module)
        if not hasattr(found, attr):  # what `from module import attr` raises
            raise ImportError(f"cannot import name {attr!r} from {module!r}")
        return getattr(found, attr)
    except Exception as e:  # noqa: BLE001 -- any import failure means "not available here"
        return f"not installed ({type(e).__name__})"


# --- shapes ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    family: str  # one line of a plot, e.g. "d72 H16" (the model's head dim and heads)
    x: int  # the plot's x value (sequence length, tokens, rows or batch)
    x_name: str
    params: dict = dataclasses.field(hash=False, compare=False)
    extra: str = ""  # more of the shape, e.g. "B128" (the batch at that length)

    @property
    def label(self) -> str:
        return " ".join(w for w in (self.family, f"{X_SHORT[self.x_name]}{self.x}", self.extra) if w)

    @property
    def quick(self) -> bool:
        return " ".join(self.label.split()[:3]) in QUICK[self.op] or self.label in QUICK[self.op]


X_SHORT = {"sequence length": "N", "tokens": "M", "rows": "M", "batch": "B"}


def _tokens_budget(device) -> int:
    return 32768 if device.type == "cuda" else 512


def cases(op: str, device: torch.device, *, batch: int | None = None) -> list[Case]:
    """The real shapes of `op` (B/16, So400m/14, giant: hidden 768/1152/1536, head dims 64/72/96)
    on a GPU; the same families scaled down on a CPU (the reference path is slow)."""
    gpu = device.type == "cuda"
    if op == "attention":
        out = []
        lengths = (64, 196, 256, 729, 1024) if gpu else (16, 32, 64)
        for head_dim, heads in ((64, 12), (72, 16), (96, 16)) if gpu else ((64, 2), (72, 2)):
            for n in lengths:
                b = max(1, _tokens_budget(device) // n)
                out.append(Case(op, f"d{head_dim} H{heads}", n, "sequence length",
                                {"batch": b, "seqlen": n, "heads": heads, "head_dim": head_dim}, f"B{b}"))
        return out
    if op == "mlp":
        widths = ((768, 3072), (1152, 4304), (1536, 6144)) if gpu else ((64, 256), (96, 384))
        rows = (4096, 16384, 50176) if gpu else (64, 256)
        return [Case(op, f"C{c} I{i}", m, "tokens", {"rows": m, "hidden": c, "inter": i})
                for c, i in widths for m in rows]
    if op == "layer_norm":
        widths = (768, 1152, 1536) if gpu else (64, 96)
        rows = (16384, 32768, 65536) if gpu else (256, 1024)
        return [Case(op, f"N{n}", m, "rows", {"rows": m, "width": n}) for n in widths for m in rows]
    if op == "loss":
        dims = (768, 1152) if gpu else (64,)
        batches = (batch,) if batch else ((4096, 16384, 65536) if gpu else (128, 256, 512))
        return [Case(op, f"D{d}", b, "batch", {"batch": b, "dim": d}) for d in dims for b in batches]
    raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS)}")


def flops_and_bytes(case: Case, dtype: torch.dtype, backward: bool) -> tuple[float, float]:
    """Useful FLOPs and the minimum bytes moved (each input read once, each output written once)."""
    p, el = case.params, torch.finfo(dtype).bits // 8
    if case.op == "attention":
        b, n, h, d = p["batch"], p["seqlen"], p["heads"], p["head_dim"]
        fwd = 4.0 * b * n * n * h * d
        io = b * n * h * d * el
        return (fwd * 3.5, 12 * io) if backward else (fwd, 4 * io)  # bwd: q,k,v,o,dO in; dq,dk,dv out
    if case.op == "mlp":
        m, c, i = p["rows"], p["hidden"], p["inter"]
        fwd = 4.0 * m * c * i
        io = (3 * m * c + 2 * c * i) * el
        return (fwd * (1 + BWD_FLOP_FACTOR), 3 * io) if backward else (fwd, io)
    if case.op == "layer_norm":
        m, n = p["rows"], p["width"]
        return (0.0, 5 * m * n * el) if backward else (0.0, 2 * m * n * el)
    if case.op == "loss":
        b, d = p["batch"], p["dim"]
        return (6.0 * b * b * d, 4 * b * d * el) if backward else (2.0 * b * b * d, 2 * b * d * el)
    raise ValueError(case.op)


# --- implementations ------------------------------------------------------------------------------

def _compiled(fn):
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
    return torch.compile(fn, dynamic=False)


def _naive_attention(q, k, v):
    """[B, H, N, D] softmax(q k^T / sqrt(D)) v, materializing the scores (the eager baseline)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def naive_loss(img, txt, logit_scale, logit_bias):
    """The textbook sigmoid loss: [B, B] logits, +1 on the diagonal, -1 elsewhere."""
    logits = img @ txt.t() * logit_scale.exp() + logit_bias  # [B, B]
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def fastsiglip_label(device: torch.device) -> str:
    return "fastsiglip" if device.type == "cuda" else "fastsiglip (reference path)"


def _fastsiglip_ops(device):
    """The kernels on CUDA; on a CPU the ops' reference path (what `import fastsiglip` runs there)."""
    from . import ops

    return ops


def implementations(op: str, case: Case, device, dtype, *, backward: bool = True, seed: int = 0,
                    only: list[str] | None = None) -> dict:
    """name -> step() running one forward (and backward) on fresh-made inputs, or a reason string."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    p = case.params
    ours = _fastsiglip_ops(device)

    def rand(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, device=device, generator=gen, dtype=torch.float32) * scale).to(dtype)
        return t.requires_grad_(grad and backward)

    def step_of(fn, inputs):
        def step():
            out = fn(*inputs)
            if backward:
                out = out[0] if isinstance(out, tuple) else out
                grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
                torch.autograd.grad(out, grads, torch.ones_like(out) if out.dim() == 0 else out.detach())
            return out
        return step

    impls: dict = {}
    if op == "layer_norm":
        from . import reference

        m, n = p["rows"], p["width"]
        x, w, b = rand(m, n), rand(n, scale=0.1), rand(n, scale=0.1)
        args = (x, w, b)
        impls[fastsiglip_label(device)] = step_of(lambda *a: ours.layer_norm(*a), args)
        impls["eager"] = step_of(lambda *a: reference.layer_norm(*a), args)
        impls["torch.compile"] = step_of(_compiled(reference.layer_norm), args)
        liger = optional_peer("liger_kernel.ops.layer_norm", "LigerLayerNormFunction")
        impls["liger"] = liger if isinstance(liger, str) else step_of(lambda *a: liger.apply(*a, 1e-6), args)
    elif op == "mlp":
        from . import reference

        m, c, i = p["rows"], p["hidden"], p["inter"]
        args = (rand(m, c), rand(i, c, scale=c**-0.5), rand(i, scale=0.02), rand(c, i, scale=i**-0.5),
                rand(c, scale=0.02))
        impls[fastsiglip_label(device)] = step_of(lambda *a: ours.mlp(*a), args)
        impls["eager"] = step_of(lambda *a: reference.mlp(*a), args)
        impls["torch.compile"] = step_of(_compiled(reference.mlp), args)
    elif op == "attention":
        bsz, n, h, d = p["batch"], p["seqlen"], p["heads"], p["head_dim"]
        q, k, v = (rand(bsz, n, h, d) for _ in range(3))  # [B, N, H, D], fastsiglip's layout
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v))
        impls[fastsiglip_label(device)] = step_of(lambda *a: ours.attention(*a), (q, k, v))
        impls["eager"] = step_of(_naive_attention, (qt, kt, vt))
        impls["torch.compile"] = step_of(_compiled(_naive_attention), (qt, kt, vt))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            backend = getattr(SDPBackend, name, None)
            label = f"sdpa {name.split('_')[0].lower()}"  # "sdpa flash", ..., as in IMPLEMENTATIONS
            if backend is None:
                impls[label] = "not in this torch"
                continue

            def sdpa(a, b_, c, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(a, b_, c)

            impls[label] = step_of(sdpa, (qt, kt, vt))
        fa = optional_peer("flash_attn", "flash_attn_func")
        impls["flash_attn"] = fa if isinstance(fa, str) else step_of(fa, (q, k, v))
    elif op == "loss":
        bsz, dim = p["batch"], p["dim"]
        img = F.normalize(torch.randn(bsz, dim, device=device, generator=gen), dim=-1).to(dtype).requires_grad_(backward)
        txt = F.normalize(torch.randn(bsz, dim, device=device, generator=gen), dim=-1).to(dtype).requires_grad_(backward)
        scale = torch.tensor(math.log(10.0), device=device, requires_grad=backward)
        bias = torch.tensor(-10.0, device=device, requires_grad=backward)
        args = (img, txt, scale, bias)
        impls[fastsiglip_label(device)] = step_of(lambda *a: ours.sigmoid_loss(*a), args)
        impls["eager"] = step_of(naive_loss, args)
        impls["torch.compile"] = step_of(_compiled(naive_loss), args)
        SigLipLoss = optional_peer("open_clip.loss", "SigLipLoss")
        if isinstance(SigLipLoss, str):
            impls["open_clip"] = SigLipLoss
        else:
            oc = SigLipLoss()  # takes the scale already exponentiated, as open_clip's model returns it
            impls["open_clip"] = step_of(lambda i, t, s, b: oc(i, t, s.exp(), b), args)
        sk = optional_peer("siglip_kernel", "fused_siglip_loss")  # (img, txt, log scale, bias)
        impls["siglip-kernel"] = sk if isinstance(sk, str) else step_of(sk, args)
        # The B x B implementations (and the CPU's reference path) hold about four B x B float32
        # matrices: not attempted where that passes half the free memory (a CPU would swap or be killed).
        need = 16 * bsz * bsz
        if need > _free_bytes(device) // 2:
            why = f"skipped: the B x B logits need ~{need / 2**30:.0f} GiB, more than half the free memory"
            for name in ("eager", "torch.compile", "open_clip") + (() if device.type == "cuda" else
                                                                      (fastsiglip_label(device),)):
                if callable(impls[name]):
                    impls[name] = why
    else:
        raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS)}")
    if only:
        impls = {k: v for k, v in impls.items() if k in only or k.split(" (")[0] in only}
    return impls


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume 8 GiB
        return 8 * 2**30


# --- timing ---------------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of fn() after warm-up: triton.testing.do_bench on CUDA (flushes L2,
    synchronizes), wall clock around each call on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(max(1, warmup // 10)):
        fn()
    times = []
    for _ in range(max(3, rep // 10)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_ceilings(dtype=torch.bfloat16, device="cuda") -> dict:
    """Measured matmul TFLOP/s (an 8192^3 GEMM in `dtype` on CUDA, 1024^3 on a CPU) and copy
    bandwidth (1 GiB on CUDA, 64 MiB on a CPU) in GB/s: the ceilings the floors divide by."""
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=25, rep=100)
    src = torch.randn(2**28 if device.type == "cuda" else 2**24, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, warmup=25, rep=100)
    return {"matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6}


def floor_ms(flops: float, bytes_moved: float, ceilings: dict) -> float:
    """The time below which nothing can go: max(FLOPs / matmul peak, bytes / copy bandwidth)."""
    return max(flops / (ceilings["matmul_tflops"] * 1e9), bytes_moved / (ceilings["copy_gbps"] * 1e6))


def measure(op: str, device, dtype, *, backward: bool = True, only: list[str] | None = None,
            batch: int | None = None, ceilings: dict | None = None, warmup: int = 10, rep: int = 50,
            log=print) -> list[dict]:
    """Time every implementation of `op` on every case side by side; one row per (case, impl)."""
    device = torch.device(device)
    rows = []
    for case in cases(op, device, batch=batch):
        flops, nbytes = flops_and_bytes(case, dtype, backward)
        floor = floor_ms(flops, nbytes, ceilings) if ceilings else None
        ours = None
        for name, step in implementations(op, case, device, dtype, backward=backward, only=only).items():
            row = {"op": op, "case": case.label, "family": case.family, "x": case.x, "x_name": case.x_name,
                   "impl": name,
                   "pass": "fwd+bwd" if backward else "fwd", "device": str(device), "dtype": str(dtype)}
            if isinstance(step, str):
                rows.append({**row, "status": step})
                continue
            try:
                ms = time_ms(step, device, warmup, rep)
            except Exception as e:  # noqa: BLE001 -- a backend this build lacks: recorded, not fatal
                first = (str(e).strip().splitlines() or [""])[0]
                rows.append({**row, "status": f"unavailable ({type(e).__name__}: {first[:100]})"})
                continue
            finally:
                sync(device)
            if name.startswith("fastsiglip"):
                ours = ms
            row.update(status="ok", ms=ms, tflops=flops / ms / 1e9 if flops else None,
                       gbps=nbytes / ms / 1e6, floor_ms=floor)
            if ours is not None and not name.startswith("fastsiglip"):
                row["x_fastsiglip"] = ms / ours  # how many times faster fastsiglip is
            rows.append(row)
            log(f"  {op:10s} {case.label:24s} {name:28s} {ms:9.3f} ms")
    return rows


def table(rows: list[dict], value: str = "ms") -> str:
    """A markdown table: one line per case, one column per implementation, `value` (ms, or
    items_per_s) and how many times faster fastsiglip is."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    floor_key = f"floor_{value}"
    has_floor = any(r.get(floor_key) for r in rows)
    unit = {"ms": " ms", "items_per_s": "/s"}.get(value, "")
    head = ["case"] + ([f"floor{unit}"] if has_floor else []) + impls
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: dict = {}  # why an implementation did not run, once each
    for case, got in by_case.items():
        cells = [case]
        if has_floor:
            fl = next((r.get(floor_key) for r in got.values() if r.get(floor_key)), None)
            cells.append(f"{fl:.4g}" if fl else "")
        for impl in impls:
            r = got.get(impl)
            if r is None:
                cells.append("")
            elif r.get("status") != "ok":
                cells.append(r["status"].split(" (")[0].split(":")[0])
                notes.setdefault(f"{impl}: {r['status']}", None)
            else:
                ratio = r.get("x_fastsiglip")
                cells.append(f"{r[value]:.4g}{unit}" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    note = "(Nx) = how many times faster fastsiglip is than that implementation"
    return "\n".join(lines + [""] + [f"- {n}" for n in notes] + ([""] if notes else []) + [note])


def plot(rows: list[dict], path, title: str, y: str = "ms") -> None:
    """Time (or `y`) vs the case's x value, one line per implementation (and case family), the
    floor as a dashed line; needs matplotlib (`pip install fastsiglip[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastsiglip[plot]'") from e
    ok = [r for r in rows if r.get("status") == "ok" and r.get(y) is not None]
    if not ok:
        raise RuntimeError("nothing to plot: no implementation ran")
    family = lambda r: r.get("family", "")  # noqa: E731
    fams = list(dict.fromkeys(family(r) for r in ok))
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        sel = [r for r in ok if family(r) == fam]
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["x"], r[y]) for r in sel if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        floors = sorted({(r["x"], r[f"floor_{y}"]) for r in sel if r.get(f"floor_{y}")})
        if floors:  # the floor time, or for a throughput the bound it implies (peak / work per item)
            label = "floor (FLOPs, bytes / measured peaks)" if y == "ms" else "bound (measured matmul peak / FLOPs)"
            ax.plot([p[0] for p in floors], [p[1] for p in floors], "k--", label=label)
        ax.set_xscale("log", base=2)
        values = [r[y] for r in sel] + [p[1] for p in floors]
        if max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.set_xlabel(sel[0]["x_name"])
        ax.set_ylabel({"ms": "time (ms)", "items_per_s": "images / s"}.get(y, y))
        ax.set_title(fam or sel[0]["op"], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 45 * len(fams) + 20), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the whole model ----------------------------------------------------------------------------

def vision_flops_per_image(cfg) -> float:
    """Forward FLOPs of the vision tower for one image at the preset's resolution (patch embedding,
    per layer the q/k/v/out projections, attention scores and values, the MLP; the head ignored)."""
    v = cfg.vision
    n = v.num_patches if v.naflex else (v.image_size // v.patch_size) ** 2
    c, i = v.hidden_size, v.intermediate_size
    per_layer = 2 * n * (4 * c * c + 2 * c * i) + 4 * n * n * c
    return 2 * n * c * v.num_channels * v.patch_size**2 + v.num_hidden_layers * per_layer


def transformers_twin(model, cfg):
    """transformers' SiglipModel / Siglip2Model holding fastsiglip's weights (the parameter names
    are the same), or a reason string when transformers is not installed."""
    transformers = optional_peer("transformers", "SiglipModel")
    if isinstance(transformers, str):
        return transformers
    import transformers

    from .config import to_dict

    d = to_dict(cfg)
    cls = transformers.Siglip2Model if cfg.vision.naflex else transformers.SiglipModel
    conf_cls = transformers.Siglip2Config if cfg.vision.naflex else transformers.SiglipConfig
    hf = cls(conf_cls(**{k: v for k, v in d.items() if k != "architectures"}))
    hf.load_state_dict(model.state_dict(), strict=True)
    p = next(model.parameters())
    return hf.to(p.device, p.dtype).eval()


def model_sweep(model, cfg, batches, device, dtype, make_inputs, *, compile: bool = False, iters: int = 3,
                ceilings: dict | None = None, log=print) -> list[dict]:
    """Image-encoding throughput per batch size: fastsiglip (+ torch.compile), transformers with
    the same weights when installed; the floor is the matmul peak over the FLOPs per image.
    make_inputs(cfg, batch, device, dtype) -> the vision tower's keyword inputs."""
    device = torch.device(device)
    ceilings = ceilings or measure_ceilings(dtype, device)
    per_image = vision_flops_per_image(cfg)
    runs = {fastsiglip_label(device): model}
    if compile:
        runs[f"{fastsiglip_label(device)} + torch.compile"] = torch.compile(model)
    try:
        twin = transformers_twin(model, cfg)
    except Exception as e:  # noqa: BLE001 -- a config transformers cannot express: say so, go on
        twin = f"unavailable ({type(e).__name__})"
    runs["transformers"] = twin
    rows = []
    with torch.inference_mode():
        for b in batches:
            images = make_inputs(cfg, b, device, dtype)
            ours = None
            for name, m in runs.items():
                row = {"op": "model", "case": f"B{b}", "family": "image encoding", "x": b, "x_name": "batch",
                       "impl": name, "floor_items_per_s": ceilings["matmul_tflops"] * 1e12 / per_image}
                if isinstance(m, str):
                    rows.append({**row, "status": m})
                    continue
                ms = time_ms(lambda: m.get_image_features(**images), device, warmup=max(1, iters // 2) * 10,
                             rep=max(3, iters) * 10)
                ours = ours or b / ms * 1e3
                row.update(status="ok", ms=ms, items_per_s=b / ms * 1e3)
                if not name.startswith("fastsiglip"):
                    row["x_fastsiglip"] = ours / row["items_per_s"]
                rows.append(row)
                log(f"  batch {b:4d} {name:32s} {row['items_per_s']:10.1f} images/s")
    return rows
