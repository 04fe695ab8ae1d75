"""Input validation: what transformers computes, fastsiglip computes, or it refuses with a one-line
error saying what to do. Integer pixels, FixRes image sizes, token ids outside the vocabulary,
and checkpoints whose tensors are not all of one dtype.

Checkpoints are tiny random-weight models written by transformers' save_pretrained (a 32 px,
patch 16 FixRes SigLIP: 4 tokens per image; and a NaFlex SigLIP 2), loaded with fastsiglip.load.
"""

import pathlib
import shutil
import warnings

import pytest
import safetensors.torch
import torch

transformers = pytest.importorskip("transformers")

import fastsiglip  # noqa: E402

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
VISION = dict(TOWER, image_size=32, patch_size=16)
VISION2 = dict(TOWER, num_patches=16, patch_size=8)
VOCAB = 100
TEXT = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=8, pad_token_id=1, bos_token_id=2, eos_token_id=3)
ATOL = 1e-5
KEY = "vision_model.post_layernorm.weight"  # the tensor the mixed-dtype checkpoints store otherwise


def _make(cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """(transformers SiglipModel, its folder, fastsiglip's model of that folder)."""
    hf = _make(transformers.SiglipModel, transformers.SiglipConfig(vision_config=VISION, text_config=TEXT))
    folder = tmp_path_factory.mktemp("siglip")
    hf.save_pretrained(folder)
    return hf, folder, fastsiglip.load(folder)


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory):
    hf = _make(transformers.Siglip2Model, transformers.Siglip2Config(vision_config=VISION2, text_config=TEXT))
    folder = tmp_path_factory.mktemp("siglip2")
    hf.save_pretrained(folder)
    return fastsiglip.load(folder)


def pixels(batch=2, size=(32, 32)):
    torch.manual_seed(1)
    return torch.randn(batch, 3, *size)


# ---------------------------------------------------------------------------------------------
# 1. Pixels must be the processor's floats.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_pixels_refused(siglip, dtype):
    _, _, model = siglip
    raw = (torch.rand(2, 3, 32, 32) * 255).to(dtype)
    ids = torch.ones(2, 8, dtype=torch.long)
    calls = {
        "vision tower": lambda: model.vision_model(raw),
        "get_image_features": lambda: model.get_image_features(pixel_values=raw),
        "forward": lambda: model(input_ids=ids, pixel_values=raw),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"pixel_values must be floating point.*fastsiglip\.load_processor") as e:
            call()
        assert "\n" not in str(e.value), name


def test_integer_pixels_refused_naflex(siglip2):
    batch = dict(pixel_values=torch.zeros(1, 4, 3 * 8 * 8, dtype=torch.uint8),
                 pixel_attention_mask=torch.ones(1, 4, dtype=torch.int32), spatial_shapes=torch.tensor([[2, 2]]))
    with pytest.raises(TypeError, match="pixel_values must be floating point"):
        siglip2.get_image_features(**batch)


def test_pixels_not_a_tensor(siglip):
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor, got ndarray"):
        siglip[2].get_image_features(pixel_values=pixels().numpy())


def test_float_pixels_of_any_float_dtype_still_run(siglip):
    hf, _, model = siglip
    x = pixels().double()  # cast to the weights' dtype, as transformers casts them
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=x),
                                   hf.get_image_features(pixel_values=x).pooler_output, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------
# 2. FixRes image size and shape.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(33, 33), (39, 39), (32, 33), (48, 48), (16, 16)])
def test_fixres_other_size_refused(siglip, size):
    """33x33 and 39x39 hold as many whole 16 px patches as 32x32: the conv would drop pixels."""
    with pytest.raises(ValueError, match=rf"takes 32x32 images, got {size[0]}x{size[1]}: resize.*processor.*"
                                         r"interpolate_pos_encoding=True"):
        siglip[2].get_image_features(pixel_values=pixels(1, size))


