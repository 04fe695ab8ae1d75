"""Ahead-of-time compile check: every kernel, for Hopper (sm_90) and Blackwell (sm_100), no GPU.

    python bench/compile_check.py [--arch 90 100] [--ops attention mlp layer_norm sigmoid_loss]
                                  [--fast] [--jobs 2] [--json FILE] [--verbose] [--strict]

Why: a GPU is lent rarely, so the evidence that a kernel still builds well for the GPUs it is
written for is this check. It needs no CUDA driver: triton.compile with an explicit GPUTarget and
the ptxas bundled with triton.

What it compiles. The real launches: the host functions of kernels/ (attention_fwd/_bwd,
mlp_fwd/_bwd, layer_norm_fwd/_bwd, sigmoid_loss_fwd) run on `meta` tensors of the model's shapes
(hidden 768 / 1152 / 1536, head dims 64 / 72 / 96, FixRes and NaFlex sequences, the text tower,
the MAP pooling head's probe with one query per image, the loss at B = 65,536), and every kernel
launch they make is recorded instead of run. Each launch is bound exactly as triton's launcher
binds it (same specialization of integers and pointers); for an autotuned kernel, every config
its prune function keeps for those arguments is compiled: what the autotuner would time.

What it reports, per kernel, launch shape and candidate config: the tensor-core path (wgmma,
tcgen05, mma.sync or none, read from the PTX), registers and spill bytes (ptxas -v, as triton
runs it), shared memory against the per-block limit, and the main loop's schedule read from the
TTGIR: whether its global loads are asynchronous and multi-buffered (cp.async or TMA into a
ring of shared-memory stages) and whether its wgmma ops overlap (a warp_group_dot_wait with
pendings > 0 inside the loop leaves a dot in flight). A warp-specialized kernel (a
`ttg.warp_specialize` op: triton's `tl.range(..., warp_specialize=True)`) is reported by its
partitions instead, e.g. "warp-specialized: 1 producer + 2 consumers (232 regs)": producers issue
the TMA loads, consumers the dots, and the consumers overlap each other's wgmma and softmax.

Configs gated to one GPU generation (the attention forward's warp-specialized configs: sm_90,
see kernels/attention.py) are recorded as on a GPU that allows them and compiled only for that
generation.

Exit status: 1 when some (kernel, shape) has no candidate that compiles, fits shared memory and
has no spills on the generation's tensor-core path (wgmma on sm_90, tcgen05 on sm_100; kernels
without dots need only be spill-free; the MAP probe may use any tensor-core path); else 0.
Candidates that spill but survived pruning are listed as warnings (configs that spill should be
pruned, not timed); --strict makes them an error too. On sm_100 the MMAs (tcgen05) are always
asynchronous, barrier-synchronized: no wgmma waits to read, so only the loads' schedule is shown.

Results are cached per compiled kernel (source hash, options, target, triton version) in
$FASTSIGLIP_COMPILE_CACHE or ~/.cache/fastsiglip/compile_check, so a rerun after editing one
kernel recompiles only that kernel. TRITON_INTERPRET must be off while triton compiles: the script
re-executes itself without it.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") and __name__ == "__main__":
    # kernels/ picks its autotune configs at import time from TRITON_INTERPRET (one small config
    # in the interpreter): compile the real lists, in a process that never saw the variable.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

ARCHS = {90: "sm_90 (Hopper)", 100: "sm_100 (Blackwell)"}
TENSOR_CORE_PATH = {90: "wgmma", 100: "tcgen05"}  # what each generation's 16-bit dots should use
SMEM_LIMIT = {90: 232448, 100: 232448}  # bytes of shared memory one block may use (227 KB)
OPS = ("attention", "mlp", "layer_norm", "sigmoid_loss")
CACHE_VERSION = 2  # 2: warp_specialized in the results


# --- launch shapes -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    intermediate: int
    heads: int

    @property
    def head_dim(self):
        return self.hidden // self.heads


B16 = Model("B/16", 768, 3072, 12)
SO400M = Model("So400m/14", 1152, 4304, 16)
GIANT = Model("giant-opt/16", 1536, 6144, 16)
MODELS = (B16, SO400M, GIANT)
IMAGES = 256  # images per batch (the bench default)
TEXT_LEN = 64
LOSS_BATCH = 65536


def _meta(*shape, dtype=None):
    import torch

    return torch.empty(*shape, device="meta", dtype=dtype or torch.bfloat16)


def _cu(batch):
    import torch

    return torch.empty(batch + 1, device="meta", dtype=torch.int32)


def attention_cases(fast):
    """(shape name, callable running the host code) for the flash-attention kernels."""
    import torch

    att = importlib.import_module("fastsiglip.kernels.attention")
    cases = []

    def sm90(run):
        """The meta device stands for an sm_90 GPU: the warp-specialized forward configs are
        candidates (main() compiles them for sm_90 only)."""
        def gated():
            from unittest import mock

            with mock.patch.object(att, "_ws_device", lambda device: True), \
                    mock.patch.object(att, "_ws_enabled", lambda: True):
                run()
        return gated

    def self_attention(m, batch, seqlen, label, train=True):
        @sm90
        def run():
            q = _meta(batch * seqlen, m.heads, m.head_dim)
            cu = _cu(batch)
            scale = m.head_dim ** -0.5
            att.attention_fwd(q, q, q, cu, cu, seqlen, seqlen, scale)
            if train:
                lse = torch.empty(m.heads, batch * seqlen, device="meta", dtype=torch.float32)
                att.attention_bwd(q, q, q, q, q, lse, cu, cu, seqlen, seqlen, scale)
        return f"{m.name} d{m.head_dim} {label}", run

    def probe(m, batch, seqlen, train=True):
        @sm90
        def run():  # the MAP head: q [B, H, D], one query per image, cu_q = 0..B (model.py)
            q = _meta(batch, m.heads, m.head_dim)
            k = _meta(batch * seqlen, m.heads, m.head_dim)
            cu_q, cu_k = _cu(batch), _cu(batch)
            scale = m.head_dim ** -0.5
            att.attention_fwd(q, k, k, cu_q, cu_k, 1, seqlen, scale)
            if train:
                lse = torch.empty(m.heads, batch, device="meta", dtype=torch.float32)
                att.attention_bwd(q, q, k, k, q, lse, cu_q, cu_k, 1, seqlen, scale)
        return f"{m.name} d{m.head_dim} MAP probe (1 query, {seqlen} keys)", run

    for m in MODELS:
        if fast and m is not SO400M:
            continue
        cases.append(self_attention(m, IMAGES, 256, "N=256 (FixRes 256/16, NaFlex budget 256)"))
        cases.append(probe(m, IMAGES, 256))
        if fast:
            continue
        cases.append(self_attention(m, IMAGES, 729, "N=729 (FixRes 384/14)"))
        cases.append(self_attention(m, IMAGES // 4, 1024, "N=1024 (NaFlex budget 1024, 512/16)"))
        cases.append(self_attention(m, IMAGES, TEXT_LEN, f"N={TEXT_LEN} (text tower)"))
    return cases


def mlp_cases(fast):
    mlp = importlib.import_module("fastsiglip.kernels.mlp")
    cases = []
    for m in MODELS:
        if fast and m is not SO400M:
            continue
        cases.append((f"{m.name} C={m.hidden} I={m.intermediate} M={IMAGES * 196}",
                      lambda m=m: _mlp_launches(mlp, m, IMAGES * 196)))
    return cases


def _mlp_launches(mlp, m, tokens):
    """The MLP's six GEMMs (fc1, fc2; dh, dW2, dW1, dx), training and inference forward."""
    import types
    from unittest import mock

    # Split-K counts come from the GPU's SM count: an H100 / H200's 132, not the meta device's.
    sm_count = types.SimpleNamespace(multi_processor_count=132)
    splits = mlp._num_splits
    with mock.patch("torch.cuda.get_device_properties", lambda *_: sm_count), \
            mock.patch.object(mlp, "_num_splits", lambda M, N, K, device: splits(M, N, K, types.SimpleNamespace(type="cuda"))):
        x = _meta(tokens, m.hidden)
        w1, b1 = _meta(m.intermediate, m.hidden), _meta(m.intermediate)
        w2, b2 = _meta(m.hidden, m.intermediate), _meta(m.hidden)
        mlp.mlp_fwd(x, w1, b1, w2, b2, residual=x, save_pre=True)  # training forward
        mlp.mlp_fwd(x, w1, b1, w2, b2, residual=x, save_pre=False)  # inference
        mlp.mlp_bwd(x, x, _meta(tokens, m.intermediate), w1, w2)


