"""transformers' model API on fastsiglip's classes (fastsiglip/pretrained.py, outputs.py):
save_pretrained / from_pretrained / push_to_hub, dtype, device, config.to_dict(), return_dict,
outputs that are dicts as transformers' ModelOutput, activation checkpointing as Trainer calls
it, and transformers' Trainer itself (train, evaluate, predict, save_model) on a tiny model."""

import json

import pytest
import torch

import fastsiglip
from fastsiglip.outputs import BaseModelOutputWithPooling, SiglipOutput

transformers = pytest.importorskip("transformers")
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
VOCAB, TEXT_LEN = 50, 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    text = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=TEXT_LEN)
    torch.manual_seed(0)
    models = {
        "fixres": transformers.SiglipModel(transformers.SiglipConfig(
            text_config=text, vision_config=dict(TOWER, image_size=16, patch_size=8))),
        "naflex": transformers.Siglip2Model(transformers.Siglip2Config(
            text_config=text, vision_config=dict(TOWER, patch_size=8, num_patches=16))),
        "vision": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER, image_size=16,
                                                                                  patch_size=8)),
        "text": transformers.SiglipTextModel(transformers.SiglipTextConfig(**text)),
        "classifier": transformers.SiglipForImageClassification(transformers.SiglipConfig(
            text_config=text, vision_config=dict(TOWER, image_size=16, patch_size=8), num_labels=3)),
    }
    for kind, model in models.items():
        out[kind] = tmp_path_factory.mktemp(kind)
        model.eval().save_pretrained(out[kind])
    return out


