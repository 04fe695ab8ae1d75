"""fastsiglip.tokenizer against transformers' tokenizers built from the same SentencePiece file.

Small models are trained here (sentencepiece.SentencePieceTrainer, well under a second each)
with the special tokens at the ids of the real vocabularies:
- SigLIP 1 (c4_en / T5 layout, spiece.model): <pad>=0, </s>=1, <unk>=2, no BOS; trained as
  unigram (the real one) and as BPE;
- SigLIP 2 (Gemma layout, tokenizer.model): <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4, then
  user-defined pieces (<start_of_turn>, whitespace runs, ...); BPE with byte fallback, identity
  normalization, no dummy prefix, no whitespace squashing, digits split (as Gemma's file).
Each goes into a folder with the tokenizer_config.json a real checkpoint has, and the ids of
several thousand strings must be identical to transformers'. For SigLIP 2, transformers (from
5.20) resolves a NaFlex folder (config.json model_type "siglip2") to Siglip2Tokenizer, which
lowercases: compared with our default as is; a FixRes folder (model_type "siglip") resolves to
GemmaTokenizer, which keeps case: compared with lowercase=False, and with our default on
`text.lower()` input. transformers before 5.20 resolved a NaFlex folder to the GemmaTokenizer its
tokenizer_config.json names (no lowercasing, unlike SigLIP 2's training: transformers' bug, fixed
in 5.20 by listing "siglip2" in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS); there the NaFlex
comparisons load Siglip2Tokenizer by name, the class 5.20 picks.
"""

import json
import logging
import os
import random
import re
import shutil
import string
import warnings

import pytest
import sentencepiece as spm
import torch

from fastsiglip.tokenizer import GEMMA_VOCAB_FILE, SIGLIP_VOCAB_FILE, Tokenizer, canonicalize_text, load_tokenizer

transformers = pytest.importorskip("transformers")
# AutoTokenizer picks Siglip2Tokenizer for model_type "siglip2" from 5.20 (module doc)
AUTO_PICKS_SIGLIP2 = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2]) >= (5, 20)

LENGTHS = (16, 64)  # text_config.max_position_embeddings of real checkpoints
N_RANDOM = 4000
# Special-token strings are plain text for fastsiglip and split out by transformers (module doc).
SPECIAL_STRINGS = ("</s>", "<pad>", "<unk>", "<eos>", "<bos>", "<mask>")
GEMMA_USER_DEFINED = ["<mask>", "<unused0>", "<unused1>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n", "\t",
                      "<table>"]
# Gemma also declares runs of spaces user-defined; SentencePiece matches those longest-first, the
# tokenizer transformers builds from tokenizer.model merges them by BPE: see the last parity test.
GEMMA_SPACE_RUNS = ["▁▁", "▁▁▁"]

SIGLIP_TOKENIZER_CONFIG = {  # as in google/siglip-base-patch16-224
    "additional_special_tokens": [], "do_lower_case": True, "eos_token": "</s>", "model_input_names": ["input_ids"],
    "model_max_length": 64, "pad_token": "</s>", "processor_class": "SiglipProcessor", "sp_model_kwargs": {},
    "tokenizer_class": "SiglipTokenizer", "unk_token": "<unk>",
}
SIGLIP_SPECIAL_TOKENS_MAP = {  # AddedToken dicts, as transformers saves them
    name: {"content": tok, "lstrip": True, "normalized": False, "rstrip": True, "single_word": False}
    for name, tok in (("eos_token", "</s>"), ("pad_token", "</s>"), ("unk_token", "<unk>"))
}
GEMMA_TOKENIZER_CONFIG = {  # as in google/siglip2-*
    "add_bos_token": False, "add_eos_token": True, "bos_token": "<bos>", "clean_up_tokenization_spaces": False,
    "eos_token": "<eos>", "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>",
    "padding_side": "right", "processor_class": "Siglip2Processor", "sp_model_kwargs": {},
    "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>",
}

WORDS = ("a photo of the cat dog red blue green big small on in with and two running house tree car city "
         "night man woman child ball water sky The Cat DOG Photo City").split()
