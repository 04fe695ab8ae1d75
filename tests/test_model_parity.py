"""fastsiglip.model against transformers: same weights (save_pretrained -> safetensors), same inputs.

Random tiny checkpoints of every family and architecture are written by transformers into
tmp_path, read back with safetensors + fastsiglip.config.from_file, loaded strictly into
fastsiglip's model, and the outputs compared in float32 (max error 1e-5, relative for large
values), plus bf16 against FlashAttention's tolerance rule, gradients, and input errors.

NaFlex: fastsiglip runs on the packed real tokens only, so its last_hidden_state holds zeros at
padded positions where transformers holds values it computes and never uses: those are
compared on the real positions only.
"""

import dataclasses
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fastsiglip import config as fconfig  # noqa: E402
from fastsiglip.model import aa_bilinear_weights, build  # noqa: E402

ATOL = RTOL = 1e-5
PATCH = 8
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3)
# Head dim 72 (So400m's) with patch 14, and a text length other than SigLIP's 64 / 16.
VISION_72 = dict(VISION, hidden_size=144, intermediate_size=200, patch_size=14, image_size=42)
TEXT_72 = dict(TEXT, hidden_size=144, intermediate_size=200, max_position_embeddings=24, vocab_size=300)
NAFLEX_PATCHES = 16  # a 4 x 4 position grid
# Mixed aspect ratios in a budget of 16 patches: down- and up-sampling, 1 x N, tall, padding.
# (N x 1 images are left to the resize test: torch's CPU antialias kernel is wrong for them.)
SPATIAL_SHAPES = [(2, 8), (4, 4), (3, 5), (1, 1), (1, 16), (6, 2)]
# Text masks: full, right-padded, right-padded short, left-padded.
TEXT_LENGTHS = [None, 10, 3, -5]

HF_CLASSES = {  # (family, architecture) -> (transformers model class, config class)
    ("siglip", "SiglipModel"): ("SiglipModel", "SiglipConfig"),
    ("siglip2", "SiglipModel"): ("Siglip2Model", "Siglip2Config"),
    ("siglip", "SiglipForImageClassification"): ("SiglipForImageClassification", "SiglipConfig"),
    ("siglip2", "SiglipForImageClassification"): ("Siglip2ForImageClassification", "Siglip2Config"),
    ("siglip", "SiglipVisionModel"): ("SiglipVisionModel", "SiglipVisionConfig"),
    ("siglip2", "SiglipVisionModel"): ("Siglip2VisionModel", "Siglip2VisionConfig"),
    ("siglip", "SiglipTextModel"): ("SiglipTextModel", "SiglipTextConfig"),
    ("siglip2", "SiglipTextModel"): ("Siglip2TextModel", "Siglip2TextConfig"),
}
# transformers 5 saves the tower-only models without the tower prefix that SiglipModel's
# checkpoints (and transformers 4's tower models) carry; fastsiglip keeps the prefix.
TOWER_PREFIX = {"SiglipVisionModel": "vision_model.", "SiglipTextModel": "text_model."}


def vision_kwargs(family, vision=VISION):
    extra = {"num_patches": NAFLEX_PATCHES} if family == "siglip2" else {"image_size": vision.get("image_size", 32)}
    return {k: v for k, v in vision.items() if k != "image_size"} | extra


def make_hf(family, arch, vision=VISION, text=TEXT, num_labels=3, seed=0):
    """A random transformers model with every parameter perturbed (biases, LN, logit scale too)."""
    model_cls, config_cls = (getattr(transformers, n) for n in HF_CLASSES[(family, arch)])
    if arch == "SiglipVisionModel":
        cfg = config_cls(**vision_kwargs(family, vision))
    elif arch == "SiglipTextModel":
        cfg = config_cls(**text)
    else:
        cfg = config_cls(vision_config=vision_kwargs(family, vision), text_config=text, num_labels=num_labels)
    torch.manual_seed(seed)
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def load_ours(hf, tmp_path):
    """Save `hf` with save_pretrained, read it back into fastsiglip strictly (built on meta)."""
    hf.save_pretrained(tmp_path)
    cfg = fconfig.from_file(tmp_path / "config.json")
    sd = safetensors.torch.load_file(tmp_path / "model.safetensors")
    prefix = TOWER_PREFIX.get(cfg.architecture)
    if prefix:
        sd = {k if k.startswith(prefix) else prefix + k: v for k, v in sd.items()}
    with torch.device("meta"):  # as fastsiglip's loader does: no memory, then the tensors assigned
        ours = build(cfg)
    ours.load_state_dict(sd, strict=True, assign=True)
    assert not any(p.is_meta for p in ours.parameters())
    return ours.eval()