def layer_norm_cases(fast):
    ln = importlib.import_module("fastsiglip.kernels.layer_norm")
    cases = []
    for m in MODELS:
        if fast and m is not SO400M:
            continue
        rows = IMAGES * 196

        def run(m=m, rows=rows):
            import torch

            x = _meta(rows, m.hidden)
            w = _meta(m.hidden)
            y, s, mean, rstd = ln.layer_norm_fwd(x, w, w, 1e-6)
            ln.layer_norm_fwd(x, w, w, 1e-6, residual=x)
            mean = torch.empty(rows, device="meta", dtype=torch.float32)
            ln.layer_norm_bwd(x, x, w, mean, mean)
            ln.layer_norm_bwd(x, x, w, mean, mean, ds_in=x)

        cases.append((f"{m.name} N={m.hidden} M={rows}", run))
    return cases


def sigmoid_loss_cases(fast):
    import torch

    sl = importlib.import_module("fastsiglip.kernels.sigmoid_loss")
    cases = []
    for m in MODELS:
        if fast and m is not B16:
            continue
        for with_grad in (False,) if fast else (True, False):
            def run(m=m, with_grad=with_grad):
                e = _meta(LOSS_BATCH, m.hidden)
                s = torch.empty((), device="meta", dtype=torch.float32)
                sl.sigmoid_loss_fwd(e, e, s, s, sl.DEFAULT_CHUNK, 0, with_grad)

            grad = "with gradients" if with_grad else "no gradients"
            cases.append((f"B={LOSS_BATCH} D={m.hidden} {grad}", run))
    return cases


