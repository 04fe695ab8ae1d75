"""fastsiglip.loading: folders and hub ids -> strict, lean model loading.

Checkpoints are tiny random-weight models written by transformers' save_pretrained (single
file and sharded); hub ids are resolved offline from a Hugging Face cache folder the tests fill
in the real layout (models--org--name/{blobs,refs/main,snapshots/<commit>}). Every bad input
has a test that reads the error message.
"""

import hashlib
import json
import pathlib
import shutil
import weakref

import pytest
import safetensors
import safetensors.torch
import torch

transformers = pytest.importorskip("transformers")
import huggingface_hub  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402

from fastsiglip import loading  # noqa: E402
from fastsiglip.loading import CheckpointError, load, resolve  # noqa: E402

TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
PATCH = 8
VISION = dict(TOWER, image_size=32, patch_size=PATCH)
VISION2 = dict(TOWER, num_patches=16, patch_size=PATCH)  # NaFlex: a 4 x 4 position grid
TEXT = dict(TOWER, vocab_size=100, max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "fastsiglip-test/tiny-siglip"
SHARD_SIZE = "20KB"  # splits the tiny SigLIP (770 KB) into ~30 shards


def make_hf(kind: str, seed: int = 0):
    """A random transformers model, every parameter perturbed (biases and LayerNorms too)."""
    t = transformers
    build = {
        "siglip": lambda: t.SiglipModel(t.SiglipConfig(vision_config=VISION, text_config=TEXT)),
        "siglip2": lambda: t.Siglip2Model(t.Siglip2Config(vision_config=VISION2, text_config=TEXT)),
        "vision": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**VISION)),
        "vision2": lambda: t.Siglip2VisionModel(t.Siglip2VisionConfig(**VISION2)),
        "text": lambda: t.SiglipTextModel(t.SiglipTextConfig(**TEXT)),
        "classifier": lambda: t.SiglipForImageClassification(
            t.SiglipConfig(vision_config=VISION, text_config=TEXT, num_labels=3)),
    }[kind]
    torch.manual_seed(seed)
    model = build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def save(model, folder, **kwargs) -> pathlib.Path:
    model.save_pretrained(folder, **kwargs)
    return pathlib.Path(folder)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """kind -> (transformers model, folder); 'siglip_sharded' is the siglip model sharded."""
    out = {}
    for kind in ("siglip", "siglip2", "vision", "vision2", "text", "classifier"):
        hf = make_hf(kind)
        out[kind] = (hf, save(hf, tmp_path_factory.mktemp(kind)))
    out["siglip_sharded"] = (out["siglip"][0], save(out["siglip"][0], tmp_path_factory.mktemp("sharded"),
                                                    max_shard_size=SHARD_SIZE))
    return out


def copy_of(ckpts, kind, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(ckpts[kind][1], tmp_path / kind))


