"""fastsiglip.patch(model) on tiny random transformers VLMs (PaliGemma, LLaVA with
vision_feature_layer -2, LLaVA-OneVision, Gemma 3, Idefics3 with a partly padded tile) and bare
SiglipModel / Siglip2Model: the patched model computes what the unpatched one does (logits and
vision gradients), with the same parameters, state-dict keys and save/load behaviour; the
fastsiglip operators are what runs; unpatch restores transformers' modules.
"""

import collections
import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import fastsiglip

transformers = pytest.importorskip("transformers")
patch_module = importlib.import_module("fastsiglip.patch")
from tests.test_modules import KernelCalls as FastsiglipOps  # noqa: E402 (counts torch.ops.fastsiglip calls)
T = transformers
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=32,
              patch_size=8)  # head dim 64: the attention kernel takes it in the interpreter
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=512)
IMAGE_TOKEN, BOI, EOI = 100, 101, 102
VLMS = ["paligemma", "llava", "onevision", "gemma3", "idefics3"]


def build(kind):
    torch.manual_seed(0)
    siglip = T.SiglipVisionConfig(**VISION)
    if kind == "paligemma":
        config = T.PaliGemmaConfig(vision_config=siglip, text_config=T.GemmaConfig(**TEXT),
                                   image_token_index=IMAGE_TOKEN, projection_dim=32)
        model = T.PaliGemmaForConditionalGeneration(config)
    elif kind == "llava":
        config = T.LlavaConfig(vision_config=siglip, text_config=T.LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
                               vision_feature_layer=-2, vision_feature_select_strategy="full")
        model = T.LlavaForConditionalGeneration(config)
    elif kind == "onevision":
        config = T.LlavaOnevisionConfig(vision_config=siglip, text_config=T.Qwen2Config(**TEXT),
                                        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                                        vision_feature_select_strategy="full", image_grid_pinpoints=[[32, 32], [32, 64]])
        model = T.LlavaOnevisionForConditionalGeneration(config)
    elif kind == "gemma3":
        config = T.Gemma3Config(vision_config=T.SiglipVisionConfig(**VISION, vision_use_head=False),
                                text_config=T.Gemma3TextConfig(**TEXT), mm_tokens_per_image=4,
                                image_token_index=IMAGE_TOKEN, boi_token_index=BOI, eoi_token_index=EOI)
        model = T.Gemma3ForConditionalGeneration(config)
    elif kind == "idefics3":
        config = T.Idefics3Config(vision_config=T.Idefics3VisionConfig(**VISION), text_config=T.LlamaConfig(**TEXT),
                                  scale_factor=2, image_token_id=IMAGE_TOKEN)
        model = T.Idefics3ForConditionalGeneration(config)
    return model.eval()


