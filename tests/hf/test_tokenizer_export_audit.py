"""The exported Hugging Face tokenizer against our pretokenizer: the same ids for any text, the
same text back from any ids, and a chat_template that renders what data/chat.py trains on."""

import json
import random

import pytest

from data.chat import Conversation, as_role, format_text, render, render_prompt
from data.samples.generate import generate, tokenizer_lines
from model.hf_tokenizer import write_tokenizer_files

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("tok_export")
    assert write_tokenizer_files(out, tokenizer, 512) == "PreTrainedTokenizerFast"
    return transformers.AutoTokenizer.from_pretrained(out)


def _specials(tokenizer) -> list[str]:
    return sorted(tokenizer.special_tokens)


def _random_texts(tokenizer, n: int, seed: int) -> list[str]:
    """Texts mixing the sample corpus' words, odd whitespace, unicode and special tokens."""
    rng = random.Random(seed)
    words = " ".join(tokenizer_lines(generate())).split(" ")
    alphabet = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "é", "ß", "日本", "☃", "\u00a0", "<", ">",
                "|", "<|im_end", "im_start|>", "<unk>", "<0x0A>", "▁", "0", "42"]  # fmt: skip
    specials = _specials(tokenizer)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(words))
            elif r < 0.8:
                parts.append(rng.choice(alphabet))
            else:
                parts.append(rng.choice(specials))
        texts.append("".join(parts))
    return texts


EDGE_TEXTS = [
    "",
    " ",
    "\n",
    "<|im_end|>\n",
    "<|im_end|> \n",
    "<|im_end|>  two spaces after",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_end|> b<PAD>c<EOD>",
    "<|im_end|><|im_start|>",
    "<<|im_end|>>",
    "trailing spaces and newlines  \n\n",
    "literal <unk> and <s> and </s> in text",
    "<unk>",
    "Grüße ☃ 日本 <|im_end|>ñ",
]


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_hf_encodes_and_decodes_like_ours(hf_tok, tokenizer, text):
    ids = tokenizer.encode(text)
    assert hf_tok.encode(text) == ids
    # Our decode is the exact inverse of our encode; HF's must give the same text back, with no
    # space inserted after a special token (SentencePiece's dummy prefix of the next piece).
    assert tokenizer.decode(ids) == text
    assert hf_tok.decode(ids) == text


def test_hf_matches_ours_on_many_texts(hf_tok, tokenizer):
    texts = _random_texts(tokenizer, 400, seed=0)
    texts += [format_text([("user", t), ("assistant", t[::-1])]) for t in texts[:100]]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tok.encode(text) == ids, text
        assert hf_tok.decode(ids) == tokenizer.decode(ids), text
        if "▁" not in text:  # SentencePiece reads a literal "▁" as a space, HF as well
            assert tokenizer.decode(ids) == text, text


def test_hf_decodes_arbitrary_ids_like_ours(hf_tok, tokenizer):
    """Ids a model may generate (not only those encode gives): the same text from both."""
    rng = random.Random(1)
    base = [i for i in range(tokenizer.base_vocab_size) if not tokenizer.piece(i).startswith("<")]
    special = sorted(tokenizer.special_tokens.values())
    for _ in range(300):
        ids = [
            rng.choice(special) if rng.random() < 0.25 else rng.choice(base)
            for _ in range(rng.randint(1, 10))
        ]
        assert hf_tok.decode(ids) == tokenizer.decode(ids), [tokenizer.piece(i) for i in ids]


def _messages(system: str | None = "Be brief."):
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And <|im_end|> twice that?  \n"},
    ]


@pytest.mark.parametrize("system", ["Be brief.", "", None])
def test_chat_template_renders_what_we_train_on(hf_tok, tokenizer, system):
    messages = _messages(system)
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = render_prompt(messages, tokenizer)
    assert text == tokenizer.decode(want)
    assert hf_tok.encode(text) == want
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == want
    # Without the generation prompt: the training rendering, ids included.
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == format_text(Conversation.from_messages(messages))
    assert hf_tok.encode(text) == render(Conversation.from_messages(messages), tokenizer)[0]


