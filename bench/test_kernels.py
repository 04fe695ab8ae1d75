"""One benchmark per (op, shape, implementation, pass): `pytest bench/ --benchmark-only`.

The shapes, implementations, FLOPs and bytes come from fastsiglip.benchmarks (shared with
`fastsiglip bench kernels` and the bench scripts). Each timed call runs one forward (and
backward) step and then torch.cuda.synchronize(), so the time is the GPU's, not the launch's.
bf16 on CUDA. Without CUDA every benchmark is collected and skipped with the reason; a peer that is
not installed, or a backend this GPU lacks, skips with its own reason. `--benchmark-json FILE`
writes what `python bench/report.py --benchmark-json FILE` turns into the README's tables; each
benchmark's extra_info holds the op, shape, implementation, pass, FLOPs, bytes and the floor.
"""

import pytest
import torch

from fastsiglip import benchmarks

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16
ROUNDS = {"attention": 20, "mlp": 20, "layer_norm": 50, "loss": 5}


def _params():
    for op in benchmarks.OPS:
        for case in benchmarks.cases(op, torch.device("cuda")):  # the GPU shapes, collected everywhere
            for impl in benchmarks.IMPLEMENTATIONS[op]:
                for pass_ in benchmarks.PASSES:
                    yield pytest.param(op, case, impl, pass_, case.quick,
                                       id=f"{op}-{case.label.replace(' ', '_')}-{impl.replace(' ', '_')}-{pass_}")


@pytest.mark.parametrize("op,case,impl,pass_,quick", list(_params()))
def test_kernel(benchmark, ceilings_or_skip, op, case, impl, pass_, quick):
    backward = pass_ == "fwd+bwd"
    found = benchmarks.implementations(op, case, "cuda", DTYPE, backward=backward, only=[impl])
    step = found.get(impl)
    if step is None or isinstance(step, str):
        pytest.skip(f"{impl}: {step or 'not available'}")

    def synced():
        step()
        torch.cuda.synchronize()

    try:
        synced()  # warm-up outside the timing: autotuning, torch.compile, cuDNN plans
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of memory at {case.label}")
    except Exception as e:  # noqa: BLE001 -- e.g. an SDPA backend that does not take this head dim
        pytest.skip(f"{impl}: unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    flops, nbytes = benchmarks.flops_and_bytes(case, DTYPE, backward)
    benchmark.extra_info.update(op=op, case=case.label, family=case.family, x=case.x, x_name=case.x_name,
                                impl=impl, pass_=pass_, dtype=str(DTYPE), flops=flops, bytes=nbytes,
                                floor_ms=benchmarks.floor_ms(flops, nbytes, ceilings_or_skip),
                                device=torch.cuda.get_device_name())
    benchmark.pedantic(synced, rounds=ROUNDS[op], iterations=1, warmup_rounds=2)


@pytest.fixture
def ceilings_or_skip(request):
    if not CUDA:
        pytest.skip("needs a CUDA GPU: these benchmarks time the Triton kernels and their peers on the GPU "
                    "(on a CPU, `fastsiglip bench kernels` times the reference path instead)")
    return request.getfixturevalue("ceilings")