def close(name, ours, theirs, atol=ATOL, rtol=RTOL):
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def fixres_pixels(batch, size=32, seed=1):
    return torch.randn(batch, 3, *((size, size) if isinstance(size, int) else size),
                       generator=torch.Generator().manual_seed(seed))


def naflex_pixels(shapes=SPATIAL_SHAPES, patches=NAFLEX_PATCHES, patch=PATCH, seed=1):
    """Patchified pixels as the Siglip2 processor lays them out: real patches first, then padding."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(shapes), patches, dtype=torch.int32)
    for i, (h, w) in enumerate(shapes):
        mask[i, : h * w] = 1
    return {"pixel_values": torch.randn(len(shapes), patches, 3 * patch * patch, generator=gen),
            "pixel_attention_mask": mask, "spatial_shapes": torch.tensor(shapes, dtype=torch.int64)}


def text_inputs(batch, length=16, vocab=100, masked=False, seed=2):
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    if not masked:
        return {"input_ids": ids}
    mask = torch.ones(batch, length, dtype=torch.int64)
    for i, n in enumerate((TEXT_LENGTHS * batch)[:batch]):
        if n is not None and n >= 0:
            mask[i, n:] = 0
        elif n is not None:
            mask[i, :-n] = 0
    return {"input_ids": ids, "attention_mask": mask}


def compare_vision(name, ours, theirs, mask=None):
    """last_hidden_state (real positions only for NaFlex) and pooler_output."""
    a, b = ours.last_hidden_state, theirs.last_hidden_state
    if mask is not None:
        keep = mask.bool()
        assert (a[~keep] == 0).all(), f"{name}: padded positions of last_hidden_state are not zero"
        a, b = a[keep], b[keep]
    close(f"{name} last_hidden_state", a, b)
    if theirs.pooler_output is not None:
        close(f"{name} pooler_output", ours.pooler_output, theirs.pooler_output)


def compare_two_tower(ours, theirs, mask=None):
    for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
        close(key, ours[key], theirs[key])
    compare_vision("vision", ours.vision_model_output, theirs.vision_model_output, mask)
    text, text_ref = ours.text_model_output, theirs.text_model_output
    close("text last_hidden_state", text.last_hidden_state, text_ref.last_hidden_state)
    close("text pooler_output", ours.text_model_output.pooler_output, theirs.text_model_output.pooler_output)


# ---------------------------------------------------------------------------------------------
# NaFlex position-embedding resize: antialiased bilinear weights as tensors vs F.interpolate.
# ---------------------------------------------------------------------------------------------


def interpolate_aa(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


@pytest.mark.parametrize("grid", [1, 4, 5, 16])
def test_aa_bilinear_weights_match_interpolate(grid):
    table = torch.randn(1, 7, grid, grid, dtype=torch.float32)  # [1, C, g, g]
    sizes = [(1, 1), (1, 9), (9, 1), (2, 8), (3, 5), (grid, grid), (grid + 3, grid - 1 or 1), (1, 40),
             (33, 2), (2 * grid, 3 * grid), (max(grid // 3, 1), grid // 2 + 1), (17, 13)]
    for h, w in sizes:
        if w == 1 and h != grid:
            # PyTorch's CPU antialias kernel (torch 2.13) is wrong for an output width of 1: it
            # repeats the first row's result. The resize commutes with transposition, so the
            # oracle there is the transposed (1, h) resize, which that kernel gets right.
            expected = interpolate_aa(table.transpose(2, 3), (w, h)).transpose(2, 3)
        else:
            expected = interpolate_aa(table, (h, w))
        wy = aa_bilinear_weights(torch.arange(h), torch.full((h,), h), grid)  # [h, g]
        wx = aa_bilinear_weights(torch.arange(w), torch.full((w,), w), grid)  # [w, g]
        ours = torch.einsum("yi,xj,cij->cyx", wy, wx, table[0])[None]
        close(f"resize {grid}x{grid} -> {h}x{w}", ours, expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Two-tower models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "textmask"])
@pytest.mark.parametrize("variant", ["siglip1", "siglip2-fixres-hd72"])
def test_fixres_two_tower(tmp_path, variant, masked):
    """SigLIP 1 and SigLIP 2 FixRes share model_type "siglip"; the second with So400m's head dim."""
    vision, text = (VISION, TEXT) if variant == "siglip1" else (VISION_72, TEXT_72)
    hf = make_hf("siglip", "SiglipModel", vision, text)
    ours = load_ours(hf, tmp_path)
    size = vision.get("image_size", 32)
    inputs = dict(pixel_values=fixres_pixels(4, size), **text_inputs(4, text["max_position_embeddings"],
                                                                     text["vocab_size"], masked))
    with torch.no_grad():
        out, ref = ours(**inputs, return_loss=True), hf(**inputs, return_loss=True)
        compare_two_tower(out, ref)
        close("loss", out.loss, ref.loss)
        close("get_image_features", ours.get_image_features(pixel_values=inputs["pixel_values"]),
              hf.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
        close("get_text_features", ours.get_text_features(**text_only), hf.get_text_features(**text_only).pooler_output)


@pytest.mark.parametrize("interpolate_to", [None, (44, 30)], ids=["native", "interpolated"])
def test_fixres_patch14_image_not_a_multiple(tmp_path, interpolate_to):
    """So400m's head dim 72 and patch 14 at an image size that is no multiple of the patch, as
    384 / 14 is: image 30 -> a 2 x 2 grid (Conv2d drops the last 2 pixels), and a (44, 30)
    image interpolated to 3 x 2."""
    vision = dict(VISION_72, image_size=30)
    hf = make_hf("siglip", "SiglipModel", vision, TEXT_72)
    ours = load_ours(hf, tmp_path)
    assert ours.config.vision.position_grid == 2 and ours.config.vision.head_dim == 72
    pixels = fixres_pixels(3, interpolate_to or 30)
    inputs = dict(pixel_values=pixels, **text_inputs(3, 24, 300, masked=True), return_loss=True)
    if interpolate_to:
        inputs["interpolate_pos_encoding"] = True
    with torch.no_grad():
        out, ref = ours(**inputs), hf(**inputs)
    compare_two_tower(out, ref)
    close("loss", out.loss, ref.loss)


@pytest.mark.parametrize("size", [(48, 40), (40, 40), (32, 32)])
def test_fixres_interpolate_pos_encoding(tmp_path, size):
    hf = make_hf("siglip", "SiglipModel")
    ours = load_ours(hf, tmp_path)
    inputs = dict(pixel_values=fixres_pixels(2, size), **text_inputs(2), interpolate_pos_encoding=True)
    with torch.no_grad():
        compare_two_tower(ours(**inputs), hf(**inputs))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "textmask"])
