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
    token, ChatML chat_template), special_tokens_map.json and, when `transformers` is installed,
    tokenizer.json (that one also needs protobuf). Returns the tokenizer class written into the
    config.

    Our ids come from SentencePiece run on each text piece between special tokens, which adds
    SentencePiece's dummy prefix to every piece. transformers' LlamaTokenizer rebuilds its own
    pipeline (a Metaspace pre-tokenizer that does not prefix a piece already starting with a
    space), so the fast tokenizer.json is written with the SentencePiece-exact normalizer
    (prepend "▁", spaces -> "▁") and the config names the generic fast class that loads it as is.

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


def _write_fast_tokenizer(out_dir: Path, tok: Tokenizer) -> bool:
    try:
        from tokenizers import Tokenizer as FastTokenizer
        from tokenizers import decoders, normalizers
        from transformers import AutoTokenizer
    except ImportError:
        print("transformers is not installed: tokenizer.json not written (the slow files are)")
        return False
    try:  # transformers' SentencePiece converter reads the model file through protobuf
        import google.protobuf  # noqa: F401
    except ImportError:
        print(
            "protobuf is not installed: tokenizer.json not written (the slow files are); "
            "`pip install protobuf` and export again to get the fast tokenizer TGI and vLLM prefer"
        )
        return False
    # Convert the SentencePiece model (+ added tokens) with transformers' own converter, then
    # swap the pre-tokenizer for the normalizer that reproduces SentencePiece's dummy prefix.
    backend = AutoTokenizer.from_pretrained(str(out_dir)).backend_tokenizer
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = None
    # Decoding as `Tokenizer.decode`: SentencePiece drops the dummy prefix of every text piece,
    # the one after each special token included, while the Llama decoder strips only the first
    # (giving "<|im_end|> \n" for the ids of "<|im_end|>\n"). The text after a special token
    # always starts with that prefix space when encode made it, and a special token's text can
    # only come from its own id (encode splits every special out of the text), so
    # "{special} " -> "{special}" removes exactly that space.
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
            *(decoders.Replace(t + " ", t) for t in sorted(tok.special_tokens)),
        ]
    )
    data = json.loads(backend.to_str())
    # The converter declares the model's own control pieces (<unk>) as added tokens; keep only
    # the tokens our encoder splits out.
    data["added_tokens"] = [d for d in data["added_tokens"] if d["content"] in tok.special_tokens]
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
