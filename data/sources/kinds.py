"""One reader per dataset kind: a raw record -> conversations, a drop reason, or BadRecord.

Readers follow Open-Assistant's loaders for the datasets of the seed's mixes:

- `megacode2` (USER -> user, ASSISTANT -> assistant) and `oa_leet10k` (INSTRUCTION, RESPONSE;
  SOURCE ignored): a None or blank field drops the row; the word filter is on by default. In a
  directory holding DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json, megacode2 reads
  only that file, Open-Assistant's `data_files` (see `data.config`).
- `orca-chat`: `instruction` -> system message (none when empty); `conversation` -> user/assistant
  turns. The seed's orca-chat is shahules786/orca-best, whose rows hold {"samples": [{"input",
  "output"}, ...]}: Open-Assistant's OrcaChat takes only the first `rows_per_conv` of them (its
  default, 1, as the seed sets none). A plain list of {"input", "output"} (shahules786/orca-chat's
  orca-chat-gpt4.json, which its earlier OrcaChat read whole) is taken whole unless
  `rows_per_conv` is set.
- `dolly15k_multilingual`: `instruction`, `context`, `response`; language from a `lang` column,
  else the file name's leading code (`en.jsonl`, `de-00000-of-00001.parquet`); en, de, es, fr
  kept by default; citation marks removed from the context (numbers, then `[citation needed]`,
  then letters, in Open-Assistant's order); a non-empty context becomes a `context` turn between
  the user and the assistant turn. As in Open-Assistant, only an empty instruction or response
  drops the row (its word filter returns the empty text, which is falsy); whitespace is kept.
- `chat`: {"messages": [{"role", "content"}, ...]} (roles system, user/prompter, assistant,
  context), an optional "lang". A blank assistant message drops the conversation ("blank"): it
  would teach the model to answer with nothing.
- `oasst_export`: see `data/sources/oasst.py`.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data.chat import Conversation, Role, as_role
from data.errors import BadRecord
from data.sources.files import decode_line
from data.sources.oasst import convert_tree

# Open-Assistant's word filter (case-insensitive substrings): refusals and model self-references
# that should not be learned.
FILTER_PHRASES = tuple(
    p.lower()
    for p in (
        "as a language model",
        "as an AI language model",
        "As a large language model",
        "As an AI ",
        "an AI language model you don't have",
        "AI language model and I do not",
        "I am an AI language model and do not",
        "I'm an AI ",
        "I am an AI ",
        "my name is OpenAI",
        "trained by OpenAI",
        "as an OpenAI language model",
        "As your dedicated AI language model",
        "As a hypothetical AI",
        "As a neutral AI",
        "my knowledge cutoff",
        "my knowledge cut off",
        "As a machine",
        "I cannot assist",
        "I do not have personal preferences",
        "I don't have personal preferences",
        "Unfortunately, I cannot provide",
        "I'm sorry, I cannot",
        "AI cannot create or program",
        "I'm afraid I cannot create",
    )
)

DOLLY_LANGS = "en,de,es,fr"
# Citation marks, removed one kind after the other as Open-Assistant does (a removal can join the
# text around it into a new mark: "[[1]a]" -> "[a]" -> ""): [1] / [2, 3], then the literal
# "[citation needed]", then [a] / [A].
_CITATION_NUMBERS = re.compile(r"\[\d+(?:,\s*\d+)*\]")
_CITATION_LETTER = re.compile(r"\[[a-zA-Z]\]")


def strip_citations(context: str) -> str:
    """Dolly's context without its citation marks, in Open-Assistant's three passes: numbered
    marks, then the literal "[citation needed]", then letter marks (one removal can expose the
    next mark, so the order matters)."""
    context = _CITATION_NUMBERS.sub("", context).replace("[citation needed]", "")
    return _CITATION_LETTER.sub("", context)


_LANG_PREFIX = re.compile(r"^([a-z]{2,3})(?=$|[-_.])")


def has_filtered_words(*texts: str) -> bool:
    """True when a text contains one of the filter phrases."""
    for text in texts:
        low = text.lower()
        if any(p in low for p in FILTER_PHRASES):
            return True
    return False


def parse_langs(value) -> frozenset[str] | None:
    """ "en,de" / ["en", "de"] -> {"en", "de"}; None stays None (no language filter)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return frozenset(str(x).strip() for x in items if str(x).strip())


