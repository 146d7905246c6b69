"""Tokenizer files for Hugging Face export, and finding the tokenizer a checkpoint was made with."""

import json
import shutil
from pathlib import Path

from data.chat import ROLE_NAMES, as_role
from data.tokenizer import DEFAULT_EXTRA_IDS, DEFAULT_TOKENIZER_PATH, IM_END, IM_START, Tokenizer


def _chatml_template() -> str:
    """data/chat.py's rendering as a Jinja chat_template: roles read as `as_role` reads them (case
    and surrounding blanks ignored, "prompter" is "user", any other role an error), an empty
    leading system message dropped as `Conversation.from_messages` + `turn_strings` drop it, and
    `add_generation_prompt` appending `render_prompt`'s `<|im_start|>assistant\\n`."""
    names = {name: ROLE_NAMES[as_role(name)] for name in [*ROLE_NAMES.values(), "prompter"]}
    known = ", ".join(names)
    return (
        "{% set names = " + json.dumps(names) + " %}"
        "{% for message in messages %}"
        "{% set role = message['role'] | trim | lower %}"
        "{% if role not in names %}"
        "{{ raise_exception('unknown role ' + message['role'] + ': expected " + known + "') }}"
        "{% endif %}"
        "{% if not (loop.first and role == 'system' and not message['content']) %}"
        "{{ '" + IM_START + "' + names[role] + '\\n' + message['content'] + '" + IM_END + "\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
    )


CHATML_TEMPLATE = _chatml_template()


