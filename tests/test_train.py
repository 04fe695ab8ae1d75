"""fastsiglip.finetune / `fastsiglip train`: the exact large-batch step, optimizer, precision,
checkpoints and resume, export, evaluation, bad input, and that a tiny model learns.

Everything runs on the CPU with a tiny random SigLIP checkpoint saved by transformers (hidden
32, one layer, 16x16 images of 2x2 patches, 24 text tokens) and synthetic data made here:
coloured squares on the left or right half of a noisy image, captioned "<colour> <left|right>".
"""

import copy
import csv
import json
import math
import os
import pathlib
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import fastsiglip
from fastsiglip import data as data_lib
from fastsiglip.train import checkpoint as ckpt
from fastsiglip.train import lr_at
from fastsiglip.train.evaluate import retrieval_recall
from fastsiglip.train.step import ExactStep, Towers

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "white": (250, 250, 250)}
PLACES = {"left": 0, "right": 1}
IMAGE, PATCH, TEXT_LEN = 16, 8, 24
FAST = dict(workers=0, progress=False, lr=1e-3)


def portable_init(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn from numpy's RandomState, whose streams numpy keeps fixed across
    releases, instead of torch's samplers: torch 2.13 changed trunc_normal_, so the same torch seed
    made another model on torch 2.11, and a threshold that held for one seed on one torch failed
    on the other. Scales as transformers' SigLIP init: LayerNorm weight 1 and bias 0, other biases
    0, projections (nn.Linear, the pooling head's in_proj) normal with Xavier's variance
    2 / (fan-in + fan-out), everything else (embeddings, the patch convolution, the probe) normal
    with variance 1 / fan-in (LeCun; fan-in = elements per output row)."""
    rng = np.random.RandomState(seed)
    norms, projections = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            norms |= {f"{name}.weight", f"{name}.bias"}
        elif isinstance(module, torch.nn.Linear):
            projections.add(f"{name}.weight")
        elif isinstance(module, torch.nn.MultiheadAttention):
            projections.add(f"{name}.in_proj_weight")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # by name: an order no torch release changes
            if name in norms:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.dim() < 2 and name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p.numel() // p.shape[0] if p.dim() > 1 else p.numel()
                var = 2 / (fan_in + p.shape[0]) if name in projections else 1 / fan_in
                p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) * math.sqrt(var)))


def make_checkpoint(folder, tokenizer_source, *, hidden=32, layers=1, seed=0, logit_bias=None):
    """A tiny random SiglipModel saved by transformers, with the test tokenizer and processor, its
    weights from portable_init(seed). transformers initializes logit_scale = log 1 and logit_bias =
    0; here scale = log 10 as in the paper, and the bias -5 (the paper's -10 suits 32k-pair
    batches, not 32-pair ones)."""
    transformers = pytest.importorskip("transformers")
    folder = pathlib.Path(folder)
    tower = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2)
    config = transformers.SiglipConfig(
        text_config=dict(tower, vocab_size=300, max_position_embeddings=TEXT_LEN, pad_token_id=1, eos_token_id=1,
                         bos_token_id=None),
        vision_config=dict(tower, image_size=IMAGE, patch_size=PATCH))
    model = transformers.SiglipModel(config).eval()
    portable_init(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-5.0 if logit_bias is None else logit_bias)
    model.save_pretrained(folder)
    shutil.copy(tokenizer_source / "spiece.model", folder / "spiece.model")
    tok = json.loads((tokenizer_source / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(tok, model_max_length=TEXT_LEN)))
    pre = json.loads((tokenizer_source / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(pre, size={"height": IMAGE, "width": IMAGE})))
    return folder


def shape_image(color, place, rng):
    """A noisy dark 16x16 image with one coloured square somewhere in the named half."""
    pixels = rng.integers(0, 60, (IMAGE, IMAGE, 3)).astype(np.uint8)
    half = IMAGE // 2
    side = int(rng.integers(4, half + 1))
    y = int(rng.integers(0, IMAGE - side + 1))
    x = PLACES[place] * half + int(rng.integers(0, half - side + 1))
    pixels[y:y + side, x:x + side] = COLORS[color]
    return Image.fromarray(pixels)


def write_shapes(folder, name, count, seed, *, every_combo=False):
    """`count` captioned images under folder/name/ and the manifest folder/name.csv."""
    folder = pathlib.Path(folder)
    (folder / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = [(c, p) for c in COLORS for p in PLACES]
    rows = []
    for i in range(count):
        color, place = combos[i % len(combos)] if every_combo else combos[int(rng.integers(len(combos)))]
        path = f"{name}/{i:05d}.png"
        shape_image(color, place, rng).save(folder / path)
        rows.append({"image": path, "text": f"{color} {place}"})
    write_manifest(folder / f"{name}.csv", rows)
    return folder / f"{name}.csv"


def write_manifest(path, rows, columns=("image", "text")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one intra-op thread is faster than two, and far faster when the
    CI machine's two cores are busy with other work (oversubscribed OpenMP threads spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(siglip_checkpoint, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), siglip_checkpoint)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return {"train": write_shapes(folder, "train", 512, 0), "val": write_shapes(folder, "val", 32, 1, every_combo=True)}


def read_metrics(out):
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_weights_close(a: torch.nn.Module, b: torch.nn.Module, rtol):
    """Every tensor equal to `rtol` relative to its own scale (floored at the init std, for
    tensors that start at zero: biases)."""
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        scale = max(y.detach().abs().max().item(), 0.02)
        err = (x.detach() - y.detach()).abs().max().item()
        assert err <= rtol * scale, f"{name}: max difference {err:.3e} > {rtol:.0e} x {scale:.3e}"


# ---------------------------------------------------------------------------------------------
# 1. The exact large-batch step
# ---------------------------------------------------------------------------------------------


def test_micro_batches_equal_one_batch(tiny, shapes, tmp_path):
    """Two AdamW steps at global batch 64 in float64: micro-batch 16 (GradCache) == none."""
    models = {}
    for micro in (64, 16):
        model = fastsiglip.load(tiny, dtype=torch.float64)
        result = fastsiglip.finetune(model, train=shapes["train"], out=tmp_path / str(micro), batch_size=64,
                                     micro_batch_size=micro, steps=2, precision="fp32", **FAST)
        assert result["step"] == 2 and not result["interrupted"]
        models[micro] = model
    start = fastsiglip.load(tiny, dtype=torch.float64)
    moved = max((p - q).abs().max().item() for p, q in zip(models[64].parameters(), start.parameters()))
    assert moved > 1e-4, "the weights did not change: the test would prove nothing"
    assert_weights_close(models[16], models[64], 1e-6)
    losses = [[r["loss"] for r in read_metrics(tmp_path / str(m))] for m in (16, 64)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-12)


def _micro_batches(tiny, shapes, batch, micro):
    batches = data_lib.TrainBatches(data_lib.open_pairs(shapes["train"]), tiny, seed=0, batch_size=batch,
                                    world_size=1, micro_batch_size=micro)
    codec = data_lib.PixelCodec(fastsiglip.load_processor(tiny).image_processor)

    def to_inputs(m):
        return codec.to_model(m, "cpu"), m["input_ids"]

    return [batches[(0, 0, m)] for m in range(batch // micro)], to_inputs


def test_float32_gradients_of_micro_batches(tiny, shapes):
    """float32: the step's gradients with 4 micro-batches equal one batch's (AdamW after it
    would amplify rounding noise in the zero-gradient attention key biases, hence gradients)."""
    grads = []
    for micro in (64, 16):
        model = fastsiglip.load(tiny).train()
        micros, to_inputs = _micro_batches(tiny, shapes, 64, micro)
        ExactStep(Towers(model), to_inputs, device="cpu")(micros)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    top = max(g.abs().max().item() for g in grads[1].values())
    for name, want in grads[1].items():
        err = (grads[0][name] - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item() + 1e-7 * top, (name, err)


class DropoutTowers(Towers):
    """Towers with dropout on the embeddings: a stochastic layer the step must replay exactly."""

    def forward(self, pixel_inputs=None, input_ids=None):
        image, text = super().forward(pixel_inputs, input_ids)
        drop = torch.nn.functional.dropout
        return (None if image is None else drop(image, 0.3)), (None if text is None else drop(text, 0.3))


def test_two_pass_replays_random_state(tiny, shapes):
    """With dropout, GradCache's gradients equal those of one autograd graph over the
    micro-batches run in sequence from the same random state (pass 2 replays pass 1's draws)."""
    model = fastsiglip.load(tiny, dtype=torch.float64).train()
    micros, to_inputs = _micro_batches(tiny, shapes, 32, 8)
    towers = DropoutTowers(model)
    torch.manual_seed(123)
    loss = ExactStep(towers, to_inputs, device="cpu")(micros)
    got = [p.grad.clone() for p in model.parameters()]
    after = torch.get_rng_state()
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    parts = [towers(*to_inputs(m)) for m in micros]
    want_loss = fastsiglip.sigmoid_loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                        model.logit_scale, model.logit_bias)
    want_loss.backward()
    assert torch.equal(torch.get_rng_state(), after), "after the step the random state must be pass 1's"
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-12, atol=0)
    for (name, p), g in zip(model.named_parameters(), got):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-15, msg=name)