def _as_dict(obj, location: str) -> dict:
    if isinstance(obj, bytes):
        return decode_line(obj, location)
    if not isinstance(obj, dict):
        raise BadRecord(location, f"expected a JSON object, found {type(obj).__name__}")
    return obj


def _field(row: dict, key: str, location: str, optional: bool = False):
    if key not in row:
        if optional:
            return None
        raise BadRecord(location, f"missing column {key!r} (found {sorted(row)})")
    value = row[key]
    if value is not None and not isinstance(value, str):
        raise BadRecord(location, f"column {key!r} must be a string, found {type(value).__name__}")
    return value


def _blank(value: str | None) -> bool:
    return value is None or not value.strip()


def _pair(user_key: str, assistant_key: str):
    def convert(obj, location: str, path: Path, opts: dict) -> list[Conversation] | str:
        row = _as_dict(obj, location)
        q = _field(row, user_key, location)
        a = _field(row, assistant_key, location)
        if _blank(q) or _blank(a):
            return "blank"
        if opts["filter_words"] and has_filtered_words(q, a):
            return "filtered_words"
        return [Conversation(turns=[(Role.USER, q), (Role.ASSISTANT, a)])]

    return convert


def convert_orca(obj, location: str, path: Path, opts: dict) -> list[Conversation] | str:
    row = _as_dict(obj, location)
    system = _field(row, "instruction", location, optional=True)
    if "conversation" not in row:
        raise BadRecord(location, f"missing column 'conversation' (found {sorted(row)})")
    conv = row["conversation"]
    rows_per_conv = opts["rows_per_conv"]
    if isinstance(conv, dict) and "samples" in conv:
        conv = conv["samples"]
        if rows_per_conv is None:
            rows_per_conv = 1  # Open-Assistant's OrcaChat default for orca-best's layout
    if not isinstance(conv, list):
        raise BadRecord(
            location,
            f"'conversation' must be a list of {{input, output}}, found {type(conv).__name__}",
        )
    if not conv:
        raise BadRecord(location, "empty conversation")
    if rows_per_conv is not None:
        conv = conv[:rows_per_conv]  # the pairs left out are never read (nor checked), as there
    turns = []
    for k, item in enumerate(conv):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("input"), str)
            or not isinstance(item.get("output"), str)
        ):
            raise BadRecord(
                location,
                f"conversation[{k}] must be {{'input': str, 'output': str}}, found {item!r:.80}",
            )
        turns += [(Role.USER, item["input"]), (Role.ASSISTANT, item["output"])]
    if opts["filter_words"] and has_filtered_words(*(t for _, t in turns)):
        return "filtered_words"
    # Any non-empty instruction is a system message, whitespace too (`format_sft_entry`).
    return [Conversation(turns=turns, system=system or None)]


def file_lang(path: Path) -> str | None:
    """Leading language code of a file name: `de-00000-of-00001.parquet` -> "de"."""
    m = _LANG_PREFIX.match(path.name)
    return m.group(1) if m else None


def convert_dolly(obj, location: str, path: Path, opts: dict) -> list[Conversation] | str:
    row = _as_dict(obj, location)
    instruction = _field(row, "instruction", location)
    context = _field(row, "context", location, optional=True) or ""
    response = _field(row, "response", location)
    lang = _field(row, "lang", location, optional=True) or file_lang(path)
    if not isinstance(lang, str):
        raise BadRecord(
            location,
            "no language: the row has no 'lang' column and the file name does not start with a "
            "language code (en.jsonl, de-00000-of-00001.parquet, ...)",
        )
    if opts["lang"] is not None and lang not in opts["lang"]:
        return "lang"
    if not instruction or not response:
        return "blank"
    if opts["filter_words"] and has_filtered_words(instruction, response):
        return "filtered_words"
    context = strip_citations(context)
    turns = [(Role.USER, instruction)]
    if context:  # `format_sft_entry` renders any non-empty context, whitespace too
        turns.append((Role.CONTEXT, context))
    turns.append((Role.ASSISTANT, response))
    return [Conversation(turns=turns, lang=lang)]