CASES = {"attention": attention_cases, "mlp": mlp_cases, "layer_norm": layer_norm_cases,
         "sigmoid_loss": sigmoid_loss_cases}


# --- recording launches --------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    op: str
    case: str
    kernel_name: str
    kernel: object  # the Autotuner or JITFunction
    args: tuple
    kwargs: dict


def _fast_keeps(name, case, kwargs):
    """--fast (the CI subset, about 100 s of compiling on 2 cores): the kernels issue 11 was about.
    Of the MLP's GEMMs only the dh GEMM (the GELU-gradient epilogue, the register-heaviest); of
    self-attention the forward and dq kernels (dK/dV run in the MAP probe case)."""
    if name == "_matmul_kernel":
        return kwargs.get("EPILOGUE") == 2
    if name == "_attn_bwd_dkdv_kernel":
        return "MAP probe" in case
    return True


def record_launches(ops, fast):
    """Run each case's host code on meta tensors; return every distinct kernel launch it makes."""
    import triton

    launches, seen = [], set()
    for op in ops:
        module = importlib.import_module(f"fastsiglip.kernels.{op}")
        kernels = {name: obj for name, obj in vars(module).items()
                   if isinstance(obj, (triton.runtime.Autotuner, triton.runtime.JITFunction))}
        current = {}
        for name, kernel in kernels.items():
            def run(*args, grid=None, warmup=False, _name=name, _kernel=kernel, **kwargs):
                case = current["case"] + _role(_name, _kernel, args, kwargs)
                sig = (_name, case, _signature_key(_kernel, args, kwargs))
                if sig not in seen and (not fast or _fast_keeps(_name, case, kwargs)):
                    seen.add(sig)
                    launches.append(Launch(op, case, _name, _kernel, args, kwargs))
            kernel.run = run  # an instance attribute: kernel[grid](...) calls it instead of launching
        try:
            for case, fn in CASES[op](fast):
                current["case"] = case
                fn()
        finally:
            for kernel in kernels.values():
                del kernel.run
    return launches


def _signature_key(kernel, args, kwargs):
    """What makes two launches compile and prune alike: tensor dtypes and strides, the autotuner's
    key arguments as they are, other integers only as triton specializes them (== 1, % 16 == 0)."""
    names = getattr(kernel, "arg_names", [])
    tuned = set(getattr(kernel, "keys", []))

    def key(name, a):
        if hasattr(a, "dtype") and hasattr(a, "shape"):
            return ("tensor", str(a.dtype), tuple(a.stride()))
        if isinstance(a, int) and not isinstance(a, bool) and name not in tuned:
            return ("int", a == 1, a % 16 == 0)
        return a if isinstance(a, (int, float, bool, str, type(None))) else repr(a)
    return (tuple(key(n, a) for n, a in zip(names or [None] * len(args), args))
            + tuple(sorted((k, key(k, v)) for k, v in kwargs.items())))