def test_lock_image_keeps_vision_weights(tiny, shapes, tmp_path):
    model = fastsiglip.load(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastsiglip.finetune(model, train=shapes["train"], out=tmp_path / "lock", batch_size=32, micro_batch_size=16,
                        steps=2, lock_image=True, **FAST)
    after = model.state_dict()
    for key in before:
        if key.startswith("vision_model."):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["text_model.head.weight"], after["text_model.head.weight"])
    assert not torch.equal(before["logit_bias"], after["logit_bias"])


def test_lock_text_and_freeze_logits(tiny, shapes, tmp_path):
    model = fastsiglip.load(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastsiglip.finetune(model, train=shapes["train"], out=tmp_path / "lock", batch_size=16, steps=1, lock_text=True,
                        freeze_logit_scale=True, **FAST)
    after = model.state_dict()
    for key in before:
        if key.startswith("text_model.") or key.startswith("logit_"):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["vision_model.head.probe"], after["vision_model.head.probe"])


def test_naflex_micro_batches_equal_one_batch(siglip_checkpoint, shapes, tmp_path):
    """The same exactness for a NaFlex (SigLIP 2) checkpoint, with --max-num-patches."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "naflex"
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.Siglip2Config(
        text_config=dict(tower, vocab_size=300, max_position_embeddings=TEXT_LEN, pad_token_id=1, eos_token_id=1,
                         bos_token_id=None),
        vision_config=dict(tower, patch_size=PATCH, num_patches=16))
    transformers.Siglip2Model(config).eval().save_pretrained(folder)
    shutil.copy(siglip_checkpoint / "spiece.model", folder / "spiece.model")
    tok = json.loads((siglip_checkpoint / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(tok, model_max_length=TEXT_LEN)))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Siglip2ImageProcessor", "patch_size": PATCH, "max_num_patches": 16,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "resample": 2, "rescale_factor": 1 / 255}))
    models = {}
    for micro in (32, 8):
        models[micro] = fastsiglip.load(folder, dtype=torch.float64)
        fastsiglip.finetune(models[micro], train=shapes["train"], out=tmp_path / str(micro), batch_size=32,
                            micro_batch_size=micro, steps=2, max_num_patches=9, precision="fp32", **FAST)
    assert_weights_close(models[8], models[32], 1e-6)
    exported = fastsiglip.load(tmp_path / "8" / "final", dtype=torch.float64)
    assert exported.config.naflex and torch.equal(exported.logit_bias, models[8].logit_bias)
    with pytest.raises(ValueError, match="max_num_patches is for NaFlex"):
        fastsiglip.finetune(fastsiglip.load(siglip_checkpoint), train=shapes["train"], out=tmp_path / "fixres",
                            batch_size=8, steps=1, max_num_patches=9, **FAST)


# ---------------------------------------------------------------------------------------------
# 3. Optimizer, schedule, precision
# ---------------------------------------------------------------------------------------------


def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, lr=1.0, warmup_steps=4, steps=12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[8] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_weight_decay_groups(tiny):
    from fastsiglip.train import _param_groups

    model = fastsiglip.load(tiny)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in _param_groups(model, 0.1))
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in decay
    assert "text_model.embeddings.token_embedding.weight" in decay
    assert "vision_model.embeddings.patch_embedding.weight" in decay
    for name in ("logit_scale", "logit_bias", "vision_model.embeddings.position_embedding.weight",
                 "text_model.embeddings.position_embedding.weight", "vision_model.head.probe",
                 "vision_model.post_layernorm.weight", "text_model.head.bias"):
        assert name in no_decay, name
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_bf16_autocast_keeps_float32_master_weights(tiny, shapes, tmp_path):
    model = fastsiglip.load(tiny)
    result = fastsiglip.finetune(model, train=shapes["train"], out=tmp_path / "bf16", batch_size=16,
                                 micro_batch_size=8, steps=1, precision="bf16", **FAST)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(result["metrics"]["loss"])
    with pytest.raises(ValueError, match="precision"):
        fastsiglip.finetune(model, train=shapes["train"], out=tmp_path / "x", batch_size=16, steps=1,
                            precision="fp16", **FAST)


def test_layer_checkpointing_inside_the_two_pass_step(tiny, shapes):
    """Per-layer activation checkpointing (gradient_checkpointing_enable) changes no gradient of
    the two-pass step."""
    grads = []
    for checkpointing in (False, True):
        model = fastsiglip.load(tiny, dtype=torch.float64).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        micros, to_inputs = _micro_batches(tiny, shapes, 32, 16)
        ExactStep(Towers(model), to_inputs, device="cpu")(micros)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_grad_checkpointing_flag(tiny, shapes, tmp_path):
    models = []
    for flag in (False, True):
        models.append(fastsiglip.load(tiny, dtype=torch.float64))
        fastsiglip.finetune(models[-1], train=shapes["train"], out=tmp_path / str(flag), batch_size=16,
                            micro_batch_size=8, steps=1, grad_checkpointing=flag, precision="fp32", **FAST)
    assert models[1].is_gradient_checkpointing and not models[0].is_gradient_checkpointing
    assert_weights_close(models[1], models[0], 1e-9)


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints, resume, export
# ---------------------------------------------------------------------------------------------


RUN = dict(batch_size=16, micro_batch_size=8, steps=6, eval_every=3, save_every=2, keep_last=2, **FAST)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in records]


def test_sigterm_then_resume_equals_uninterrupted(tiny, shapes, tmp_path):
    full_model = fastsiglip.load(tiny)
    fastsiglip.finetune(full_model, train=shapes["train"], val=shapes["val"], out=tmp_path / "full", **RUN)
    want = _state(full_model)

    stop_at = int(np.random.default_rng().integers(1, RUN["steps"]))  # a random step, any of them must do

    def kill(step, record):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "cut"
    result = fastsiglip.finetune(fastsiglip.load(tiny), train=shapes["train"], val=shapes["val"], out=out,
                                 callback=kill, **RUN)
    assert result["interrupted"] and result["step"] == stop_at, (stop_at, result)
    assert (out / "checkpoints" / f"step-{stop_at}").is_dir() and not (out / "final").exists()
    with pytest.raises(ValueError, match="--resume"):  # without --resume an existing run is not overwritten
        fastsiglip.finetune(fastsiglip.load(tiny), train=shapes["train"], out=out, **RUN)
    resumed = fastsiglip.load(tiny)
    result = fastsiglip.finetune(resumed, train=shapes["train"], val=shapes["val"], out=out, resume=True, **RUN)
    assert result["step"] == RUN["steps"] and not result["interrupted"]
    for key, value in want.items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
    got, expected = _without_timing(read_metrics(out)), _without_timing(read_metrics(tmp_path / "full"))
    assert [r["step"] for r in got] == list(range(RUN["steps"] + 1))
    assert got[0].keys() == expected[0].keys() and "val/i2t_recall@1" in got[3]
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for k in g:
            assert g[k] == e[k] if e[k] is None else g[k] == pytest.approx(e[k], rel=1e-6, abs=1e-7), (g["step"], k)
    saved = sorted({2, 4, 6, stop_at})  # --save-every 2, the end, the signal; --keep-last 2
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"step-{n}" for n in saved[-2:]]


def test_crash_while_saving_keeps_previous_checkpoint(tiny, shapes, tmp_path, monkeypatch):
    """A save that fails half-way (after the weights, before the optimizer state) at step 3."""
    out, real, calls = tmp_path / "run", ckpt._optimizer_files, []

    def crash_third_time(optimizer):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(optimizer)

    monkeypatch.setattr(ckpt, "_optimizer_files", crash_third_time)
    run = dict(train=shapes["train"], out=out, batch_size=16, steps=4, save_every=1, **FAST)
    with pytest.raises(OSError, match="simulated"):
        fastsiglip.finetune(fastsiglip.load(tiny), **run)
    monkeypatch.setattr(ckpt, "_optimizer_files", real)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-1", "step-2"]
    # a save that fails (a full disk) removes its half-written folder at once; one a kill leaves
    # behind is removed by the next run (test_train_robustness.py)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    state, weights, _ = ckpt.read_resume(ckpt.list_checkpoints(out)[-1])
    assert state["step"] == 2 and weights.keys() == fastsiglip.load(tiny).state_dict().keys()
    result = fastsiglip.finetune(fastsiglip.load(tiny), resume=True, **run)
    assert result["step"] == 4 and [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())


def test_resume_refuses_other_model_and_options(tiny, siglip_checkpoint, shapes, tmp_path):
    out = tmp_path / "run"
    fastsiglip.finetune(fastsiglip.load(tiny), train=shapes["train"], out=out, batch_size=16, steps=1, **FAST)
    other = make_checkpoint(tmp_path / "other", siglip_checkpoint, seed=1)
    with pytest.raises(ValueError, match="another model"):
        fastsiglip.finetune(fastsiglip.load(other), train=shapes["train"], out=out, batch_size=16, steps=1,
                            resume=True, **FAST)
    with pytest.raises(ValueError, match="batch_size: 16 -> 32"):
        fastsiglip.finetune(fastsiglip.load(tiny), train=shapes["train"], out=out, batch_size=32, steps=1,
                            resume=True, **FAST)


def test_export_loads_in_fastsiglip_and_transformers(tiny, shapes, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = fastsiglip.load(tiny)
    result = fastsiglip.finetune(model, train=shapes["train"], out=tmp_path / "run", batch_size=16, steps=2, **FAST)
    final = result["final"]
    assert final == tmp_path / "run" / "final"
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer_config.json",
            "preprocessor_config.json"} <= {p.name for p in final.iterdir()}
    ours = fastsiglip.load(final)
    for key, value in model.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    theirs = transformers.AutoModel.from_pretrained(final).eval()
    processor = fastsiglip.load_processor(final)
    inputs = processor(text=["red left", "blue right"],
                       images=[shape_image("red", "left", np.random.default_rng(0)),
                               shape_image("blue", "right", np.random.default_rng(1))])
    with torch.no_grad():
        want = theirs(**inputs).logits_per_image
        got = ours(**inputs).logits_per_image
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. Evaluation and logging
# ---------------------------------------------------------------------------------------------


def test_retrieval_recall_in_chunks():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(50, 8, generator=g), dim=-1)
    got = retrieval_recall(img, txt, chunk=7)
    full = img @ txt.t()
    for name, scores in (("i2t", full), ("t2i", full.t())):
        ranks = (scores > scores.diag()[:, None]).sum(1)
        for k in (1, 5, 10):
            assert got[f"val/{name}_recall@{k}"] == pytest.approx((ranks < k).float().mean().item())
    perfect = retrieval_recall(img, img)
    assert all(v == 1.0 for v in perfect.values())


def test_metrics_keys_and_zero_shot(tiny, shapes, tmp_path):
    folder = tmp_path / "zs"
    rng = np.random.default_rng(5)
    for color in ("red", "blue"):
        (folder / color).mkdir(parents=True)
        for i in range(3):
            shape_image(color, "left", rng).save(folder / color / f"{i}.png")
    out = tmp_path / "run"
    fastsiglip.finetune(fastsiglip.load(tiny), train=shapes["train"], val=shapes["val"], zero_shot=folder, out=out,
                        batch_size=16, steps=3, eval_every=2, **FAST)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    base = {"step", "loss", "lr", "pairs_per_s", "samples_seen", "skipped"}
    evals = {f"val/{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"zeroshot/top1"}
    assert set(records[1]) == base
    for r in (records[0], records[2], records[3]):
        assert set(r) == base | evals, r
    assert records[3]["samples_seen"] == 48 and records[3]["skipped"] == 0
    assert 0 <= records[3]["zeroshot/top1"] <= 1


def test_zero_shot_skips_unreadable_images(tiny, tmp_path):
    # An unreadable image in the --zero-shot folder is left out of the accuracy (it must not stop
    # a training run mid-way); a folder with no readable image at all is an error.
    import contextlib

    from fastsiglip.processing import load_processor
    from fastsiglip.train.evaluate import zero_shot_top1

    folder = tmp_path / "zs"
    rng = np.random.default_rng(5)
    for color in ("red", "blue"):
        (folder / color).mkdir(parents=True)
        shape_image(color, "left", rng).save(folder / color / "0.png")
    model, processor = fastsiglip.load(tiny), load_processor(tiny)
    run = dict(device="cpu", autocast=contextlib.nullcontext)
    clean = zero_shot_top1(model, processor, folder, **run)["zeroshot/top1"]
    (folder / "red" / "1.png").write_bytes(b"not an image")
    assert zero_shot_top1(model, processor, folder, **run)["zeroshot/top1"] == clean
    for color in ("red", "blue"):
        (folder / color / "0.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="none of its 3 images could be read"):
        zero_shot_top1(model, processor, folder, **run)


def test_resume_drops_a_half_written_metrics_line(tmp_path):
    # A process killed in the middle of a metrics.jsonl write leaves half a line; a resumed run
    # drops it (and every line after its checkpoint's step) instead of failing to parse it.
    from fastsiglip.train import _Metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n'
                                            '{"step": 2, "loss": 0.8}\n{"step": 3, "lo')
    _Metrics(tmp_path, keep_until=1, tensorboard=False, active=True)
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.9}]


# ---------------------------------------------------------------------------------------------
# 6. Several processes (DDP, gloo): the same run as one process on the same global batches
# ---------------------------------------------------------------------------------------------

ROOT = str(pathlib.Path(__file__).resolve().parents[1])  # spawned workers import this file as tests.test_train


def _ddp_worker(rank, world, checkpoint, manifest, out):
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # file rendezvous, loopback only (see test_distributed_loss.py)
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = fastsiglip.load(checkpoint, dtype=torch.float64)
        fastsiglip.finetune(model, train=manifest, out=out, batch_size=32, micro_batch_size=8, steps=3,
                            precision="fp32", resume=True, **FAST)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo may abort in its destructors at exit (see test_distributed_loss.py)


def test_two_processes_equal_one(tiny, shapes, tmp_path, monkeypatch):
    """A run stopped after step 1 on one process and resumed on two (DDP, gloo, 2 x 2 micro-batches)
    ends with the weights and losses of one process running all three steps."""
    import torch.multiprocessing as mp

    out, run = tmp_path / "ddp", dict(train=shapes["train"], batch_size=32, steps=3, precision="fp32", **FAST)

    def stop(step, record):
        os.kill(os.getpid(), signal.SIGTERM)

    assert fastsiglip.finetune(fastsiglip.load(tiny, dtype=torch.float64), out=out, callback=stop, **run)["step"] == 1
    monkeypatch.syspath_prepend(ROOT)
    mp.spawn(_ddp_worker, args=(2, str(tiny), str(shapes["train"]), str(out)), nprocs=2, join=True)
    single = fastsiglip.load(tiny, dtype=torch.float64)
    fastsiglip.finetune(single, out=tmp_path / "one", micro_batch_size=16, **run)
    assert_weights_close(fastsiglip.load(out / "final", dtype=torch.float64), single, 1e-6)
    got, want = read_metrics(out), read_metrics(tmp_path / "one")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-9)
    state, _, rng = ckpt.read_resume(ckpt.list_checkpoints(out)[-1])
    assert state["step"] == 3 and state["args"]["world_size"] == 2 and {"cpu.0", "cpu.1"} <= rng.keys()


# ---------------------------------------------------------------------------------------------
# 2. Data through the loop (the data itself: tests/test_data.py)
# ---------------------------------------------------------------------------------------------


def test_trains_from_tar_shards_with_worker_processes(tiny, shapes, tmp_path):
    import io
    import tarfile

    rows = list(csv.DictReader(open(shapes["train"])))
    for shard in range(2):
        with tarfile.open(tmp_path / f"train-{shard:03d}.tar", "w") as tar:
            for i, row in enumerate(rows[shard * 32:(shard + 1) * 32]):
                for name, payload in ((f"{shard}-{i:04d}.png", (shapes["train"].parent / row["image"]).read_bytes()),
                                      (f"{shard}-{i:04d}.json", json.dumps({"text": row["text"]}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    result = fastsiglip.finetune(tiny, train=str(tmp_path / "train-{000..001}.tar"), out=tmp_path / "run",
                                 batch_size=16, micro_batch_size=8, steps=2, workers=2, lr=1e-3, progress=False)
    assert result["step"] == 2 and result["metrics"]["samples_seen"] == 32 and math.isfinite(result["metrics"]["loss"])


# ---------------------------------------------------------------------------------------------
# 7. The command line
# ---------------------------------------------------------------------------------------------


def test_cli_sigterm_from_outside_then_resume(tiny, shapes, tmp_path):
    """`python -m fastsiglip train` with two loader processes, its process group sent SIGTERM (as
    a scheduler does), exits 128 + 15 after saving; `fastsiglip train --resume` finishes the run."""
    import subprocess
    import sys
    import time

    from fastsiglip import cli

    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny), "--train", str(shapes["train"]), "--out", str(out), "--batch-size", "16",
            "--micro-batch-size", "8", "--steps", "30", "--save-every", "50", "--workers", "2", "--lr", "1e-3"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastsiglip", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the training process logged nothing for 120 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its DataLoader workers
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "continue with --resume" in stderr and "step " in stderr and "pairs/s" in stderr
    stopped = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 3 <= stopped < 30 and [p.name for p in ckpt.list_checkpoints(out)][-1] == f"step-{stopped}"
    assert cli.main([*argv, "--resume", "--quiet"]) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 31))
    assert (out / "final" / "model.safetensors").is_file()
    assert cli.main(["train", "--model", str(tiny), "--train", str(shapes["train"]), "--out", str(tmp_path / "x"),
                     "--batch-size", "8", "--micro-batch-size", "3", "--steps", "1"]) == 2


# ---------------------------------------------------------------------------------------------
# 8. It learns
# ---------------------------------------------------------------------------------------------


def test_it_learns(tiny, shapes, tmp_path):
    """Held-out images: image->text recall@1 from chance (8 captions, 1/8) to >= 0.9. (With four
    validation images per caption, text->image recall@1 cannot exceed 1/4: not asserted.)

    The recipe holds beyond this one seed: with portable_init's seeds 0-9 (and finetune's seed
    equal to it), every run reached recall@1 >= 0.96875 at step 600 on torch 2.11 and 2.13 alike
    (the same numbers on both); at lr 3e-3, batch 32 and 300 steps, 3 of 5 seeds stayed below 0.9."""
    torch.manual_seed(0)
    out = tmp_path / "learn"
    fastsiglip.finetune(tiny, train=shapes["train"], val=shapes["val"], out=out, batch_size=64, steps=600,
                        lr=1e-3, warmup_steps=5, weight_decay=0.0, eval_every=200, workers=0, progress=False)
    records = [r for r in read_metrics(out) if "val/i2t_recall@1" in r]
    assert [r["step"] for r in records] == [0, 200, 400, 600]
    assert records[0]["val/i2t_recall@1"] <= 0.3, records[0]
    assert records[-1]["val/i2t_recall@1"] >= 0.9, records
    assert records[-1]["val/i2t_recall@5"] == 1.0


def test_portable_init_ignores_torch_rng():
    """The test checkpoints' weights depend on the seed alone, not on torch's random state (nor
    on its samplers, which change between releases)."""
    transformers = pytest.importorskip("transformers")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.SiglipConfig(text_config=dict(tower, vocab_size=50, max_position_embeddings=8),
                                       vision_config=dict(tower, image_size=IMAGE, patch_size=PATCH))
    states = []
    for torch_seed in (0, 1):
        torch.manual_seed(torch_seed)
        model = transformers.SiglipModel(config)
        portable_init(model, seed=3)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ---------------------------------------------------------------------------------------------
# 9. Bad input, optional packages
# ---------------------------------------------------------------------------------------------


def test_tensorboard_needs_the_package(tiny, shapes, tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install tensorboard"):
            fastsiglip.finetune(tiny, train=shapes["train"], out=tmp_path / "tb", batch_size=8, steps=1,
                                tensorboard=True, **FAST)
    else:
        fastsiglip.finetune(tiny, train=shapes["train"], out=tmp_path / "tb", batch_size=8, steps=1, tensorboard=True,
                            **FAST)
        assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_batch_sizes_are_checked(tiny, shapes, tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
        fastsiglip.finetune(tiny, train=shapes["train"], out=tmp_path / "a", batch_size=20, micro_batch_size=8,
                            steps=1, **FAST)
    with pytest.raises(ValueError, match="larger than --batch-size"):
        fastsiglip.finetune(tiny, train=shapes["train"], out=tmp_path / "b", batch_size=8, micro_batch_size=16,
                            steps=1, **FAST)


def test_bad_images_are_skipped_counted_then_fatal(tiny, shapes, tmp_path):
    folder = shapes["train"].parent
    rows = list(csv.DictReader(open(shapes["train"])))
    (folder / "broken.png").write_bytes(b"not a png")
    rows[3] = {"image": "broken.png", "text": "red left"}
    rows[5] = {"image": "missing.png", "text": "red left"}
    manifest = write_manifest(folder / "with_bad.csv", rows)
    model = fastsiglip.load(tiny)
    result = fastsiglip.finetune(model, train=manifest, out=tmp_path / "ok", batch_size=64, steps=2,
                                 max_bad_fraction=0.05, **FAST)
    assert result["metrics"]["skipped"] == 2 and result["metrics"]["samples_seen"] == 128
    with pytest.raises(ValueError, match=r"more than --max-bad-fraction 0.01.*(broken|missing)\.png"):
        fastsiglip.finetune(tiny, train=manifest, out=tmp_path / "fatal", batch_size=64, steps=2, **FAST)


def test_data_errors_are_clear(tiny, shapes, tmp_path):
    with pytest.raises(ValueError, match="no text column 'caption'.*--text-column"):
        fastsiglip.finetune(tiny, train=shapes["train"], out=tmp_path / "a", batch_size=8, steps=1,
                            text_column="caption", **FAST)
    empty = write_manifest(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match="no rows"):
        fastsiglip.finetune(tiny, train=empty, out=tmp_path / "b", batch_size=8, steps=1, **FAST)


# ---------------------------------------------------------------------------------------------
# 10. LoRA (peft)
# ---------------------------------------------------------------------------------------------


def _base_of(state: dict) -> dict:
    """A peft model's base weights under transformers' names (lora_* dropped, base_layer. removed)."""
    return {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in state.items()
            if ".lora_" not in k}


def test_cli_lora_trains_the_adapters_only_and_exports_both(tiny, shapes, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from fastsiglip import cli

    out = tmp_path / "lora"
    argv = ["train", "--model", str(tiny), "--train", str(shapes["train"]), "--val", str(shapes["val"]),
            "--out", str(out), "--batch-size", "32", "--steps", "40", "--lr", "1e-2", "--workers", "0",
            "--lora-rank", "4", "--eval-every", "40", "--quiet"]
    assert cli.main(argv) == 0
    source = fastsiglip.load(tiny).state_dict()
    saved = load_file(str(out / "checkpoints" / "step-40" / "model.safetensors"))
    base = _base_of(saved)
    assert base.keys() == source.keys()
    assert all(torch.equal(base[k], source[k]) for k in source), "a base weight changed"
    lora = [k for k in saved if ".lora_B." in k]
    assert lora and all(saved[k].abs().max() > 0 for k in lora), "an adapter never moved from zero"
    assert not any(".head.attention.out_proj." in k for k in saved if ".lora_" in k)
    records = read_metrics(out)
    assert records[-1]["loss"] < records[1]["loss"]  # it learns
    assert records[-1]["val/i2t_recall@1"] > records[0]["val/i2t_recall@1"]
    # OUT/final: the merged model, for fastsiglip and transformers; OUT/final/adapter: peft's
    merged = fastsiglip.load(out / "final")
    assert any(not torch.equal(p, source[n]) for n, p in merged.named_parameters())
    hf = transformers.SiglipModel.from_pretrained(out / "final").eval()
    with_adapter = peft.PeftModel.from_pretrained(transformers.SiglipModel.from_pretrained(tiny).eval(),
                                                  out / "final" / "adapter")
    gen = torch.Generator().manual_seed(0)
    x = dict(pixel_values=torch.randn(3, 3, IMAGE, IMAGE, generator=gen),
             input_ids=torch.randint(0, 300, (3, TEXT_LEN), generator=gen))
    with torch.no_grad():
        ours = merged(**x).logits_per_image
        torch.testing.assert_close(hf(**x).logits_per_image, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(with_adapter(**x).logits_per_image, ours, atol=1e-5, rtol=0)


def test_finetune_respects_requires_grad_of_a_peft_model(tiny, shapes, tmp_path):
    """A PeftModel passed in trains its adapters only (nothing is switched on); the export merges."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(fastsiglip.load(tiny), peft.LoraConfig(r=2, target_modules=["q_proj", "fc2"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = _state(model)
    result = fastsiglip.finetune(model, train=shapes["train"], out=tmp_path / "peft", batch_size=16, steps=3,
                                 **dict(FAST, lr=1e-2))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {k for k in before if ".lora_" in k}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    merged = fastsiglip.load(result["final"])
    gen = torch.Generator().manual_seed(1)
    x = dict(pixel_values=torch.randn(2, 3, IMAGE, IMAGE, generator=gen),
             input_ids=torch.randint(0, 300, (2, TEXT_LEN), generator=gen))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits_per_image, model(**x).logits_per_image, atol=1e-5, rtol=0)
    assert (result["final"] / "adapter" / "adapter_config.json").is_file()


