"""kernels.mlp against reference.mlp: output and every gradient, FlashAttention tolerance rule.

On CPU the kernels run through the Triton interpreter (tiny shapes, float32 and float16); the
bfloat16 and real-size cases need CUDA.
"""

import importlib

import pytest
import torch

from fastsiglip import ops, reference
from fastsiglip.kernels import mlp

device_module = importlib.import_module("fastsiglip.kernels._device")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NAMES = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual")


def make_inputs(lead, C, I, residual=True, seed=0, x_scale=1.0, device=DEVICE):
    """float32 inputs: x [*lead, C], fc1 [I, C] + [I], fc2 [C, I] + [C], residual like x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, C, generator=g) * x_scale
    w1 = torch.randn(I, C, generator=g) / C**0.5
    b1 = torch.randn(I, generator=g) * 0.1
    w2 = torch.randn(C, I, generator=g) / I**0.5
    b2 = torch.randn(C, generator=g) * 0.1
    r = torch.randn(*lead, C, generator=g) if residual else None
    return [t.to(device) if t is not None else None for t in (x, w1, b1, w2, b2, r)]


def leaves(inputs, dtype):
    return [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs]


def run(fn, inputs, dy):
    y = fn(*inputs)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad if t is not None else None for t in inputs]


def check_mlp(fa_rule, inputs, dtype, exact_dtype=torch.float64, make_kernel_inputs=None):
    """Kernel vs reference: y and the gradient of every input that is not None."""
    kin = leaves(inputs, dtype) if make_kernel_inputs is None else make_kernel_inputs(inputs, dtype)
    g = torch.Generator().manual_seed(123)
    dy = torch.randn(inputs[0].shape, generator=g).to(inputs[0].device)
    y, grads = run(mlp, kin, dy)
    y_exact, grads_exact = run(reference.mlp, leaves(inputs, exact_dtype), dy)
    y_lowp, grads_lowp = run(reference.mlp, leaves(inputs, dtype), dy)
    assert y.dtype == dtype and y.shape == inputs[0].shape
    fa_rule("y", y, y_exact, y_lowp)
    for name, a, e, lp in zip(NAMES, grads, grads_exact, grads_lowp):
        if e is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert a is not None and a.dtype == dtype, f"{name}: missing gradient or wrong dtype"
        fa_rule(f"d{name}", a, e, lp)


# --- CPU (interpreter) and GPU: tiny odd shapes, not multiples of the tiles ---------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,C,I", [(1, 16, 64), (5, 24, 72), (33, 40, 100)])
@pytest.mark.parametrize("residual", [False, True])
def test_mlp_matches_reference(fa_rule, dtype, rows, C, I, residual):
    check_mlp(fa_rule, make_inputs((rows,), C, I, residual), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mlp_3d_input(fa_rule, dtype):
    check_mlp(fa_rule, make_inputs((2, 7), 24, 72, residual=True, seed=1), dtype)


def test_mlp_non_contiguous(fa_rule):
    """Strided x and residual (every other column), transposed-storage weights, batch-major x."""

    def strided(inputs, dtype):
        x, w1, b1, w2, b2, r = inputs
        lead, C = x.shape[:-1], x.shape[-1]
        x_nc = torch.empty(lead[1], lead[0], 2 * C, dtype=dtype, device=x.device).transpose(0, 1)[..., ::2]
        x_nc.copy_(x).requires_grad_()  # [B, N, C], strides (2C, 2BC, 2)
        w1_nc = w1.t().contiguous().to(dtype).t().requires_grad_()  # [I, C], strides (1, I)
        w2_nc = w2.t().contiguous().to(dtype).t().requires_grad_()
        r_nc = torch.stack([r, r], -1).to(dtype)[..., 1].detach().requires_grad_()
        assert not (x_nc.is_contiguous() or w1_nc.is_contiguous() or r_nc.is_contiguous())
        return [x_nc, w1_nc, b1.to(dtype).requires_grad_(), w2_nc, b2.to(dtype).requires_grad_(), r_nc]

    check_mlp(fa_rule, make_inputs((3, 5), 24, 72, residual=True, seed=2), torch.float32,
              make_kernel_inputs=strided)


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 200), (torch.float16, 200), (torch.float32, 33)])
def test_mlp_split_k_weight_grads(fa_rule, monkeypatch, dtype, rows):
    """The weight-gradient GEMMs split K (tokens) over programs; forced here on few rows
    (33 rows: asked for splits, but they round to one aligned split)."""
    mod = importlib.import_module("fastsiglip.kernels.mlp")
    monkeypatch.setattr(mod, "SPLIT_K_MIN_CHUNK", 16)
    used = []
    real = mod._num_splits
    monkeypatch.setattr(mod, "_num_splits", lambda *a: used.append(real(*a)) or used[-1])
    check_mlp(fa_rule, make_inputs((rows,), 24, 72, seed=8), dtype)
    assert used and min(used) > 1, f"split-K not exercised: {used}"


def test_mlp_without_biases(fa_rule):
    x, w1, _, w2, _, r = make_inputs((5,), 16, 64, seed=3)
    check_mlp(fa_rule, [x, w1, None, w2, None, r], torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp
def test_mlp_large_preactivations(fa_rule):
    """|h| up to ~1e3: the tanh formula must saturate cleanly (no inf/inf, no NaN)."""
    check_mlp(fa_rule, make_inputs((5,), 16, 64, seed=4, x_scale=300.0), torch.float32)


def test_mlp_zero_rows():
    x, w1, b1, w2, b2, r = leaves(make_inputs((0,), 16, 64), torch.float32)
    y = mlp(x, w1, b1, w2, b2, r)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    for t in (w1, b1, w2, b2):
        assert t.grad is not None and not t.grad.any()


@pytest.mark.parametrize("trainable", ["x", "weights"])
def test_mlp_partial_requires_grad(fa_rule, trainable):
    """Frozen weights (only dx) or a frozen input (only weight grads): the others stay None."""
    inputs = make_inputs((5,), 24, 72, seed=9)

    def some(inputs, dtype):
        ts = [t.to(dtype) for t in inputs]
        wanted = (0,) if trainable == "x" else (1, 2, 3, 4)
        return [t.requires_grad_() if i in wanted else t for i, t in enumerate(ts)]

    kin = some(inputs, torch.float32)
    y = mlp(*kin)
    y.backward(torch.ones_like(y))
    ref = leaves(inputs, torch.float64)
    reference.mlp(*ref).backward(torch.ones_like(y, dtype=torch.float64))
    low = leaves(inputs, torch.float32)
    reference.mlp(*low).backward(torch.ones_like(y))
    for name, k, e, lp in zip(NAMES, kin, ref, low):
        if k.requires_grad:
            fa_rule(f"d{name}", k.grad, e.grad, lp.grad)
        else:
            assert k.grad is None


def test_mlp_inference_matches_training_forward():
    """Without autograd no h is written; the output is bit-identical to the training forward."""
    inputs = leaves(make_inputs((5,), 24, 72, seed=5), torch.float16)
    y_train = mlp(*inputs)
    with torch.no_grad():
        y_infer = mlp(*inputs)
    assert y_infer.grad_fn is None and y_train.grad_fn is not None
    assert torch.equal(y_infer, y_train.detach())


def test_mlp_saves_only_x_and_h():
    """Autograd keeps x and the pre-activation h (and the weights, which are parameters)."""
    rows, C, I = 5, 24, 72
    x, w1, b1, w2, b2, r = leaves(make_inputs((rows,), C, I, seed=6), torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mlp(x, w1, b1, w2, b2, r)
    params = {w1.data_ptr(), w2.data_ptr()}
    activations = sorted((tuple(t.shape) for t in saved if t.data_ptr() not in params), key=len)
    assert activations == [(rows, C), (rows, I)], f"saved activations: {activations}"
    assert len(saved) == 4, f"saved {len(saved)} tensors: {[tuple(t.shape) for t in saved]}"
    y.sum().backward()  # and backward works from exactly those
    assert x.grad is not None and b1.grad is not None


def test_ops_routes_to_kernel(fa_rule, monkeypatch):
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    inputs = make_inputs((5,), 16, 64, seed=7)
    y = ops.mlp(*inputs)
    fa_rule("y", y, reference.mlp(*[t.double() for t in inputs]), reference.mlp(*inputs))


# --- bad inputs -------------------------------------------------------------------------------


def test_rejects_unsupported_dtype():
    inputs = [t.double() for t in make_inputs((2,), 16, 64)]
    with pytest.raises(TypeError, match="float64 is not supported.*reference"):
        mlp(*inputs)


def test_rejects_mixed_dtypes():
    x, w1, b1, w2, b2, r = make_inputs((2,), 16, 64)
    with pytest.raises(TypeError, match="fc2_weight is torch.float16 but x is torch.float32"):
        mlp(x, w1, b1, w2.half(), b2, r)


@pytest.mark.parametrize("which,shape,message", [
    ("fc2_weight", (16, 32), r"fc2_weight has shape \(16, 32\), expected \(16, 64\)"),
    ("fc1_bias", (16,), r"fc1_bias has shape \(16,\), expected \(64,\)"),
    ("residual", (3, 16), r"residual has shape \(3, 16\), expected \(2, 16\)"),
    ("x", (2, 8), r"x has shape \(2, 8\), expected \(2, 16\)"),
])
def test_rejects_mismatched_shapes(which, shape, message):
    inputs = dict(zip(NAMES, make_inputs((2,), 16, 64)))
    inputs[which] = torch.zeros(shape, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        mlp(**inputs)


def test_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(device_module, "INTERPRET", False)
    inputs = make_inputs((2,), 16, 64, device="cpu")
    with pytest.raises(ValueError, match="move the inputs to CUDA.*FASTSIGLIP_IMPL=reference"):
        mlp(*inputs)


def test_rejects_mixed_devices():
    x, w1, b1, w2, b2, r = make_inputs((2,), 16, 64)
    with pytest.raises(ValueError, match="different devices.*fc2_weight on meta"):
        mlp(x, w1, b1, w2.to("meta"), b2, r)


# --- GPU: bf16 / fp16 at the real sizes -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,C,I", [(197, 768, 3072), (50_000, 768, 3072), (4097, 1152, 4304)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (bf16 and real sizes)")
def test_mlp_real_shapes_gpu(fa_rule, dtype, rows, C, I, residual):
    # float32 as the "exact" reference: float64 GEMMs at 50k rows are slow even on a GPU, and
    # its error is far below the bf16/fp16 error being bounded.
    check_mlp(fa_rule, make_inputs((rows,), C, I, residual), dtype, exact_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (bf16 and real sizes)")
def test_mlp_bf16_small_odd_gpu(fa_rule):
    check_mlp(fa_rule, make_inputs((2, 33), 40, 100, residual=True), torch.bfloat16)
