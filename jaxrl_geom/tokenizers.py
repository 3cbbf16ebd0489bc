"""Tokenizers: a character-level one for the built-in tasks and an HF adapter.

Both expose one small interface, :class:`Tokenizer`, which is all the trainer,
sampler and tasks use::

    ids = tok.encode("12+34=")                      # list[int], BOS first
    tokens, mask = tok.batch_encode(prompts, pad_to=64)  # int32 [B, P], bool [B, P]
    text = tok.decode(ids)                          # specials dropped

Prompts are **left**-padded so that every row's last prompt token sits at the same
column and the KV cache can write at one offset shared by the batch (see
``docs/DESIGN.md``). The mask comes from the sequence lengths, never from token
values: a tokenizer whose pad id equals its EOS id (common for HF checkpoints) would
otherwise mask real EOS tokens out.

:class:`CharTokenizer` needs no files and no hub: its 64-entry vocabulary (a
multiple of 8, so the vocab axis shards evenly) is 3 specials, the digits, the
lowercase letters and 25 symbols. :func:`load_tokenizer` returns it when a
directory holds its JSON, and otherwise wraps
``transformers.AutoTokenizer.from_pretrained`` in :class:`HFTokenizer`.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
_CHAR_TOKENIZER_TYPE = "jaxrl_geom.CharTokenizer"

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
DEFAULT_CHARS = string.digits + string.ascii_lowercase + " \n=+-*/?:;,.|#()!_'\"<>[]$"


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer, sampler and tasks need from a tokenizer."""

    pad_id: int
    bos_id: int | None
    eos_id: int
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    def batch_encode(
        self,
        texts: Sequence[str],
        pad_to: int | None = None,
        left_pad: bool = True,
        add_bos: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]: ...


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    pad_to: int | None = None,
    left_pad: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack token sequences into a padded batch, the mask built from their lengths.

    Row ``b`` of length ``n_b`` occupies columns ``[P - n_b, P)`` with left padding
    (``[0, n_b)`` with right padding) and ``mask[b, p]`` is True exactly there, whatever
    the token values are (so ``pad_id == eos_id`` is safe).

    Args:
      sequences: token ids, one list per row.
      pad_id: id written into padded slots.
      pad_to: padded length ``P``; defaults to the longest sequence.
      left_pad: pad on the left (prompts) or on the right.

    Returns:
      ``(tokens int32 [B, P], mask bool [B, P])``.
    """
    if len(sequences) == 0:
        raise ValueError("pad_batch got no sequences; pass at least one text.")
    lengths = np.array([len(s) for s in sequences], np.int64)  # [B]
    longest = int(lengths.max())
    width = longest if pad_to is None else int(pad_to)
    if width < longest:
        raise ValueError(
            f"pad_to={pad_to} is shorter than the longest sequence ({longest} tokens); "
            "raise pad_to or pass pad_to=None."
        )
    columns = np.arange(width)[None, :]  # [1, P]
    if left_pad:
        mask = columns >= (width - lengths)[:, None]  # [B, P]
    else:
        mask = columns < lengths[:, None]  # [B, P]
    tokens = np.full((len(sequences), width), pad_id, np.int32)  # [B, P]
    tokens[mask] = np.concatenate([np.asarray(s, np.int32) for s in sequences])
    return tokens, mask


class CharTokenizer:
    """Character-level tokenizer with a fixed, file-free vocabulary.

    Ids ``0, 1, 2`` are ``<pad>``, ``<bos>``, ``<eos>``; then one id per character of
    ``chars`` in order (default :data:`DEFAULT_CHARS`: digits, lowercase letters and
    ``space \\n = + - * / ? : ; , . | # ( ) ! _ ' " < > [ ] $``, 64 ids in all).
    Special tokens are never produced by :meth:`encode` from text: ``"<eos>"`` in a
    string encodes as five characters.

    Example::

        tok = CharTokenizer()
        tok.encode("1+2=")            # [1, 4, 42, 5, 41]  (BOS first)
        tok.decode([1, 6, 2])          # "3"
    """

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            duplicates = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f"CharTokenizer chars repeat {duplicates!r}; list each once.")
        if not chars:
            raise ValueError("CharTokenizer needs at least one character in `chars`.")
        self.chars = chars
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(SPECIAL_TOKENS) + len(chars)
        self._char_to_id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def can_encode(self, text: str) -> bool:
        """Whether every character of ``text`` is in the vocabulary."""
        return all(c in self._char_to_id for c in text)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (one per character), BOS first when ``add_bos``; no EOS."""
        ids = [self.bos_id] if add_bos else []
        for position, c in enumerate(text):
            token = self._char_to_id.get(c)
            if token is None:
                raise ValueError(
                    f"CharTokenizer cannot encode character {c!r} at position {position} "
                    f"of {text[:40]!r}; it knows only {self.chars!r}. Lowercase or drop it, "
                    "or build CharTokenizer(chars=...) with it."
                )
            ids.append(token)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``; specials are dropped, or rendered as ``<pad>`` etc."""
        out = []
        n_special = len(SPECIAL_TOKENS)
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"Token id {token} is outside the CharTokenizer vocabulary "
                    f"[0, {self.vocab_size}); decode only ids this tokenizer produced."
                )
            if token < n_special:
                if not skip_special:
                    out.append(SPECIAL_TOKENS[token])
            else:
                out.append(self.chars[token - n_special])
        return "".join(out)

    def batch_encode(
        self,
        texts: Sequence[str],
        pad_to: int | None = None,
        left_pad: bool = True,
        add_bos: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode and pad ``texts``: ``(tokens int32 [B, P], mask bool [B, P])``."""
        return pad_batch([self.encode(t, add_bos) for t in texts], self.pad_id, pad_to, left_pad)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as JSON to ``path`` (a ``.json`` file or a directory)."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / CHAR_TOKENIZER_FILE
        payload = {"type": _CHAR_TOKENIZER_TYPE, "special_tokens": SPECIAL_TOKENS}
        payload["chars"] = self.chars
        path.write_text(json.dumps(payload, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """Read a tokenizer written by :meth:`save` (the file or its directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / CHAR_TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"No CharTokenizer JSON at {path}; write one with CharTokenizer.save.")
        payload = json.loads(path.read_text())
        if payload.get("type") != _CHAR_TOKENIZER_TYPE:
            raise ValueError(
                f"{path} is not a CharTokenizer file (type={payload.get('type')!r}); "
                "use load_tokenizer for Hugging Face tokenizers."
            )
        if tuple(payload["special_tokens"]) != SPECIAL_TOKENS:
            raise ValueError(
                f"{path} has special tokens {payload['special_tokens']}, expected "
                f"{list(SPECIAL_TOKENS)}; it was written by an incompatible version."
            )
        return cls(payload["chars"])


class HFTokenizer:
    """:class:`Tokenizer` view of a ``transformers`` tokenizer.

    ``encode`` never lets the HF tokenizer add its own specials; it prepends BOS
    itself when ``add_bos`` and the tokenizer has one (unless the text already
    starts with it, as chat-template output does). ``pad_id`` falls back to the EOS
    id when the tokenizer has no pad token; masks come from lengths, so that is safe.
    ``vocab_size`` is ``len(tokenizer)`` (added tokens included); a checkpoint's
    embedding table may be larger.
    """

    def __init__(self, hf_tokenizer: Any):
        self.hf_tokenizer = hf_tokenizer
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                f"{type(hf_tokenizer).__name__} has no eos_token; set one "
                "(tokenizer.eos_token = ...) before wrapping, generation needs a stop token."
            )
        pad = hf_tokenizer.pad_token_id
        self.eos_id: int = int(eos)
        self.pad_id: int = self.eos_id if pad is None else int(pad)
        bos = hf_tokenizer.bos_token_id
        self.bos_id: int | None = None if bos is None else int(bos)
        self.vocab_size: int = len(hf_tokenizer)

    def __repr__(self) -> str:
        name = getattr(self.hf_tokenizer, "name_or_path", "")
        return f"HFTokenizer({name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_bos`` and the tokenizer has one."""
        ids = list(self.hf_tokenizer.encode(text, add_special_tokens=False))
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped when ``skip_special``)."""
        return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def batch_encode(
        self,
        texts: Sequence[str],
        pad_to: int | None = None,
        left_pad: bool = True,
        add_bos: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode and pad ``texts``: ``(tokens int32 [B, P], mask bool [B, P])``."""
        return pad_batch([self.encode(t, add_bos) for t in texts], self.pad_id, pad_to, left_pad)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render chat ``messages`` as prompt text with the checkpoint's chat template."""
        if not getattr(self.hf_tokenizer, "chat_template", None):
            raise ValueError(
                f"{self!r} has no chat_template; format the prompt yourself or load an "
                "instruct checkpoint's tokenizer."
            )
        return self.hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )


def load_tokenizer(path: str | os.PathLike) -> CharTokenizer | HFTokenizer:
    """The tokenizer stored at ``path``: our :class:`CharTokenizer` JSON, else HF files.

    ``path`` is a local directory (or a CharTokenizer ``.json`` file); nothing is
    downloaded.
    """
    path = Path(path)
    if path.suffix == ".json" or (path / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.load(path)
    if not path.is_dir():
        raise ValueError(
            f"Tokenizer path {str(path)!r} is not a local directory; pass a checkpoint "
            "directory holding tokenizer files (nothing is downloaded)."
        )
    from transformers import AutoTokenizer  # lazy: heavy import

    return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