def test_lora_micro_batches_equal_one_batch(tiny, shapes, tmp_path):
    """GradCache stays exact with adapters: the same adapters after two steps either way."""
    pytest.importorskip("peft")
    states = {}
    for micro in (32, 8):
        model = fastsiglip.load(tiny, dtype=torch.float64)
        fastsiglip.finetune(model, train=shapes["train"], out=tmp_path / str(micro), batch_size=32,
                            micro_batch_size=micro, steps=2, precision="fp32", lora_rank=4,
                            **dict(FAST, lr=1e-2))
        states[micro] = load_adapter_state(tmp_path / str(micro))
    assert states[8].keys() == states[32].keys() and any(v.abs().max() > 0 for v in states[32].values())
    for key, value in states[32].items():
        torch.testing.assert_close(states[8][key], value, rtol=1e-6, atol=1e-9, msg=key)


def load_adapter_state(out):
    from safetensors.torch import load_file

    return load_file(str(pathlib.Path(out) / "final" / "adapter" / "adapter_model.safetensors"))


def test_lora_resume_equals_uninterrupted(tiny, shapes, tmp_path):
    pytest.importorskip("peft")
    run = dict(RUN, lora_rank=4, lr=1e-2)
    fastsiglip.finetune(fastsiglip.load(tiny), train=shapes["train"], out=tmp_path / "full", **run)

    def kill(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "cut"
    assert fastsiglip.finetune(fastsiglip.load(tiny), train=shapes["train"], out=out, callback=kill, **run)["interrupted"]
    with pytest.raises(ckpt.ResumeError, match="lora_rank"):
        fastsiglip.finetune(fastsiglip.load(tiny), train=shapes["train"], out=out, resume=True, **dict(run, lora_rank=8))
    fastsiglip.finetune(fastsiglip.load(tiny), train=shapes["train"], out=out, resume=True, **run)
    want, got = load_adapter_state(tmp_path / "full"), load_adapter_state(out)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_lora_options_are_checked(tiny, shapes, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--lora-targets must name some of"):
        fastsiglip.finetune(tiny, train=shapes["train"], out=tmp_path / "a", batch_size=8, steps=1, lora_rank=2,
                            lora_targets=("qkv",), **FAST)
    with pytest.raises(ValueError, match="--lora-rank must be a positive integer"):
        fastsiglip.finetune(tiny, train=shapes["train"], out=tmp_path / "b", batch_size=8, steps=1, lora_rank=0,
                            **FAST)
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    for kw, message in [(dict(lora_rank=2, lora_alpha=float("nan")), "--lora-alpha must be a finite positive"),
                        (dict(lora_rank=2, lora_dropout=1.0), r"--lora-dropout must lie in \[0, 1\)"),
                        (dict(lora_alpha=8.0), "--lora-alpha needs --lora-rank"),
                        (dict(lora_dropout=0.1, lora_targets=("q_proj",)), "--lora-dropout, --lora-targets need")]:
        with pytest.raises(ValueError, match=message):
            fastsiglip.finetune(tiny, train=shapes["train"], out=tmp_path / "d", batch_size=8, steps=1, **kw, **FAST)
        assert not (tmp_path / "d").exists(), "checked before anything is written"
    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ImportError, match=r"pip install 'fastsiglip\[lora\]'"):
        fastsiglip.finetune(tiny, train=shapes["train"], out=tmp_path / "c", batch_size=8, steps=1, lora_rank=2,
                            **FAST)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("config", [dict(use_dora=True), dict(lora_bias=True), dict(modules_to_save=["head"])])
def test_the_export_merges_as_peft_merges(tiny, config):
    """DoRA, LoRA biases and modules_to_save, as a caller may pass them in a PeftModel: the exported
    weights are what peft's merge_and_unload gives, and the caller's model is left as it was."""
    peft = pytest.importorskip("peft")
    from fastsiglip.train import lora

    model = peft.get_peft_model(fastsiglip.load(tiny), peft.LoraConfig(r=2, target_modules=["q_proj", "fc2"], **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)  # trained adapters, not the initial no-op
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.merged_state_dict(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys() == fastsiglip.load(tiny).state_dict().keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=0, rtol=0, msg=key)
    x = dict(pixel_values=torch.randn(2, 3, IMAGE, IMAGE), input_ids=torch.randint(0, 300, (2, TEXT_LEN)))
    plain = fastsiglip.load(tiny)
    plain.load_state_dict(merged)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**x).logits_per_image, model(**x).logits_per_image, atol=1e-5, rtol=0)
