"""Tokenizer files for Hugging Face export, and finding the tokenizer a checkpoint was made with."""

import json
import shutil
from pathlib import Path

from data.tokenizer import DEFAULT_EXTRA_IDS, DEFAULT_TOKENIZER_PATH, Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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
    """
    shutil.copyfile(tok.model_path, out_dir / "tokenizer.model")
    added = {tok.unk_id: tok.piece(tok.unk_id)}
    added.update({i: t for t, i in tok.special_tokens.items()})
    special_map = {
        "bos_token": tok.piece(tok.bos_id),
        "eos_token": tok.piece(tok.im_end_id),
        "unk_token": tok.piece(tok.unk_id),
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
    if _write_fast_tokenizer(out_dir):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config["tokenizer_class"]


def _write_fast_tokenizer(out_dir: Path) -> bool:
    try:
        from tokenizers import normalizers
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
    backend.save(str(out_dir / "tokenizer.json"))
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
