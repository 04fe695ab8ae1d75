"""Faithful modules: every module transformers calls, fastsiglip calls (or computes exactly what
calling it would compute), so hooks, peft's LoRA, quantized and derived layers behave as on
transformers; plain modules keep the fused kernels.

Each test builds the same tiny random checkpoint in transformers (FixRes SiglipModel and NaFlex
Siglip2Model, head dim 64 so the attention kernel takes it in the interpreter), loads it in
fastsiglip, applies the same change to both, and compares. Reference path unless a test says
otherwise (FASTSIGLIP_IMPL=kernel runs the Triton kernels, through the interpreter on a CPU).
"""

import collections
import copy

import pytest
import torch
from torch import nn

import fastsiglip

transformers = pytest.importorskip("transformers")
TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1)
VOCAB, TEXT_LEN, BATCH = 50, 8, 2
KINDS = ["fixres", "naflex"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in KINDS:
        torch.manual_seed(0)
        text = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=TEXT_LEN)
        if kind == "naflex":
            config = transformers.Siglip2Config(text_config=text, vision_config=dict(TOWER, patch_size=8, num_patches=16))
            model = transformers.Siglip2Model(config)
        else:
            config = transformers.SiglipConfig(text_config=text, vision_config=dict(TOWER, image_size=16, patch_size=8))
            model = transformers.SiglipModel(config)
        out[kind] = tmp_path_factory.mktemp(kind)
        model.eval().save_pretrained(out[kind])
    return out


def inputs(kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(0, VOCAB, (BATCH, TEXT_LEN), generator=gen)}
    if kind == "naflex":
        shapes = torch.tensor([[2, 3], [4, 4]])
        x.update(pixel_values=torch.randn(BATCH, 16, 3 * 64, generator=gen), spatial_shapes=shapes,
                 pixel_attention_mask=(torch.arange(16)[None] < shapes.prod(1)[:, None]).long())
    else:
        x["pixel_values"] = torch.randn(BATCH, 3, 16, 16, generator=gen)
    return x


def pair(folders, kind):
    """(transformers model, fastsiglip model) of the same checkpoint, eval mode."""
    cls = transformers.Siglip2Model if kind == "naflex" else transformers.SiglipModel
    return cls.from_pretrained(folders[kind]).eval(), fastsiglip.load(folders[kind])


def assert_same_outputs(hf_out, out, atol=1e-5, what=""):
    for name in ("logits_per_image", "image_embeds", "text_embeds"):
        torch.testing.assert_close(out[name], hf_out[name], atol=atol, rtol=0, msg=lambda m: f"{what} {name}: {m}")


# ---------------------------------------------------------------------------------------------
# The module tree and its hooks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_module_tree_is_transformers(folders, kind):
    hf, ours = pair(folders, kind)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in hf.named_modules()]
    for (name, a), (_, b) in zip(hf.named_modules(), ours.named_modules()):
        if isinstance(a, (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding, nn.Conv2d)):
            assert type(a) is type(b), name
    assert ours.state_dict().keys() == {k for k in hf.state_dict() if not k.endswith("position_ids")}


def _tensors(value):
    """The tensors of a module's output as a hook sees it (a tensor, a tuple such as attention's
    (output, weights), or a ModelOutput such as the encoder's), None where a slot holds None."""
    if torch.is_tensor(value):
        return [value.detach().clone()]
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in (_tensors(v) if v is not None else [None])]
    return None