def test_chat_template_normalises_roles_as_data_chat_does(hf_tok, tokenizer):
    messages = [
        {"role": "System", "content": "Be brief."},
        {"role": "prompter", "content": "hi"},
        {"role": " Assistant ", "content": "hello"},
        {"role": "context", "content": "Ana has 3 pens."},
        {"role": "USER", "content": "bye"},
    ]
    assert [as_role(m["role"]) for m in messages]  # all valid for data/chat.py
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert hf_tok.encode(text) == render_prompt(messages, tokenizer)
    with pytest.raises(ValueError):
        as_role("tool")
    with pytest.raises(Exception, match="tool"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_unk_is_not_split_out_of_text(hf_tok, tokenizer, tmp_path):
    """Megatron-LLM splits only its specials (<CLS> <SEP> <EOD> <MASK> <PAD> <s> </s> and the
    extra ids) out of the text, so a literal "<unk>" is plain text in the training data."""
    assert "<unk>" not in tokenizer.special_tokens
    assert hf_tok.encode("x <unk> y") == tokenizer.encode("x <unk> y")
    assert tokenizer.unk_id not in tokenizer.encode("<unk>")
    write_tokenizer_files(tmp_path, tokenizer, 512)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    added = {int(i): d["content"] for i, d in config["added_tokens_decoder"].items()}
    assert added == {i: t for t, i in tokenizer.special_tokens.items()}


def test_tokenizer_json_merges_in_the_form_every_tokenizers_version_reads(tmp_path, tokenizer):
    """tokenizers < 0.20 (transformers < 4.45) reads merges only as "left right" strings; a
    tokenizer.json with merges as pairs fails there with "data did not match any variant of
    untagged enum ModelWrapper"."""
    from tokenizers import Tokenizer as FastTokenizer

    write_tokenizer_files(tmp_path, tokenizer, 512)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    merges, vocab = data["model"]["merges"], data["model"]["vocab"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    assert all(left in vocab and right in vocab and left + right in vocab
               for left, right in (m.split(" ") for m in merges))  # fmt: skip
    fast = FastTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "<|im_start|>user\nGrüße, 42 apples<|im_end|>\n"
    assert fast.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)


def _train_model(tmp_path, name: str, **settings) -> str:
    """A SentencePiece model as train_sentencepiece makes one, with `settings` changed."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    options = dict(model_type="bpe", vocab_size=600, character_coverage=1.0, byte_fallback=True,
                   split_digits=True, normalization_rule_name="identity",
                   remove_extra_whitespaces=False, add_dummy_prefix=True,
                   allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                   num_threads=1, minloglevel=2)  # fmt: skip
    options.update(settings)
    lines = tokenizer_lines(generate())
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(lines), model_writer=buffer, **options)
    path = tmp_path / f"{name}.model"
    path.write_bytes(buffer.getvalue())
    return str(path)


@pytest.mark.parametrize(
    "settings",
    [{"vocab_size": 1400}, {"byte_fallback": False, "character_coverage": 0.98}],
    ids=["bpe-1400", "no-byte-fallback"],
)
def test_other_bpe_models_export_a_tokenizer_that_segments_as_sentencepiece(tmp_path, settings):
    """Not only the bundled model: a larger BPE vocabulary (more merges to rank), and one
    without byte pieces, where characters outside the vocabulary are <unk> (one per run) and
    decode to SentencePiece's " ⁇ "."""
    from data.tokenizer import Tokenizer

    ours = Tokenizer(_train_model(tmp_path, "m", **settings))
    out = tmp_path / "hf"
    out.mkdir()
    assert write_tokenizer_files(out, ours, 512) == "PreTrainedTokenizerFast"
    hf = transformers.AutoTokenizer.from_pretrained(out)
    texts = EDGE_TEXTS + _random_texts(ours, 300, seed=2) + ["Ω≈ç√ unseen ☃☃ x"]
    if not settings.get("byte_fallback", True):
        assert ours.unk_id in ours.encode(texts[-1])  # the case is really exercised
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == ours.decode(ids), text


def test_a_unigram_model_exports_only_the_slow_tokenizer(tmp_path, capsys):
    from data.tokenizer import Tokenizer
    from model.hf_tokenizer import _spm_model_type

    path = _train_model(tmp_path, "uni", model_type="unigram", vocab_size=500)
    assert _spm_model_type(open(path, "rb").read()) == 1
    assert write_tokenizer_files(tmp_path, Tokenizer(path), 512) == "LlamaTokenizer"
    assert "is not a BPE SentencePiece model" in capsys.readouterr().out
    assert not (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer.model").exists()


def test_model_type_read_without_protobuf(tokenizer):
    from model.hf_tokenizer import _spm_model_type

    assert _spm_model_type(open(tokenizer.model_path, "rb").read()) == 2  # the bundled BPE model
    assert _spm_model_type(b"") == 1  # an absent TrainerSpec: protobuf's default, unigram
