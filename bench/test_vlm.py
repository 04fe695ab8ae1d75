"""The VLM towers under pytest-benchmark (`pytest bench/ --benchmark-only -k vlm`): fastsiglip.patch
against transformers' sdpa, bf16, forward and forward + backward, on CUDA (bench/vlm.py has the
floors, the other peers and the ratios). Without CUDA each is collected and skipped with the reason.
"""

import pytest
import torch

import vlm

CUDA = torch.cuda.is_available()
CASES = vlm.BENCH_CASES


@pytest.mark.parametrize("pass_", vlm.BENCH_PASSES)
@pytest.mark.parametrize("impl", vlm.BENCH_IMPLEMENTATIONS)
@pytest.mark.parametrize("tower,batch", CASES, ids=[c[0] for c in CASES])
def test_vlm_tower(benchmark, tower, batch, impl, pass_):
    if not CUDA:
        pytest.skip("needs a CUDA GPU (on a CPU, python bench/vlm.py --layers 2 --batch 2 times the reference path)")
    pytest.importorskip("transformers")
    found, kind, image = vlm.implementations(tower, torch.device("cuda"), torch.bfloat16)
    model = found[impl]
    x = vlm.tower_inputs(kind, image, batch, "cuda", torch.bfloat16)

    def step():
        if pass_ == "fwd":
            with torch.no_grad():
                model(**x)
        else:
            model.zero_grad(set_to_none=True)
            model(**x).last_hidden_state.float().square().mean().backward()
        torch.cuda.synchronize()

    step()  # warm-up: autotuning
    benchmark.extra_info.update(op="vlm", case=tower, impl=impl, pass_=pass_, batch=batch, dtype="torch.bfloat16",
                                device=torch.cuda.get_device_name())
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