def test_naflex_two_tower(tmp_path, masked):
    hf = make_hf("siglip2", "SiglipModel")
    ours = load_ours(hf, tmp_path)
    pixels = naflex_pixels()
    inputs = dict(**pixels, **text_inputs(len(SPATIAL_SHAPES), masked=masked))
    with torch.no_grad():
        out, ref = ours(**inputs, return_loss=True), hf(**inputs, return_loss=True)
        compare_two_tower(out, ref, pixels["pixel_attention_mask"])
        close("loss", out.loss, ref.loss)
        close("get_image_features", ours.get_image_features(**pixels), hf.get_image_features(**pixels).pooler_output)


def test_naflex_two_tower_head_dim_72_patch_14(tmp_path):
    """NaFlex with So400m's head dim 72 and patch 14 (588 values per patchified patch)."""
    hf = make_hf("siglip2", "SiglipModel", VISION_72, TEXT_72)
    ours = load_ours(hf, tmp_path)
    assert ours.config.vision.head_dim == 72
    pixels = naflex_pixels(patch=VISION_72["patch_size"])
    inputs = dict(**pixels, **text_inputs(len(SPATIAL_SHAPES), 24, 300, masked=True), return_loss=True)
    with torch.no_grad():
        out, ref = ours(**inputs), hf(**inputs)
    compare_two_tower(out, ref, pixels["pixel_attention_mask"])
    close("loss", out.loss, ref.loss)


