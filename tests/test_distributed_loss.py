"""distributed_sigmoid_loss / SigmoidLoss(distributed=True) against the single-process loss.

Each case spawns W CPU processes (gloo over loopback, a file rendezvous in the test's folder); every rank takes its slice of
one global batch, computes its share L_r and backpropagates it. DDP's convention is emulated by
averaging over ranks: mean_r L_r must be the single-process loss on the concatenated batch, the
embedding gradients divided by W (DDP's average) and the scalar gradients averaged over ranks
must be the single-process gradients.
"""

import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastsiglip import reference
from fastsiglip.train import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT, SigmoidLoss, distributed_sigmoid_loss

D = 16
# pytest imports this file as `tests.test_distributed_loss` (importlib mode): spawned workers
# unpickle their target by that name, so the repository root must be on their sys.path.
ROOT = str(pathlib.Path(__file__).resolve().parents[1])
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout: only summation order differs


def _global_batch(b_img, b_txt, world, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(world * b_img, D, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(world * b_txt, D, generator=g, dtype=torch.float64), dim=-1)
    return img, txt, torch.tensor(2.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)


def _worker(rank, world, b_img, b_txt, out):
    # Rendezvous through a file in the test's own folder: no port picked in advance that a
    # concurrent run could take first; the ranks then connect over the loopback interface only.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        _compute_and_save(rank, world, b_img, b_txt, out)
        dist.barrier()  # every rank done with the group before any tears it down
    finally:
        dist.destroy_process_group()
    # Everything is computed, saved and torn down. gloo (torch 2.13, CPU) can still abort the
    # process in its C++ destructors at interpreter exit ("terminate called without an active
    # exception", about 1 run in 8 here), after this function returned: leave without running
    # them. A failure in the work above still raises before this line and fails the test.
    os._exit(0)


def _compute_and_save(rank, world, b_img, b_txt, out):
    img, txt, scale, bias = _global_batch(b_img, b_txt, world)
    local_img = img[rank * b_img:(rank + 1) * b_img].clone().requires_grad_()
    local_txt = txt[rank * b_txt:(rank + 1) * b_txt].clone().requires_grad_()
    scale, bias = scale.requires_grad_(), bias.requires_grad_()
    loss = distributed_sigmoid_loss(local_img, local_txt, scale, bias)
    loss.backward()
    # The module, in float64, with DDP-style averaging of its parameters' gradients.
    crit = SigmoidLoss(2.0, -3.0, distributed=True).double()
    mimg, mtxt = local_img.detach().clone().requires_grad_(), local_txt.detach().clone().requires_grad_()
    mloss = crit(mimg, mtxt)
    mloss.backward()
    torch.save(dict(loss=loss.detach(), img=local_img.grad, txt=local_txt.grad, scale=scale.grad,
                    bias=bias.grad, mloss=mloss.detach(), mimg=mimg.grad, mtxt=mtxt.grad,
                    mscale=crit.logit_scale.grad, mbias=crit.logit_bias.grad), f"{out}/rank{rank}.pt")
    # Ranks with different batch sizes are refused on every rank, with a message.
    uneven = torch.randn(3 + rank, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="same number of images"):
        distributed_sigmoid_loss(uneven, uneven, scale, bias)


@pytest.mark.parametrize("world,b_img,b_txt", [(2, 4, 6), (4, 3, 3)])  # rectangular per rank; square
def test_distributed_matches_single_process(tmp_path, monkeypatch, world, b_img, b_txt):
    monkeypatch.syspath_prepend(ROOT)
    mp.spawn(_worker, args=(world, b_img, b_txt, str(tmp_path)), nprocs=world, join=True)
    img, txt, scale, bias = _global_batch(b_img, b_txt, world)
    img.requires_grad_(), txt.requires_grad_(), scale.requires_grad_(), bias.requires_grad_()
    # Single process on the concatenated batch: pair k is (image k, text k), as on the ranks.
    loss = reference.sigmoid_loss(img, txt, scale, bias)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for prefix in ("", "m"):
        got_loss = torch.stack([r[prefix + "loss"] for r in ranks]).mean()
        torch.testing.assert_close(got_loss, loss.detach(), **TOL)
        got_img = torch.cat([r[prefix + "img"] for r in ranks]) / world  # DDP averages over ranks
        got_txt = torch.cat([r[prefix + "txt"] for r in ranks]) / world
        torch.testing.assert_close(got_img, img.grad, **TOL)
        torch.testing.assert_close(got_txt, txt.grad, **TOL)
        for name, want in (("scale", scale.grad), ("bias", bias.grad)):
            got = torch.stack([r[prefix + name].reshape(()) for r in ranks]).mean()
            torch.testing.assert_close(got, want, **TOL)


def test_requires_process_group():
    x = torch.randn(2, D)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed_sigmoid_loss(x, x, torch.tensor(1.0), torch.tensor(0.0))


def test_criterion_single_process():
    crit = SigmoidLoss()
    assert crit.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT) and crit.logit_bias.item() == LOGIT_BIAS_INIT
    img = torch.nn.functional.normalize(torch.randn(6, D), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, D), dim=-1)
    loss = crit(img, txt)
    want = reference.sigmoid_loss(img, txt, crit.logit_scale, crit.logit_bias)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert crit.logit_scale.grad is not None and crit.logit_bias.grad is not None

    class TwoTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor([1.5]))
            self.logit_bias = torch.nn.Parameter(torch.tensor([-7.0]))

    from_model = SigmoidLoss.from_model(TwoTower())
    assert from_model.logit_scale.item() == 1.5 and from_model.logit_bias.item() == -7.0
    with pytest.raises(ValueError, match="logit_scale"):
        SigmoidLoss.from_model(torch.nn.Linear(2, 2))
