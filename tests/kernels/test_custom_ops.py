"""The kernels as PyTorch custom operators (torch.ops.fastsiglip.*): torch.library.opcheck of
every operator (schema, fake implementation, autograd registration, AOT dispatch with dynamic
shapes) in float32 and float16, the autocast rules, and what each one keeps for backward.

On a CPU the operators run their Triton kernels through the interpreter (tests/conftest.py), on
tiny shapes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastsiglip.kernels  # noqa: F401  (registers the operators)
from fastsiglip import ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
OPS = torch.ops.fastsiglip


def rand(*shape, dtype=torch.float32, grad=False, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)
    return t.requires_grad_(grad)


def opcheck(op, args):
    torch.library.opcheck(op, args, raise_exception=True)


def cu(*lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


# --- opcheck ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [None, "same", "float32"])
@pytest.mark.parametrize("with_stats", [True, False])
def test_opcheck_layer_norm(dtype, residual, with_stats):
    x = rand(2, 3, 16, dtype=dtype, grad=True)
    w, b = rand(16, grad=True, seed=1) * 0.1 + 1, rand(16, grad=True, seed=2)
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()  # float32 parameters
    r = None if residual is None else rand(2, 3, 16, dtype=dtype if residual == "same" else torch.float32,
                                           grad=True, seed=3)
    if not with_stats:  # inference: no statistics, hence nothing to differentiate through
        x, w, b, r = (None if t is None else t.detach() for t in (x, w, b, r))
    opcheck(OPS.layer_norm.default, (x, w, b, r, 1e-6, None, with_stats))
    y, s, mean, rstd = OPS.layer_norm(x, w, b, r, 1e-6, dtype, with_stats)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    assert mean.shape == rstd.shape == ((6,) if with_stats else (0,))
    assert s.numel() == 0 if r is None else s.dtype == torch.promote_types(dtype, r.dtype)
    if not with_stats:
        return
    dy = rand(2, 3, 16, dtype=dtype, seed=4)
    ds_in = None if r is None else rand(2, 3, 16, dtype=s.dtype, seed=5)
    opcheck(OPS.layer_norm_backward.default, (dy, x.detach() if r is None else s.detach(), w.detach(),
                                              mean, rstd, ds_in))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save_pre", [True, False])
def test_opcheck_mlp(dtype, save_pre):
    x = rand(5, 16, dtype=dtype, grad=save_pre)
    w1, b1 = rand(32, 16, dtype=dtype, grad=save_pre, scale=0.3, seed=1), rand(32, dtype=dtype, grad=save_pre, seed=2)
    w2, b2 = rand(16, 32, dtype=dtype, grad=save_pre, scale=0.3, seed=3), rand(16, dtype=dtype, grad=save_pre, seed=4)
    r = rand(5, 16, dtype=dtype, grad=save_pre, seed=5)
    opcheck(OPS.mlp.default, (x, w1, b1, w2, b2, r, save_pre))
    y, h = OPS.mlp(x, w1, b1, w2, b2, r, save_pre)
    assert h.shape == ((5, 32) if save_pre else (0,))
    if save_pre:
        dy = rand(5, 16, dtype=dtype, seed=6)
        args = [t.detach() for t in (dy, x, h, w1, w2)]
        opcheck(OPS.mlp_backward.default, (*args, [True] * 5))
        opcheck(OPS.mlp_backward.default, (*args, [False, True, False, True, False]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("return_lse", [True, False])
def test_opcheck_attention(dtype, return_lse):
    cu_seqlens = cu(3, 5)
    q, k, v = (rand(8, 2, 64, dtype=dtype, grad=return_lse, seed=i) for i in range(3))
    args = (q, k, v, cu_seqlens, cu_seqlens, 5, 5, 0.125)
    opcheck(OPS.attention.default, (*args, return_lse))
    out, lse = OPS.attention(*args, return_lse)
    assert lse.shape == ((2, 8) if return_lse else (0,))
    if return_lse:
        dout = rand(8, 2, 64, dtype=dtype, seed=3)
        opcheck(OPS.attention_backward.default, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse,
                                                 cu_seqlens, cu_seqlens, 5, 5, 0.125))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck_sigmoid_loss(dtype, with_grad):
    img = torch.nn.functional.normalize(rand(6, 16, seed=1), dim=-1).to(dtype).requires_grad_(with_grad)
    txt = torch.nn.functional.normalize(rand(5, 16, seed=2), dim=-1).to(dtype).requires_grad_(with_grad)
    scale = torch.full((1,), 2.3, device=DEVICE, requires_grad=with_grad)
    bias = torch.full((1,), -4.0, device=DEVICE, requires_grad=with_grad)
    opcheck(OPS.sigmoid_loss.default, (img, txt, scale, bias, 4, 1, with_grad))


def test_opcheck_mask_indices():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool, device=DEVICE)
    opcheck(ops.mask_indices, (mask.reshape(-1),))
    assert OPS.mask_indices(mask.reshape(-1)).tolist() == [0, 1, 4, 5, 6]


# --- autocast ---------------------------------------------------------------------------------


class OpInputs(TorchDispatchMode):
    """Records the dtypes of the floating tensors each fastsiglip operator receives."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastsiglip":
            flat = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            self.calls.append((func._opname, [a.dtype for a in flat], args))
        return func(*args, **(kwargs or {}))