def stored_tensors(folder: pathlib.Path) -> dict:
    """Every tensor of a checkpoint folder (single or sharded), by checkpoint key."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(file))
    return out


# ---------------------------------------------------------------------------------------------
# Loading real checkpoints
# ---------------------------------------------------------------------------------------------


def forward_pair(kind, ours, hf):
    """(ours, transformers') main output on the same small inputs."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TEXT["vocab_size"], (2, TEXT["max_position_embeddings"]), generator=gen)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        if kind == "siglip":
            kw = dict(input_ids=ids, pixel_values=pixels)
            return ours(**kw).logits_per_image, hf(**kw).logits_per_image
        if kind in ("siglip2", "vision2"):  # NaFlex: a full 4 x 4 image and a padded 2 x 3 one
            mask = torch.zeros(2, 16, dtype=torch.int32)
            mask[0], mask[1, :6] = 1, 1
            kw = dict(pixel_values=torch.randn(2, 16, 3 * PATCH * PATCH, generator=gen), pixel_attention_mask=mask,
                      spatial_shapes=torch.tensor([[4, 4], [2, 3]]))
            if kind == "vision2":
                return ours(**kw).pooler_output, hf(**kw).pooler_output
            return ours(input_ids=ids, **kw).logits_per_image, hf(input_ids=ids, **kw).logits_per_image
        if kind == "vision":
            return ours(pixels).pooler_output, hf(pixel_values=pixels).pooler_output
        if kind == "text":
            return ours(ids).pooler_output, hf(input_ids=ids).pooler_output
        return ours(pixels).logits, hf(pixel_values=pixels).logits


@pytest.mark.parametrize("kind", ["siglip", "siglip2", "vision", "vision2", "text", "classifier", "siglip_sharded"])
def test_load_matches_transformers(ckpts, kind):
    hf, folder = ckpts[kind]
    ours = load(folder)
    assert not ours.training and ours.checkpoint_dir == folder.resolve()
    assert not any(t.is_meta for t in ours.state_dict().values())
    # Every parameter is the stored tensor (tower-only checkpoints of transformers 5 lack the prefix).
    stored = stored_tensors(folder)
    state = ours.state_dict()
    assert len(stored) == len(state)
    prefix = {"vision": "vision_model.", "vision2": "vision_model.", "text": "text_model."}.get(kind, "")
    for key, tensor in stored.items():
        assert torch.equal(state[key if key.startswith(prefix) else prefix + key], tensor), key
    out, ref = forward_pair(kind.removesuffix("_sharded"), ours, hf)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_is_sharded(ckpts):
    folder = ckpts["siglip_sharded"][1]
    assert not (folder / "model.safetensors").exists()
    assert len(loading.weight_files(folder)) > 1


def test_tower_checkpoint_with_prefix_and_ignored_position_ids(ckpts, tmp_path):
    """transformers 4 wrote tower models with the "vision_model." prefix, and CLIP-derived
    conversions carry embeddings.position_ids: both load."""
    folder = copy_of(ckpts, "vision", tmp_path)
    tensors = {"vision_model." + k: v for k, v in stored_tensors(folder).items()}
    tensors["vision_model.embeddings.position_ids"] = torch.arange(16)[None]
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    ours = load(folder)
    torch.testing.assert_close(*forward_pair("vision", ours, ckpts["vision"][0]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# dtype and device: straight from safe_open, one tensor at a time
# ---------------------------------------------------------------------------------------------


class SpySafeOpen:
    """Wraps safetensors.safe_open: records every tensor handed out (weakly, by data pointer
    and dtype), and counts reads made while the tensor read before was still alive."""

    def __init__(self, real):
        self.real, self.returned, self.ptrs, self.alive_at_next_read = real, [], {}, 0

    def __call__(self, *args, **kwargs):
        spy, handle = self, self.real(*args, **kwargs)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_slice(self, key):
                return handle.get_slice(key)

            def get_tensor(self, key):
                spy.alive_at_next_read += bool(spy.returned) and spy.returned[-1]() is not None
                tensor = handle.get_tensor(key)
                spy.returned.append(weakref.ref(tensor))
                spy.ptrs[tensor.data_ptr()] = tensor.dtype
                return tensor

        return Handle()


@pytest.fixture
def spy(monkeypatch):
    spy = SpySafeOpen(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", spy)
    return spy


def test_bf16_from_float32_checkpoint_casts_one_tensor_at_a_time(ckpts, spy):
    hf, folder = ckpts["siglip"]
    ours = load(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert all(dt == torch.float32 for dt in spy.ptrs.values())  # stored float32, read as is
    # Each float32 tensor read was gone by the next read: at most one float32 tensor alive.
    assert spy.alive_at_next_read == 0 and len(spy.returned) == len(ours.state_dict())
    for key, tensor in stored_tensors(folder).items():
        assert torch.equal(ours.state_dict()[key], tensor.to(torch.bfloat16)), key


def test_bf16_checkpoint_loads_without_any_copy(tmp_path, spy):
    folder = save(make_hf("vision").to(torch.bfloat16), tmp_path / "bf16")
    for dtype in (None, "auto", "bfloat16", torch.bfloat16):
        spy.ptrs.clear()
        ours = load(folder, dtype=dtype)
        params = list(ours.parameters())
        assert {p.dtype for p in params} == {torch.bfloat16}, dtype
        # The parameters ARE the tensors safe_open returned: no float32 detour, no copy.
        assert all(p.data_ptr() in spy.ptrs for p in params), dtype


def test_dtype_and_device_arguments(ckpts):
    folder = ckpts["vision"][1]
    assert {p.dtype for p in load(folder, dtype="float16", device="cpu").parameters()} == {torch.float16}
    assert {p.device for p in load(folder, device=torch.device("cpu")).parameters()} == {torch.device("cpu")}
    assert {p.dtype for p in load(folder, dtype="auto").parameters()} == {torch.float32}  # config.json dtype
    with pytest.raises(ValueError, match="dtype must be None, 'auto'.*got 'int8'"):
        load(folder, dtype="int8")
    with pytest.raises(ValueError, match="device='meta' holds no weights"):
        load(folder, device="meta")
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        load(folder, device="gpu0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_load_peak_memory(ckpts):
    """Straight to the GPU in bf16: peak = the bf16 model + one float32 tensor, never 2x."""
    folder = ckpts["siglip"][1]
    stored = stored_tensors(folder)
    bf16_bytes = sum(t.numel() * 2 for t in stored.values())
    largest_f32 = max(t.numel() * 4 for t in stored.values())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ours = load(folder, device="cuda", dtype=torch.bfloat16)
    assert {p.device.type for p in ours.parameters()} == {"cuda"}
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    slack = 512 * len(stored)  # the caching allocator rounds every block up to 512 bytes
    assert torch.cuda.max_memory_allocated() - base <= bf16_bytes + largest_f32 + slack


# ---------------------------------------------------------------------------------------------
# Hub ids from the Hugging Face cache, offline
# ---------------------------------------------------------------------------------------------


def fill_cache(cache: pathlib.Path, repo_id: str, src: pathlib.Path) -> pathlib.Path:
    """The layout huggingface_hub writes: content-addressed blobs, snapshot files as relative
    symlinks into blobs, refs/main holding the commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for file in src.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blobs / digest)
        (snapshot / file.name).symlink_to(pathlib.Path("..", "..", "blobs", digest))
    return snapshot


@pytest.fixture
def offline_hub(monkeypatch):
    """HF_HUB_OFFLINE=1 in the environment only (huggingface_hub read its constant at import,
    so this checks that fastsiglip reads the variable itself), and a snapshot_download that
    fails the test if it is ever called without local_files_only: no network, ever."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    real = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kwargs):
        assert kwargs.get("local_files_only") is True, "would have gone to the network"
        calls.append(kwargs)
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_load_by_hub_id_from_cache_offline(ckpts, tmp_path, offline_hub, monkeypatch):
    snapshot = fill_cache(tmp_path / "cache", REPO_ID, ckpts["siglip_sharded"][1])
    ours = load(REPO_ID, cache_dir=tmp_path / "cache")
    assert ours.checkpoint_dir.resolve() == snapshot.resolve()
    assert offline_hub and offline_hub[0]["allow_patterns"] == list(loading.HUB_FILES)
    torch.testing.assert_close(*forward_pair("siglip", ours, ckpts["siglip"][0]), atol=1e-5, rtol=1e-5)
    # a commit as the revision, and the default cache (huggingface_hub's HF_HUB_CACHE)
    assert resolve(REPO_ID, revision=COMMIT, cache_dir=tmp_path / "cache").resolve() == snapshot.resolve()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve(REPO_ID).resolve() == snapshot.resolve()


def test_hub_id_offline_in_a_fresh_process_without_transformers(ckpts, tmp_path):
    """As a user runs it: HF_HUB_OFFLINE=1 and HF_HUB_CACHE in the environment before anything is
    imported (no monkeypatching), a hub id read from the cache, and `fastsiglip.load` importing
    neither transformers nor triton. The logits match transformers' (computed here)."""
    import os
    import subprocess
    import sys

    fill_cache(tmp_path / "cache", REPO_ID, ckpts["siglip_sharded"][1])
    ours_logits, expected = tmp_path / "logits.pt", forward_pair("siglip", ckpts["siglip"][0], ckpts["siglip"][0])[1]
    code = f"""
import sys
import torch
import fastsiglip
model = fastsiglip.load({REPO_ID!r})
gen = torch.Generator().manual_seed(1)
ids = torch.randint(0, {TEXT["vocab_size"]}, (2, {TEXT["max_position_embeddings"]}), generator=gen)
pixels = torch.randn(2, 3, 32, 32, generator=gen)
with torch.no_grad():
    torch.save(model(input_ids=ids, pixel_values=pixels).logits_per_image, {str(ours_logits)!r})
print(sorted(m for m in ("transformers", "triton") if m in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TRITON_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]"], f"fastsiglip.load imported {proc.stdout.strip()}"
    torch.testing.assert_close(torch.load(ours_logits), expected, atol=1e-5, rtol=1e-5)


def test_local_files_only_argument(ckpts, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    snapshot = fill_cache(tmp_path / "cache", REPO_ID, ckpts["vision"][1])
    assert resolve(REPO_ID, cache_dir=tmp_path / "cache", local_files_only=True).resolve() == snapshot.resolve()
    with pytest.raises(FileNotFoundError, match="offline mode is on"):
        resolve("fastsiglip-test/absent", cache_dir=tmp_path / "cache", local_files_only=True)


def test_not_cached_while_offline(tmp_path, offline_hub):
    cache = tmp_path / "empty-cache"
    with pytest.raises(FileNotFoundError) as info:
        load("google/siglip-base-patch16-224", cache_dir=cache)
    msg = str(info.value)
    assert (f"'google/siglip-base-patch16-224' is not in the Hugging Face cache at {cache} and offline mode is on "
            "(HF_HUB_OFFLINE=1 / local_files_only)") in msg
    assert "download it once with network access, or pass a local folder" in msg
    with pytest.raises(FileNotFoundError, match=r"revision 'v2'.*not in the Hugging Face cache"):
        resolve("google/siglip-base-patch16-224", revision="v2", cache_dir=cache)


def hub_error(cls, message):
    """A huggingface_hub HTTP error without an HTTP response (their constructors want one, of a
    type that changed across versions)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


@pytest.mark.parametrize("error, expected", [
    ("RepositoryNotFoundError", r"'org/absent' \(revision 'v9'\) is neither a local folder nor a model on the "
                                r"Hugging Face hub.*check the name"),
    ("GatedRepoError", r"'org/absent' \(revision 'v9'\) is gated on the Hugging Face hub: accept its terms on "
                       r"huggingface.co/org/absent"),
    ("RevisionNotFoundError", r"'org/absent' has no revision 'v9' on the Hugging Face hub"),
    ("LocalEntryNotFoundError", r"could not reach the Hugging Face hub for 'org/absent' \(revision 'v9'\).*"
                                r"check the network connection, or pass a local folder"),
])
def test_hub_errors_say_what_to_do(monkeypatch, tmp_path, error, expected):
    cls = getattr(huggingface_hub.utils, error)

    def snapshot_download(repo_id, **kwargs):
        assert kwargs["local_files_only"] is False
        raise hub_error(cls, "from the hub") if error != "LocalEntryNotFoundError" else cls("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(OSError, match=expected):
        resolve("org/absent", revision="v9", cache_dir=tmp_path, local_files_only=False)


def test_hub_download_fetches_only_what_fastsiglip_reads():
    repo = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "pytorch_model.bin", "flax_model.msgpack", "tf_model.h5",
            "onnx/model.onnx", "README.md", ".gitattributes", "spiece.model", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
            "open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
    kept = set(filter_repo_objects(repo, allow_patterns=list(loading.HUB_FILES)))
    dropped = {"pytorch_model.bin", "flax_model.msgpack", "tf_model.h5", "onnx/model.onnx", "README.md",
               ".gitattributes", "open_clip_pytorch_model.bin", "open_clip_model.safetensors"}
    assert kept == set(repo) - dropped


# ---------------------------------------------------------------------------------------------
# Bad inputs: every message says what is wrong and what to do
# ---------------------------------------------------------------------------------------------


def test_folder_without_config(ckpts, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(ckpts["vision"][1] / "model.safetensors", folder)
    with pytest.raises(FileNotFoundError, match=rf"{folder} has no config.json.*pass the folder that holds config"):
        load(folder)


def test_path_that_does_not_exist(tmp_path):
    for missing in (tmp_path / "nope", str(tmp_path / "nope"), "./not/a/folder"):
        with pytest.raises(FileNotFoundError, match="does not exist: pass an existing checkpoint folder, or a Hugging"):
            resolve(missing)
    with pytest.raises(TypeError, match="must be a folder path or a hub id"):
        resolve(3)


def test_file_instead_of_folder(ckpts):
    with pytest.raises(FileNotFoundError, match="is a file; pass the checkpoint folder"):
        load(ckpts["vision"][1] / "config.json")


def test_unknown_model_type_reaches_the_user(ckpts, tmp_path):
    folder = copy_of(ckpts, "vision", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="clip_vision_model")))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'clip_vision_model'.*siglip2_vision"):
        load(folder)


def test_strict_lists_every_missing_unexpected_and_misshaped_key(ckpts, tmp_path):
    folder = copy_of(ckpts, "siglip", tmp_path)
    tensors = stored_tensors(folder)
    del tensors["logit_bias"], tensors["vision_model.head.probe"]
    tensors["vision_model.extra.weight"] = torch.zeros(3)
    tensors["text_model.head.weight"] = torch.zeros(5, 64)
    tensors["text_model.embeddings.token_embedding.weight"] = torch.zeros(101, 64)
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load(folder)
    msg = str(info.value)
    assert f"{folder.resolve()} does not match the SiglipModel its config.json describes" in msg
    assert "missing from the checkpoint (2):\n    logit_bias\n    vision_model.head.probe" in msg
    assert "unexpected in the checkpoint (1):\n    vision_model.extra.weight in model.safetensors" in msg
    assert "shape mismatch (2):" in msg
    assert "text_model.embeddings.token_embedding.weight: checkpoint [101, 64], model [100, 64]" in msg
    assert "text_model.head.weight: checkpoint [5, 64], model [64, 64]" in msg
    assert "Check that config.json belongs to these weights" in msg


def test_strict_tower_key_both_with_and_without_prefix(ckpts, tmp_path):
    folder = copy_of(ckpts, "vision", tmp_path)
    tensors = stored_tensors(folder)
    tensors["vision_model.post_layernorm.bias"] = tensors["post_layernorm.bias"].clone()
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"in the checkpoint twice \(1\):\n    vision_model.post_layernorm.bias"):
        load(folder)


def test_wrong_config_for_the_weights(ckpts, tmp_path):
    """A text-tower checkpoint under a vision config.json: every wrong key is reported (the
    encoder layers have the same names and shapes in both towers, so only those match)."""
    folder = copy_of(ckpts, "text", tmp_path)
    shutil.copy(ckpts["vision"][1] / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError) as info:
        load(folder)
    msg = str(info.value)
    text_keys, vision_keys = set(stored_tensors(folder)), set(stored_tensors(ckpts["vision"][1]))
    missing, unexpected = vision_keys - text_keys, text_keys - vision_keys
    assert len(missing) > 10 and len(unexpected) > 4
    assert f"missing from the checkpoint ({len(missing)})" in msg
    assert f"unexpected in the checkpoint ({len(unexpected)})" in msg
    assert all(f"    vision_model.{k}\n" in msg for k in missing)
    assert "final_layer_norm.weight (as vision_model.final_layer_norm.weight) in model.safetensors" in msg


def test_corrupt_file(ckpts, tmp_path):
    folder = copy_of(ckpts, "vision", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 8 + data[8:])  # a header length no file has
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable safetensors file.*corrupt or truncated"
                                              r".*download the checkpoint again"):
        load(folder)


def test_truncated_file(ckpts, tmp_path):
    folder = copy_of(ckpts, "siglip_sharded", tmp_path)
    path = sorted(folder.glob("model-*.safetensors"))[3]
    path.write_bytes(path.read_bytes()[:-100])  # an interrupted download
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable safetensors file.*delete it and download"):
        load(folder)


def test_missing_shard(ckpts, tmp_path):
    folder = copy_of(ckpts, "siglip_sharded", tmp_path)
    gone = sorted(folder.glob("model-*.safetensors"))[1:3]
    for path in gone:
        path.unlink()
    with pytest.raises(FileNotFoundError) as info:
        load(folder)
    msg = str(info.value)
    assert f"{folder / 'model.safetensors.index.json'} names 2 shard(s) that are not in {folder}" in msg
    assert all(p.name in msg for p in gone) and "download the checkpoint again" in msg


def test_bad_index(ckpts, tmp_path):
    folder = copy_of(ckpts, "siglip_sharded", tmp_path)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="is not a valid safetensors index.*download the checkpoint again"):
        load(folder)


def test_no_safetensors_weights(ckpts, tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    shutil.copy(ckpts["vision"][1] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"neither model.safetensors nor model.safetensors.index.json.*"
                                                r"pytorch_model.bin: load it once with transformers and save_pret"):
        load(folder)
