"""kernels.layer_norm against reference.layer_norm: outputs and every gradient, FlashAttention rule.

exact = the reference in float64 on upcast inputs, torch_lowp = the reference in the test dtype;
the kernel's error against exact must be at most twice PyTorch's own (the `fa_rule` fixture).
On CPU the kernel runs through the Triton interpreter (tiny shapes, float32 and float16); bfloat16
and the real sizes need CUDA.
"""

import importlib

import pytest
import torch

from fastsiglip import ops, reference
from fastsiglip.kernels import layer_norm

ln_module = importlib.import_module("fastsiglip.kernels.layer_norm")
device_module = importlib.import_module("fastsiglip.kernels._device")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS = 1e-6
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (bf16 and real sizes)")


def make_inputs(lead, N, residual, seed=0, device=DEVICE):
    """float32 x [*lead, N], weight [N] around 1, bias [N], residual like x (or None)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, N, generator=g) * 2 + 0.5  # an offset mean, as real activations have
    w = 1 + 0.1 * torch.randn(N, generator=g)
    b = 0.1 * torch.randn(N, generator=g)
    r = torch.randn(*lead, N, generator=g) if residual else None
    return [t.to(device) if t is not None else None for t in (x, w, b, r)]


def leaves(inputs, dtype, param_dtype=None):
    out = []
    for i, t in enumerate(inputs):
        dt = param_dtype if (param_dtype is not None and i in (1, 2)) else dtype
        out.append(None if t is None else t.detach().to(dt).requires_grad_())
    return out


def run(fn, inputs, dy, ds=None, view=None):
    """Forward (x passed through `view` if given), backward with dy on y and ds on s; grads."""
    x, w, b, r = inputs
    xin = view(x) if view is not None else x
    rin = view(r) if (view is not None and r is not None) else r
    out = fn(xin, w, b, EPS, rin)
    if r is None:
        y, s = out, None
        y.backward(dy.to(y.dtype))
    else:
        y, s = out
        outs, grads = ([y, s], [dy.to(y.dtype), ds.to(s.dtype)]) if ds is not None else ([y], [dy.to(y.dtype)])
        torch.autograd.backward(outs, grads)
    return y.detach(), (None if s is None else s.detach()), [None if t is None else t.grad for t in inputs]


def check(fa_rule, inputs, dtype, grad_on_s=True, view=None, param_dtype=None):
    x = inputs[0]
    shape = x.shape if view is None else view(x).shape
    g = torch.Generator().manual_seed(123)
    dy = torch.randn(shape, generator=g).to(x.device)
    ds = torch.randn(shape, generator=g).to(x.device) if (grad_on_s and inputs[3] is not None) else None
    y, s, grads = run(layer_norm, leaves(inputs, dtype, param_dtype), dy, ds, view)
    y_ex, s_ex, grads_ex = run(reference.layer_norm, leaves(inputs, torch.float64), dy, ds, view)
    y_lp, s_lp, grads_lp = run(reference.layer_norm, leaves(inputs, dtype, param_dtype), dy, ds, view)
    assert y.dtype == dtype and y.shape == shape
    fa_rule("y", y, y_ex, y_lp)
    if s is not None:
        assert s.dtype == dtype
        fa_rule("s", s, s_ex, s_lp)
    for name, a, e, lp in zip(("x", "weight", "bias", "residual"), grads, grads_ex, grads_lp):
        if e is None:
            continue
        assert a is not None and a.dtype == lp.dtype, f"d{name}: missing gradient or wrong dtype"
        fa_rule(f"d{name}", a, e, lp)


# --- CPU (interpreter) and GPU: tiny shapes, odd widths ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N", [8, 64, 100, 1000, 1152])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_matches_reference(fa_rule, dtype, N, rows, residual):
    check(fa_rule, make_inputs((rows,), N, residual, seed=rows * N), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_3d_input(fa_rule, dtype):
    check(fa_rule, make_inputs((2, 5), 96, residual=True, seed=1), dtype)
    check(fa_rule, make_inputs((2, 5), 96, residual=False, seed=2), dtype)


@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_non_contiguous(fa_rule, residual):
    """Column-strided x (copied by the kernel) and row-strided slices (used in place)."""
    inputs = make_inputs((40,), 7, residual, seed=3)  # x, residual stored [40, 7]
    transposed = lambda t: t.reshape(7, 40).t()  # noqa: E731  seen as [40, 7] with column stride 40
    check(fa_rule, inputs, torch.float32, view=transposed)
    x, w, b, r = make_inputs((9,), 100, residual, seed=4)
    wide = make_inputs((9,), 130, residual, seed=5)  # x, residual stored [9, 130]
    sliced = lambda t: t[:, 3:103]  # noqa: E731  seen as [9, 100] with row stride 130
    check(fa_rule, [wide[0], w, b, wide[3]], torch.float16, view=sliced)


def test_layer_norm_strided_params(fa_rule):
    """weight and bias as every other element of a longer vector."""
    x, w, b, r = make_inputs((5,), 50, residual=True, seed=12)
    kw, kb = (torch.stack([t, torch.full_like(t, 7.0)], 1).requires_grad_() for t in (w, b))  # [50, 2]
    y, s = layer_norm(x, kw[:, 0], kb[:, 0], EPS, r)
    y_ref, s_ref = reference.layer_norm(x, w, b, EPS, r)
    torch.testing.assert_close(y, y_ref)
    (y * y_ref).sum().backward()
    w_ref, b_ref = w.clone().requires_grad_(), b.clone().requires_grad_()
    (reference.layer_norm(x, w_ref, b_ref, EPS, r)[0] * y_ref).sum().backward()
    torch.testing.assert_close(kw.grad[:, 0], w_ref.grad)
    torch.testing.assert_close(kb.grad[:, 0], b_ref.grad)
    assert not kw.grad[:, 1].any() and not kb.grad[:, 1].any()


def test_layer_norm_residual_grad_on_y_only(fa_rule):
    """s feeds nothing downstream: only y's gradient arrives."""
    check(fa_rule, make_inputs((5,), 64, residual=True, seed=5), torch.float32, grad_on_s=False)