def _added_token(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_tokenizer_files(out_dir: Path, tok: Tokenizer, model_max_length: int) -> str:
    """tokenizer.model (copy), tokenizer_config.json (every special id of our layout as an added
    token, ChatML chat_template), special_tokens_map.json and, when `tokenizers` is installed and
    the model is BPE (Llama's is), tokenizer.json, built from the SentencePiece model directly
    (neither transformers' converter nor protobuf is needed). Returns the tokenizer class written
    into the config.

    Our ids come from SentencePiece run on each text piece between special tokens, which adds
    SentencePiece's dummy prefix to every piece. transformers' LlamaTokenizer rebuilds its own
    pipeline (a Metaspace pre-tokenizer that does not prefix a piece already starting with a
    space), so tokenizer.json has the SentencePiece-exact normalizer (prepend "▁", spaces -> "▁")
    and the config names the generic fast class that loads it as is.

    The added tokens are exactly the tokens our encoder splits out of the text (Megatron-LLM's
    specials and the extra ids). `<unk>` is not one of them: Megatron-LLM leaves a literal
    "<unk>" to SentencePiece, so the config names no unk_token (transformers would otherwise
    add it as a special token and split it out of the text).

    Decoding gives `Tokenizer.decode`'s text: no space after a special token (see the decoder
    below). With `skip_special_tokens=True` the skipped token's dummy-prefix space stays (the
    decoder never sees the skipped ids): "hi<|im_end|>\\n" decodes to "hi \\n" that way.
    """
    shutil.copyfile(tok.model_path, out_dir / "tokenizer.model")
    added = {i: t for t, i in tok.special_tokens.items()}
    special_map = {
        "bos_token": tok.piece(tok.bos_id),
        "eos_token": tok.piece(tok.im_end_id),
        "unk_token": None,
        "pad_token": tok.piece(tok.pad_id),
        "additional_special_tokens": list(tok.extra_ids),
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(i): _added_token(t) for i, t in sorted(added.items())},
        **special_map,
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if _write_fast_tokenizer(out_dir, tok):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config["tokenizer_class"]


def _spm_model_type(model_bytes: bytes) -> int:
    """TrainerSpec.model_type of a serialized SentencePiece ModelProto (1 unigram, 2 BPE, 3 word,
    4 char), read from the protobuf wire format directly so the export needs no protobuf package:
    ModelProto field 2 is the TrainerSpec, whose field 3 is the model type (unigram if absent)."""

    def varint(buf: bytes, i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = buf[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return value, i

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = varint(buf, i)
            elif wire == 1:
                value, i = buf[i : i + 8], i + 8
            elif wire == 2:
                size, i = varint(buf, i)
                value, i = buf[i : i + size], i + size
            elif wire == 5:
                value, i = buf[i : i + 4], i + 4
            else:
                raise ValueError(f"unexpected protobuf wire type {wire}")
            yield number, value

    model_type = 1
    for number, value in fields(model_bytes):
        if number == 2:
            for inner, v in fields(value):
                if inner == 3:
                    model_type = v
    return model_type


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary, which stores pieces but no merges: every split of
    a piece into two pieces is a merge, ranked by the merged piece's id (SentencePiece orders BPE
    pieces by merge score), then by the halves' lengths and ids. This is the ranking transformers'
    converter gives, so the fast tokenizer encodes as SentencePiece does."""
    ranked = []
    for piece, rank in vocab.items():
        splits = [
            (vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        ranked += [(rank, len(left), len(right), il, ir, left, right)
                   for il, ir, left, right in splits]  # fmt: skip
    ranked.sort()
    return [(r[5], r[6]) for r in ranked]


def _write_fast_tokenizer(out_dir: Path, tok: Tokenizer) -> bool:
    try:
        from tokenizers import AddedToken, decoders, models, normalizers, processors
        from tokenizers import Tokenizer as FastTokenizer
    except ImportError:
        print("tokenizers is not installed: tokenizer.json not written (the slow files are)")
        return False
    model_bytes = Path(tok.model_path).read_bytes()
    # Llama's tokenizer is BPE. A unigram model's tokenizers port does not segment as
    # SentencePiece does (it matches control pieces in text), so none is written for it.
    kind = _spm_model_type(model_bytes)
    if kind != 2:
        print(
            f"{tok.model_path} is not a BPE SentencePiece model (Llama's is; this one has type "
            f"{kind}): tokenizer.json not written (the slow files are)"
        )
        return False
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = {sp.IdToPiece(i): i for i in range(tok.base_vocab_size)}
    has_bytes = any(sp.IsByte(i) for i in range(tok.base_vocab_size))
    # Characters outside the vocabulary: a byte_fallback model (Llama's) spells them in bytes
    # and never needs <unk>; without byte pieces SentencePiece gives one <unk> for each run.
    unk = None if has_bytes else sp.IdToPiece(sp.unk_id())
    bpe = models.BPE(
        vocab, _bpe_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=has_bytes
    )
    fast = FastTokenizer(bpe)
    # SentencePiece's dummy prefix on every text piece between specials: a normalizer that
    # prepends "▁" and turns spaces into "▁". No pre-tokenizer, which would split the text: a new
    # FastTokenizer has none (and tokenizers < 0.20 refuses `pre_tokenizer = None`).
    fast.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    fast.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")  # no BOS
    # Decoding as `Tokenizer.decode`: SentencePiece drops the dummy prefix of every text piece,
    # the one after each special token included, while a plain Llama decoder strips only the
    # first (giving "<|im_end|> \n" for the ids of "<|im_end|>\n"). The text after a special
    # token always starts with that prefix space when encode made it, and a special token's text
    # can only come from its own id (encode splits every special out of the text), so
    # "{special} " -> "{special}" removes exactly that space.
    # Without byte pieces, <unk> decodes to SentencePiece's surface for it, " ⁇ ".
    unk_surface = [] if unk is None else [decoders.Replace(unk, " \u2047 ")]
    fast.decoder = decoders.Sequence(
        [
            *unk_surface,
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
            *(decoders.Replace(t + " ", t) for t in sorted(tok.special_tokens)),
        ]
    )
    # The added tokens are exactly those our encoder splits out of the text, in id order: those
    # that are pieces keep their piece's id, the others get the ids after the vocabulary.
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    wrong = {t: fast.token_to_id(t) for t, i in specials if fast.token_to_id(t) != i}
    if wrong:
        raise ValueError(f"tokenizer.json would give special tokens other ids than ours: {wrong}")
    data = json.loads(fast.to_str())
    # tokenizers >= 0.20 writes each merge as a pair, which tokenizers < 0.20 (transformers < 4.45,
    # the TGI and vLLM releases of the seed's time) cannot read ("data did not match any variant
    # of untagged enum ModelWrapper"); the "left right" string form is read by every version and
    # is unambiguous because SentencePiece pieces hold "▁", never a space.
    merges = data["model"].get("merges") or []
    if all(isinstance(m, list) and " " not in "".join(m) for m in merges):
        data["model"]["merges"] = [" ".join(m) for m in merges]
    text = json.dumps(data, indent=2, ensure_ascii=False)
    FastTokenizer.from_str(text)  # loads (saving it through tokenizers would write pairs again)
    (out_dir / "tokenizer.json").write_text(text + "\n", encoding="utf-8")
    return True


def checkpoint_tokenizer(meta: dict, path: str | None = None) -> Tokenizer:
    """The tokenizer a checkpoint was made with: `path` if given, else the model file its meta
    names, else the committed default; the first whose fingerprint matches the checkpoint's (when
    it records one) and whose vocabulary size matches."""
    info = meta.get("tokenizer") or {}
    extra = info.get("extra_ids", info.get("vocab_extra_ids_list", list(DEFAULT_EXTRA_IDS)))
    want = info.get("fingerprint")
    # model_path: our imports (Tokenizer.describe()); vocab_file: the trainer's checkpoints.
    candidates = [path] if path else [info.get("model_path"), info.get("vocab_file")]
    candidates += [] if path else [DEFAULT_TOKENIZER_PATH]
    tried = []
    for cand in candidates:
        if not cand or not Path(cand).is_file():
            continue
        tok = Tokenizer(cand, extra)
        if (want is None or tok.fingerprint == want) and tok.vocab_size == meta["vocab_size"]:
            return tok
        tried.append(f"{cand} (fingerprint {tok.fingerprint[:12]}, vocab {tok.vocab_size})")
    raise ValueError(
        f"no tokenizer matches the checkpoint (fingerprint {str(want)[:12]}, vocab "
        f"{meta['vocab_size']}, extra ids {extra}); tried {tried or candidates}: pass --tokenizer "
        "with the tokenizer.model the model was trained with"
    )