def _role(name, kernel, args, kwargs):
    """What a launch is for, when one case launches a kernel several ways (the MLP's six GEMMs,
    LayerNorm with and without the residual)."""
    named = dict(zip(getattr(kernel, "arg_names", []), args))
    if name == "_matmul_kernel":
        epi = kwargs.get("EPILOGUE")
        m, n, k = named.get("M"), named.get("N"), named.get("K")
        what = {1: "fc1 + GELU" + (" (training: stores h)" if kwargs.get("STORE_AUX") else ""),
                2: "dh GEMM (GELU-gradient epilogue)"}.get(epi)
        if what is None:
            what = ("fc2 + residual" if kwargs.get("HAS_RESIDUAL") else
                    "weight-gradient GEMM" + (" (split-K)" if named.get("stride_cs") else "") if k > max(m, n)
                    else "dx GEMM")
        return f" | {what} {m}x{n}x{k}"
    if "HAS_RESIDUAL" in kwargs and name.startswith("_layer_norm"):
        return " | residual" if kwargs["HAS_RESIDUAL"] else " | plain"
    return ""


def candidates(launch):
    """[(config label, JITFunction, kwargs with the config's meta-parameters and options)]: for an
    autotuned kernel every config its prune function keeps for these arguments."""
    import triton

    kernel = launch.kernel
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel.nargs = dict(zip(kernel.arg_names, launch.args))
        configs = kernel.prune_configs(dict(launch.kwargs))
        out = []
        for c in configs:
            kw = {**launch.kwargs, **c.all_kwargs()}
            out.append((_config_label(c), kernel.fn, kw))
        return out
    return [("-", kernel, dict(launch.kwargs))]


def _config_label(c):
    meta = " ".join(f"{k[len('BLOCK_'):] if k.startswith('BLOCK_') else k}{v}" for k, v in c.kwargs.items()
                    if k not in ("GROUP_M", "WARP_SPECIALIZE"))
    return f"{meta} s{c.num_stages} w{c.num_warps}" + (" ws" if c.kwargs.get("WARP_SPECIALIZE") else "")


def arch_allows(kwargs, arch):
    """Whether a candidate is meant for `arch`: the warp-specialized attention configs only for the
    compute capability kernels/attention.py gates them to."""
    if not kwargs.get("WARP_SPECIALIZE"):
        return True
    att = importlib.import_module("fastsiglip.kernels.attention")
    return arch // 10 == att.WS_CAPABILITY_MAJOR


# --- compiling one candidate ---------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    arch: int
    fn: object
    args: tuple
    kwargs: dict


_BINDERS: dict = {}


def _pack(fn, backend, args, kwargs):
    """(ASTSource, options) as triton's launcher builds them for these arguments."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    key = (id(fn), backend.target.arch)
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = _BINDERS[key](*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def _cache_dir():
    root = os.environ.get("FASTSIGLIP_COMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "fastsiglip", "compile_check")
    path = pathlib.Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def task_key(task):
    """(ASTSource, options, cache key) of a task: equal keys compile to the same binary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", task.arch, 32)
    src, options = _pack(task.fn, make_backend(target), task.args, task.kwargs)
    key = hashlib.sha256(f"{CACHE_VERSION}-{triton.__version__}-{task.arch}-{src.hash()}-"
                         f"{sorted(options.__dict__.items())}".encode()).hexdigest()
    return src, options, key


