import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer, parse_extra_ids, train_sentencepiece


def test_megatron_layout_with_32000_piece_base(llama_like_model):
    t = Tokenizer(llama_like_model, parse_extra_ids('"<|im_start|>,<|im_end|>"'))
    assert t.base_vocab_size == 32000
    assert (t.im_start_id, t.im_end_id, t.vocab_size) == (32005, 32006, 32007)
    # <CLS> <SEP> <EOD> <MASK>, then <PAD> (the model has no pad piece); bos/eos are its own.
    assert [t.special_tokens[k] for k in ("<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>")] == list(
        range(32000, 32005)
    )
    assert (t.eod_id, t.pad_id, t.bos_id, t.eos_id, t.unk_id) == (32002, 32004, 1, 2, 0)
    ids = t.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 32005 and 32006 in ids and t.bos_id not in ids
    assert t.piece(32006) == "<|im_end|>"


def test_layout_without_extra_ids(llama_like_model):
    t = Tokenizer(llama_like_model, None)
    assert t.vocab_size == 32005 and t.extra_ids == []
    with pytest.raises(KeyError, match="ChatML"):
        _ = t.im_start_id


@pytest.mark.parametrize(
    "value, expected",
    [
        (
            '"<|im_start|>,<|im_end|>"',
            ["<|im_start|>", "<|im_end|>"],
        ),  # the seed's value, as argv sees it
        (
            r'"\"<|im_start|>,<|im_end|>\""',
            ["<|im_start|>", "<|im_end|>"],
        ),  # read verbatim from a file
        ("<|im_start|>, <|im_end|>", ["<|im_start|>", "<|im_end|>"]),
        ("'<a>'", ["<a>"]),
        (["<x>", " <y> "], ["<x>", "<y>"]),
        ("'<a>', \"<b>\"", ["<a>", "<b>"]),  # each item quoted on its own
        (None, []),
        ("", []),
    ],
)
def test_parse_extra_ids(value, expected):
    assert parse_extra_ids(value) == expected


def test_parse_extra_ids_rejects_duplicates():
    with pytest.raises(ValueError, match="twice"):
        parse_extra_ids("<a>,<a>")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain words",
        "  two  spaces and trailing ",
        "\n\nnewlines\n",
        "digits 1234567890 and symbols {}[]()<>",
        "Grüße, ¿qué tal? 日本語 ☃",
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "literal </s> and <s> and <PAD> inside text",
        "<|im_end|><|im_end|>back to back<|im_start|>",
    ],
)
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_specials_are_split_out_first(tok):
    # Megatron-LLM splits every special token (the extra ids and <s>, </s>, <PAD>, ...) out of the
    # text and encodes the pieces between them separately.
    ids = tok.encode("a</s>b<|im_end|>")
    assert tok.eos_id in ids and ids[-1] == tok.im_end_id
    sp = spm.SentencePieceProcessor(model_file=DEFAULT_TOKENIZER_PATH)
    assert ids == sp.encode("a") + [tok.eos_id] + sp.encode("b") + [tok.im_end_id]
    assert tok.encode("x")[0] != tok.bos_id  # no BOS