def test_autocast_runs_each_kernel_in_the_autocast_dtype(monkeypatch):
    """float32 parameters and activations under torch.autocast(float16): MLP, attention and loss
    kernels get float16 inputs; LayerNorm keeps its float32 input and parameters (float32
    statistics) and returns float16; every parameter gradient comes back float32."""
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    x = rand(6, 16, grad=True)
    ln_w, ln_b = torch.ones(16, device=DEVICE, requires_grad=True), torch.zeros(16, device=DEVICE, requires_grad=True)
    w1, b1 = rand(32, 16, grad=True, scale=0.3, seed=1), rand(32, grad=True, seed=2)
    w2, b2 = rand(16, 32, grad=True, scale=0.3, seed=3), rand(16, grad=True, seed=4)
    scale, bias = torch.zeros(1, device=DEVICE, requires_grad=True), torch.zeros(1, device=DEVICE, requires_grad=True)
    params = (ln_w, ln_b, w1, b1, w2, b2, scale, bias)
    with OpInputs() as spy:
        with torch.autocast(DEVICE, torch.float16):
            h = ops.layer_norm(x, ln_w, ln_b)
            y = ops.mlp(h, w1, b1, w2, b2)  # float16 LN output, float32 weights: cast to float16
            q = torch.cat([y, y, y, y], dim=-1).view(2, 3, 1, 64)
            a = ops.attention(q, q.float(), q)  # mixed dtypes: all cast to float16
            emb = torch.nn.functional.normalize(a.flatten(1), dim=-1)  # float32 (autocast's norm)
            loss = ops.sigmoid_loss(emb, emb, scale, bias)
        assert h.dtype == y.dtype == a.dtype == torch.float16 and loss.dtype == torch.float32
        loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    first = {}
    for name, dtypes, _ in spy.calls:
        first.setdefault(name, dtypes)
    assert first["layer_norm"] == [torch.float32] * 3
    assert first["mlp"] == [torch.float16] * 5
    assert first["attention"] == [torch.float16] * 3
    assert first["sigmoid_loss"][:2] == [torch.float16] * 2 and first["sigmoid_loss"][2:] == [torch.float32] * 2
    assert {"layer_norm_backward", "mlp_backward", "attention_backward"} <= set(first)


def test_layer_norm_keeps_a_float32_residual_stream(fa_rule):
    """x float16 (a block's output under autocast) plus a float32 residual: s = x + residual in
    float32 as PyTorch's add gives it, y in float16; gradients in each input's dtype."""
    x, r = rand(4, 32, dtype=torch.float16, grad=True), rand(4, 32, grad=True, seed=1)
    w, b = rand(32, grad=True, seed=2), rand(32, grad=True, seed=3)
    with torch.autocast(DEVICE, torch.float16):
        y, s = fastsiglip.kernels.layer_norm(x, w, b, 1e-6, r)
    assert y.dtype == torch.float16 and s.dtype == torch.float32
    (y.float().square().sum() + s.sum()).backward()
    assert x.grad.dtype == torch.float16 and r.grad.dtype == w.grad.dtype == torch.float32
    leaves = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    y_ref, s_ref = reference.layer_norm(leaves[0], leaves[2], leaves[3], 1e-6, leaves[1])
    torch.testing.assert_close(s, s_ref.float(), rtol=0, atol=0)  # float16 -> float32 add is exact
    y_lowp = reference.layer_norm(x.detach(), w.detach(), b.detach(), 1e-6, r.detach())[0].half()
    fa_rule("y", y, y_ref, y_lowp)


# --- inference fast path: what each operator keeps for backward -------------------------------


def saved_by(fn):
    """(tensors autograd saved while fn ran, fn's result)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def test_inference_allocates_no_backward_buffers(monkeypatch):
    """Under no_grad / inference_mode the kernels are called without their backward outputs
    (LayerNorm mean / rstd, MLP pre-activation h, attention LSE, loss gradients: empty) and
    autograd saves nothing;
    with gradients the same calls keep exactly what the backward reads."""
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    x = rand(5, 16, grad=True)
    w1, b1, w2, b2 = rand(32, 16, grad=True, seed=1), rand(32, grad=True), rand(16, 32, grad=True, seed=2), rand(16)
    q = rand(2, 4, 1, 64, grad=True, seed=3)
    emb, s = torch.nn.functional.normalize(rand(4, 16, seed=4), dim=-1).requires_grad_(), torch.zeros(1)
    calls = {
        "layer_norm": lambda: ops.layer_norm(x, w1[0], b2),
        "mlp": lambda: ops.mlp(x, w1, b1, w2, b2),
        "attention": lambda: ops.attention(q, q, q),
        "sigmoid_loss": lambda: ops.sigmoid_loss(emb, emb, s, s),
    }
    expected_saved = {"layer_norm": [(5, 16), (16,), (5,), (5,)],  # x, weight, mean, rstd
                      "mlp": [(5, 16), (5, 32), (32, 16), (16, 32)],  # x, h, the two weights
                      "attention": [(8, 1, 64)] * 4 + [(1, 8), (3,), (3,)],  # q, k, v, out, LSE, cu_seqlens
                      "sigmoid_loss": [(4, 16), (4, 16), (1,), (1,)]}  # the four gradients
    aux = {"layer_norm": slice(2, None), "mlp": 1, "attention": 1, "sigmoid_loss": slice(1, None)}
    for name, call in calls.items():
        for context in (torch.no_grad, torch.inference_mode):
            with OpInputs() as spy, context():
                saved, _ = saved_by(call)
            assert saved == [], name
            (op, _, args), = spy.calls
            assert op == name and args[-1] is False, f"{name} was asked for its backward outputs"
            outs = getattr(OPS, name)(*args)
            extra = outs[aux[name]]
            assert all(t.numel() == 0 for t in (extra if isinstance(extra, tuple) else [extra])), name
        saved, out = saved_by(call)
        assert [tuple(t.shape) for t in saved] == expected_saved[name], name
        out.sum().backward()