def compile_task(task):
    """Compile one candidate for task.arch; a dict of what the report needs (cached on disk)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, options, key = task_key(task)
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    target = GPUTarget("cuda", task.arch, 32)
    triton.knobs.compilation.always_compile = True  # ptxas must run (its -v log is the source)
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ck = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 -- a config that does not compile is a result, not a crash
        msg = str(e).strip().splitlines()
        result = {"error": f"{type(e).__name__}: {msg[-1][:300] if msg else ''}"}
        cached.write_text(json.dumps(result))
        return result
    seconds = time.perf_counter() - start
    ptxas = _ptxas_numbers(log.getvalue()) or _ptxas_rerun(ck.asm["ptx"], task.arch)
    ttgir = ck.asm["ttgir"]
    result = {
        "path": tensor_core_path(ck.asm["ptx"]),
        "regs": ptxas["regs"], "spill_bytes": ptxas["spill_bytes"], "spill_loads": ptxas.get("spill_loads", 0),
        "ptxas_source": ptxas["source"],
        "smem": int(ck.metadata.shared), "tmem": int(getattr(ck.metadata, "tmem_size", 0) or 0),
        "num_warps": ck.metadata.num_warps,
        **loop_schedule(ttgir),
        "tc_ops": tensor_core_ops(ck.asm["ptx"]),
        "compile_s": round(seconds, 2),
    }
    cached.write_text(json.dumps(result))
    return result


def _ptxas_numbers(log):
    regs = re.findall(r"Used (\d+) registers", log)
    if not regs:
        return None
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stores, loads = (int(spills[-1][0]), int(spills[-1][1])) if spills else (0, 0)
    return {"regs": int(regs[-1]), "spill_bytes": stores, "spill_loads": loads, "source": "triton"}


def _ptxas_rerun(ptx, arch):
    """ptxas -v on the PTX ourselves (only when triton's log could not be captured)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "k.ptx"
        path.write_text(ptx)
        gpu = f"sm_{arch}a"
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(path), "-o", str(path) + ".o"],
                             capture_output=True, text=True)
    found = _ptxas_numbers(out.stderr + out.stdout) or {"regs": -1, "spill_bytes": -1}
    found["source"] = "rerun"
    return found


def tensor_core_path(ptx):
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def tensor_core_ops(ptx):
    """How many tensor-core instructions of each shape the PTX holds (e.g. wgmma m64n64k16)."""
    shapes = re.findall(r"(wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+|tcgen05\.mma\.cta_group::\d|"
                        r"mma\.sync\.aligned\.m\d+n\d+k\d+)", ptx)
    counts = {}
    for s in shapes:
        s = s.replace(".sync.aligned", "").replace("wgmma.mma_async", "wgmma")
        counts[s] = counts.get(s, 0) + 1
    return counts