def test_encode_batch_and_flat_agree(tok):
    texts = ["<|im_start|>user\nhello<|im_end|>\n", "", "no specials", "<s>"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    flat, lengths = tok.encode_flat(texts)
    assert lengths.tolist() == [len(b) for b in batch]
    assert flat.tolist() == [i for b in batch for i in b]


def test_sample_model_is_llama_like(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.base_vocab_size == 1024 and tok.vocab_size == 1031
    # Byte fallback: an unseen character becomes its UTF-8 bytes, never <unk>.
    ids = tok.encode("\u2603")
    assert tok.unk_id not in ids and any(tok.piece(i).startswith("<0x") for i in ids)


def test_fingerprint(tok, llama_like_model):
    assert tok.fingerprint == Tokenizer(DEFAULT_TOKENIZER_PATH).fingerprint
    assert tok.fingerprint != Tokenizer(DEFAULT_TOKENIZER_PATH, ["<|im_start|>"]).fingerprint
    assert tok.fingerprint != Tokenizer(llama_like_model).fingerprint
    assert len(tok.fingerprint) == 64


def test_pickles_by_path(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint and clone.encode("hi there") == tok.encode(
        "hi there"
    )


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(str(junk))


def test_piece_and_decode_reject_out_of_range(tok):
    with pytest.raises(IndexError):
        tok.piece(tok.vocab_size)
    with pytest.raises(IndexError):
        tok.decode([tok.vocab_size])


def test_sample_tokenizer_regenerates_deterministically(tmp_path):
    from data.samples.generate import SAMPLE_VOCAB_SIZE, generate, tokenizer_lines

    lines = tokenizer_lines(generate())
    a = train_sentencepiece(lines, tmp_path / "a.model", SAMPLE_VOCAB_SIZE)
    b = train_sentencepiece(lines, tmp_path / "b.model", SAMPLE_VOCAB_SIZE)
    assert a == b
    info = json.loads((Path(DEFAULT_TOKENIZER_PATH).with_suffix(".json")).read_text())
    if info["sentencepiece"] == spm.__version__:
        assert a == Path(DEFAULT_TOKENIZER_PATH).read_bytes()
    else:  # another trainer version may merge differently; the layout must still hold
        assert Tokenizer(str(tmp_path / "a.model")).vocab_size == SAMPLE_VOCAB_SIZE + 7


@pytest.mark.parametrize(
    "extra",
    [
        ["<|im_start|>", "<|im_end|>"],
        ["<|im_start|>", "<|im_end|>", "x<y>"],  # a '<' inside a special: the general path
        ["<|im_start|>", "<|im_end|>", "[X]"],  # a special that does not start with '<'
        ["[X]", "<|im_start|>", "<|im_end|>"],
        # a '>' inside a special: "<|im_start|>user" would swallow the role in the turn string
        ["<|im_start|>", "<|im_end|>", "<|im_start|>user"],
    ],
)
def test_encode_turns_equals_encoding_the_turn_strings(extra):
    t = Tokenizer(DEFAULT_TOKENIZER_PATH, extra)
    contents = [
        "user\nWhat is 2 + 2?",
        "assistant\n",
        "assistant\ncode: if a < b and b > c: return a <|im_end|> b</s>",
        "user\n x<y> <|im_start|>",
        "system\n\n\n",
        "user\nsay [X] now, [X",
    ]
    flat, lengths = t.encode_turns(contents)
    ref, ref_lengths = t.encode_flat([f"<|im_start|>{c}<|im_end|>\n" for c in contents])
    assert lengths.tolist() == ref_lengths.tolist()
    assert flat.tolist() == ref.tolist()


class _PublicOnly:
    """A SentencePieceProcessor seen only through its public Encode."""

    def __init__(self, sp):
        self.Encode = sp.Encode


@pytest.mark.parametrize("path", ["direct", "public", "lists"])
@pytest.mark.parametrize(
    "contents",
    [
        [],
        ["user\nplain text only", "assistant\nno specials here either"],
        ["assistant\n<|im_end|>", "user\na<|im_start|>b</s><s>c", "user\n<", "system\n\n"],
        ["user\nx", "assistant\n<EOD><PAD>", "user\nlast one <|im_end|>"],
    ],
)
def test_encode_turns_int32_and_list_paths_agree(tok, contents, path):
    """The int32-buffer paths (the extension's batch call, or the public out_type="numpy") and
    the list path give the same ids, lengths and dtypes, with or without special tokens inside
    the contents."""
    from data.tokenizer import _int32_encoder

    encoder = {
        "direct": _int32_encoder(tok._sp),
        "public": _int32_encoder(_PublicOnly(tok._sp)),
        "lists": None,
    }[path]
    if path != "lists" and encoder is None:
        pytest.skip("this sentencepiece has no out_type='numpy'")
    if path == "direct" and encoder.__name__ != "direct":
        pytest.skip("this sentencepiece has no batch buffer call")
    ref, ref_lengths = tok.encode_flat(
        [f"<|im_start|>{c}<|im_end|>\n" for c in contents], np.uint16
    )
    saved = tok._encode_int32, tok._numpy_out
    tok._encode_int32, tok._numpy_out = encoder, encoder is not None
    try:
        flat, lengths = tok.encode_turns(contents, np.uint16)
    finally:
        tok._encode_int32, tok._numpy_out = saved
    assert flat.dtype == np.uint16 and lengths.dtype == np.int64
    assert lengths.tolist() == ref_lengths.tolist()
    assert flat.tolist() == ref.tolist()


def test_decode_reads_a_literal_u2581_as_space(tok):
    """SentencePiece escapes spaces as U+2581 "▁", so a literal one comes back as a space: the one
    text `decode(encode(text))` does not return (documented in data/tokenizer.py)."""
    assert tok.decode(tok.encode("a\u2581b c")) == "a b c"


def test_longest_special_wins_and_base_pieces_by_name(tok):
    t = Tokenizer(DEFAULT_TOKENIZER_PATH, ["<x>", "<x>y"])  # one a prefix of the other
    assert t.encode("<x>y<x>") == [t.special_tokens["<x>y"], t.special_tokens["<x>"]]
    assert tok.token_id(tok.piece(tok.unk_id)) == tok.unk_id  # the unk piece itself is a piece
    assert tok.token_id("</s>") == tok.eos_id
    with pytest.raises(KeyError, match="is not a piece"):
        tok.token_id("no such piece")
    d = tok.describe()
    assert (d["pad_id"], d["eod_id"], d["bos_id"], d["eos_id"], d["unk_id"]) == (
        tok.pad_id, tok.eod_id, tok.bos_id, tok.eos_id, tok.unk_id)  # fmt: skip
    # the extra ids' order is their ids: another order is another tokenizer
    a = Tokenizer(DEFAULT_TOKENIZER_PATH, ["<a>", "<b>"]).fingerprint
    assert a != Tokenizer(DEFAULT_TOKENIZER_PATH, ["<b>", "<a>"]).fingerprint


@pytest.mark.parametrize("unk, pad", [(0, 3), (1, 0)])
def test_a_model_with_its_own_pad_piece_keeps_it(tmp_path, unk, pad):
    lines = [f"word{i % 37} and more words {i}" for i in range(300)]
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"), vocab_size=60,
        unk_id=unk, bos_id=2, eos_id=4, pad_id=pad, minloglevel=2, num_threads=1,
    )  # fmt: skip
    t = Tokenizer(str(tmp_path / "m.model"), None)
    n = t.base_vocab_size
    assert (t.pad_id, t.bos_id, t.eos_id) == (pad, 2, 4) and "<PAD>" not in t.special_tokens
    assert t.vocab_size == n + 4  # <CLS> <SEP> <EOD> <MASK> only
