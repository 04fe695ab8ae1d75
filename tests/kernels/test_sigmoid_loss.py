"""kernels.sigmoid_loss against reference.sigmoid_loss: the loss and all four gradients.

On CPU the kernel runs through the Triton interpreter (tiny shapes, float32 and float16) and is
compared with the float64 reference under the FlashAttention rule (its error at most twice
PyTorch's own float32/float16 error, plus a small floor); the bfloat16 and 65k-pair cases need
CUDA and compare with a row-chunked float32 reference.
"""

import importlib
import math

import pytest
import torch

from fastsiglip import ops, reference
from fastsiglip.kernels import sigmoid_loss

device_module = importlib.import_module("fastsiglip.kernels._device")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NAMES = ("loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias")
# Absolute floor of the tolerance, relative to the largest exact value of each output: float32
# rounding of a sum of a few hundred terms, for outputs whose PyTorch error happens to be ~0.
REL_FLOOR = 2e-6


def make_inputs(n_img, n_txt, dim, scale=math.log(10.0), bias=-10.0, seed=0, device=DEVICE, transpose=False):
    """float32 L2-normalized embeddings [n_img, D], [n_txt, D] and 0-dim scale / bias."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n_txt, dim, generator=g), dim=-1)
    if transpose:  # non-contiguous views: [D, B] storage read through .t()
        img, txt = img.t().contiguous().t(), txt.t().contiguous().t()
    return [t.to(device) for t in (img, txt, torch.tensor(float(scale)), torch.tensor(float(bias)))]


def loss_and_grads(fn, inputs, dtype, **kwargs):
    """fn's loss and the gradients of (image, text, logit_scale, logit_bias), inputs cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    loss = fn(*leaves, **kwargs)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def check(fa_rule, inputs, dtype=torch.float32, chunk_size=None, positive_offset=0):
    kw = dict(positive_offset=positive_offset)
    got = loss_and_grads(sigmoid_loss, inputs, dtype, chunk_size=chunk_size, **kw)
    exact = loss_and_grads(reference.sigmoid_loss, inputs, torch.float64, **kw)
    lowp = loss_and_grads(reference.sigmoid_loss, inputs, dtype, **kw)
    for name, a, e, t in zip(NAMES, got, exact, lowp):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        fa_rule(name, a, e, t, atol=1e-5 + REL_FLOOR * e.abs().max().item())


@pytest.mark.parametrize("n_img,n_txt,dim,chunk", [
    (1, 1, 8, None),  # a single positive pair
    (7, 7, 16, None),  # one block, smaller than a tile
    (37, 29, 24, 16),  # rectangular, neither a multiple of the chunk nor of the tile
    (29, 37, 40, 32),  # rectangular the other way
    (100, 100, 96, 48),  # several blocks and tiles, D = 96
])
def test_matches_reference_fp32(fa_rule, n_img, n_txt, dim, chunk):
    check(fa_rule, make_inputs(n_img, n_txt, dim, scale=2.3, bias=-4.0), chunk_size=chunk)


def test_non_contiguous_and_positive_offset(fa_rule):
    # positive_offset as the distributed loss uses it: this rank's images against gathered texts.
    inputs = make_inputs(12, 40, 8, scale=2.0, bias=-3.0, transpose=True)
    check(fa_rule, inputs, chunk_size=16, positive_offset=20)
    check(fa_rule, inputs, chunk_size=16, positive_offset=-5)  # some rows without a positive


@pytest.mark.parametrize("scale,bias", [(10.0, 50.0), (10.0, -50.0), (-10.0, 0.0), (0.0, 30.0)])
def test_extreme_logits_are_finite_and_exact(fa_rule, scale, bias):
    # exp(10) * <i, t> + bias spans about +-22000: exp(-|x|) underflows, log1p must not lose it.
    check(fa_rule, make_inputs(20, 20, 16, scale=scale, bias=bias), chunk_size=16)


def test_float16(fa_rule):
    check(fa_rule, make_inputs(40, 33, 32, scale=2.3, bias=-4.0), dtype=torch.float16, chunk_size=32)


def test_no_grad_path_and_grad_output():
    img, txt, s, b = make_inputs(20, 20, 8, scale=2.0, bias=-2.0)
    with torch.no_grad():
        plain = sigmoid_loss(img, txt, s, b)  # only the logits GEMM runs
    leaves = [t.clone().requires_grad_() for t in (img, txt, s, b)]
    loss = sigmoid_loss(*leaves)
    torch.testing.assert_close(plain, loss.detach())
    (3.0 * loss).backward()  # backward scales the gradients stored by the forward pass
    ref_leaves = [t.clone().requires_grad_() for t in (img, txt, s, b)]
    (3.0 * reference.sigmoid_loss(*ref_leaves)).backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)