def _record_every_module(model, records):
    handles = []
    for name, module in model.named_modules():
        def hook(module, args, output, name=name):
            records[name].append((args[0].detach().clone() if args and torch.is_tensor(args[0]) else None,
                                  _tensors(output)))
        handles.append(module.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("kind", KINDS)
def test_every_module_hook_sees_what_transformers_shows(folders, kind):
    """A forward hook on each module fires as many times as on transformers and sees transformers'
    input tensor (where transformers passes one by position) and output, in transformers'
    structure: the attention's (output, None) tuple, the encoder's ModelOutput, the NaFlex
    embeddings' [B, N, C] with the padded positions as transformers computes them."""
    hf, ours = pair(folders, kind)
    seen = {"hf": collections.defaultdict(list), "ours": collections.defaultdict(list)}
    _record_every_module(hf, seen["hf"]), _record_every_module(ours, seen["ours"])
    with torch.no_grad():
        expected, out = hf(**inputs(kind)), ours(**inputs(kind))
    assert_same_outputs(expected, out)
    assert {n: len(c) for n, c in seen["ours"].items()} == {n: len(c) for n, c in seen["hf"].items()}
    compared = set()
    for name, calls in seen["hf"].items():
        if name == "":  # the whole model's outputs: assert_same_outputs above
            continue
        for (hf_in, hf_out), (in_, out_) in zip(calls, seen["ours"][name]):
            if hf_in is not None:
                torch.testing.assert_close(in_, hf_in, atol=1e-5, rtol=0, msg=lambda m: f"{name} input: {m}")
            assert (out_ is None) == (hf_out is None) and len(out_ or ()) == len(hf_out or ()), \
                f"{name}: output structure {out_ and [None if t is None else tuple(t.shape) for t in out_]} != " \
                f"{hf_out and [None if t is None else tuple(t.shape) for t in hf_out]}"
            for a, b in zip(hf_out or (), out_ or ()):
                assert (a is None) == (b is None), name
                if a is not None:
                    torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=lambda m: f"{name} output: {m}")
            compared.add(name)
    every = {n for n in seen["hf"] if n}
    assert compared == every, sorted(every - compared)


@pytest.mark.parametrize("kind", KINDS)
def test_a_hook_that_edits_a_layer_output_acts_as_in_transformers(folders, kind):
    hf, ours = pair(folders, kind)
    for model in (hf, ours):
        model.vision_model.encoder.layers[0].register_forward_hook(lambda m, a, o: o * 0.5 + 1)
        model.text_model.encoder.layers[1].mlp.fc1.register_forward_hook(lambda m, a, o: o.flip(-1))
    with torch.no_grad():
        assert_same_outputs(hf(**inputs(kind)), ours(**inputs(kind)))


def test_backward_hooks_see_what_transformers_shows(folders):
    """Full backward hooks on every encoder layer, projection and LayerNorm fire as on transformers,
    with transformers' output gradients."""
    grads = {}
    for name, model in zip(("hf", "ours"), pair(folders, "fixres")):
        seen = grads[name] = collections.defaultdict(list)
        for module_name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) or module_name.endswith(tuple(f"layers.{i}" for i in range(9))):
                module.register_full_backward_hook(
                    lambda m, grad_in, grad_out, n=module_name, seen=seen: seen[n].append(grad_out[0].clone()))
        out = model(**inputs("fixres"))
        (out.logits_per_image.square().mean() + out.text_embeds.sum()).backward()
    assert {n: len(g) for n, g in grads["ours"].items()} == {n: len(g) for n, g in grads["hf"].items()}
    assert any(".layers." in n for n in grads["hf"])
    for name, calls in grads["hf"].items():
        for a, b in zip(calls, grads["ours"][name]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_hooks_and_replacements_are_seen_when_added_later(folders):
    """The fused/per-module decision follows the modules as they are at each call."""
    _, ours = pair(folders, "fixres")
    x = inputs("fixres")
    with torch.no_grad():
        before = ours(**x).logits_per_image
        handle = ours.vision_model.encoder.layers[1].mlp.fc2.register_forward_hook(lambda m, a, o: o + 1)
        hooked = ours(**x).logits_per_image
        handle.remove()
        after = ours(**x).logits_per_image
    assert not torch.equal(before, hooked) and torch.equal(before, after)


# ---------------------------------------------------------------------------------------------
# Plain modules: the fused kernels, as many calls per layer as before
# ---------------------------------------------------------------------------------------------


class KernelCalls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastsiglip":
            self.calls[func._opname] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", KINDS)
def test_plain_modules_run_the_fused_kernels(folders, kind, monkeypatch):
    """Per encoder layer: two LayerNorm, one attention and one MLP kernel (LN2 fused with the first
    residual add, the second add in fc2's epilogue); per tower its final LayerNorm; the MAP head one
    attention, one LayerNorm, one MLP. No separate add, GELU or GEMM for the fused blocks."""
    _, ours = pair(folders, kind)
    monkeypatch.setenv("FASTSIGLIP_IMPL", "kernel")
    with KernelCalls() as spy, torch.no_grad():
        ours(**inputs(kind), return_loss=True)
    layers = 2 * TOWER["num_hidden_layers"]
    assert dict(spy.calls) == {"layer_norm": 2 * layers + 3, "attention": layers + 1, "mlp": layers + 1,
                               "sigmoid_loss": 1}


# ---------------------------------------------------------------------------------------------
# peft LoRA
# ---------------------------------------------------------------------------------------------


def _lora(model, seed=1, **kwargs):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)  # the same random A and B on both models (init_lora_weights=False: B != 0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False, **kwargs)
    return peft.get_peft_model(model, config)


