"""`fastsiglip bench model|kernels|loss`, the pytest-benchmark suite's collection, bench/report.py.

On a CPU these run the reference path (labelled so) on small shapes; timings are not checked,
only that tables and plots come out.
"""

import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastsiglip import benchmarks, cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_without_subcommand_means_model():
    """The README's main-job command, `fastsiglip bench --preset NAME`, is `bench model`."""
    parser = cli.build_parser()
    args = parser.parse_args(cli._bench_argv(["bench", "--preset", "siglip2-base-patch16-224"]))
    assert args.command_bench == "model" and args.preset == "siglip2-base-patch16-224" and args.func is cli.cmd_bench
    assert parser.parse_args(cli._bench_argv(["bench"])).command_bench == "model"
    args = parser.parse_args(cli._bench_argv(["bench", "kernels", "--op", "mlp"]))
    assert args.command_bench == "kernels" and args.op == "mlp"
    args = parser.parse_args(cli._bench_argv(["bench", "loss", "--batch", "65536"]))
    assert args.command_bench == "loss" and args.batch == 65536


def test_bench_model_plot(siglip_checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "y.png"
    assert cli.main(["bench", "model", "--model", str(siglip_checkpoint), "--batch-size", "2", "--iters", "1",
                     "--device", "cpu", "--plot", str(png), "--plot-batches", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "reference path" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    if importlib.util.find_spec("transformers"):  # the peer with the same weights is in the table
        assert "transformers" in out


def test_bench_kernels_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, rows = tmp_path / "x.png", tmp_path / "rows.json"
    assert cli.main(["bench", "kernels", "--op", "layer_norm", "--impl", "fastsiglip", "eager", "liger",
                     "--rep", "3", "--device", "cpu", "--quiet", "--plot", str(png), "--json", str(rows)]) == 0
    out = capsys.readouterr().out
    assert "fastsiglip (reference path)" in out and "| case |" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    got = json.loads(rows.read_text())["rows"]
    assert {r["impl"] for r in got} == {"fastsiglip (reference path)", "eager", "liger"}
    assert all(r["status"] == "ok" for r in got if r["impl"] != "liger")
    assert all(r.get("x_fastsiglip", 0) > 0 for r in got if r["impl"] == "eager")


def test_bench_loss(capsys):
    assert cli.main(["bench", "loss", "--batch", "64", "--impl", "fastsiglip", "eager", "--rep", "3",
                     "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "loss (fwd+bwd" in out and "B64" in out


def test_loss_implementations_agree():
    """The benchmarked steps compute the same loss (peers that are installed included)."""
    case = benchmarks.cases("loss", torch.device("cpu"), batch=32)[0]
    values = {}
    for name, step in benchmarks.implementations("loss", case, "cpu", torch.float32, backward=False).items():
        if callable(step) and name != "torch.compile":
            values[name] = float(step())
    ours = values.pop("fastsiglip (reference path)")
    assert values and all(abs(v - ours) <= 1e-4 * abs(ours) for v in values.values()), values


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour: every benchmark skipped")
def test_benchmark_suite_collects_every_kernel_and_peer_and_skips_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-rs",
                          "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    expected = sum(len(benchmarks.cases(op, torch.device("cuda"))) * len(benchmarks.IMPLEMENTATIONS[op])
                   * len(benchmarks.PASSES) for op in benchmarks.OPS)
    vlm = {node.targets[0].id: ast.literal_eval(node.value)  # bench/vlm.py's constants, without importing it
           for node in ast.parse((ROOT / "bench" / "vlm.py").read_text()).body
           if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "").startswith("BENCH_")}
    expected += len(vlm["BENCH_CASES"]) * len(vlm["BENCH_IMPLEMENTATIONS"]) * len(vlm["BENCH_PASSES"])
    assert f"{expected} skipped" in out.stdout and "passed" not in out.stdout
    assert "needs a CUDA GPU" in out.stdout


def test_report_builds_tables_from_pytest_benchmark_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def bench(impl, ms):  # the shape of one entry of pytest-benchmark's --benchmark-json output
        return {"name": f"test_kernel[{impl}]", "stats": {"median": ms / 1e3},
                "extra_info": {"op": "layer_norm", "case": "N768 M65536", "impl": impl, "pass_": "fwd+bwd",
                               "floor_ms": 0.05, "device": "NVIDIA H200"}}

    run = {"machine_info": {"python_version": "3.11"}, "datetime": "2026-12-01T00:00:00",
           "benchmarks": [bench("fastsiglip", 0.1), bench("eager", 0.25)]}
    (tmp_path / "kernels-quick.json").write_text(json.dumps(run))
    text = report.section(tmp_path)
    assert "**layer_norm**, fwd+bwd" in text and "| N768 M65536 | 0.050 | 0.100 | 0.250 (2.50x) |" in text


def test_implementation_names_match_the_suite():
    """bench/test_kernels.py parametrizes over IMPLEMENTATIONS: every name must be one implementations() makes."""
    for op in benchmarks.OPS:
        case = benchmarks.cases(op, torch.device("cpu"))[0]
        made = {name.split(" (")[0] for name in benchmarks.implementations(op, case, "cpu", torch.float32)}
        assert made == set(benchmarks.IMPLEMENTATIONS[op]), op


def test_vlm_tower_bench_runs_on_the_cpu_reference_path(tmp_path):
    """bench/vlm.py on a CPU: one layer of each kind of tower, patched and not, labelled as the
    reference path; the peers that need CUDA are listed as skipped with their reason."""
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSIGLIP_IMPL")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "vlm.py"), "--towers", "so400m-224", "smolvlm-512",
                           "--layers", "1", "--batch", "2", "--rep", "3", "--out-dir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("vlm-*.json")).read_text())
    timed = [r for r in result["rows"] if "ms" in r]
    assert {(r["tower"], r["pass"], r["impl"]) for r in timed} == {
        (t, p, i) for t in ("so400m-224", "smolvlm-512") for p in ("fwd", "fwd+bwd")
        for i in ("transformers sdpa", "fastsiglip.patch")}
    assert all(r["path"] == "CPU reference path" and r["ms"] > 0 for r in timed)
    assert all(r["skipped"] for r in result["rows"] if "ms" not in r)