@pytest.mark.parametrize("size", [(33, 33), (39, 39), (40, 47), (32, 32), (50, 20)])
def test_fixres_interpolated_sizes_match_transformers(siglip, size):
    """transformers' interpolate_pos_encoding takes any size and floors it to whole patches (the
    patch conv drops the remainder, the position grid is resized to H // p x W // p): so does
    fastsiglip, value for value."""
    hf, _, model = siglip
    x = pixels(2, size)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=x, interpolate_pos_encoding=True)
        ref = hf(input_ids=ids, pixel_values=x, interpolate_pos_encoding=True)
    for name in ("logits_per_image", "image_embeds"):
        torch.testing.assert_close(ours[name], ref[name], atol=ATOL, rtol=ATOL, msg=name)
    torch.testing.assert_close(ours.vision_model_output.last_hidden_state, ref.vision_model_output.last_hidden_state,
                               atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 3, 32, 32), (1, 1, 32, 32), (1, 4, 32, 32)])
def test_fixres_bad_shape(siglip, shape):
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, height, width\], got shape"):
        siglip[2].get_image_features(pixel_values=torch.randn(shape))


# ---------------------------------------------------------------------------------------------
# 3. Token ids inside the vocabulary.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 50, -1])
def test_token_ids_outside_vocabulary(siglip, bad):
    model = siglip[2]
    ids = torch.full((2, 8), 5, dtype=torch.long)
    ids[1, 3] = bad
    low, high = min(bad, 5), max(bad, 5)
    message = rf"token ids in \[0, {VOCAB}\) \(the model's vocab_size\), got values in \[{low}, {high}\]"
    for call in (lambda: model.get_text_features(input_ids=ids), lambda: model.text_model(ids),
                 lambda: model(input_ids=ids, pixel_values=pixels())):
        with pytest.raises(ValueError, match=message):
            call()


