"""Training-side model features: gradient checkpointing (transformers' gradient_checkpointing_enable)
and the fused QKV projection, whose state dict keeps transformers' q_proj / k_proj / v_proj keys.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastsiglip
from fastsiglip.config import ModelConfig, TextConfig, VisionConfig
from fastsiglip.model import Attention, EncoderLayer, build

TOWER = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1)


def _naflex_model_and_inputs():
    vision = VisionConfig(**TOWER, patch_size=4, image_size=8, num_patches=16, naflex=True)
    text = TextConfig(**TOWER, vocab_size=50, max_position_embeddings=5)
    torch.manual_seed(0)
    model = build(ModelConfig(model_type="siglip2", vision=vision, text=text))
    gen = torch.Generator().manual_seed(1)
    shapes = torch.tensor([[2, 3], [3, 4]])
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[0, 3:] = 0
    inputs = dict(input_ids=torch.randint(0, 50, (2, 5), generator=gen), attention_mask=mask, return_loss=True,
                  pixel_values=torch.randn(2, 16, 48, generator=gen), spatial_shapes=shapes,
                  pixel_attention_mask=(torch.arange(16)[None] < shapes.prod(1)[:, None]).to(torch.int32))
    return model, inputs


def _grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    (out.loss + out.logits_per_image.square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class AttentionCalls(TorchDispatchMode):
    """How many times the attention operator runs (forward or recomputed)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.namespace == "fastsiglip" and func._opname == "attention"
        return func(*args, **(kwargs or {}))


def _grads_counted(model, inputs):
    with AttentionCalls() as calls:
        grads = _grads(model, inputs)
    return grads, calls.count


def test_gradient_checkpointing_recomputes_each_layer_with_equal_gradients(monkeypatch):
    """Through the kernels (their backward runs on recomputed activations): the same gradients,
    and every encoder layer's attention runs twice per step when checkpointed (forward, then in
    backward); the layer's own hooks stay outside the checkpoint and fire once (transformers >=
    5.23)."""
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    model, inputs = _naflex_model_and_inputs()
    model.train()
    runs = []
    for layer in model.modules():
        if isinstance(layer, EncoderLayer):
            layer.register_forward_pre_hook(lambda module, args: runs.append(module))
    layers = len(runs_of := [m for m in model.modules() if isinstance(m, EncoderLayer)])
    assert layers == 2 and not model.is_gradient_checkpointing
    heads = 1  # the MAP head's attention, never checkpointed

    plain, attentions = _grads_counted(model, inputs)
    assert len(runs) == layers and attentions == layers + heads
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.is_activation_checkpointing
    runs.clear()
    checkpointed, attentions = _grads_counted(model, inputs)
    assert attentions == 2 * layers + heads
    assert len(runs) == layers and set(runs) == set(runs_of)
    assert checkpointed.keys() == plain.keys() and len(plain) == len(list(model.parameters()))
    for name, g in checkpointed.items():
        torch.testing.assert_close(g, plain[name], rtol=1e-6, atol=1e-7, msg=name)

    model.eval()  # as in transformers: checkpointing only while training
    with torch.no_grad(), AttentionCalls() as calls:
        model(**inputs)
    assert calls.count == layers + heads
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_every_n_layers_and_offload(monkeypatch):
    """transformers' activation_checkpointing_enable(every_n_layers=2, offload=True): layers 0, 2,
    ... over both towers are recomputed, their saved inputs held on the host; same gradients."""
    model, inputs = _naflex_model_and_inputs()
    model.train()
    plain = _grads(model, inputs)
    model.activation_checkpointing_enable(every_n_layers=2, offload=True)
    layers = [m for m in model.modules() if isinstance(m, EncoderLayer)]
    assert [layer.gradient_checkpointing for layer in layers] == [i % 2 == 0 for i in range(len(layers))]
    checkpointed = _grads(model, inputs)
    for name, g in checkpointed.items():
        torch.testing.assert_close(g, plain[name], rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="every_n_layers"):
        model.activation_checkpointing_enable(every_n_layers=0)


class GemmShapes(TorchDispatchMode):
    """The (input, weight) shapes of every addmm (what F.linear on 2-D input runs on a CPU)."""

    def __init__(self):
        super().__init__()
        self.gemms = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.addmm.default:
            self.gemms.append((tuple(args[1].shape), tuple(args[2].shape)))
        return func(*args, **(kwargs or {}))


def test_fused_qkv_is_one_gemm_per_attention_block(siglip_checkpoint, monkeypatch):
    monkeypatch.setenv("FASTSIGLIP_IMPL", "reference")
    model = fastsiglip.load(siglip_checkpoint)
    blocks = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(blocks) == 4
    pixels = torch.randn(2, 3, 32, 32)
    with GemmShapes() as spy, torch.no_grad():
        model.get_image_features(pixel_values=pixels)
    tokens, hidden = 2 * 16, 64
    # One [3C, C] GEMM per vision layer for q, k and v ...
    assert spy.gemms.count(((tokens, hidden), (hidden, 3 * hidden))) == 2
    # ... and on the tokens no other C -> C GEMM but each layer's out_proj and the MAP head's k and v.
    assert spy.gemms.count(((tokens, hidden), (hidden, hidden))) == 2 + 2

    # The fused block computes what the three separate projections do, as strided views of its
    # one output (token stride 3C), which the attention kernel reads without a copy.
    block, x = blocks[0], torch.randn(5, hidden)
    with torch.no_grad():
        captured = {}
        monkeypatch.setattr("fastsiglip.layers._attend", lambda q, k, v, layout: captured.update(q=q, k=k, v=v) or q)
        block(x)
        for name in "qkv":
            proj = getattr(block, f"{name}_proj")
            torch.testing.assert_close(captured[name].flatten(-2), proj(x), rtol=1e-5, atol=1e-6)
            assert captured[name].stride() == (3 * hidden, block.head_dim, 1)
        assert captured["q"].untyped_storage().data_ptr() == captured["v"].untyped_storage().data_ptr()


def test_state_dict_keeps_transformers_keys_load_and_save(siglip_checkpoint, tmp_path):
    """Loading a transformers checkpoint fills q_proj / k_proj / v_proj as stored; the state dict
    has exactly transformers' keys and shapes; saved as safetensors it loads back unchanged, into
    fastsiglip and into transformers (strict)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    ours = fastsiglip.load(siglip_checkpoint)
    stored = load_file(siglip_checkpoint / "model.safetensors")
    state = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in stored.items()}
    for key in (k for k in stored if "_proj." in k):
        assert torch.equal(state[key], stored[key]), key

    folder = tmp_path / "resaved"
    folder.mkdir()
    (folder / "config.json").write_text((siglip_checkpoint / "config.json").read_text())
    save_file(state, folder / "model.safetensors")  # plain tensors: no shared storage between q, k, v
    again = fastsiglip.load(folder)
    for key, value in again.state_dict().items():
        assert torch.equal(value, state[key]), key

    hf = transformers.SiglipModel(transformers.SiglipConfig.from_pretrained(siglip_checkpoint))
    hf.load_state_dict(state, strict=True)
    assert torch.equal(hf.vision_model.encoder.layers[0].self_attn.k_proj.weight,
                       stored["vision_model.encoder.layers.0.self_attn.k_proj.weight"])
