"""torch.compile of whole models through the kernels' custom operators (FASTSIGLIP_IMPL=kernel,
the Triton interpreter on a CPU), as docs/architecture.md promises:

- FixRes two-tower with loss: fullgraph=True, forward and backward equal to eager;
- NaFlex (packed tokens): no graph break at all, plain torch.compile; a batch with other token
  counts reuses the graph (the token count is an unbacked size inside it); a new batch size
  recompiles once (automatic dynamic shapes), then never again; fullgraph forward and backward
  equal to eager.

Tiny towers (hidden 64, one head of 64, one layer) keep the interpreter fast.
"""

import pytest
import torch

from fastsiglip.config import ModelConfig, TextConfig, VisionConfig
from fastsiglip.model import build

TOWER = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1)
TEXT_LEN = 5


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(naflex, architecture="SiglipModel"):
    vision = VisionConfig(**TOWER, patch_size=4, image_size=8, num_patches=16, naflex=naflex)
    text = TextConfig(**TOWER, vocab_size=50, max_position_embeddings=TEXT_LEN)
    torch.manual_seed(0)
    return build(ModelConfig(model_type="siglip2" if naflex else "siglip", architecture=architecture,
                             vision=vision, text=text))


def _text(batch, gen):
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.int64)
    mask[0, 3:] = 0
    return dict(input_ids=torch.randint(0, 50, (batch, TEXT_LEN), generator=gen), attention_mask=mask)


def _naflex_pixels(shapes, gen, patches=16):
    shapes = torch.tensor(shapes)
    mask = (torch.arange(patches)[None] < (shapes[:, 0] * shapes[:, 1])[:, None]).to(torch.int32)
    return dict(pixel_values=torch.randn(len(shapes), patches, 48, generator=gen), pixel_attention_mask=mask,
                spatial_shapes=shapes)


def _loss_and_grads(model, fn, inputs):
    model.zero_grad()
    out = fn(**inputs)
    (out.loss + out.logits_per_image.square().mean()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-float16"])
def test_fixres_two_tower_fullgraph_matches_eager(autocast):
    """Forward with loss and backward (masked text: its packing is traced too); also under
    torch.autocast, where the operators' autocast rules must trace as they run eagerly (float32
    parameter gradients)."""
    model = _model(naflex=False)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(pixel_values=torch.randn(2, 3, 8, 8, generator=gen), **_text(2, gen), return_loss=True)
    device = next(model.parameters()).device.type

    def fn(**kwargs):
        with torch.autocast(device, torch.float16, enabled=autocast):
            return model(**kwargs)

    eager, eager_grads = _loss_and_grads(model, fn, inputs)
    out, grads = _loss_and_grads(model, torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs)
    assert {g.dtype for g in grads.values()} == {torch.float32}
    for name in ("loss", "logits_per_image", "image_embeds", "text_embeds"):
        torch.testing.assert_close(out[name], eager[name], rtol=1e-5, atol=1e-5, msg=name)
    assert grads.keys() == eager_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_naflex_compiles_without_graph_breaks_and_bounded_recompiles():
    from torch._dynamo.testing import CompileCounter

    model = _model(naflex=True, architecture="SiglipVisionModel")
    gen = torch.Generator().manual_seed(2)
    first = _naflex_pixels([[2, 3], [4, 4]], gen)
    # CompileCounter counts the graphs dynamo hands to the backend: one graph for the whole
    # forward means no graph break (torch._dynamo.explain(model)(**first) lists the reasons of any).
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)  # the default mode: graph breaks would be allowed
    with torch.no_grad():  # recompilation is decided by dynamo alone: no backward needed here
        compiled(**first)
        assert counter.frame_count == 1, f"{counter.frame_count} graphs: the forward broke"
        compiled(**_naflex_pixels([[1, 3], [3, 3]], gen))
        assert counter.frame_count == 1, "a batch with other token counts recompiled"
        for batch, expected in ((3, 2), (4, 2)):  # a new batch size: one recompile, dynamic from then on
            shapes = [[1, 3], [3, 3], [2, 2], [1, 1]][:batch]
            compiled(**_naflex_pixels(shapes, gen))
            assert counter.frame_count == expected, f"batch {batch}: {counter.frame_count} compiles"


def test_naflex_vision_fullgraph_backward_matches_eager():
    model = _model(naflex=True, architecture="SiglipVisionModel")
    inputs = _naflex_pixels([[2, 3], [3, 4]], torch.Generator().manual_seed(3))

    def run(fn):
        model.zero_grad()
        out = fn(**inputs)
        out.pooler_output.square().sum().backward()
        return out.pooler_output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, eager_grads = run(model)
    out, grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)