def test_naflex_gradients(tmp_path):
    """Every parameter's gradient of the sigmoid loss, packed NaFlex and masked text included."""
    hf = make_hf("siglip2", "SiglipModel")
    ours = load_ours(hf, tmp_path)
    inputs = dict(**naflex_pixels(), **text_inputs(len(SPATIAL_SHAPES), masked=True), return_loss=True)
    ours(**inputs).loss.backward()
    hf(**inputs).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        close(f"grad {name}", p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_ops_get_contiguous_inputs(monkeypatch, family):
    """What the model hands to fastsiglip.ops is what kernels want: contiguous tensors (q, k, v:
    unit stride along D and the other strides multiples of 8, which the attention kernel reads
    without a copy), int32 cu_seqlens of length B + 1, python-int max_seqlen."""
    from fastsiglip import ops

    seen = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            for i, a in enumerate(list(args) + list(kwargs.values())):
                if not isinstance(a, torch.Tensor):
                    continue
                if name == "attention" and i < 3:  # q, k, v: views of the fused QKV output, or copies
                    assert a.stride(-1) == 1 and all(s % 8 == 0 for s in a.stride()[:-1]), \
                        f"attention got a {tuple(a.shape)} operand with strides {a.stride()} the kernel would copy"
                else:
                    assert a.is_contiguous(), f"{name} got a non-contiguous {tuple(a.shape)} tensor"
            if name == "attention" and len(args) > 3:
                assert args[3].dtype == args[4].dtype == torch.int32 and args[3].numel() == args[4].numel()
                assert isinstance(args[5], int) and isinstance(args[6], int)
            seen.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in ("layer_norm", "mlp", "attention", "sigmoid_loss"):
        monkeypatch.setattr(ops, name, spy(name, getattr(ops, name)))
    model = _tiny(family)
    pixels = naflex_pixels() if family == "siglip2" else {"pixel_values": fixres_pixels(3, (48, 40)),
                                                          "interpolate_pos_encoding": True}
    batch = pixels["pixel_values"].shape[0]
    model(**pixels, **text_inputs(batch, masked=True), return_loss=True).loss.backward()
    assert set(seen) == {"layer_norm", "mlp", "attention", "sigmoid_loss"}


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_output_hidden_states(tmp_path, family):
    """output_hidden_states: the embeddings, then every layer's output, before the final norm
    (NaFlex: real positions); output_attentions=True is refused with a reason."""
    hf = make_hf(family, "SiglipModel")
    ours = load_ours(hf, tmp_path)
    pixels = naflex_pixels() if family == "siglip2" else {"pixel_values": fixres_pixels(3)}
    inputs = dict(**pixels, **text_inputs(pixels["pixel_values"].shape[0], masked=True), output_hidden_states=True)
    with torch.no_grad():
        out, ref = ours(**inputs), hf(**inputs)
        assert ours(**dict(inputs, output_hidden_states=False)).vision_model_output.hidden_states is None
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            ours(**inputs, output_attentions=True)
    keep = pixels.get("pixel_attention_mask")
    for tower, mask in (("vision_model_output", keep), ("text_model_output", None)):
        states, expected = out[tower].hidden_states, ref[tower].hidden_states
        assert len(states) == len(expected) == VISION["num_hidden_layers"] + 1
        for i, (a, b) in enumerate(zip(states, expected)):
            if mask is not None:
                a, b = a[mask.bool()], b[mask.bool()]
            close(f"{tower} hidden_states[{i}]", a, b)


def test_output_objects(tmp_path):
    hf = make_hf("siglip", "SiglipModel")
    ours = load_ours(hf, tmp_path)
    with torch.no_grad():
        out = ours(pixel_values=fixres_pixels(2), **text_inputs(2))
    assert out["logits_per_image"] is out.logits_per_image
    assert out["vision_model_output"]["pooler_output"] is out.vision_model_output.pooler_output
    assert "loss" not in out and list(out.keys())[0] == "logits_per_image"
    with pytest.raises(KeyError, match="loss"):
        out["loss"]


# ---------------------------------------------------------------------------------------------
# Tower-only and classification models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_vision_model(tmp_path, family):
    hf = make_hf(family, "SiglipVisionModel")
    ours = load_ours(hf, tmp_path)
    inputs = naflex_pixels() if family == "siglip2" else {"pixel_values": fixres_pixels(3)}
    with torch.no_grad():
        compare_vision("vision", ours(**inputs), hf(**inputs), inputs.get("pixel_attention_mask"))
        close("get_image_features", ours.get_image_features(**inputs), hf(**inputs).pooler_output)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_text_model(tmp_path, family):
    hf = make_hf(family, "SiglipTextModel", text=TEXT_72)
    ours = load_ours(hf, tmp_path)
    for masked in (False, True):
        inputs = text_inputs(4, 24, 300, masked)
        # position_ids given explicitly (as a [1, L] row, shifted) must be used, not re-derived.
        positions = {"position_ids": torch.arange(24)[None].flip(1)}
        with torch.no_grad():
            for extra in ({}, positions):
                out, ref = ours(**inputs, **extra), hf(**inputs, **extra)
                close("text last_hidden_state", out.last_hidden_state, ref.last_hidden_state)
                close("text pooler_output", out.pooler_output, ref.pooler_output)
            close("get_text_features", ours.get_text_features(**inputs), hf(**inputs).pooler_output)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_classification(tmp_path, family):
    hf = make_hf(family, "SiglipForImageClassification", num_labels=5)
    ours = load_ours(hf, tmp_path)
    assert ours.config.num_labels == 5
    inputs = naflex_pixels() if family == "siglip2" else {"pixel_values": fixres_pixels(3)}
    labels = torch.arange(inputs["pixel_values"].shape[0]) % 5
    with torch.no_grad():
        out, ref = ours(**inputs, labels=labels), hf(**inputs, labels=labels)
    close("logits", out.logits, ref.logits)
    close("loss", out.loss, ref.loss)
    assert ours(**inputs).loss is None
    # Multi-label (float multi-hot labels): binary cross-entropy. transformers remembers the
    # problem type from its first call, so it is reset for the second.
    hf.config.problem_type = None
    multi_hot = torch.rand(labels.shape[0], 5, generator=torch.Generator().manual_seed(3)).round()
    with torch.no_grad():
        close("multi-label loss", ours(**inputs, labels=multi_hot).loss, hf(**inputs, labels=multi_hot).loss)


# ---------------------------------------------------------------------------------------------
# Positional arguments in transformers' order (FixRes Siglip* and NaFlex Siglip2* differ)
# ---------------------------------------------------------------------------------------------


def _positional_cases(family):
    """{(architecture, method): positional args in transformers 5's order for `family`}."""
    text = text_inputs(3, masked=True)
    ids, text_mask = text["input_ids"], text["attention_mask"]
    positions = torch.arange(16)[None].flip(1)
    labels = torch.arange(3) % 3
    if family == "siglip2":
        px = naflex_pixels(SPATIAL_SHAPES[:3])
        pixels = (px["pixel_values"], px["pixel_attention_mask"], px["spatial_shapes"])
        two_tower = (ids, pixels[0], pixels[1], pixels[2], text_mask, positions, True)
    else:
        pixels = (fixres_pixels(3, 48), True)  # interpolate_pos_encoding: a 48 px image, a 32 px model
        two_tower = (ids, pixels[0], text_mask, positions, True, True)
    return {
        ("SiglipModel", "forward"): two_tower,
        ("SiglipModel", "get_image_features"): pixels,
        ("SiglipModel", "get_text_features"): (ids, text_mask, positions),
        ("SiglipVisionModel", "forward"): pixels,
        ("SiglipTextModel", "forward"): (ids, text_mask, positions),
        ("SiglipForImageClassification", "forward"): pixels[:3] + (labels,) if family == "siglip2"
        else (pixels[0], labels, True),
    }


def _first_tensor(out):
    """The output a positional call is compared on: the loss when there is one, else the first field."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "loss", None) is not None:
        return out.loss
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_transformers_positional_order(tmp_path, family):
    # Code written for transformers that passes arguments positionally binds them as there:
    # every positional argument of every public class and method, compared with transformers'
    # own positional call (the loss where there is one, so labels and return_loss count too).
    for (arch, method), args in _positional_cases(family).items():
        hf = make_hf(family, arch, num_labels=3)
        ours = load_ours(hf, tmp_path / f"{arch}-{method}")
        with torch.no_grad():
            got = _first_tensor(getattr(ours, method)(*args))
            want = _first_tensor(getattr(hf, method)(*args))
        close(f"{family} {arch}.{method} positional", got, want)
        if (arch, method) == ("SiglipModel", "forward"):
            assert ours(*args).loss is not None  # return_loss landed where transformers puts it

    hf = make_hf(family, "SiglipModel")
    ours = load_ours(hf, tmp_path / "errors")
    args = _positional_cases(family)[("SiglipModel", "forward")]
    with pytest.raises(TypeError, match="pass the others by keyword"):
        ours(*args, None)
    with pytest.raises(TypeError, match="'input_ids' both by position and by keyword"):
        ours(args[0], input_ids=args[0])


# ---------------------------------------------------------------------------------------------
# bf16 on CPU: FlashAttention's rule (error vs float32 at most twice transformers' own in bf16).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_bf16_fa_rule(tmp_path, family, fa_rule):
    hf = make_hf(family, "SiglipModel")
    ours = load_ours(hf, tmp_path).to(torch.bfloat16)
    hf_lowp = make_hf(family, "SiglipModel").to(torch.bfloat16)
    hf_lowp.load_state_dict(hf.state_dict())
    pixels = naflex_pixels() if family == "siglip2" else {"pixel_values": fixres_pixels(4)}
    inputs = dict(**pixels, **text_inputs(pixels["pixel_values"].shape[0], masked=True))
    with torch.no_grad():
        out, exact, lowp = ours(**inputs), hf(**inputs), hf_lowp(**inputs)
    keep = pixels.get("pixel_attention_mask", torch.ones(out.vision_model_output.last_hidden_state.shape[:2])).bool()
    for key in ("logits_per_image", "image_embeds", "text_embeds"):
        fa_rule(key, out[key].float(), exact[key], lowp[key].float())
    for tower in ("vision_model_output", "text_model_output"):
        fa_rule(f"{tower} pooler_output", out[tower].pooler_output.float(), exact[tower].pooler_output,
                lowp[tower].pooler_output.float())
    fa_rule("vision last_hidden_state", out.vision_model_output.last_hidden_state[keep].float(),
            exact.vision_model_output.last_hidden_state[keep], lowp.vision_model_output.last_hidden_state[keep].float())


# ---------------------------------------------------------------------------------------------
# Construction: meta device, no buffers, the presets' parameter names and shapes = transformers'
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["siglip-so400m-patch14-384", "siglip2-giant-opt-patch16-256",
                                  "siglip2-base-patch16-naflex"])
def test_preset_meta_matches_transformers(name):
    cfg = fconfig.preset(name)
    with torch.device("meta"):
        ours = build(cfg)
        d = fconfig.to_dict(cfg)
        model_cls, config_cls = (getattr(transformers, n) for n in HF_CLASSES[(cfg.family, "SiglipModel")])
        hf = model_cls(config_cls(vision_config=d["vision_config"], text_config=d["text_config"]))
    assert list(ours.buffers()) == []
    assert all(p.is_meta for p in ours.parameters())
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_config_defaults_are_transformers_defaults(family):
    """config.json files leave out what equals transformers' defaults (the hub's SigLIP configs
    omit vocab_size, image_size, ...): a missing key must read as transformers reads it."""
    ours = fconfig.from_dict({"model_type": family})
    prefix = "Siglip2" if family == "siglip2" else "Siglip"
    for tower, cls in ((ours.vision, f"{prefix}VisionConfig"), (ours.text, f"{prefix}TextConfig")):
        theirs = getattr(transformers, cls)().to_dict()
        for f in dataclasses.fields(tower):
            if f.name in theirs:
                assert getattr(tower, f.name) == theirs[f.name], f"{cls}.{f.name}"


def test_presets_are_consistent():
    """Every preset: its name's patch and resolution, the vocabulary of its family (SigLIP 2:
    Gemma's 256000), head dims the attention kernel compiles for, and a lossless config.json
    round trip. The hub-id form resolves too."""
    from fastsiglip import ops

    for name in fconfig.PRESETS:
        cfg = fconfig.preset(name)
        parts = name.split("-")
        patch = next(int(p.removeprefix("patch")) for p in parts if p.startswith("patch"))
        assert cfg.vision.patch_size == patch, name
        if parts[-1] == "naflex":
            assert cfg.naflex and cfg.vision.num_patches == 256, name
        else:
            assert not cfg.naflex and cfg.vision.image_size == int(parts[parts.index(f"patch{patch}") + 1]), name
        assert (cfg.text.vocab_size == 256000) == name.startswith("siglip2"), name
        assert {cfg.vision.head_dim, cfg.text.head_dim} <= set(ops.ATTENTION_HEAD_DIMS), name
        assert fconfig.from_dict(fconfig.to_dict(cfg)) == cfg, name
    assert fconfig.preset("google/siglip-so400m-patch14-224").text.max_position_embeddings == 16
    with pytest.raises(ValueError, match="known presets"):
        fconfig.preset("siglip-tiny")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_naflex_cuda_with_mask_and_shapes_left_on_cpu(tmp_path):
    """The processor's pixel_attention_mask / spatial_shapes may stay on the CPU while the pixels
    and the model are on the GPU (transformers accepts that); the model moves them."""
    hf = make_hf("siglip2", "SiglipModel")
    ours = load_ours(hf, tmp_path).cuda()
    pixels = naflex_pixels()
    text = text_inputs(len(SPATIAL_SHAPES), masked=True)
    with torch.no_grad():
        ref = hf(**pixels, **text)
        out = ours(**dict(pixels, pixel_values=pixels["pixel_values"].cuda()), input_ids=text["input_ids"].cuda(),
                   attention_mask=text["attention_mask"])
    close("logits_per_image", out.logits_per_image.cpu(), ref.logits_per_image, atol=1e-4, rtol=1e-4)


def test_random_init_is_usable():
    cfg = fconfig.ModelConfig(
        "siglip2", "SiglipModel", fconfig.VisionConfig(**vision_kwargs("siglip2"), naflex=True),
        fconfig.TextConfig(**{k: v for k, v in TEXT.items() if not k.endswith("_token_id")}))
    model = build(cfg)
    assert math.isclose(model.logit_scale.item(), math.log(10.0), rel_tol=1e-6) and model.logit_bias.item() == -10.0
    with torch.no_grad():
        out = model(**naflex_pixels(), **text_inputs(len(SPATIAL_SHAPES)))
    assert torch.isfinite(out.logits_per_image).all()
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(len(SPATIAL_SHAPES)), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors that say what to do.
# ---------------------------------------------------------------------------------------------


def _tiny(family):
    naflex = family == "siglip2"
    vision = fconfig.VisionConfig(**vision_kwargs(family), naflex=naflex)
    text = fconfig.TextConfig(**{k: v for k, v in TEXT.items() if not k.endswith("_token_id")})
    return build(fconfig.ModelConfig(family, "SiglipModel", vision, text))


def test_errors_naflex():
    model = _tiny("siglip2")
    px = naflex_pixels()
    with pytest.raises(ValueError, match="pixel_attention_mask"):
        model.get_image_features(pixel_values=px["pixel_values"])
    with pytest.raises(ValueError, match="patchified"):
        model.get_image_features(**dict(px, pixel_values=torch.randn(2, 3, 32, 32)))
    with pytest.raises(ValueError, match="empty|no patches"):
        model.get_image_features(**naflex_pixels(shapes=[]))
    with pytest.raises(ValueError, match="spatial_shapes"):
        model.get_image_features(**dict(px, spatial_shapes=px["spatial_shapes"].flip(0)[:-1]))
    with pytest.raises(ValueError, match="h \\* w <= 16"):
        model.get_image_features(**dict(px, spatial_shapes=torch.tensor(SPATIAL_SHAPES) * 2))
    with pytest.raises(ValueError, match="interpolate_pos_encoding is for FixRes"):
        model.get_image_features(**px, interpolate_pos_encoding=True)


def test_errors_fixres_and_text():
    model = _tiny("siglip")
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model.get_image_features(pixel_values=fixres_pixels(1, 48))
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        model.get_image_features(pixel_values=torch.randn(1, 32, 32))
    with pytest.raises(ValueError, match="empty batch"):
        model.get_image_features(pixel_values=torch.randn(0, 3, 32, 32))
    with pytest.raises(ValueError, match="for NaFlex"):
        model.get_image_features(pixel_values=fixres_pixels(1), spatial_shapes=torch.tensor([[4, 4]]))
    with pytest.raises(ValueError, match="max_length=16"):
        model.get_text_features(input_ids=torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        model.get_text_features(input_ids=torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model.get_text_features(input_ids=torch.zeros(2, 16, dtype=torch.long), attention_mask=torch.ones(2, 15))
    with pytest.raises(ValueError, match="both pixel_values and input_ids"):
        model(pixel_values=fixres_pixels(1))
    with pytest.raises(ValueError, match="matching pairs"):
        model(pixel_values=fixres_pixels(2), **text_inputs(3), return_loss=True)
    with pytest.raises(ValueError, match="unknown architecture"):
        build(dataclasses.replace(model.config, architecture="SiglipForCausalLM"))
