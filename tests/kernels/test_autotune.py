"""kernels/_autotune.py: in the Triton interpreter the autotuned kernels take the first config their
prune function keeps and time nothing (triton 3.6 and older time even a single kept config, and
timing asks for a GPU driver); on a GPU the decorator is triton.autotune itself."""

import importlib

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import Autotuner

from fastsiglip import reference
from fastsiglip.kernels import _autotune
from fastsiglip.kernels._device import INTERPRET

# the kernel files (fastsiglip.kernels re-exports a function under each of these names)
MODULES = {name: importlib.import_module(f"fastsiglip.kernels.{name}")
           for name in ("attention", "layer_norm", "mlp", "sigmoid_loss")}
attention = MODULES["attention"]

interpreter_only = pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's autotuner (TRITON_INTERPRET=1)")

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=1) for b in (64, 16, 32, 8)]
pruned_with = []


def _keep_blocks_up_to_n(configs, named_args, **kwargs):
    """Drops BLOCK 64 for n < 64: the first config kept is BLOCK 16 (the second listed)."""
    pruned_with.append(named_args["n"])
    return [c for c in configs if c.kwargs["BLOCK"] <= named_args["n"]]


@_autotune.autotune(configs=CONFIGS, key=["n"], prune_configs_by={"early_config_prune": _keep_blocks_up_to_n})
@triton.jit
def _scaled_copy(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * scale, mask=mask)


def _no_timing(*args, **kwargs):
    raise AssertionError("the interpreter's autotuner timed a config")


@interpreter_only
def test_first_kept_config_is_launched_without_timing(monkeypatch):
    monkeypatch.setattr(Autotuner, "_bench", _no_timing)
    monkeypatch.setattr(triton.testing, "do_bench", _no_timing)
    x = torch.arange(40, dtype=torch.float32)
    y = torch.zeros_like(x)
    pruned_with.clear()
    _scaled_copy[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, y, 40, 2.0)
    assert pruned_with == [40], "the prune function ran once, on the launch's arguments"
    assert isinstance(_scaled_copy, _autotune.FirstKeptConfig)
    assert _scaled_copy.best_config.kwargs == {"BLOCK": 16}  # three kept; the first of them
    assert torch.equal(y, 2 * x)  # the whole grid ran with that config
    # a new key (n) prunes again: here only BLOCK 8 is kept
    x, y = torch.arange(8, dtype=torch.float32), torch.zeros(8)
    _scaled_copy[lambda meta: (triton.cdiv(8, meta["BLOCK"]),)](x, y, 8, 3.0)
    assert _scaled_copy.best_config.kwargs == {"BLOCK": 8} and torch.equal(y, 3 * x)


@interpreter_only
def test_every_kernel_autotuner_times_nothing():
    """Each autotuned kernel of fastsiglip.kernels is a FirstKeptConfig under the interpreter, with
    the configs, keys and prune function triton.autotune was given."""
    tuners = {f"{m.__name__}.{name}": obj for m in MODULES.values()
              for name, obj in vars(m).items() if isinstance(obj, Autotuner)}
    assert len(tuners) >= 7, sorted(tuners)  # 3 attention, 2 layer norm, 1 mlp, 1 loss
    for name, tuner in tuners.items():
        assert type(tuner) is _autotune.FirstKeptConfig, name
        assert tuner.configs and tuner.early_config_prune is not None, name


@interpreter_only
def test_attention_with_two_kept_configs_runs(monkeypatch):
    """The attention forward lists two interpreter configs (pointer and warp-specialized body);
    with both kept (WS_CANDIDATE, as on sm_90) the first, the pointer body, runs untimed."""
    monkeypatch.setattr(Autotuner, "_bench", _no_timing)
    monkeypatch.setattr(attention, "_ws_mode", lambda *args, **kwargs: attention.WS_CANDIDATE)
    torch.manual_seed(0)
    q, k, v = (torch.randn(20, 2, 64) for _ in range(3))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    out = attention.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=13, max_seqlen_k=13)
    assert not attention._attn_fwd_kernel.best_config.kwargs.get("WARP_SPECIALIZE")
    expected = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=13, max_seqlen_k=13)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_on_a_gpu_the_decorator_is_triton_autotune():
    if INTERPRET:
        pytest.skip("the interpreter swaps in FirstKeptConfig (the tests above)")
    assert type(attention._attn_fwd_kernel) is Autotuner
