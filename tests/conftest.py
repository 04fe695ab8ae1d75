"""Shared test setup.

On a machine without CUDA the kernel tests run through the Triton interpreter, which has to
be switched on before triton is first imported: that happens here, before any test module.
"""

import importlib.metadata
import os
import pathlib
import re
import sys
import warnings

import pytest
import torch

# `python -m pytest` puts the working folder first on sys.path; from the repository root its
# kernels/ (fastsiglip's Triton kernels, installed as fastsiglip.kernels) would then shadow Hugging
# Face's `kernels` package, which transformers imports. The tests import the installed package.
_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or os.curdir).resolve() != _ROOT]

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _ignore_interpreter_noise():
    """Inside a `warnings.catch_warnings()` that turns warnings into errors: ignore exactly the two
    warnings the Triton interpreter itself raises on correct kernels. numpy's exp overflows to inf
    on very negative scores (which the kernels mean: exp2(-inf) = 0); and triton 3.6's interpreter
    converts a one-element array with int() where a kernel uses a loaded scalar as a loop bound
    (`range(0, n, BLOCK)`; interpreter.py's `__index__`), which numpy >= 1.25 deprecates; triton
    3.8 squeezes the array first. pyproject.toml's filterwarnings ignores the same two."""
    warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
    warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0 to a scalar", DeprecationWarning,
                            r"triton\.runtime\.interpreter")


def _version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "5.21.0" or "5.26.0.dev0"."""
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def installed_version(package: str) -> tuple[int, ...] | None:
    try:
        return _version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_runtest_setup(item):
    """@pytest.mark.transformers("5.21", reason=...): the test compares against behaviour that
    transformers only has from that version on; older versions skip it, naming both versions."""
    for mark in item.iter_markers("transformers"):
        have = installed_version("transformers")
        if have is not None and have < _version(mark.args[0]):
            pytest.skip(f"needs transformers >= {mark.args[0]} (installed: {importlib.metadata.version('transformers')}): "
                        f"{mark.kwargs['reason']}")


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_fa_rule(name, actual, exact, torch_lowp, factor=2.0, atol=1e-5):
    """FlashAttention's tolerance rule.

    `exact`: the reference computed in float64 (or float32) from the same inputs;
    `torch_lowp`: the reference computed by PyTorch in the kernel's own dtype.
    The kernel's error against `exact` must be at most `factor` times PyTorch's own, plus atol.
    """
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(exact).all(), f"{name}: non-finite values differ"
    err = max_error(actual, exact)
    bound = factor * max_error(torch_lowp, exact) + atol
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (PyTorch's own error x{factor} + {atol})"


@pytest.fixture
def fa_rule():
    return check_fa_rule


@pytest.fixture
def ignore_interpreter_noise():
    return _ignore_interpreter_noise


# ---------------------------------------------------------------------------------------------
# A complete small SigLIP 1 checkpoint folder, as the hub has them: config.json and
# model.safetensors written by transformers' save_pretrained (random weights), a sentencepiece
# spiece.model trained here, tokenizer and preprocessor configs. For API, CLI and pipeline tests.
# ---------------------------------------------------------------------------------------------

TINY_VOCAB = 300
TINY_IMAGE = 32
SIGLIP_PREPROCESSOR_CONFIG = {  # as in google/siglip-base-patch16-224, at the tiny image size
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": TINY_IMAGE, "width": TINY_IMAGE},
}
SIGLIP_TOKENIZER_CONFIG = {  # as in google/siglip-base-patch16-224
    "do_lower_case": True, "eos_token": "</s>", "model_input_names": ["input_ids"], "model_max_length": 64,
    "pad_token": "</s>", "processor_class": "SiglipProcessor", "tokenizer_class": "SiglipTokenizer",
    "unk_token": "<unk>",
}


def _train_spiece(folder):
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = "a photo of the cat dog red blue green big small on in with two house tree car sky water".split()
    syllables = "ka to ri mu se na po li ve du ga ho fi ne ru bo".split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "m"), model_type="unigram",
                                   vocab_size=TINY_VOCAB, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
                                   minloglevel=2)
    (folder / "m.model").rename(folder / "spiece.model")
    for leftover in ("m.vocab", "corpus.txt"):
        (folder / leftover).unlink()


@pytest.fixture(scope="session")
def siglip_checkpoint(tmp_path_factory):
    """Folder of a tiny random-weight SigLIP 1 checkpoint (text length 64, image 32, patch 8)."""
    import json

    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("siglip_checkpoint")
    torch.manual_seed(0)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.SiglipConfig(
        text_config=dict(tower, vocab_size=TINY_VOCAB, max_position_embeddings=64, pad_token_id=1, eos_token_id=1,
                         bos_token_id=None),
        vision_config=dict(tower, image_size=TINY_IMAGE, patch_size=8),
    )
    transformers.SiglipModel(config).eval().save_pretrained(folder)
    _train_spiece(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(SIGLIP_TOKENIZER_CONFIG))
    (folder / "preprocessor_config.json").write_text(json.dumps(SIGLIP_PREPROCESSOR_CONFIG))
    return folder