def inputs(kind, model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = 2
    if kind == "idefics3":
        pixels = torch.randn(batch, 2, 3, 32, 32, generator=gen)
        mask = torch.ones(batch, 2, 32, 32, dtype=torch.bool)
        mask[1, 1, :, 16:] = False  # the second tile of the second sample is half padding
        pixels[1, 1, :, :, 16:] = 0
        x, image_tokens = dict(pixel_values=pixels, pixel_attention_mask=mask), 2 * 4  # tiles x (16 / 2^2)
    elif kind == "onevision":
        x = dict(pixel_values=torch.randn(batch, 3, 3, 32, 32, generator=gen),
                 image_sizes=torch.tensor([[32, 64]] * batch))  # the base image and two 32x32 crops
        with torch.no_grad():
            features = model.model.get_image_features(**x, vision_feature_layer=-1,
                                                      vision_feature_select_strategy="full")
        features = getattr(features, "pooler_output", features)
        image_tokens = features[0].shape[0]
    else:
        x, image_tokens = dict(pixel_values=torch.randn(batch, 3, 32, 32, generator=gen)), 4 if kind == "gemma3" else 16
    length = image_tokens + 6
    ids = torch.randint(0, 90, (batch, length), generator=gen)
    ids[:, 1:1 + image_tokens] = IMAGE_TOKEN
    if kind == "gemma3":
        ids[:, 0], ids[:, 1 + image_tokens] = BOI, EOI
    x.update(input_ids=ids, attention_mask=torch.ones(batch, length, dtype=torch.long))
    if kind == "paligemma":
        x["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
    return x


def vision_params(model):
    tower = dict(model.named_modules())[patch_module._towers(model)[0][0]]
    return {n: p for n, p in tower.named_parameters()}




def _step(model, x):
    model.zero_grad()
    out = model(**x)
    loss = out.logits.float().square().mean()
    loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in vision_params(model).items() if p.grad is not None}


@pytest.mark.parametrize("kind", VLMS)
def test_patched_vlm_equals_unpatched(kind):
    reference = build(kind)
    model = copy.deepcopy(reference)
    x = inputs(kind, model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert fastsiglip.patch(model) is model
    assert fastsiglip.patched(model) == [patch_module._towers(model)[0][0]]
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # the very same Parameter objects
    tower = dict(model.named_modules())[fastsiglip.patched(model)[0]]
    assert all(type(layer).__module__ == "fastsiglip.layers" for layer in tower.encoder.layers)
    logits, grads = _step(model, x)
    expected, expected_grads = _step(reference, x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert grads.keys() == expected_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    fastsiglip.patch(model)  # twice: a no-op
    assert type(tower.encoder).__module__ == "fastsiglip.layers"


@pytest.mark.parametrize("kind", VLMS)
def test_the_fastsiglip_kernels_run_inside(kind, monkeypatch, ignore_interpreter_noise):
    reference = build(kind)
    model = fastsiglip.patch(copy.deepcopy(reference))
    x = inputs(kind, reference)
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    with FastsiglipOps() as spy, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        ignore_interpreter_noise()
        logits = model(**x).logits
    layers = VISION["num_hidden_layers"]
    towers = {"onevision": 1, "idefics3": 1}.get(kind, 1)
    assert spy.calls["attention"] >= layers * towers and spy.calls["mlp"] >= layers and spy.calls["layer_norm"] >= 2 * layers
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(**x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["paligemma", "idefics3"])
def test_training_step_and_gradient_checkpointing_as_the_vlm_enables_it(kind):
    reference, model = build(kind), fastsiglip.patch(build(kind))
    for m in (reference, model):
        m.train()
        m.gradient_checkpointing_enable()
    x = inputs(kind, reference)
    tower = dict(model.named_modules())[fastsiglip.patched(model)[0]]
    assert all(layer.gradient_checkpointing for layer in tower.encoder.layers)
    results = []
    for m in (reference, model):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m.zero_grad()
        loss = m(**x).logits.float().square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in vision_params(m).items() if p.grad is not None}
        optimizer.step()
        results.append((loss.item(), grads, {n: p.detach().clone() for n, p in vision_params(m).items()}))
    (ref_loss, ref_grads, ref_after), (loss, grads, after) = results
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(after[name], ref_after[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llava", "idefics3"])
def test_save_pretrained_then_transformers_from_pretrained(kind, tmp_path):
    model = fastsiglip.patch(build(kind))
    x = inputs(kind, model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert not fastsiglip.patched(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, model(**x).logits, atol=1e-5, rtol=0)


def test_unpatch_restores_transformers_modules_and_keeps_adapters():
    peft = pytest.importorskip("peft")
    model = build("llava")
    tower = model.model.vision_tower
    originals = [type(m) for m in tower.encoder.layers]
    x = inputs("llava", model)
    fastsiglip.patch(model)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=r".*vision_tower.*\.(q_proj|fc1)",
                                                       init_lora_weights=False))
    with torch.no_grad():
        patched_logits = model(**x).logits
    fastsiglip.unpatch(model)
    assert [type(m) for m in tower.encoder.layers] == originals and "forward" not in tower.__dict__
    assert not fastsiglip.patched(model)
    assert type(tower.encoder.layers[0].self_attn.q_proj).__module__.startswith("peft.")  # the adapter stayed
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, patched_logits, atol=1e-5, rtol=0)


def test_lora_on_a_patched_vlm_equals_lora_on_transformers():
    peft = pytest.importorskip("peft")
    x = inputs("paligemma", build("paligemma"))
    outputs = []
    for do_patch in (False, True):
        model = build("paligemma")
        if do_patch:
            fastsiglip.patch(model)
        torch.manual_seed(2)
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "fc2"],
                                                           init_lora_weights=False))
        model.zero_grad()
        logits = model(**x).logits
        logits.square().mean().backward()
        outputs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (expected, expected_grads), (logits, grads) = outputs
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert grads.keys() == expected_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# The tower's keywords, bare SiglipModel / Siglip2Model, what cannot be served
# ---------------------------------------------------------------------------------------------