def inputs(kind, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = {} if kind in ("vision", "classifier") else {"input_ids": torch.randint(0, VOCAB, (batch, TEXT_LEN),
                                                                                generator=gen)}
    if kind == "text":
        return x
    if kind == "naflex":
        shapes = torch.tensor([[2, 3], [4, 4]] * (batch // 2))
        x.update(pixel_values=torch.randn(batch, 16, 3 * 64, generator=gen), spatial_shapes=shapes,
                 pixel_attention_mask=(torch.arange(16)[None] < shapes.prod(1)[:, None]).long())
    else:
        x["pixel_values"] = torch.randn(batch, 3, 16, 16, generator=gen)
    return x


HF_CLASSES = {"fixres": "SiglipModel", "naflex": "Siglip2Model", "vision": "SiglipVisionModel",
              "text": "SiglipTextModel", "classifier": "SiglipForImageClassification"}
COMPARED = {"vision": ["pooler_output"], "text": ["pooler_output"], "classifier": ["logits"]}


@pytest.mark.parametrize("kind", list(HF_CLASSES))
def test_save_pretrained_loads_in_transformers(folders, kind, tmp_path):
    model = fastsiglip.load(folders[kind])
    with torch.no_grad():  # change the weights, so that the saved ones are not the source's
        for p in model.parameters():
            p.mul_(1.01)
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    hf = getattr(transformers, HF_CLASSES[kind]).from_pretrained(tmp_path / "out").eval()
    again = type(model).from_pretrained(tmp_path / "out")
    x = inputs(kind)
    with torch.no_grad():
        expected, out, reloaded = hf(**x), model(**x), again(**x)
    names = COMPARED.get(kind, ["logits_per_image", "image_embeds", "text_embeds"])
    for name in names:
        torch.testing.assert_close(out[name], expected[name], atol=1e-5, rtol=0)
        assert torch.equal(reloaded[name], out[name])
    with torch.no_grad():  # return_dict=False: transformers' tuple, field for field
        as_tuple, hf_tuple = model(**x, return_dict=False), hf(**x, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(hf_tuple)
    for got, want in zip(as_tuple, hf_tuple):
        if torch.is_tensor(want):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == model.config.to_dict() | {"dtype": "float32"}


def test_save_pretrained_in_bfloat16_and_errors(folders, tmp_path):
    model = fastsiglip.load(folders["fixres"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert fastsiglip.SiglipModel.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert fastsiglip.SiglipModel.from_pretrained(tmp_path / "bf16", torch_dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(tmp_path / "file")
    with pytest.raises(ValueError, match="holds a SiglipModel.*not a SiglipVisionModel"):
        fastsiglip.SiglipVisionModel.from_pretrained(folders["fixres"])
    assert not list((tmp_path / "bf16").glob(".*"))  # no temporary files left


def test_push_to_hub_uploads_the_saved_folder(folders, monkeypatch, tmp_path):
    """No hub is reachable here: huggingface_hub's HfApi is stopped at its two network calls, and
    the folder it would upload is checked to be a loadable checkpoint."""
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls["create"] = (repo_id, private, exist_ok)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, revision=None, create_pr=False, **kwargs):
        calls["upload"] = (repo_id, commit_message, create_pr)
        loaded = fastsiglip.load(folder_path)
        calls["config"] = loaded.config
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = fastsiglip.load(folders["fixres"])
    assert model.push_to_hub("me/tiny-siglip", private=True) == "commit-info"
    assert calls["create"] == ("me/tiny-siglip", True, True)
    assert calls["upload"] == ("me/tiny-siglip", "Upload SiglipModel", False)
    assert calls["config"] == model.config


def test_config_to_dict_is_transformers_config(folders):
    model = fastsiglip.load(folders["naflex"])
    d = model.config.to_dict()
    assert d["model_type"] == "siglip2" and d["vision_config"]["num_patches"] == 16
    config = transformers.Siglip2Config(**{k: v for k, v in d.items() if k != "architectures"})
    assert config.vision_config.hidden_size == TOWER["hidden_size"]


@pytest.mark.parametrize("kind", ["fixres", "naflex"])
def test_return_dict_and_outputs_as_transformers(folders, kind):
    model = fastsiglip.load(folders[kind])
    hf = getattr(transformers, HF_CLASSES[kind]).from_pretrained(folders[kind]).eval()
    x = inputs(kind)
    with torch.no_grad():
        out, as_tuple, hf_tuple = model(**x), model(**x, return_dict=False), hf(**x, return_dict=False)
        features = model.get_image_features(**{k: v for k, v in x.items() if k != "input_ids"})
        features_out = model.get_image_features(**{k: v for k, v in x.items() if k != "input_ids"}, return_dict=True)
        text = model.get_text_features(input_ids=x["input_ids"], return_dict=True)
    assert isinstance(out, dict) and isinstance(out, SiglipOutput) and isinstance(as_tuple, tuple)
    assert len(as_tuple) == len(hf_tuple) == 6  # logits x2, embeds x2, the two towers' outputs as tuples
    for a, b in zip(as_tuple[:4], hf_tuple[:4]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert isinstance(as_tuple[4], tuple) and isinstance(as_tuple[5], tuple)
    assert list(out.keys()) == ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds",
                                "text_model_output", "vision_model_output"]
    assert out[0] is out.logits_per_image and dict(**out)["image_embeds"] is out.image_embeds
    assert torch.is_tensor(features) and isinstance(features_out, BaseModelOutputWithPooling)
    assert torch.equal(features_out.pooler_output, features)
    assert torch.equal(text.pooler_output, model.get_text_features(input_ids=x["input_ids"]))
    rebuilt = type(out)({k: v for k, v in out.items()})  # as Trainer's nested_concat rebuilds outputs
    assert list(rebuilt.keys()) == list(out.keys()) and rebuilt.image_embeds is out.image_embeds
    out.loss = torch.tensor(1.0)
    assert "loss" not in out  # as transformers: only set fields that were set at construction
    with pytest.raises(TypeError, match="return_dict"):
        model(**x, return_dict="yes")


# ---------------------------------------------------------------------------------------------
# transformers' Trainer
# ---------------------------------------------------------------------------------------------


class Pairs(torch.utils.data.Dataset):
    def __init__(self, kind, n=8):
        self.items = [{k: v[0] for k, v in inputs(kind, batch=2, seed=i).items()} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(rows):
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["return_loss"] = True
    return batch


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("kind", ["fixres", "naflex"])
def test_trainer_trains_evaluates_predicts_and_saves(folders, kind, checkpointing, tmp_path):
    pytest.importorskip("accelerate")
    import inspect

    model = fastsiglip.load(folders[kind]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flag = "activation_checkpointing" if "activation_checkpointing" in inspect.signature(
        transformers.TrainingArguments).parameters else "gradient_checkpointing"
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        max_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True, remove_unused_columns=False,
        save_strategy="no", logging_steps=1, **{flag: checkpointing})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Pairs(kind), eval_dataset=Pairs(kind),
                                   data_collator=collate)
    result = trainer.train()
    assert model.is_gradient_checkpointing == checkpointing
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    predictions = trainer.predict(Pairs(kind))
    logits = predictions.predictions[0]
    assert logits.shape == (8, 4)  # logits_per_image of each batch of 4, concatenated
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").exists()
    # Trainer saves only the weights of a model that is not a transformers PreTrainedModel;
    # save_pretrained writes the loadable folder
    model.save_pretrained(tmp_path / "saved")
    reloaded = fastsiglip.load(tmp_path / "saved")
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, model.state_dict()[name]), name
