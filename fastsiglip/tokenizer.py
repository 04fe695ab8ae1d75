"""SentencePiece tokenizers for SigLIP (spiece.model) and SigLIP 2 (Gemma tokenizer.model).

Only `sentencepiece` is needed at runtime (no transformers, no `tokenizers`). The family is
told by the vocabulary file in the checkpoint folder:

SigLIP 1 -- ``spiece.model`` (32k English unigram vocabulary; ids pad ``<pad>``=0, eos
``</s>``=1, unk ``<unk>``=2, no BOS). Text is canonicalized exactly as transformers'
``SiglipTokenizer.canonicalize_text`` does, itself taken from big_vision's
``prompt_engineering.canonicalize_text`` (used there on zero-shot class names and prompts):

  1. lowercase with ``str.lower`` when ``do_lower_case`` (tokenizer_config.json, default True);
  2. delete every ASCII punctuation character (``string.punctuation``; non-ASCII punctuation
     such as "。" or "¿" stays);
  3. collapse each run of whitespace (``\\s+``, so tabs and newlines too) to one space;
  4. strip leading and trailing whitespace.

  The canonical text is encoded by the model file (its own normalizer, nmt_nfkc, still runs),
  then ``</s>`` is appended and rows are padded with the checkpoint's pad token, which is
  ``</s>`` too (tokenizer_config.json: ``pad_token: "</s>"``, big_vision ``pad_value=1``).
  SentencePiece is handed the very string transformers hands it: ``"<unk>▁" + canonical text``
  (a literal "▁" in the text first turned into a space), whose leading ``"<unk>"`` pieces are
  then dropped. The prefix is not cosmetic: the unigram Viterbi search breaks ties between
  equal-score segmentations ("22"+"2" vs "2"+"22") differently depending on what precedes
  them, so a bare ``encode(text)`` differs from transformers on a few strings with repeated
  characters (e.g. "x4½2２" after NFKC: "...2", "22" vs "...22", "2").

SigLIP 2 -- ``tokenizer.model`` (Gemma's 256k BPE vocabulary with byte fallback; ids
``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3; no dummy prefix, no whitespace
normalization). The only text normalization is lowercasing (``str.lower``), ON BY DEFAULT for
every SigLIP 2 checkpoint, FixRes and NaFlex alike: the SigLIP 2 recipe trained on lowercased
text (why transformers added ``Siglip2Tokenizer``, PR #43101: "SigLIP2 text encoder was
trained on lowercased text"). transformers 5.23
agrees only for NaFlex checkpoints (config.json ``model_type: "siglip2"`` loads
``Siglip2Tokenizer``, whose normalizer is ``Lowercase`` then ``Replace(" ", "▁")``); FixRes
checkpoints (``model_type: "siglip"`` with a ``GemmaTokenizer`` tokenizer_config) load a plain
``GemmaTokenizer`` that keeps case. Pass ``lowercase=False`` to match the latter. Punctuation
and whitespace are kept as they are (Gemma's vocabulary has pieces for whitespace runs).
No BOS; ``<eos>`` is appended (the google/siglip2-* tokenizer_config.json sets
``add_bos_token: false, add_eos_token: true, padding_side: "right"``); right padding with
``<pad>``.

Both families: when a text is longer than the sequence length, the text's own tokens are cut
and EOS stays last (big_vision's ``eos="sticky"``; transformers counts EOS in ``max_length``
and so does the same). The sequence length is the checkpoint's
``text_config.max_position_embeddings`` (e.g. 64 or 16): the caller
passes it, nothing here assumes one.

One deliberate difference from transformers: special-token strings inside the text ("</s>",
"<eos>", "<pad>") are plain text here, as they were for the original SentencePiece pipeline;
transformers' slow/fast tokenizers split them out and emit the special id mid-sequence.
Pieces that the model file itself declares user-defined (Gemma's "<mask>",
"<start_of_turn>", ...) are matched by SentencePiece from text, as in transformers, but after
lowercasing (so an upper-case one such as "[@BOS@]" is not matched when lowercasing). Gemma
also declares runs of spaces user-defined; SentencePiece takes the longest run first (five
spaces: "▁▁▁" + "▁▁"), which is what the training pipeline saw, while the tokenizer transformers
builds from tokenizer.model alone merges them by BPE ("▁▁" + "▁▁▁"). Everything else matches
transformers id for id (tests/test_tokenizer.py).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import string
from collections.abc import Sequence

import sentencepiece as spm
import torch

SIGLIP_VOCAB_FILE = "spiece.model"  # SigLIP 1
GEMMA_VOCAB_FILE = "tokenizer.model"  # SigLIP 2 (FixRes and NaFlex)
CONFIG_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # later file wins

# Special tokens of each family when the folder has no tokenizer_config.json saying otherwise.
DEFAULT_SPECIAL_TOKENS = {
    "siglip": {"eos_token": "</s>", "pad_token": "</s>"},
    "siglip2": {"eos_token": "<eos>", "pad_token": "<pad>"},
}
PADDING_MODES = ("max_length", "longest")

SPIECE_UNDERLINE = "▁"  # U+2581: SentencePiece's visible space
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_WHITESPACE_RUN = re.compile(r"\s+")


def canonicalize_text(text: str, *, lowercase: bool = True) -> str:
    """SigLIP 1 text canonicalization (big_vision prompt_engineering, transformers SiglipTokenizer)."""
    if lowercase:
        text = text.lower()
    text = text.translate(_PUNCTUATION_TABLE)
    return _WHITESPACE_RUN.sub(" ", text).strip()


class Tokenizer:
    """Text -> padded int64 token ids for one SigLIP text tower.

    Build with `load_tokenizer(folder, max_length=...)`. Attributes: `family` ("siglip" or
    "siglip2"), `max_length`, `lowercase`, `eos_id`, `pad_id`, `vocab_size`, `model_file`.
    """

    def __init__(self, model_file: str, *, family: str, max_length: int, lowercase: bool,
                 eos_token: str, pad_token: str, unk_token: str = "<unk>"):
        if family not in DEFAULT_SPECIAL_TOKENS:
            raise ValueError(f"family must be one of {tuple(DEFAULT_SPECIAL_TOKENS)}, got {family!r}")
        self.family = family
        self.model_file = str(model_file)
        self.max_length = _check_length(max_length, "max_length")
        self.lowercase = bool(lowercase)
        self._sp = _load_sentencepiece(self.model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._piece_id(eos_token, "eos_token")
        self.pad_id = self._piece_id(pad_token, "pad_token")
        # SigLIP 1 only: the text prefix whose pieces are dropped after encoding (see module doc).
        self._prefix = unk_token if family == "siglip" else ""
        self._prefix_len = len(self._sp.encode(self._prefix)) if self._prefix else 0

    def __repr__(self) -> str:
        return (f"Tokenizer(family={self.family!r}, max_length={self.max_length}, lowercase={self.lowercase}, "
                f"vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})")

    def _piece_id(self, token: str, what: str) -> int:
        i = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(i) != token:
            raise ValueError(f"{what} {token!r} (from the tokenizer config) is not a piece of {self.model_file}; "
                             "fix tokenizer_config.json / special_tokens_map.json in that folder")
        return i

    def normalize(self, text: str) -> str:
        """The text as the family normalizes it (SigLIP 1: canonical text; SigLIP 2: lowercased)."""
        if self.family == "siglip":
            return canonicalize_text(text.replace(SPIECE_UNDERLINE, " "), lowercase=self.lowercase)
        return text.lower() if self.lowercase else text

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each normalized text, without EOS, padding or truncation."""
        if not self._prefix:
            return self._sp.encode([self.normalize(t) for t in texts], out_type=int)
        # transformers' SiglipTokenizer, step by step: "▁" -> " ", prepend "▁", canonicalize (the
        # marker is no whitespace, so it survives the strip), encode "<unk>" + that, drop "<unk>".
        prefixed = [self._prefix + canonicalize_text(SPIECE_UNDERLINE + t.replace(SPIECE_UNDERLINE, " "),
                                                     lowercase=self.lowercase) for t in texts]
        return [ids[self._prefix_len:] for ids in self._sp.encode(prefixed, out_type=int)]

    def __call__(self, texts: str | Sequence[str], *, max_length: int | None = None, padding: str = "max_length",
                 truncation: bool = True, return_attention_mask: bool = False) -> dict[str, torch.Tensor]:
        """Tokenize a batch: `input_ids` int64 [B, L] (and `attention_mask` int64 [B, L] if asked).

        L is `max_length` (default: the tokenizer's) with padding="max_length", or the longest
        row (EOS included, at most `max_length`) with padding="longest". Every row ends its
        tokens with EOS; with truncation the text's tokens are cut so that EOS stays last.
        """
        batch = _as_batch(texts)
        length = self.max_length if max_length is None else _check_length(max_length, "max_length")
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        rows = self.encode(batch)
        if truncation:
            rows = [r[: length - 1] for r in rows]  # keep room for EOS
        else:
            for i, r in enumerate(rows):
                if len(r) + 1 > length:
                    raise ValueError(f"text {i} is {len(r) + 1} tokens with EOS, longer than max_length={length}; "
                                     "pass truncation=True or a larger max_length (at most the checkpoint's "
                                     "text_config.max_position_embeddings)")
        n_tokens = torch.tensor([len(r) for r in rows], dtype=torch.int64)  # [B], EOS not counted
        width = length if padding == "max_length" else int(n_tokens.max()) + 1 if rows else 0
        # One scatter instead of a Python list per row: row-major boolean indexing visits the
        # text positions in the order of the flattened rows.
        flat = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.int64)  # [sum(n_tokens)]
        position = torch.arange(width)[None, :]  # [1, L]
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)  # [B, L]
        ids[position < n_tokens[:, None]] = flat
        ids[position == n_tokens[:, None]] = self.eos_id
        out = {"input_ids": ids}
        if return_attention_mask:
            out["attention_mask"] = (position <= n_tokens[:, None]).long()  # [B, L], EOS included
        return out

    def decode(self, ids, *, skip_special_tokens: bool = True):
        """Ids -> text. A 1-D sequence gives one str, a 2-D one (or list of lists) a list of str."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if len(ids) and not isinstance(ids[0], int):
            return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.eos_id, self.pad_id) and not self._sp.is_control(i)]
        return self._sp.decode(ids)


def load_tokenizer(folder: str | os.PathLike, *, max_length: int, lowercase: bool | None = None) -> Tokenizer:
    """The tokenizer of the checkpoint in `folder`.

    `folder` holds `spiece.model` (SigLIP 1) or `tokenizer.model` (SigLIP 2), and optionally
    tokenizer_config.json / special_tokens_map.json (eos/pad tokens, SigLIP 1's do_lower_case).
    `max_length`: the checkpoint's text_config.max_position_embeddings. `lowercase`: None keeps
    the family's training default (SigLIP 1: do_lower_case, default True; SigLIP 2: True).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist or is not a directory")
    found = [name for name in (SIGLIP_VOCAB_FILE, GEMMA_VOCAB_FILE) if os.path.isfile(os.path.join(folder, name))]
    if not found:
        hint = ""
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            hint = " (tokenizer.json alone is not enough: fastsiglip reads the SentencePiece file)"
        raise FileNotFoundError(f"no tokenizer model in {folder!r}: expected {SIGLIP_VOCAB_FILE!r} (SigLIP) or "
                                f"{GEMMA_VOCAB_FILE!r} (SigLIP 2){hint}; download it with the checkpoint")
    if len(found) > 1:
        raise ValueError(f"{folder!r} holds both {SIGLIP_VOCAB_FILE!r} and {GEMMA_VOCAB_FILE!r}; "
                         "keep only the one of this checkpoint")
    family = "siglip" if found[0] == SIGLIP_VOCAB_FILE else "siglip2"
    config = _read_token_config(folder)
    tokens = {k: _token_str(config.get(k), default) for k, default in DEFAULT_SPECIAL_TOKENS[family].items()}
    tokens["unk_token"] = _token_str(config.get("unk_token"), "<unk>")
    if lowercase is None:
        # SigLIP 2 lowercases whatever its tokenizer_config says: the config describes Gemma, not the recipe.
        lowercase = bool(config.get("do_lower_case", True)) if family == "siglip" else True
    return Tokenizer(os.path.join(folder, found[0]), family=family, max_length=max_length, lowercase=lowercase,
                     **tokens)


def _check_length(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int (the checkpoint's text_config.max_position_embeddings, "
                         f"e.g. 64), got {n!r}")
    return n


def _as_batch(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}"
                        + ("" if not isinstance(texts, Sequence) else " with non-str items"))
    return list(texts)


def _load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path!r} is not a readable SentencePiece model ({e}); the file is corrupt or "
                         "truncated: download it again") from e
    return sp


def _read_token_config(folder: str) -> dict:
    merged = {}
    for name in CONFIG_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {path!r} as JSON ({e}); fix or delete it") from e
            if not isinstance(d, dict):
                raise ValueError(f"{path!r} must hold a JSON object, got {type(d).__name__}")
            merged.update({k: v for k, v in d.items() if v is not None})
    return merged


def _token_str(value, default: str) -> str:
    """A special token from a config: a str, or transformers' AddedToken dict {"content": ...}."""
    if value is None:
        return default
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, str):
        return value
    raise ValueError(f"special token entry {value!r} is neither a string nor an AddedToken dict with 'content'")