def _tower_pair(family="siglip"):
    torch.manual_seed(0)
    if family == "siglip2":
        model = T.Siglip2VisionModel(T.Siglip2VisionConfig(**{k: v for k, v in VISION.items() if k != "image_size"},
                                                           num_patches=16))
    else:
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**VISION))
    model.eval()
    return model, fastsiglip.patch(copy.deepcopy(model))


def test_tower_keywords_as_transformers():
    reference, model = _tower_pair()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cases = [{}, {"output_hidden_states": True}, {"output_hidden_states": -2}, {"return_dict": False},
                 {"interpolate_pos_encoding": True}]
        if patch_module._selects_by_index():  # transformers >= 5.23: layer indices; before, a flag (lists undefined)
            cases.append({"output_hidden_states": [0, -1]})
        for kwargs in cases:
            size = 48 if kwargs.get("interpolate_pos_encoding") else 32
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
            want, got = reference(x, **kwargs), model(x, **kwargs)
            if isinstance(want, tuple):
                assert isinstance(got, tuple) and len(got) == len(want)
                want, got = dict(zip(("last_hidden_state", "pooler_output"), want)), dict(zip(("last_hidden_state", "pooler_output"), got))
            for name in ("last_hidden_state", "pooler_output"):
                torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=lambda m: f"{kwargs} {name}: {m}")
            if want.get("hidden_states") is not None:
                assert len(got["hidden_states"]) == len(want["hidden_states"]), kwargs
                for a, b in zip(want["hidden_states"], got["hidden_states"]):
                    assert (a is None) == (b is None), kwargs
                    if a is not None:
                        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="output_attentions"):
            model(pixels, output_attentions=True)
        torch.testing.assert_close(model(pixels).last_hidden_state, reference(pixel_values=pixels).last_hidden_state,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_bare_two_tower_models(family):
    torch.manual_seed(0)
    text = dict(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                max_position_embeddings=8)
    if family == "siglip2":
        reference = T.Siglip2Model(T.Siglip2Config(text_config=text, vision_config=dict(
            {k: v for k, v in VISION.items() if k != "image_size"}, num_patches=16))).eval()
        shapes = torch.tensor([[2, 3], [4, 4]])
        x = dict(pixel_values=torch.randn(2, 16, 192), spatial_shapes=shapes,
                 pixel_attention_mask=(torch.arange(16)[None] < shapes.prod(1)[:, None]).long())
    else:
        reference = T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=VISION)).eval()
        x = dict(pixel_values=torch.randn(2, 3, 32, 32))
    x["input_ids"] = torch.randint(0, 50, (2, 8))
    model = fastsiglip.patch(copy.deepcopy(reference))
    assert fastsiglip.patched(model) == ["vision_model"]
    with torch.no_grad():
        want, got = reference(**x), model(**x)
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image, atol=1e-5, rtol=0)
    if family == "siglip2":  # the real tokens equal; the padded ones are zeros (never computed)
        real = x["pixel_attention_mask"].bool()
        last, want_last = got.vision_model_output.last_hidden_state, want.vision_model_output.last_hidden_state
        torch.testing.assert_close(last[real], want_last[real], atol=1e-5, rtol=0)
        assert (last[~real] == 0).all()


def test_a_tower_it_cannot_serve_is_left_with_a_warning():
    torch.manual_seed(0)
    model = T.SiglipVisionModel(T.SiglipVisionConfig(**VISION, attention_dropout=0.1)).eval()
    with pytest.warns(UserWarning, match=r"fastsiglip.patch: left SiglipVisionModel .*attention dropout"):
        fastsiglip.patch(model)
    assert fastsiglip.patched(model) == [] and type(model.encoder).__module__.startswith("transformers.")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastsiglip.patch("google/siglip-base-patch16-224")


def test_patched_tower_compiles_without_graph_breaks():
    reference, model = _tower_pair()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).pooler_output, reference(x).pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["idefics3", "siglip2"])