def test_layer_norm_residual_grad_on_s_only():
    """y unused: x and residual get exactly the gradient on s; weight and bias none."""
    x, w, b, r = leaves(make_inputs((3,), 16, residual=True, seed=6), torch.float32)
    _, s = layer_norm(x, w, b, EPS, r)
    ds = torch.randn_like(s)
    s.backward(ds)
    assert torch.equal(x.grad, ds) and torch.equal(r.grad, ds)
    assert w.grad is None and b.grad is None


def test_layer_norm_float32_params_with_float16_input(fa_rule):
    check(fa_rule, make_inputs((6,), 64, residual=True, seed=7), torch.float16, param_dtype=torch.float32)


@pytest.mark.parametrize("min_rows", [1, 4])
def test_layer_norm_many_programs_deterministic(fa_rule, monkeypatch, min_rows):
    """Several backward programs (some with no rows when min_rows=1): partial dw, db summed right,
    and bitwise the same on a second run."""
    monkeypatch.setattr(ln_module, "BWD_MIN_ROWS", min_rows)
    inputs = make_inputs((19,), 24, residual=False, seed=8)
    check(fa_rule, inputs, torch.float32)
    grads = [run(layer_norm, leaves(inputs, torch.float32), torch.ones(19, 24, device=DEVICE))[2] for _ in range(2)]
    for a, b in zip(grads[0][:3], grads[1][:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_empty(residual):
    x, w, b, r = leaves(make_inputs((0,), 32, residual), torch.float32)
    out = layer_norm(x, w, b, EPS, r)
    y = out[0] if residual else out
    assert y.shape == (0, 32)
    y.sum().backward()
    assert x.grad.shape == (0, 32) and torch.equal(w.grad, torch.zeros(32, device=DEVICE))


def test_ops_routes_to_kernel(monkeypatch, fa_rule):
    """FASTSIGLIP_IMPL=kernel sends ops.layer_norm here (on a CPU through the interpreter)."""
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    x, w, b, r = make_inputs((4,), 48, residual=True, seed=9)
    y, s = ops.layer_norm(x, w, b, EPS, r)
    y_ref, s_ref = reference.layer_norm(x, w, b, EPS, r)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


# --- bad input: clear messages ------------------------------------------------------------------


def _bad(**overrides):
    x, w, b, r = make_inputs((2,), 16, residual=True)
    args = {"x": x, "weight": w, "bias": b, "residual": r, **overrides}
    return lambda: layer_norm(args["x"], args["weight"], args["bias"], EPS, args["residual"])


@pytest.mark.parametrize("make_call,error,match", [
    (lambda: _bad(x=torch.zeros(2, 16, dtype=torch.float64, device=DEVICE)), TypeError, "float64 is not supported"),
    (lambda: _bad(x=torch.zeros(1, 8193, device=DEVICE), weight=torch.ones(8193, device=DEVICE),
                  bias=torch.zeros(8193, device=DEVICE), residual=None), ValueError, "width must be 1..8192"),
    (lambda: _bad(weight=torch.ones(15, device=DEVICE)), ValueError, r"weight has shape \(15,\), expected \(16,\)"),
    (lambda: _bad(bias=torch.ones(2, 16, device=DEVICE)), ValueError, r"bias has shape \(2, 16\)"),
    (lambda: _bad(weight=torch.ones(16, dtype=torch.float64, device=DEVICE)), TypeError, "weight dtype"),
    (lambda: _bad(bias=None), TypeError, "bias must be a tensor"),
    (lambda: _bad(residual=torch.zeros(2, 17, device=DEVICE)), ValueError, "residual must have x's shape"),
    (lambda: _bad(residual=torch.zeros(2, 16, dtype=torch.float64, device=DEVICE)), TypeError,
     "residual dtype torch.float64 is not supported"),
    (lambda: _bad(weight=torch.ones(16, device="meta")), ValueError, "one device.*weight on meta"),
])
def test_layer_norm_bad_input(make_call, error, match):
    with pytest.raises(error, match=match):
        make_call()()


def test_layer_norm_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(device_module, "INTERPRET", False)
    x, w, b, _ = make_inputs((2,), 16, residual=False, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors.*FASTSIGLIP_IMPL=reference"):
        layer_norm(x, w, b)


# --- GPU: bfloat16 and the real sizes -----------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,N", [(65536, 768), (16384, 1024), (32768, 1152), (8192, 1536), (2048, 8192)])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_gpu_real_sizes(fa_rule, dtype, rows, N, residual):
    check(fa_rule, make_inputs((rows,), N, residual, seed=N), dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_gpu_model_shapes(fa_rule, dtype):
    """[B, N, C] activations as the encoder passes them, bf16/fp16 params, odd token count."""
    check(fa_rule, make_inputs((3, 729), 1152, residual=True, seed=10), dtype)
    check(fa_rule, make_inputs((5, 197), 768, residual=False, seed=11), dtype)