def _loss(out):
    return out.logits_per_image.square().mean() + out.text_embeds.sum() * 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_lora_equals_transformers_with_the_same_adapter(folders, kind):
    hf, ours = (_lora(m) for m in pair(folders, kind))
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in hf.named_parameters()]
    for (name, a), (_, b) in zip(hf.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad, name
    x = inputs(kind)
    expected, out = hf(**x), ours(**x)
    assert_same_outputs(expected, out, what="LoRA")
    base = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    _loss(expected).backward(), _loss(out).backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    # every LoRA tensor but the MAP head's attention.out_proj, which nn.MultiheadAttention never
    # calls (it reads out_proj.weight): a no-op adapter in transformers too
    assert grads.keys() == hf_grads.keys()
    lora = {n for n, _ in ours.named_parameters() if "lora_" in n}
    assert grads.keys() == {n for n in lora if ".head.attention.out_proj." not in n}
    for name, g in grads.items():
        torch.testing.assert_close(g, hf_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    for model in (hf, ours):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in ours.named_parameters() if "lora_" not in n and not torch.equal(p, base[n])}
    assert changed == set(), f"base weights changed: {sorted(changed)}"
    with torch.no_grad():
        assert_same_outputs(hf(**x), ours(**x), what="LoRA after a step")
        # merging also folds the head's out_proj delta in, which the wrapped model never applied:
        # the outputs change, on transformers as here
        merged = ours.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert_same_outputs(hf.merge_and_unload()(**x), merged(**x), what="merge_and_unload")


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_equals_the_wrapped_model(folders, kind):
    """Without an adapter on the head's attention.out_proj (which nn.MultiheadAttention ignores),
    merged and wrapped models give the same outputs."""
    _, ours = pair(folders, kind)
    model = _lora(ours, exclude_modules=["vision_model.head.attention.out_proj"])
    assert not any(".head.attention.out_proj.lora" in n for n, _ in model.named_parameters())
    x = inputs(kind)
    with torch.no_grad():
        wrapped = model(**x)
        assert_same_outputs(wrapped, model.merge_and_unload()(**x), what="merge_and_unload")


@pytest.mark.parametrize("kind", KINDS)
def test_lora_adapters_load_across_libraries(folders, kind, tmp_path):
    peft = pytest.importorskip("peft")
    x = inputs(kind)
    for source, target in (("ours", "hf"), ("hf", "ours")):
        models = dict(zip(("hf", "ours"), pair(folders, kind)))
        trained = _lora(models[source], seed=3)
        trained.save_pretrained(tmp_path / source)
        loaded = peft.PeftModel.from_pretrained(models[target], tmp_path / source)
        with torch.no_grad():
            assert_same_outputs(trained(**x), loaded(**x), what=f"adapter saved by {source}, loaded by {target}")


@pytest.mark.parametrize("kind", KINDS)
def test_lora_through_the_kernels(folders, kind, monkeypatch, ignore_interpreter_noise):
    """The per-module path around LoRA layers still runs the attention kernel (and the fused
    LayerNorms); outputs and LoRA gradients equal the reference path's."""
    import warnings

    _, ours = pair(folders, kind)
    model = _lora(ours)
    x = inputs(kind)
    results = {}
    for impl in ("reference", "kernel"):
        monkeypatch.setenv("FASTSIGLIP_IMPL", impl)
        model.zero_grad()
        with KernelCalls() as spy, warnings.catch_warnings():
            warnings.simplefilter("error")
            ignore_interpreter_noise()
            out = model(**x)
            _loss(out).backward()
        results[impl] = out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if impl == "kernel":
            # every encoder layer's attention; the MAP head (its MLP has LoRA) runs transformers'
            # nn.MultiheadAttention, as on transformers
            assert spy.calls["attention"] == 2 * TOWER["num_hidden_layers"] and spy.calls["layer_norm"] > 0
    (ref, ref_grads), (out, grads) = results["reference"], results["kernel"]
    assert_same_outputs(ref, out, atol=1e-4, what="kernel vs reference")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-3)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-3, name