def test_token_ids_at_the_edges_run(siglip):
    hf, _, model = siglip
    ids = torch.tensor([[0, VOCAB - 1] * 4, [VOCAB - 1] * 8], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(input_ids=ids),
                                   hf.get_text_features(input_ids=ids.long()).pooler_output, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("bad", [8, -1])
def test_position_ids_outside_the_positions(siglip, bad):
    hf, _, model = siglip
    ids = torch.full((1, 8), 5, dtype=torch.long)
    positions = torch.arange(8)
    with torch.no_grad():  # in range: transformers' numbers
        torch.testing.assert_close(model.get_text_features(input_ids=ids, position_ids=positions.flip(0)),
                                   hf.get_text_features(input_ids=ids, position_ids=positions.flip(0)[None])
                                   .pooler_output, atol=ATOL, rtol=ATOL)
    positions[2] = bad
    with pytest.raises(ValueError, match=r"position_ids must be in \[0, 8\) \(the model's max_position_embeddings\)"):
        model.get_text_features(input_ids=ids, position_ids=positions)
    with pytest.raises(ValueError, match="position_ids must be integer"):
        model.get_text_features(input_ids=ids, position_ids=positions.float())
    with pytest.raises(ValueError, match=r"position_ids must be \[length\], \[1, length\] or \[batch, length\]"):
        model.get_text_features(input_ids=ids, position_ids=torch.arange(8).repeat(3, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bool])
def test_token_ids_not_int(siglip, dtype):
    with pytest.raises(ValueError, match=r"input_ids must be integer \(int64 or int32\)"):
        siglip[2].get_text_features(input_ids=torch.ones(1, 8, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints whose tensors are not all of one dtype.
# ---------------------------------------------------------------------------------------------


def rewritten(folder, tmp_path, change) -> pathlib.Path:
    """A copy of checkpoint `folder` whose model.safetensors is `change(tensors)`."""
    out = pathlib.Path(shutil.copytree(folder, tmp_path / "ckpt"))
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    safetensors.torch.save_file(change(tensors), out / "model.safetensors", metadata={"format": "pt"})
    return out


def one_tensor_as(dtype, key=KEY):
    return lambda tensors: dict(tensors, **{key: tensors[key].to(dtype)})


def load_quietly(folder, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fastsiglip.load(folder, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_low_precision_tensor_is_cast(siglip, tmp_path, dtype):
    hf, folder, _ = siglip
    folder = rewritten(folder, tmp_path, one_tensor_as(dtype))
    name = str(dtype).removeprefix("torch.")
    with pytest.warns(UserWarning, match=rf"cast 1 checkpoint tensor\(s\) stored unlike the rest \(float32\) to "
                                         rf"float32 \(1 from {name}\): {KEY}") as record:
        model = fastsiglip.load(folder)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    reference = transformers.SiglipModel.from_pretrained(folder).eval()  # casts it too, silently
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=x),
                                   reference.get_image_features(pixel_values=x).pooler_output, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(model.get_parameter(KEY), reference.get_parameter(KEY), atol=0, rtol=0)


def test_integer_tensor_for_a_float_parameter_is_cast_as_transformers_does(siglip, tmp_path):
    hf, folder, _ = siglip
    change = one_tensor_as(torch.int64, "logit_bias")
    folder = rewritten(folder, tmp_path, lambda t: change(dict(t, logit_bias=torch.tensor([-7.0]))))
    with pytest.warns(UserWarning, match=r"cast 1 checkpoint tensor\(s\).*\(1 from int64\): logit_bias"):
        model = fastsiglip.load(folder)
    reference = transformers.SiglipModel.from_pretrained(folder)
    assert model.logit_bias.dtype == reference.logit_bias.dtype == torch.float32
    assert model.logit_bias.item() == reference.logit_bias.item() == -7.0
    assert model.logit_bias.requires_grad


def test_mixed_checkpoint_with_requested_dtype(siglip, tmp_path):
    _, folder, _ = siglip
    folder = rewritten(folder, tmp_path, lambda t: one_tensor_as(torch.int64, "logit_scale")(
        one_tensor_as(torch.float16)(t)))
    with pytest.warns(UserWarning, match=r"cast 2 .* to bfloat16 \(1 from float16, 1 from int64\)"):
        model = fastsiglip.load(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_mostly_half_checkpoint_stays_half(siglip, tmp_path):
    """The checkpoint's dtype is that of most of its elements: one float32 tensor among float16
    ones is cast to float16, not the whole model to float32."""
    _, folder, _ = siglip
    folder = rewritten(folder, tmp_path, lambda t: dict({k: v.half() for k, v in t.items()}, **{KEY: t[KEY]}))
    with pytest.warns(UserWarning, match=r"stored unlike the rest \(float16\) to float16 \(1 from float32\)"):
        model = fastsiglip.load(folder)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_uniform_checkpoints_load_without_warning(siglip, tmp_path):
    _, folder, _ = siglip
    assert {p.dtype for p in load_quietly(folder).parameters()} == {torch.float32}
    assert {p.dtype for p in load_quietly(folder, dtype="bfloat16").parameters()} == {torch.bfloat16}
    half = rewritten(folder, tmp_path, lambda t: {k: v.half() for k, v in t.items()})
    assert {p.dtype for p in load_quietly(half).parameters()} == {torch.float16}


def test_integer_position_ids_buffer_is_left_alone(siglip, tmp_path):
    """CLIP-derived checkpoints store the int64 `embeddings.position_ids` buffer: not a float
    parameter, never cast, never warned about (it is skipped: fastsiglip computes the arange)."""
    _, folder, _ = siglip
    ids = {f"{t}_model.embeddings.position_ids": torch.arange(n)[None] for t, n in (("text", 8), ("vision", 4))}
    folder = rewritten(folder, tmp_path, lambda t: dict(t, **ids))
    model = load_quietly(folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(b.is_floating_point() for b in model.buffers())  # no buffer turned into floats