def test_padded_and_packed_towers_compile_without_graph_breaks(family):
    """The data-dependent paths too: Idefics3 with a half-padded tile (varlen keys) and Siglip2
    packed (cu_seqlens from the mask), fullgraph, against transformers eager."""
    torch.manual_seed(0)
    config = dict(VISION, image_size=32) if family == "idefics3" else \
        dict({k: v for k, v in VISION.items() if k != "image_size"}, num_patches=16)
    if family == "idefics3":
        reference = T.Idefics3VisionTransformer(T.Idefics3VisionConfig(**config)).eval()
        mask = torch.ones(2, 4, 4, dtype=torch.bool)
        mask[1, :, 2:] = False
        x = dict(pixel_values=torch.randn(2, 3, 32, 32), patch_attention_mask=mask)
    else:
        reference = T.Siglip2VisionModel(T.Siglip2VisionConfig(**config)).eval()
        shapes = torch.tensor([[2, 3], [4, 4]])
        x = dict(pixel_values=torch.randn(2, 16, 192), spatial_shapes=shapes,
                 pixel_attention_mask=(torch.arange(16)[None] < shapes.prod(1)[:, None]).long())
    compiled = torch.compile(fastsiglip.patch(copy.deepcopy(reference)), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(**x), reference(**x)
    name = "last_hidden_state" if family == "idefics3" else "pooler_output"
    torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0)


def test_autocast_bfloat16():
    reference, model = _tower_pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got, want = model(x).pooler_output, reference(x).pooler_output
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_kernels_false_runs_the_reference_ops(monkeypatch):
    reference, _ = _tower_pair()
    model = fastsiglip.patch(copy.deepcopy(reference), kernels=False)
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    with FastsiglipOps() as spy, torch.no_grad():
        got = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).pooler_output
    assert not spy.calls
    with torch.no_grad():
        torch.testing.assert_close(got, reference(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
                                   .pooler_output, atol=1e-5, rtol=0)
    fastsiglip.patch(model)  # patching again with kernels=True switches the kernels on
    with FastsiglipOps() as spy, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        model(torch.randn(2, 3, 32, 32))
    assert spy.calls["attention"]


def test_forward_hooks_and_modules_as_in_transformers():
    reference, model = _tower_pair()
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    seen = collections.Counter()
    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, a, o, name=name: seen.update([name]))
    expected = collections.Counter()
    for name, module in reference.named_modules():
        module.register_forward_hook(lambda m, a, o, name=name: expected.update([name]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).pooler_output, reference(x).pooler_output, atol=1e-5, rtol=0)
    assert seen == expected
    assert isinstance(model.head.attention, nn.MultiheadAttention)


def test_a_model_run_before_the_patch_keeps_the_fused_path(monkeypatch, ignore_interpreter_noise):
    """transformers installs its output-capturing hooks on the tower's layers the first time hidden
    states are asked for (LLaVA always asks); they carry over to the patched blocks, must not
    turn the fused path off, and must not record the tower's layers into the outer model's
    hidden_states."""
    reference = build("llava")
    x = inputs("llava", reference)
    with torch.no_grad():
        want = reference(**x, output_hidden_states=True)
    model = fastsiglip.patch(copy.deepcopy(reference))
    tower = dict(model.named_modules())[fastsiglip.patched(model)[0]]
    assert any(layer._forward_hooks for layer in tower.encoder.layers), "transformers' hooks came along"
    assert all(layer.fusable() for layer in tower.encoder.layers)
    with torch.no_grad():
        got = model(**x, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert len(got.hidden_states) == len(want.hidden_states)
    for a, b in zip(want.hidden_states, got.hidden_states):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    with FastsiglipOps() as spy, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        ignore_interpreter_noise()
        model(**x)
    layers = VISION["num_hidden_layers"]
    assert spy.calls["mlp"] >= layers and spy.calls["layer_norm"] >= 2 * layers


def test_full_backward_hooks_fire_and_unpatch_keeps_the_mode():
    reference, model = _tower_pair()
    fired = {"ref": 0, "ours": 0}
    for name, m in (("ref", reference), ("ours", model)):
        m.encoder.layers[1].mlp.fc1.register_full_backward_hook(lambda *a, name=name: fired.__setitem__(name, fired[name] + 1))
        m(torch.randn(2, 3, 32, 32)).pooler_output.sum().backward()
    assert fired == {"ref": 1, "ours": 1}
    old_layers = list(model.encoder.__dict__["_modules"]["layers"])  # fastsiglip's blocks
    model.train()  # patched in eval mode, trained since
    fastsiglip.unpatch(model)
    assert all(layer.training for layer in model.encoder.layers) and model.encoder.training
    assert all(type(layer).__module__.startswith("transformers.") for layer in model.encoder.layers)
    assert old_layers and all(type(layer).__module__ == "fastsiglip.layers" for layer in old_layers)


def test_towers_it_must_not_take_over():
    torch.manual_seed(0)
    wrapped = T.SiglipVisionModel(T.SiglipVisionConfig(**VISION)).eval()
    wrapped.encoder.layers[0]._hf_hook = object()  # as accelerate's device_map / offload leaves it
    with pytest.warns(UserWarning, match="accelerate's device_map"):
        fastsiglip.patch(wrapped)
    assert fastsiglip.patched(wrapped) == []

    class MyTower(T.SiglipVisionModel):  # a subclass (as FSDP2's wrapper classes are) is still a tower
        pass

    mine = MyTower(T.SiglipVisionConfig(**VISION)).eval()
    assert fastsiglip.patched(fastsiglip.patch(mine)) == [""]
    mine.config._attn_implementation = "eager"  # transformers allows output_attentions with eager attention only
    mine.config.output_attentions = True  # read by transformers when the keyword is not given
    with pytest.raises(ValueError, match="output_attentions"):
        mine(torch.randn(1, 3, 32, 32))


def test_siglip2_tower_without_a_mask_is_all_real():
    reference, model = _tower_pair("siglip2")
    pixels, shapes = torch.randn(2, 16, 192), torch.tensor([[4, 4], [2, 8]])
    with torch.no_grad():
        # pixel_attention_mask=None (as Siglip2Model.get_image_features passes it when not given)
        want = reference(pixels, pixel_attention_mask=None, spatial_shapes=shapes)
        got = model(pixels, pixel_attention_mask=None, spatial_shapes=shapes)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["paligemma", "idefics3"])
