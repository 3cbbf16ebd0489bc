"""Tests for jaxrl_geom.tokenizers: CharTokenizer and the HF adapter (no hub)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_geom.tokenizers import (
    DEFAULT_CHARS,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    pad_batch,
)


def _expected_mask(lengths, width, left_pad):
    """Hand-written reference: row b is real on [width - n_b, width) (left) or [0, n_b)."""
    mask = np.zeros((len(lengths), width), bool)
    for b, n in enumerate(lengths):
        if left_pad:
            mask[b, width - n :] = True
        else:
            mask[b, :n] = True
    return mask


# ---------------------------------------------------------------- CharTokenizer


def test_char_vocabulary_layout():
    tok = CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + len(DEFAULT_CHARS) == 64
    ids = tok.encode(DEFAULT_CHARS, add_bos=False)
    # one distinct non-special id per character
    assert ids == list(range(3, 64))
    for c in "0123456789abcdefghijklmnopqrstuvwxyz =+-*?:;,.|\n":
        assert tok.can_encode(c)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=DEFAULT_CHARS, max_size=40))
def test_char_round_trip(text):
    tok = CharTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and len(ids) == len(text) + 1
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_char_decode_specials():
    tok = CharTokenizer()
    ids = [tok.pad_id, tok.bos_id] + tok.encode("7+1", add_bos=False) + [tok.eos_id]
    assert tok.decode(ids) == "7+1"
    assert tok.decode(ids, skip_special=False) == "<pad><bos>7+1<eos>"
    with pytest.raises(ValueError, match="outside the CharTokenizer vocabulary"):
        tok.decode([64])


def test_char_unknown_character_names_it():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"'H'.*position 0"):
        tok.encode("Hello")
    with pytest.raises(ValueError, match=r"'\\t'"):
        tok.encode("a\tb")
    assert not tok.can_encode("Hello")


def test_char_rejects_duplicate_chars():
    with pytest.raises(ValueError, match="repeat"):
        CharTokenizer("abca")


@pytest.mark.parametrize("left_pad", [True, False])
def test_char_batch_encode_masks_from_lengths(left_pad):
    tok = CharTokenizer()
    texts = ["12+3=", "", "a=1;b=2\n?a="]
    tokens, mask = tok.batch_encode(texts, pad_to=16, left_pad=left_pad)
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (3, 16)
    lengths = [len(t) + 1 for t in texts]  # +1 for BOS
    np.testing.assert_array_equal(mask, _expected_mask(lengths, 16, left_pad))
    for b, text in enumerate(texts):
        assert tokens[b][mask[b]].tolist() == tok.encode(text)
        assert (tokens[b][~mask[b]] == tok.pad_id).all()
    # default width is the longest row
    tokens, mask = tok.batch_encode(texts)
    assert tokens.shape == (3, max(lengths)) and mask[2].all()


def test_batch_encode_rejects_short_pad_to():
    with pytest.raises(ValueError, match="raise pad_to"):
        CharTokenizer().batch_encode(["abcdef"], pad_to=3)
    with pytest.raises(ValueError, match="no sequences"):
        pad_batch([], pad_id=0)


def test_pad_batch_pad_equal_to_real_tokens():
    # pad id 2 (= an EOS id) also occurs as a real token: the mask must still come from
    # the lengths, so real 2s stay True and padded 2s are False.
    seqs = [[2, 5, 2], [2], [7, 2, 2, 2]]
    tokens, mask = pad_batch(seqs, pad_id=2, pad_to=5)
    np.testing.assert_array_equal(mask, _expected_mask([3, 1, 4], 5, left_pad=True))
    np.testing.assert_array_equal(tokens[0], [2, 2, 2, 5, 2])
    assert mask[0].sum() == 3 and mask[2].sum() == 4


@pytest.mark.parametrize("as_file", [False, True])
def test_char_save_load(tmp_path, as_file):
    tok = CharTokenizer("ab01=\n")
    target = tmp_path / ("tok.json" if as_file else "ckpt")
    written = tok.save(target)
    assert json.loads(written.read_text())["chars"] == "ab01=\n"
    loaded = load_tokenizer(target)
    assert isinstance(loaded, CharTokenizer) and loaded == tok
    assert loaded.vocab_size == 9 and loaded.encode("b1=") == tok.encode("b1=")
    assert CharTokenizer.load(target) == tok


def test_char_load_rejects_foreign_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"type": "something-else"}))
    with pytest.raises(ValueError, match="not a CharTokenizer file"):
        CharTokenizer.load(path)


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        load_tokenizer(tmp_path / "nope")


# ---------------------------------------------------------------- HF adapter

_VOCAB = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4, "one": 5, "two": 6}
_CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _save_hf_tokenizer(path, pad_token=None):
    """A WordLevel tokenizer built in memory and saved like a checkpoint's tokenizer."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(_VOCAB)
    if pad_token is not None:
        vocab[pad_token] = len(vocab)
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"pad_token": pad_token} if pad_token is not None else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", **kwargs
    )
    fast.chat_template = _CHAT
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _save_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


def test_hf_adapter_interface(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert isinstance(CharTokenizer(), Tokenizer)
    # no pad token in the files -> pad falls back to EOS
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 1, 7)
    assert tok.encode("hello world") == [0, 3, 4]
    assert tok.encode("hello world", add_bos=False) == [3, 4]
    assert tok.encode("<s> hello") == [0, 3]  # BOS already present: not doubled
    assert tok.decode([0, 3, 4, 1]) == "hello world"
    assert "</s>" in tok.decode([0, 3, 4, 1], skip_special=False)


def test_hf_adapter_pad_equals_eos_masks(hf_dir):
    tok = load_tokenizer(hf_dir)
    texts = ["hello </s>", "one two world", "</s> </s>"]
    tokens, mask = tok.batch_encode(texts, pad_to=6)
    lengths = [3, 4, 3]  # BOS + words; "</s>" in text is a real EOS token
    np.testing.assert_array_equal(mask, _expected_mask(lengths, 6, left_pad=True))
    np.testing.assert_array_equal(tokens[0], [1, 1, 1, 0, 3, 1])
    np.testing.assert_array_equal(tokens[2][mask[2]], [0, 1, 1])  # real EOS kept in mask


def test_hf_adapter_explicit_pad(tmp_path):
    tok = load_tokenizer(_save_hf_tokenizer(tmp_path, pad_token="[PAD]"))
    assert tok.pad_id == 7 != tok.eos_id
    tokens, mask = tok.batch_encode(["hello", "one two"], left_pad=False)
    np.testing.assert_array_equal(tokens, [[0, 3, 7], [0, 5, 6]])
    np.testing.assert_array_equal(mask, _expected_mask([2, 3], 3, left_pad=False))


def test_hf_adapter_chat_template(hf_dir):
    tok = load_tokenizer(hf_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert prompt == "user: hello\nassistant:"