UNICODE = ("café naïve Straße ÉCOLE İstanbul ıi Ωmega ω Жук 日本語 東京 猫 中文 한국어 🐱 😀 👍🏽 ❤️ ﬁ ½ "
           "１２３ Ａｂ 。 、 ¿ ¡ — « » “ ” ’ … \u200b \u00a0 \u3000 ▁").split()
ALPHABET = (string.ascii_letters + string.digits + string.punctuation + " \t\n\r\x0b\x0c"
            + "ÀÉÎõüßçñΩωЖжİı日本語東京猫犬中文한국어🐱😀👍🏽❤️\u200b\u00a0\u3000▁。、¿¡—–…«»“”’ﬁ½１２３Ａ")
EDGE_CASES = [
    "", " ", "   ", "\t", "\n", "\t\n\r ", ".", "!!!", "...", "?!?!", "a", "A", "2", "22", "222", "2222", "00000",
    "zzzz", "hmmmm", "!!!hello!!!", "hello,world", "hello , world", "  leading", "trailing  ", "  both  ",
    "tab\tsep", "new\nline", "multi\n\n\nline", "many     spaces", "MiXeD CaSe", "ALL CAPS", "1234567890",
    "3.14159", "$100", "e-mail: x@y.z", "<;x4½2２]", "x▁y", "▁lead", "日本語のテキスト", "猫 と 犬", "🐱🐱🐱",
    "emoji 😀 in text", "Straße", "İstanbul", "ﬁne", "½ cup", "Ａｂｃ１２３", "\u200bzero\u200bwidth",
    "nbsp\u00a0here", "ideographic\u3000space", " ".join(["word"] * 200), "x" * 500, "日" * 300,
]


def _generated_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:  # raw characters: punctuation runs, whitespace runs, unicode, digits
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
    if kind < 0.85:  # caption-like: words, unicode words, numbers, separators
        parts = []
        for _ in range(rng.randint(1, 16)):
            r = rng.random()
            parts.append(rng.choice(WORDS) if r < 0.6 else rng.choice(UNICODE) if r < 0.8
                         else str(rng.randint(0, 10 ** rng.randint(1, 6))) if r < 0.9
                         else "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 5))))
            parts.append(rng.choice([" ", " ", " ", "  ", "\t", "\n", ", ", "!!! ", "... ", "-", ""]))
        return "".join(parts)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 120)))  # beyond any max_length


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(20240501)
    texts = EDGE_CASES + [_generated_text(rng) for _ in range(N_RANDOM)]
    return [t for t in texts if not any(s in t for s in SPECIAL_STRINGS)]


def _training_lines(n=3000):
    rng = random.Random(7)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS + UNICODE) if rng.random() < 0.85 else str(rng.randint(0, 99999))
                 for _ in range(rng.randint(1, 12))]
        line = " ".join(words) + rng.choice(["", ".", "!", "?", "!!"])
        lines.append(line.lower() if rng.random() < 0.5 else line)
    return lines


@pytest.fixture(scope="module")
def training_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "corpus.txt"
    path.write_text("\n".join(_training_lines()), encoding="utf-8")
    return str(path)