def loop_schedule(ttgir):
    """The schedule of the loop holding the most dots (the main loop), read from the TTGIR.

    async_loads: global loads inside the loop go to shared memory asynchronously (cp.async /
    TMA) into a multi-buffered ring, i.e. the loop is software-pipelined; dot_waits: the
    `pendings` of each warp_group_dot_wait in the loop (all 0: every wgmma is waited on at once,
    so no two overlap); stages: buffers of the shared-memory ring (the leading dim of the
    mutable 3-D allocations; triton keeps num_stages - 1 of them for cp.async).
    """
    loops, stack = [], []
    for line in ttgir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            stack.append({"lines": [], "depth": 0})
        for loop in stack:
            loop["lines"].append(line)
            loop["depth"] += line.count("{") - line.count("}")
        while stack and stack[-1]["depth"] <= 0 and len(stack[-1]["lines"]) > 1:
            loops.append(stack.pop()["lines"])
    stages = [int(n) for n in re.findall(r"!ttg\.memdesc<(\d+)x\d+x\d+x[^>]*mutable>", ttgir)]
    ws = warp_specialization(ttgir)
    if not loops:
        return {"loop": "none", "async_loads": False, "dot_waits": [], "stages": max(stages, default=1),
                "warp_specialized": ws}
    main = max(loops, key=lambda body: sum(any(d in ln for d in _DOT_OPS) for ln in body))
    body = "\n".join(main)
    async_loads = bool(re.search(_ASYNC_LOADS, body))
    if ws is not None:  # the consumers' loop waits on barriers; the producer's loop issues the loads
        async_loads = any(p["role"] == "producer" and p["async_loads"] for p in ws["partitions"])
    waits = [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", body)]
    n_dots = sum(body.count(d) for d in _DOT_OPS)
    return {"loop": f"{n_dots} dots", "async_loads": async_loads, "dot_waits": waits,
            "stages": max(stages, default=1), "warp_specialized": ws}


_DOT_OPS = ("ttng.warp_group_dot ", "ttng.tc_gen5_mma", "tt.dot ")
_ASYNC_LOADS = (r"async_copy_global_to_local|async_tma_copy_global_to_local|ttng\.async_tma|"
                r"tt\.descriptor_load")


def warp_specialization(ttgir):
    """The partitions of a `ttg.warp_specialize` op (None without one), read from the TTGIR:
    {"partitions": [{"name", "warps", "role", "dots", "async_loads"}], "requested_regs": [...]}.
    Its regions are `default {` (the module's warps) and `partitionN(...) num_warps(W) {`; a
    region's role is "consumer" when it holds dots, "producer" when it only issues asynchronous
    loads (TMA), else "other". requested_regs: the registers asked for per non-default partition
    (setmaxnreg; the default region gets what is left)."""
    start = ttgir.find("ttg.warp_specialize(")
    if start < 0:
        return None
    head = ttgir[start:ttgir.find("\n", start)]
    regs = re.search(r"requestedRegisters = array<i32: ([\d, ]+)>", head)
    module_warps = re.search(r'"ttg\.num-warps" = (\d+)', ttgir)
    partitions, current = [], None
    for line in ttgir[start:].splitlines()[1:]:
        header = re.match(r"\s*(default) \{|\s*(partition\d+)\(.*num_warps\((\d+)\) \{\s*$", line)
        if header:
            name = header.group(1) or header.group(2)
            warps = int(header.group(3)) if header.group(3) else int(module_warps.group(1)) if module_warps else 0
            current = {"name": name, "warps": warps, "lines": []}
            partitions.append(current)
        elif re.match(r"\s*\} : \(", line):  # the end of the op
            break
        elif current is not None:
            current["lines"].append(line)
    out = []
    for p in partitions:
        body = "\n".join(p.pop("lines"))
        dots = sum(body.count(d) for d in _DOT_OPS)
        loads = bool(re.search(_ASYNC_LOADS, body))
        role = "consumer" if dots else "producer" if loads else "other"
        out.append({**p, "role": role, "dots": dots, "async_loads": loads})
    return {"partitions": out, "requested_regs": [int(r) for r in regs.group(1).split(",")] if regs else []}


def warp_specialization_text(ws):
    """e.g. "warp-specialized: 1 producer + 2 consumers (232 regs)"."""
    roles = [p["role"] for p in ws["partitions"]]
    parts = " + ".join(f"{roles.count(r)} {r}{'s' if roles.count(r) > 1 else ''}"
                       for r in ("producer", "consumer", "other") if roles.count(r))
    regs = sorted(set(ws["requested_regs"]))
    return f"warp-specialized: {parts}" + (f" ({'/'.join(map(str, regs))} regs)" if regs else "")


# --- verdicts and the report ---------------------------------------------------------------------

def verdict(result, arch, wants_tc, any_tc_ok):
    """(usable, reason): whether a candidate meets the bar of the module doc."""
    if "error" in result:
        return False, "compile error"
    if result["smem"] > SMEM_LIMIT[arch]:
        return False, "shared memory over the limit"
    if result["spill_bytes"] != 0:
        return False, f"spills {result['spill_bytes']} B"
    if wants_tc:
        if any_tc_ok and result["path"] != "none":
            return True, ""
        if result["path"] != TENSOR_CORE_PATH[arch]:
            return False, f"{result['path']} instead of {TENSOR_CORE_PATH[arch]}"
    return True, ""


def schedule_text(r):
    if "error" in r:
        return r["error"][:60]
    loads = "async" if r["async_loads"] else "sync"
    if r.get("warp_specialized"):
        return f"{warp_specialization_text(r['warp_specialized'])}, {loads} loads, {r['stages']} buf"
    waits = r["dot_waits"]
    overlap = ("" if not waits else " dots overlap" if max(waits) > 0 else " dots serial")
    return f"{loads} loads, {r['stages']} buf{overlap}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS))
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--fast", action="store_true", help="the CI subset: So400m attention forward and dq at "
                        "N=256, all of it for the MAP probe, the So400m MLP's dh GEMM, the loss without gradients "
                        "at D=768")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--json", help="write every result to this file")
    parser.add_argument("--verbose", action="store_true", help="one line per candidate config")
    parser.add_argument("--strict", action="store_true", help="also exit 1 when a candidate that spills "
                        "survives pruning")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice, once per process

    import triton

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    ops = [op for op in args.ops if not (args.fast and op == "layer_norm")]  # no dots: the full run covers it
    launches = record_launches(ops, args.fast)
    tasks, rows = [], []
    for launch in launches:
        for label, fn, kw in candidates(launch):
            for arch in args.arch:
                if arch_allows(kw, arch):
                    tasks.append(Task(arch, fn, launch.args, kw))
                    rows.append((launch, label, arch))
    print(f"compile check, triton {triton.__version__}: {len(launches)} launches, {len(tasks)} compiles "
          f"({', '.join(ARCHS[a] for a in args.arch)})", flush=True)
    start = time.perf_counter()
    results = _run_all(tasks, args.jobs)
    print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)

    groups = {}
    for (launch, label, arch), result in zip(rows, results):
        groups.setdefault((arch, launch.op, launch.kernel_name, launch.case), []).append((label, result))
    failures, spilling, report = [], [], []
    for (arch, op, kernel, case), cands in groups.items():
        wants_tc = kernel in _DOT_KERNELS  # every case here is bf16: its dots belong on tensor cores
        probe = "MAP probe" in case
        verdicts = [verdict(r, arch, wants_tc, probe) for _, r in cands]
        ok = any(v for v, _ in verdicts)
        for (label, r), (v, why) in zip(cands, verdicts):
            if "error" not in r and r["spill_bytes"] > 0:
                spilling.append(f"sm_{arch} {kernel} [{case}] {label}: {r['spill_bytes']} B spilled, {r['regs']} regs")
            report.append({"arch": arch, "op": op, "kernel": kernel, "case": case, "config": label,
                           "usable": v, "why": why, **r})
        if not ok:
            failures.append(f"sm_{arch} {kernel} [{case}]: " + "; ".join(f"{lb}: {why}" for (lb, _), (_, why)
                                                                           in zip(cands, verdicts)))
        best = min((r for (_, r), (v, _) in zip(cands, verdicts) if v),
                   key=lambda r: (r["spill_bytes"], -r["regs"]), default=None)
        _print_group(arch, kernel, case, cands, verdicts, ok, best, args.verbose)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"triton": triton.__version__, "results": report}, indent=1))
    if spilling:
        print(f"\nwarning: {len(spilling)} candidate configs spill but survive pruning (the autotuner would time them):")
        print("\n".join("  " + s for s in spilling))
    if failures:
        print(f"\nFAIL: {len(failures)} (kernel, shape) without a spill-free candidate on the tensor-core path:")
        print("\n".join("  " + f for f in failures))
        return 1
    if spilling and args.strict:
        print("\nFAIL (--strict): candidates that spill survive pruning")
        return 1
    print(f"\nOK: every (kernel, shape) has a spill-free candidate on the tensor-core path "
          f"({len(groups)} checked)")
    return 0