def test_ops_dispatch_to_kernel(monkeypatch):
    # [1]-shaped scalars, as the model's nn.Parameters are: gradients keep that shape.
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    img, txt, s, b = make_inputs(9, 9, 8, scale=1.0, bias=-1.0)
    s, b = s.reshape(1).requires_grad_(), b.reshape(1).requires_grad_()
    got = ops.sigmoid_loss(img, txt, s, b, positive_offset=1)
    want = reference.sigmoid_loss(img, txt, s, b, positive_offset=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, r in zip(torch.autograd.grad(got, (s, b)), torch.autograd.grad(want, (s, b))):
        assert a.shape == (1,)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_bad_inputs(monkeypatch):
    img, txt, s, b = make_inputs(4, 4, 8)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        sigmoid_loss(img, txt[:, :4], s, b)
    with pytest.raises(ValueError, match="cast both to one dtype"):
        sigmoid_loss(img, txt.half(), s, b)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        sigmoid_loss(img.double(), txt.double(), s, b)
    with pytest.raises(ValueError, match="one device"):
        sigmoid_loss(img, txt, s.to("meta"), b)
    with pytest.raises(ValueError, match="empty batch"):
        sigmoid_loss(img[:0], txt, s, b)
    with pytest.raises(ValueError, match="must be scalars"):
        sigmoid_loss(img, txt, torch.ones(2), b)
    with pytest.raises(ValueError, match=r"\[B_img, D\]"):
        sigmoid_loss(img[0], txt, s, b)
    with pytest.raises(ValueError, match="chunk_size"):
        sigmoid_loss(img, txt, s, b, 0)
    if not HAS_CUDA:
        monkeypatch.setattr(device_module, "INTERPRET", False)
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            sigmoid_loss(img, txt, s, b)


# --- GPU: bf16 / fp16 / fp32 at real sizes ---------------------------------------------------


def chunked_reference(inputs, dtype, rows=4096):
    """reference.sigmoid_loss's loss and gradients, `rows` images at a time (positive_offset
    places each block; the reference divides by the block's rows, so rescale by rows / B_img),
    embeddings in `dtype`, logit_scale / logit_bias float32: the B x B matrix never exists."""
    img, txt, s, b = [t.detach().clone() for t in inputs]
    img, txt = img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()
    s, b = s.float().requires_grad_(), b.float().requires_grad_()
    total = torch.zeros((), device=img.device, dtype=torch.float64)
    for r0 in range(0, img.shape[0], rows):
        blk = img[r0:r0 + rows]
        part = reference.sigmoid_loss(blk, txt, s, b, positive_offset=r0) * (blk.shape[0] / img.shape[0])
        part.backward()
        total += part.detach().double()
    return [total.float(), img.grad, txt.grad, s.grad, b.grad]


GPU_CASES = [(dtype, *shape) for dtype in (torch.bfloat16, torch.float16, torch.float32)
             for shape in ((4096, 4096, 768), (5000, 3001, 1152))]
GPU_CASES += [(torch.bfloat16, 65536, 65536, 768), (torch.bfloat16, 65536, 65536, 1152)]


@pytest.mark.parametrize("dtype,n_img,n_txt,dim", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (bf16 and real sizes)")
def test_real_sizes_gpu(fa_rule, dtype, n_img, n_txt, dim):
    inputs = make_inputs(n_img, n_txt, dim)
    lowp_inputs = [t.to(dtype) if t.dim() else t for t in inputs]
    leaves = [t.detach().clone().requires_grad_() for t in lowp_inputs]
    loss = sigmoid_loss(*leaves, chunk_size=4096 if n_img <= 8192 else None)
    got = [loss.detach(), *torch.autograd.grad(loss, leaves)]
    exact = chunked_reference(lowp_inputs, torch.float32)
    lowp = chunked_reference(lowp_inputs, dtype)
    for name, a, e, t in zip(NAMES, got, exact, lowp):
        fa_rule(name, a.float(), e.float(), t.float(), atol=1e-5 + REL_FLOOR * e.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (bf16 and real sizes)")
def test_chunk_past_int32_offsets_gpu(fa_rule):
    """chunk_size 65,536: the block of G holds 2^32 elements, so row x row stride passes 2^31
    (the kernel forms tile bases in int64); same results as the chunked reference."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GB (an 8 GiB block of G)")
    inputs = make_inputs(65536, 65536, 256)
    lowp_inputs = [t.to(torch.bfloat16) if t.dim() else t for t in inputs]
    leaves = [t.detach().clone().requires_grad_() for t in lowp_inputs]
    loss = sigmoid_loss(*leaves, chunk_size=65536)
    got = [loss.detach(), *torch.autograd.grad(loss, leaves)]
    exact = chunked_reference(lowp_inputs, torch.float32)
    lowp = chunked_reference(lowp_inputs, torch.bfloat16)
    for name, a, e, t in zip(NAMES, got, exact, lowp):
        fa_rule(name, a.float(), e.float(), t.float(), atol=1e-5 + REL_FLOOR * e.abs().max().item())