def convert_chat(obj, location: str, path: Path, opts: dict) -> list[Conversation] | str:
    row = _as_dict(obj, location)
    if "messages" not in row:
        raise BadRecord(location, f"missing column 'messages' (found {sorted(row)})")
    messages = row["messages"]
    if not isinstance(messages, list):
        raise BadRecord(location, f"'messages' must be a list, found {type(messages).__name__}")
    if not messages:
        raise BadRecord(location, "empty conversation")
    turns = []
    for k, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or not isinstance(m.get("role"), str)
        ):
            raise BadRecord(
                location, f"messages[{k}] must be {{'role': str, 'content': str}}, found {m!r:.80}"
            )
        try:
            turns.append((as_role(m["role"]), m["content"]))
        except ValueError as e:  # as_role's message lists the roles it knows
            raise BadRecord(location, f"messages[{k}]: {e}") from None
    if not any(role == Role.ASSISTANT for role, _ in turns):
        raise BadRecord(location, "no assistant turn")
    if any(role == Role.ASSISTANT and _blank(text) for role, text in turns):
        return "blank"  # counted as dropped, as a pair dataset's blank row
    lang = row.get("lang")
    if not isinstance(lang, str):
        if opts["lang"] is not None and lang is not None:  # the filter needs a code to compare
            raise BadRecord(
                location, f"column 'lang' must be a string, found {type(lang).__name__}"
            )
        lang = None
    if opts["lang"] is not None and lang not in opts["lang"]:
        return "lang"
    if opts["filter_words"] and has_filtered_words(*(t for _, t in turns)):
        return "filtered_words"
    system = None
    if turns[0][0] == Role.SYSTEM:
        system = turns.pop(0)[1]
    return [Conversation(turns=turns, system=system or None, lang=lang)]


@dataclass(frozen=True)
class Kind:
    """A dataset kind: its reader, the fields it needs and its own options (with defaults)."""

    name: str
    display: str  # the dataset's name in the stats text (Open-Assistant's class names)
    convert: Callable  # (raw, location, path, opts) -> list[Conversation] | drop reason
    columns: tuple[str, ...] | None = None  # Parquet columns to read (None: all)
    options: dict = field(default_factory=dict)  # kind-specific option -> default
    # The files Open-Assistant's loader reads of the dataset's hub repository (its `data_files`):
    # the default selection in a directory that holds them (see `data.config`).
    data_files: tuple[str, ...] = ()
    unit: str = "sample"  # what val_split/fraction select: "sample" or "tree"


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("megacode2", "InstructionDataset (megacode2)", _pair("USER", "ASSISTANT"),
             ("USER", "ASSISTANT"), {"filter_words": True},
             data_files=("DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json",)),
        Kind("oa_leet10k", "InstructionDataset (oa_leet10k)", _pair("INSTRUCTION", "RESPONSE"),
             ("INSTRUCTION", "RESPONSE"), {"filter_words": True}),
        Kind("orca-chat", "OrcaChat (orca-chat)", convert_orca, ("instruction", "conversation"),
             {"filter_words": False, "rows_per_conv": None}),
        Kind("dolly15k_multilingual", "Dolly15kMultilingual", convert_dolly, None,
             {"filter_words": True, "lang": DOLLY_LANGS}),
        Kind("chat", "ChatDataset", convert_chat, None, {"filter_words": False, "lang": None}),
        Kind("oasst_export", "ListDataset", convert_tree, None,
             {"lang": "en", "top_k": None, "input_file_path": None}, unit="tree"),
    )
}  # fmt: skip