_DOT_KERNELS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_matmul_kernel",
                "_sigmoid_loss_block_kernel"}


def _print_group(arch, kernel, case, cands, verdicts, ok, best, verbose):
    n_ok = sum(v for v, _ in verdicts)
    head = f"sm_{arch} {kernel:28s} {case:52s} {n_ok}/{len(cands)} usable"
    if best is not None:
        head += (f"  best: {best['path']:8s} {best['regs']:3d} regs, smem {best['smem'] // 1024:3d} KB, "
                 f"{schedule_text(best)}")
    print(("  " if ok else "! ") + head, flush=True)
    for (label, r), (v, why) in zip(cands, verdicts):
        if not (verbose or not ok or label.endswith(" ws")):  # warp-specialized candidates: always shown
            continue
        if "error" in r:
            print(f"      {label:28s} {r['error'][:120]}")
            continue
        print(f"      {label:28s} {r['path']:8s} {r['regs']:3d} regs {r['spill_bytes']:5d} B spill "
              f"smem {r['smem'] // 1024:3d}/{SMEM_LIMIT[arch] // 1024} KB  {schedule_text(r):30s} "
              f"{' '.join(f'{k}x{n}' for k, n in r['tc_ops'].items())}  {'ok' if v else why}")


def _run_all(tasks, jobs):
    """Compile every distinct task once, `jobs` at a time (forked workers: tasks hold
    JITFunctions, which do not pickle); results in the order of `tasks`."""
    global _TASKS
    keys = [task_key(t)[2] for t in tasks]
    unique = list({k: t for k, t in zip(keys, tasks)}.items())
    print(f"{len(unique)} distinct kernels to compile or read from the cache", flush=True)
    if jobs <= 1 or len(unique) <= 1:
        done = {k: compile_task(t) for k, t in unique}
    else:
        import concurrent.futures
        import multiprocessing

        _TASKS = [t for _, t in unique]
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            done = dict(zip((k for k, _ in unique), pool.map(_compile_index, range(len(unique)))))
    return [done[k] for k in keys]


_TASKS: list = []


def _compile_index(i):
    return compile_task(_TASKS[i])


if __name__ == "__main__":
    sys.exit(main())
