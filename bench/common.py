"""Shared benchmark plumbing for the scripts: timing, ceilings, results (timing, ceilings, floors
and peer lookup are fastsiglip.benchmarks', shared with the pytest-benchmark suite and the CLI).

Every bench script: measures the device's ceilings in the same process, times each
implementation side by side with `time_ms`, reports the floor (FLOPs and bytes over the
ceilings) beside the measured time, and writes bench/results/<name>-<device>.json plus a
markdown table with `write_results`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys

import torch

from fastsiglip import benchmarks
from fastsiglip.benchmarks import floor_ms, optional_peer  # noqa: F401 -- the scripts import them from here

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype names


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (these are GPU kernel benchmarks); run it on the GPU machine")


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The script's options plus the --out-dir every bench script takes (last in --help)."""
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    return parser.parse_args()


def time_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() after warm-up (triton.testing.do_bench, which flushes L2)."""
    return benchmarks.time_ms(fn, "cuda", warmup, rep)


def peak_memory_mb(fn) -> float:
    """Peak CUDA memory allocated during fn(), above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_ceilings(dtype=torch.bfloat16) -> dict:
    """Measured matmul TFLOP/s (8192^3 GEMM in `dtype`) and copy bandwidth (1 GiB copy), GB/s; printed."""
    ceilings = benchmarks.measure_ceilings(dtype, "cuda")
    print(f"ceilings: {ceilings['matmul_tflops']:.0f} TFLOP/s {str(dtype).removeprefix('torch.')} matmul, "
          f"{ceilings['copy_gbps']:.0f} GB/s copy")
    return ceilings


def device_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(name: str, rows: list[dict], meta: dict | None = None, out_dir=None) -> pathlib.Path:
    """Write <name>-<device>.json and .md; rows are flat dicts (one per shape/implementation)."""
    import triton

    out_dir = pathlib.Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        **(meta or {}),
        "rows": rows,
    }
    stem = out_dir / f"{name}-{device_slug()}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    header = f"# {name} on {payload['device']} (torch {payload['torch']}, triton {payload['triton']}, {payload['date']})\n\n"
    stem.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))
    return stem.with_suffix(".json")