def test_vision_gradients_through_the_kernels(kind, monkeypatch, fa_rule, ignore_interpreter_noise):
    """A training step of the patched VLM on fastsiglip's kernels (the Triton interpreter on a
    CPU), Idefics3 with a partly padded tile: the vision gradients against transformers' in
    float64, within the FlashAttention rule (twice transformers' own float32 error)."""
    reference = build(kind)
    exact = copy.deepcopy(reference).double()
    model = fastsiglip.patch(copy.deepcopy(reference))
    x = inputs(kind, reference)
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    _, want = _step(exact, x64)
    _, torch_fp32 = _step(reference, x)
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    with FastsiglipOps() as spy, warnings.catch_warnings():
        warnings.simplefilter("error")
        ignore_interpreter_noise()
        _, got = _step(model, x)
    assert spy.calls["attention"] and spy.calls["mlp"] and spy.calls["layer_norm"]
    assert got.keys() == want.keys() and got
    for name in got:
        fa_rule(name, got[name].double(), want[name], torch_fp32[name].double(), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 and real sizes)")
@pytest.mark.parametrize("family", ["so400m", "idefics3"])
def test_patched_tower_on_the_gpu_in_bfloat16(family, fa_rule):
    """Real head sizes on the kernels: So400m's head dim 72 at 224 (PaliGemma 2 / Gemma 3), and
    SmolVLM's B/16 tower with a half-padded tile; forward and vision gradients in bf16, within the
    FlashAttention rule against float32 (twice transformers' own bf16 error)."""
    torch.manual_seed(0)
    if family == "so400m":
        config = T.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2,
                                      num_attention_heads=16, patch_size=14, image_size=224)
        reference = T.SiglipVisionModel(config)
        x = dict(pixel_values=torch.randn(4, 3, 224, 224))
    else:
        config = T.Idefics3VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                                        num_attention_heads=12, patch_size=16, image_size=512)
        reference = T.Idefics3VisionTransformer(config)
        mask = torch.ones(4, 32, 32, dtype=torch.bool)
        mask[1, :, 16:] = False
        x = dict(pixel_values=torch.randn(4, 3, 512, 512), patch_attention_mask=mask)
    reference = reference.cuda().eval()
    x = {k: v.cuda() for k, v in x.items()}
    runs = {}
    for name, dtype, patched in (("fp32", torch.float32, False), ("torch_bf16", torch.bfloat16, False),
                                 ("ours", torch.bfloat16, True)):
        model = copy.deepcopy(reference).to(dtype)
        if patched:
            fastsiglip.patch(model)
        inp = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
        out = model(**inp).last_hidden_state
        out.float().square().mean().backward()
        runs[name] = (out.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    fa_rule("last_hidden_state", runs["ours"][0], runs["fp32"][0], runs["torch_bf16"][0], atol=1e-3)
    for n, g in runs["fp32"][1].items():
        fa_rule(n, runs["ours"][1][n], g, runs["torch_bf16"][1][n], factor=3.0, atol=1e-4)