# ---------------------------------------------------------------------------------------------
# Derived and quantized layers
# ---------------------------------------------------------------------------------------------


class CountingLinear(nn.Linear):
    """A user's nn.Linear subclass (as bitsandbytes' are): counts its calls, adds 0.01."""

    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        return super().forward(x) + 0.01


def _replace_linears(model, make):
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, make(child))
    return model


def _counting(linear):
    new = CountingLinear(linear.in_features, linear.out_features)
    new.load_state_dict(linear.state_dict())
    return new


@pytest.mark.parametrize("kind", KINDS)
def test_a_linear_subclass_is_called_as_in_transformers(folders, kind):
    results = {}
    for name, model in zip(("hf", "ours"), pair(folders, kind)):
        _replace_linears(model, _counting)
        CountingLinear.calls = 0
        with torch.no_grad():
            results[name] = model(**inputs(kind)), CountingLinear.calls
    (expected, hf_calls), (out, calls) = results["hf"], results["ours"]
    assert calls == hf_calls > 20  # every nn.Linear transformers calls (27 FixRes, 28 NaFlex here)
    assert_same_outputs(expected, out)


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_dynamic_equals_transformers(folders, kind):
    """torch.ao's dynamic int8 Linear everywhere quantize_dynamic puts it. NaFlex: transformers'
    embeddings read patch_embedding.weight.dtype, and a quantized Linear's weight is a method, so
    transformers fails there; compared with the embeddings left in float, and fastsiglip also runs
    with them quantized."""
    quantize = torch.ao.quantization.quantize_dynamic
    hf, ours = pair(folders, kind)
    if kind == "naflex":
        whole = quantize(copy.deepcopy(ours), {nn.Linear}, dtype=torch.qint8)
        with pytest.raises(AttributeError, match="dtype"):
            quantize(copy.deepcopy(hf), {nn.Linear}, dtype=torch.qint8)(**inputs(kind))
        with torch.no_grad():
            assert torch.isfinite(whole(**inputs(kind)).logits_per_image).all()
    quantized = []
    for model in (hf, ours):
        for name, child in model.named_children():
            for sub_name, sub in child.named_children():
                if not (kind == "naflex" and name == "vision_model" and sub_name == "embeddings"):
                    quantize(sub, {nn.Linear}, dtype=torch.qint8, inplace=True)
        quantized.append(model)
    assert type(quantized[1].vision_model.encoder.layers[0].mlp.fc1).__module__.startswith("torch.ao")
    with torch.no_grad():
        assert_same_outputs(*(m(**inputs(kind)) for m in quantized), what="quantize_dynamic")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_bitsandbytes_layers_equal_transformers(folders, kind, bits):
    """bitsandbytes' int8 (LLM.int8 with outlier threshold 6) and NF4 Linear layers. NaFlex:
    transformers casts the pixels to the patch layer's weight dtype, an integer one here (int8
    fails, uint8 truncates them); compared with the embeddings left in float, and fastsiglip's
    quantized embeddings (fed float pixels) stay close to the float model."""
    bnb = pytest.importorskip("bitsandbytes")

    def quantize(linear):
        if bits == 8:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
        q.bias = nn.Parameter(linear.bias.data.clone())
        return q.to("cpu")  # quantizes the weight

    hf, ours = pair(folders, kind)
    x = inputs(kind)
    if kind == "naflex":
        with torch.no_grad():
            full = ours(**x)
            whole = _replace_linears(copy.deepcopy(ours), quantize)
            assert (whole(**x).image_embeds - full.image_embeds).abs().max() < 0.2
    models = []
    for model in (hf, ours):
        for name, child in model.named_children():
            for sub_name, sub in child.named_children():
                if not (kind == "naflex" and name == "vision_model" and sub_name == "embeddings"):
                    _replace_linears(sub, quantize)
        models.append(model)
    assert type(models[1].vision_model.encoder.layers[0].mlp.fc1).__module__.startswith("bitsandbytes")
    with torch.no_grad():
        assert_same_outputs(*(m(**x) for m in models), what=f"bitsandbytes {bits}-bit")
