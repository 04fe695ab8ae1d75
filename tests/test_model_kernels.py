"""The whole model through the Triton kernels (FASTSIGLIP_IMPL=kernel) against the reference
path: outputs, loss and every parameter gradient. On a CPU the kernels run in the Triton
interpreter (tests/conftest.py), so the shapes are tiny and float32; on a GPU the same test runs
the compiled kernels. This is the wiring test: each kernel is tested alone in tests/kernels/.
"""

import pytest
import torch

from fastsiglip.config import ModelConfig, TextConfig, VisionConfig
from fastsiglip.model import build

# Head dim 64 (and 72 for the second config): sizes the attention kernel compiles for.
TOWERS = [dict(hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2),
          dict(hidden_size=144, intermediate_size=100, num_hidden_layers=1, num_attention_heads=2)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _config(naflex, tower):
    vision = VisionConfig(**tower, patch_size=4, image_size=12, num_patches=16, naflex=naflex)
    text = TextConfig(**tower, vocab_size=50, max_position_embeddings=7)
    return ModelConfig(model_type="siglip2" if naflex else "siglip", vision=vision, text=text)


def _inputs(cfg, gen):
    batch = 3
    ids = torch.randint(0, 50, (batch, 7), generator=gen)
    text_mask = torch.ones(batch, 7, dtype=torch.int64)
    text_mask[1, 5:] = 0  # masked keys, every query computed (transformers' semantics)
    inputs = {"input_ids": ids, "attention_mask": text_mask, "return_loss": True}
    if cfg.vision.naflex:
        shapes = torch.tensor([[2, 3], [4, 4], [1, 1]])
        mask = torch.zeros(batch, 16, dtype=torch.int32)
        for i, (h, w) in enumerate(shapes.tolist()):
            mask[i, : h * w] = 1
        inputs.update(pixel_values=torch.randn(batch, 16, 3 * 16, generator=gen), pixel_attention_mask=mask,
                      spatial_shapes=shapes)
    else:
        inputs["pixel_values"] = torch.randn(batch, 3, 12, 12, generator=gen)
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _run(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    (out.loss + out.logits_per_image.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("naflex", [False, True], ids=["fixres", "naflex"])
@pytest.mark.parametrize("tower", range(len(TOWERS)), ids=["head64", "head72"])
def test_model_through_kernels_matches_reference(naflex, tower, monkeypatch):
    torch.manual_seed(0)
    cfg = _config(naflex, TOWERS[tower])
    model = build(cfg).to(DEVICE)
    inputs = _inputs(cfg, torch.Generator().manual_seed(1))
    monkeypatch.setenv("FASTSIGLIP_IMPL", "reference")
    ref, ref_grads = _run(model, inputs)
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    out, grads = _run(model, inputs)
    for name in ("logits_per_image", "image_embeds", "text_embeds", "loss"):
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-4, msg=name)
    valid = inputs["pixel_attention_mask"].bool() if naflex else slice(None)
    torch.testing.assert_close(out.vision_model_output.last_hidden_state[valid],
                               ref.vision_model_output.last_hidden_state[valid], rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-3)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-3, name