def _train(training_file, folder, **kwargs):
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "m")
    spm.SentencePieceTrainer.train(input=training_file, model_prefix=prefix, num_threads=1, minloglevel=2, **kwargs)
    os.remove(prefix + ".vocab")
    return prefix + ".model"


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def siglip_folder(request, training_file, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(f"siglip_{request.param}"))
    model = _train(training_file, folder, model_type=request.param, vocab_size=500,
                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>")
    os.replace(model, os.path.join(folder, SIGLIP_VOCAB_FILE))
    _write_json(os.path.join(folder, "tokenizer_config.json"), SIGLIP_TOKENIZER_CONFIG)
    _write_json(os.path.join(folder, "special_tokens_map.json"), SIGLIP_SPECIAL_TOKENS_MAP)
    return folder


def _train_gemma(training_file, folder, user_defined):
    return _train(training_file, folder, model_type="bpe", vocab_size=700,
                  pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                  unk_piece="<unk>", user_defined_symbols=user_defined, byte_fallback=True, split_digits=True,
                  normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                  allow_whitespace_only_pieces=True)


@pytest.fixture(scope="module")
def gemma_folders(training_file, tmp_path_factory):
    """(naflex, fixres) folders sharing one Gemma-layout tokenizer.model; they differ in config.json."""
    base = str(tmp_path_factory.mktemp("gemma"))
    model = _train_gemma(training_file, base, GEMMA_USER_DEFINED)
    folders = []
    for variant, model_type in (("naflex", "siglip2"), ("fixres", "siglip")):
        folder = os.path.join(base, variant)
        os.makedirs(folder)
        shutil.copy(model, os.path.join(folder, GEMMA_VOCAB_FILE))
        _write_json(os.path.join(folder, "tokenizer_config.json"), GEMMA_TOKENIZER_CONFIG)
        _write_json(os.path.join(folder, "config.json"), {"model_type": model_type})
        folders.append(folder)
    return tuple(folders)


def _hf_tokenizer(folder, cls=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # random configs make transformers warn about token ids
        try:
            return (cls or transformers.AutoTokenizer).from_pretrained(folder, **kwargs)
        finally:
            logging.disable(logging.NOTSET)


def _hf_naflex_tokenizer(folder):
    """The tokenizer transformers gives a NaFlex folder: AutoTokenizer's pick from 5.20, which must be
    Siglip2Tokenizer; before 5.20 that class by name (module doc)."""
    if not AUTO_PICKS_SIGLIP2:
        return _hf_tokenizer(folder, cls=transformers.Siglip2Tokenizer)
    hf = _hf_tokenizer(folder)
    assert type(hf).__name__ == "Siglip2Tokenizer"  # lowercases: same normalization as our default
    return hf


def _hf_ids(tok, texts, max_length, padding="max_length"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(texts, padding=padding, max_length=max_length, truncation=True)["input_ids"]


def _assert_same(texts, expected, actual, what):
    bad = [(t, e, a) for t, e, a in zip(texts, expected, actual) if e != a]
    assert not bad, (f"{what}: {len(bad)} of {len(texts)} differ; first: text={bad[0][0]!r}\n"
                     f"  transformers {bad[0][1]}\n  fastsiglip   {bad[0][2]}")


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("max_length", LENGTHS)
def test_siglip_matches_transformers(siglip_folder, corpus, max_length):
    hf = _hf_tokenizer(siglip_folder)
    assert type(hf).__name__ == "SiglipTokenizer"
    ours = load_tokenizer(siglip_folder, max_length=max_length)
    assert (ours.family, ours.eos_id, ours.pad_id, ours.lowercase) == ("siglip", 1, 1, True)
    ids = ours(corpus)["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape == (len(corpus), max_length)
    _assert_same(corpus, _hf_ids(hf, corpus, max_length), ids.tolist(), f"SigLIP max_length={max_length}")


def test_siglip_without_lowercase_matches_transformers(siglip_folder, corpus):
    hf = _hf_tokenizer(siglip_folder, do_lower_case=False)
    ours = load_tokenizer(siglip_folder, max_length=16, lowercase=False)
    _assert_same(corpus, _hf_ids(hf, corpus, 16), ours(corpus)["input_ids"].tolist(), "SigLIP do_lower_case=False")


@pytest.mark.parametrize("max_length", LENGTHS)
def test_siglip2_naflex_matches_transformers(gemma_folders, corpus, max_length):
    hf = _hf_naflex_tokenizer(gemma_folders[0])
    ours = load_tokenizer(gemma_folders[0], max_length=max_length)
    assert (ours.family, ours.eos_id, ours.pad_id, ours.lowercase) == ("siglip2", 1, 0, True)
    ids = ours(corpus)["input_ids"]
    assert ids.shape == (len(corpus), max_length)
    _assert_same(corpus, _hf_ids(hf, corpus, max_length), ids.tolist(), f"SigLIP 2 NaFlex max_length={max_length}")


def test_siglip2_fixres_matches_transformers(gemma_folders, corpus):
    hf = _hf_tokenizer(gemma_folders[1])
    assert type(hf).__name__ == "GemmaTokenizer"  # keeps case
    # Our default lowercases FixRes too (the training recipe): equal to GemmaTokenizer on lowercased text.
    ours = load_tokenizer(gemma_folders[1], max_length=64)
    lowered = [t.lower() for t in corpus]
    _assert_same(corpus, _hf_ids(hf, lowered, 64), ours(corpus)["input_ids"].tolist(), "SigLIP 2 FixRes, lowercased")
    cased = load_tokenizer(gemma_folders[1], max_length=64, lowercase=False)
    _assert_same(corpus, _hf_ids(hf, corpus, 64), cased(corpus)["input_ids"].tolist(), "SigLIP 2 lowercase=False")


def test_padding_longest_and_attention_mask_match_transformers(siglip_folder, gemma_folders, corpus):
    for folder, hf in ((siglip_folder, _hf_tokenizer(siglip_folder)), (gemma_folders[0], _hf_naflex_tokenizer(gemma_folders[0]))):
        ours = load_tokenizer(folder, max_length=64)
        for start in range(0, 400, 37):  # batches of mixed lengths, some truncated
            batch = corpus[start:start + 37]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = hf(batch, padding="longest", max_length=64, truncation=True, return_attention_mask=True)
            got = ours(batch, padding="longest", return_attention_mask=True)
            assert got["input_ids"].tolist() == ref["input_ids"], folder
            assert got["attention_mask"].tolist() == ref["attention_mask"], folder
            assert got["attention_mask"].dtype == torch.int64


def test_gemma_space_runs_follow_sentencepiece(training_file, tmp_path):
    """User-defined space runs: our ids are SentencePiece's (the training pipeline's), longest run first.

    transformers' GemmaTokenizer built from the same tokenizer.model gives "▁▁" + "▁▁▁" for five
    spaces where SentencePiece gives "▁▁▁" + "▁▁": the one known divergence, not asserted here.
    """
    model = _train_gemma(training_file, str(tmp_path), GEMMA_USER_DEFINED + GEMMA_SPACE_RUNS)
    os.replace(model, tmp_path / GEMMA_VOCAB_FILE)
    tok = load_tokenizer(tmp_path, max_length=32)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / GEMMA_VOCAB_FILE))
    for text in ("many     spaces", "a  b   c    d", "  lead", "trail     "):
        ids = tok(text, padding="longest")["input_ids"][0].tolist()
        assert ids == sp.encode(text) + [tok.eos_id], text
    assert sp.encode("a     b", out_type=str) == ["a", "▁▁▁", "▁▁", "b"]


# ------------------------------------------------------------------------------- behaviour


def test_eos_stays_last_when_truncated(siglip_folder, gemma_folders):
    for folder in (siglip_folder, gemma_folders[0]):
        tok = load_tokenizer(folder, max_length=16)
        ids = tok([" ".join(["house"] * 100), "cat"], return_attention_mask=True)
        assert ids["input_ids"][0, -1].item() == tok.eos_id
        assert ids["attention_mask"][0].all()
        row = ids["input_ids"][1].tolist()
        n = ids["attention_mask"][1].sum().item()
        assert row[n - 1] == tok.eos_id and all(i == tok.pad_id for i in row[n:])


def test_single_string_and_max_length_override(gemma_folders):
    tok = load_tokenizer(gemma_folders[0], max_length=64)
    one = tok("a red cat")
    assert one["input_ids"].shape == (1, 64) and set(one) == {"input_ids"}
    assert torch.equal(one["input_ids"], tok(["a red cat"])["input_ids"])
    assert tok("a red cat", max_length=8)["input_ids"].shape == (1, 8)
    assert tok("", padding="longest")["input_ids"].tolist() == [[tok.eos_id]]
    assert tok([], padding="max_length")["input_ids"].shape == (0, 64)


def test_lowercase_option(gemma_folders, siglip_folder):
    lower = load_tokenizer(gemma_folders[1], max_length=16)
    cased = load_tokenizer(gemma_folders[1], max_length=16, lowercase=False)
    assert lower.lowercase and not cased.lowercase
    assert torch.equal(lower("A RED CAT")["input_ids"], lower("a red cat")["input_ids"])
    assert not torch.equal(cased("A RED CAT")["input_ids"], cased("a red cat")["input_ids"])
    assert load_tokenizer(siglip_folder, max_length=16, lowercase=False).normalize("A, B!") == "A B"


def test_special_token_strings_are_plain_text(siglip_folder, gemma_folders):
    siglip = load_tokenizer(siglip_folder, max_length=32)
    assert siglip.normalize("a </s> cat") == "a s cat"  # punctuation removed, as in training
    gemma = load_tokenizer(gemma_folders[0], max_length=32)
    ids = gemma("a <eos> cat", return_attention_mask=True)
    n = ids["attention_mask"].sum().item()
    assert gemma.eos_id not in ids["input_ids"][0, : n - 1].tolist()


def test_canonicalize_text():
    assert canonicalize_text("  Hello,\tWorld!!\n  A  ") == "hello world a"
    assert canonicalize_text("It's 3.5 o'clock", lowercase=False) == "Its 35 oclock"
    assert canonicalize_text("¿Qué? 日本。") == "¿qué 日本。"  # only ASCII punctuation goes


def test_decode_roundtrip(siglip_folder, gemma_folders):
    gemma = load_tokenizer(gemma_folders[0], max_length=32)
    ids = gemma(["a red cat on the house", "日本語 🐱"])["input_ids"]
    assert gemma.decode(ids) == ["a red cat on the house", "日本語 🐱"]
    assert gemma.decode(ids[0].tolist()) == "a red cat on the house"
    siglip = load_tokenizer(siglip_folder, max_length=32)
    assert siglip.decode(siglip("A red cat!")["input_ids"][0]) == "a red cat"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        siglip.decode([10 ** 6])


# ---------------------------------------------------------------------------------- errors


def test_missing_folder_and_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope", max_length=64)
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(tmp_path, max_length=64)
    assert str(tmp_path) in str(e.value) and SIGLIP_VOCAB_FILE in str(e.value) and GEMMA_VOCAB_FILE in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path, max_length=64)


def test_corrupt_model_file(tmp_path, gemma_folders):
    (tmp_path / GEMMA_VOCAB_FILE).write_bytes(b"\x00not a sentencepiece model\xff" * 10)
    with pytest.raises(ValueError, match="corrupt") as e:
        load_tokenizer(tmp_path, max_length=64)
    assert GEMMA_VOCAB_FILE in str(e.value)
    real = open(os.path.join(gemma_folders[0], GEMMA_VOCAB_FILE), "rb").read()
    (tmp_path / GEMMA_VOCAB_FILE).write_bytes(real[: len(real) // 2])  # truncated download
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(tmp_path, max_length=64)


def test_config_errors(tmp_path, siglip_folder, gemma_folders):
    shutil.copy(os.path.join(siglip_folder, SIGLIP_VOCAB_FILE), tmp_path / SIGLIP_VOCAB_FILE)
    _write_json(tmp_path / "tokenizer_config.json", {"pad_token": "<nope>"})
    with pytest.raises(ValueError, match="<nope>"):
        load_tokenizer(tmp_path, max_length=64)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_tokenizer(tmp_path, max_length=64)
    os.remove(tmp_path / "tokenizer_config.json")
    shutil.copy(os.path.join(gemma_folders[0], GEMMA_VOCAB_FILE), tmp_path / GEMMA_VOCAB_FILE)
    with pytest.raises(ValueError, match="both"):
        load_tokenizer(tmp_path, max_length=64)


def test_argument_errors(gemma_folders):
    for bad in (0, -1, True, 3.5, None):
        with pytest.raises(ValueError, match="max_position_embeddings"):
            load_tokenizer(gemma_folders[0], max_length=bad)
    tok = load_tokenizer(gemma_folders[0], max_length=8)
    assert isinstance(tok, Tokenizer) and "siglip2" in repr(tok)
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="do_not_pad")
    with pytest.raises(ValueError, match="max_length"):
        tok("a", max_length=0)
    with pytest.raises(TypeError, match="list of str"):
        tok(["a", 3])
    with pytest.raises(TypeError, match="list of str"):
        tok(42)
    with pytest.raises(ValueError, match="truncation=True"):
        tok(" ".join(["house"] * 50), truncation=False)
    assert tok("a", truncation=False)["input_ids"].shape == (1, 8)
