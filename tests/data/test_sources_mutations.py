"""Behaviour of the dataset readers (data/sources/) that a hand mutation pass found unpinned: each
test names the mistake it catches. Fixtures come from tests/data/conftest.py."""

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from data.chat import Role
from data.errors import BadRecord, DataError
from data.sources import KINDS, has_filtered_words, iter_records, list_files, parse_langs
from data.sources.files import decode_line, iter_blocks
from data.sources.kinds import file_lang
from tests.data.test_sources import convert as _convert

# -- files: list_files ------------------------------------------------------------------------


def test_a_single_file_of_an_unsupported_type_is_refused(files):
    """A file location must be a data file: a `.txt` or `.csv` given as `path:` is refused with
    the supported suffixes, not opened and misread as JSON Lines record after record."""
    p = files.text("notes.txt", '{"a": 1}\n')
    with pytest.raises(DataError, match=r"notes\.txt is not a supported file \(expected \.jsonl"):
        list_files(p, "test")


def test_a_directory_named_like_a_data_file_is_walked_not_read(files):
    """Only files are data: a sub-directory named `part.jsonl/` (as Spark writes its output)
    contributes the files inside it, not itself (opening a directory fails)."""
    files.jsonl("d/a.jsonl", [{"i": 1}])
    files.jsonl("d/part.jsonl/b.jsonl", [{"i": 2}])
    found = list_files(files.root / "d", "test")
    assert [p.relative_to(files.root / "d").as_posix() for p in found] == [
        "a.jsonl",
        "part.jsonl/b.jsonl",
    ]


def test_a_hidden_directory_above_the_location_hides_nothing(files):
    """Hidden files are skipped relative to the dataset directory only: a dataset under
    `~/.cache/huggingface/...` (the hub's default download place) is found whole."""
    files.jsonl(".cache/hub/ds/a.jsonl", [{"i": 1}])
    files.jsonl(".cache/hub/ds/.git/x.jsonl", [{"i": 9}])
    found = list_files(files.root / ".cache/hub/ds", "test")
    assert [p.name for p in found] == ["a.jsonl"]


def test_data_files_patterns_are_alternatives(files):
    """Several `data_files` patterns each pick files (a union, as Hugging Face's list of
    patterns), in the directory's sorted order; a file need not match all of them."""
    for name in ("a-1.jsonl", "b-1.jsonl", "c-1.jsonl"):
        files.jsonl(f"d/{name}", [{"i": 1}])
    found = list_files(files.root / "d", "test", ["b-*.jsonl", "a-*.jsonl"])
    assert [p.name for p in found] == ["a-1.jsonl", "b-1.jsonl"]


# -- files: JSON Lines and JSON arrays ---------------------------------------------------------


@pytest.mark.parametrize(
    "escape", ["\\ud800", "\\uD800", "\\udc00", "\\uDFFF", "\\ude00 after a low half"]
)
def test_a_lone_surrogate_of_either_half_in_either_case_is_a_bad_record(escape):
    """JSON allows `\\uXXXX` in upper or lower case hex, and a lone half may be a high
    (d800-dbff) or a low (dc00-dfff) surrogate: each is refused where the line is decoded, naming
    the line, instead of crashing SentencePiece later."""
    raw = b'{"messages": [{"t": "x ' + escape.encode() + b'"}]}'
    with pytest.raises(BadRecord, match=r"f\.jsonl:3: invalid Unicode: a lone surrogate"):
        decode_line(raw, "f.jsonl:3")
    # A whole pair, in either case, is text.
    assert decode_line(b'{"t": "\\uD83D\\uDE00 \\ud83d\\ude00"}', "f.jsonl:3") == {
        "t": "\U0001f600 \U0001f600"
    }


def test_a_lone_surrogate_in_a_json_array_element_is_a_bad_record_in_upper_case_too(files):
    """A JSON array element that may hold a lone surrogate is handed over undecoded, so the
    reader refuses it as a bad record: `\\uD800` (upper-case hex) as well as `\\ud800`."""
    rows = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
    good = json.dumps({"messages": rows})
    bad = good.replace('"x"', '"half \\uD800 a pair"')
    p = files.text("arr.json", f"[{good},\n{bad}]")
    (loc1, obj1), (loc2, obj2) = iter_records(p)
    assert isinstance(obj1, dict) and loc2 == f"{p}:2"
    opts = dict(KINDS["chat"].options)
    with pytest.raises(BadRecord, match=r"arr\.json:2: invalid Unicode: a lone surrogate \\ud800"):
        KINDS["chat"].convert(obj2, loc2, p, opts)


def test_json_array_elements_must_be_separated_by_commas(files):
    """`[{...} {...}]` is not JSON: the array reader stops with the line, rather than reading
    the elements as if the comma were there."""
    p = files.text("arr.json", '[{"a": 1}\n {"a": 2}]')
    with pytest.raises(DataError, match=r"arr\.json:2: malformed JSON array \(expected ',' or ']'"):
        list(iter_records(p))


def test_an_empty_json_array_has_no_records(files):
    """`[]` (with or without blanks inside) is a file of no records, not a syntax error."""
    for text in ("[]", "[ \n ]\n"):
        assert list(iter_records(files.text("empty.json", text))) == []


@pytest.mark.parametrize("prefix", [b"\n\n  ", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n"])
def test_a_json_array_after_blank_lines_or_a_byte_order_mark(files, prefix):
    """A `.json` array is recognised after leading blanks and a UTF-8 byte-order mark (as
    Windows editors save it), and read as an array, not as JSON Lines of bad records."""
    p = files.raw("arr.json", prefix + b'[{"a": 1},\n{"a": 2}]')
    assert [obj for _, obj in iter_records(p)] == [{"a": 1}, {"a": 2}]


def test_a_byte_order_mark_at_any_line_of_json_lines(files):
    """Files saved by Windows editors start with a byte-order mark; joined with `cat`, the marks
    stand at the start of later lines too. Each is dropped, as the first one is, instead of
    making a valid record a bad one."""
    bom = b"\xef\xbb\xbf"
    p = files.raw("joined.jsonl", bom + b'{"a": 1}\n' + bom + b'{"a": 2}\n')
    assert [decode_line(raw, loc) for loc, raw in iter_records(p)] == [{"a": 1}, {"a": 2}]


def test_invalid_utf8_in_a_json_array_names_the_file(files):
    """A JSON array cannot be read past a byte that is not UTF-8: one DataError naming the file
    and the byte, not a UnicodeDecodeError traceback."""
    p = files.raw("arr.json", b'[{"a": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"arr\.json: invalid UTF-8 in the JSON array"):
        list(iter_records(p))


# -- files: blocks (the pretokenizer's unit of work) --------------------------------------------


def test_blocks_are_cut_by_bytes_as_well_as_by_records(files):
    """`iter_blocks` closes a block of lines at `max_bytes` of raw line bytes (a block of a few
    huge records must not be as long as a block of short ones), and keeps the last partial block:
    seven 40-byte lines with max_bytes=120 are blocks of 3, 3 and 1."""
    line = json.dumps({"text": "x" * 27}).encode() + b"\n"
    assert len(line) == 40
    p = files.raw("a.jsonl", line * 7)
    blocks = list(iter_blocks(p, None, max_records=100, max_bytes=120))
    assert [len(b) for b in blocks] == [3, 3, 1]
    assert [loc for b in blocks for loc, _ in b] == [f"{p}:{i}" for i in range(1, 8)]
    blocks = list(iter_blocks(p, None, max_records=2, max_bytes=1 << 20))
    assert [len(b) for b in blocks] == [2, 2, 2, 1]


def test_parquet_row_numbers_run_on_across_blocks(files):
    """Parquet locations are `file:row N`, counted from 1 over the whole file, also when the rows
    come in several record batches (blocks of `max_records`)."""
    p = files.parquet("m.parquet", [{"USER": f"q{i}", "ASSISTANT": "a"} for i in range(5)])
    blocks = list(iter_blocks(p, ["USER"], max_records=2, max_bytes=1))
    assert [len(b) for b in blocks] == [2, 2, 1]
    got = [rec for b in blocks for rec in b]
    assert got == [(f"{p}:row {i + 1}", {"USER": f"q{i}"}) for i in range(5)]


# -- files: tar archives ----------------------------------------------------------------------


def _tar(members: list[tuple[str, bytes | None]], mode: str = "w:gz") -> bytes:
    """A tar archive; a member whose data is None is a directory entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tgz_and_plain_tar_archives_are_read(files):
    """`.tgz` is a tar.gz under another name, and `.tar` an uncompressed one: both are read as
    archives of JSON Lines members, with `archive!member:line` locations."""
    for name, mode in (("export.tgz", "w:gz"), ("export.tar", "w")):
        p = files.raw(name, _tar([("x/a.jsonl", b'{"a": 1}\n{"a": 2}\n')], mode))
        got = list(iter_records(p))
        assert [json.loads(r) for _, r in got] == [{"a": 1}, {"a": 2}]
        assert got[1][0] == f"{p}!x/a.jsonl:2"


def test_tar_members_named_json_and_directory_entries(files):
    """In an archive, `.json` / `.json.gz` members are read (as JSON Lines), and a directory entry
    named like a data file (`part.jsonl/`) is skipped, not opened."""
    p = files.raw(
        "export.tar.gz",
        _tar(
            [
                ("part.jsonl", None),
                ("part.jsonl/a.json", b'{"a": 1}\n'),
                ("b.json.gz", gzip.compress(b'{"a": 2}\n')),
            ]
        ),
    )
    assert [json.loads(r) for _, r in iter_records(p)] == [{"a": 1}, {"a": 2}]


def test_tar_without_data_members_is_an_error(files):
    """An archive holding no JSON Lines member (a wrong download) is one DataError naming the
    archive and what it should hold, not a dataset that silently contributes nothing."""
    p = files.raw("export.tar.gz", _tar([("README.md", b"hi"), ("data.csv", b"a,b\n")]))
    with pytest.raises(DataError, match=r"export\.tar\.gz: the archive holds no \.jsonl"):
        list(iter_records(p))


# -- kinds ------------------------------------------------------------------------------------


def test_language_lists_ignore_blanks_around_codes():
    """`lang: "en, de"` (as people type it in YAML) is the codes en and de, not " de"."""
    assert parse_langs("en, de ,fr") == {"en", "de", "fr"}
    assert parse_langs([" en", "de "]) == {"en", "de"}


@pytest.mark.parametrize(
    "kind", ["megacode2", "oa_leet10k", "orca-chat", "dolly15k_multilingual", "chat"]
)
@pytest.mark.parametrize("element", [5, "text", [1, 2], None])
def test_a_json_array_element_that_is_not_an_object_is_a_bad_record(files, kind, element):
    """A JSON array's elements reach the readers decoded; one that is not an object is a bad
    record naming its type and line, never a TypeError (`"USER" in 5`) or a misleading
    "missing column" message listing the characters of a string."""
    p = files.text("en.json", "[\n" + json.dumps(element) + "\n]")
    [(loc, obj)] = iter_records(p)
    opts = dict(KINDS[kind].options)
    if "lang" in opts:
        opts["lang"] = parse_langs(opts["lang"])
    with pytest.raises(
        BadRecord, match=rf"en\.json:2: expected a JSON object, found {type(element).__name__}"
    ):
        KINDS[kind].convert(obj, loc, p, opts)


@pytest.mark.parametrize(
    "kind, q, a", [("megacode2", "USER", "ASSISTANT"), ("oa_leet10k", "INSTRUCTION", "RESPONSE")]
)
def test_pair_word_filter_reads_the_question_too(kind, q, a):
    """Open-Assistant filters an instruction pair on both texts: a prompt that quotes a refusal
    ("Rewrite 'As an AI language model ...'") is dropped like a refusing answer."""
    row = {q: "Rewrite: 'As an AI language model, I cannot.'", a: "Sure: I can't."}
    assert _convert(kind, row) == "filtered_words"


def test_word_filter_phrases_keep_their_trailing_space():
    """Phrases like "As an AI " end with a space on purpose: "As an aid to memory" or "I'm an
    AIrline pilot" are ordinary text, not model self-references."""
    assert not has_filtered_words("As an aid to memory, list them.", "I'm an AIrline pilot.")
    assert has_filtered_words("As an AI I think so.")


def test_orca_word_filter_is_off_by_default_and_reads_every_turn_when_on():
    """orca-chat keeps refusals unless `filter_words` is set (Open-Assistant's OrcaChat has no
    word filter); when set, a phrase in any turn, the user's included, drops the conversation."""
    row = {
        "instruction": "",
        "conversation": [{"input": "Say 'As an AI language model'.", "output": "ok"}],
    }
    [conv] = _convert("orca-chat", row)
    assert conv.turns[0][1].startswith("Say")
    assert _convert("orca-chat", row, filter_words=True) == "filtered_words"


def test_chat_keeps_refusals_by_default_and_drops_an_empty_system_message():
    """The generic chat kind has no word filter unless asked (its data is the user's own), and an
    empty leading system message is no system message (None), as for orca-chat."""
    rows = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "As an AI language model, hello."},
    ]
    [conv] = _convert("chat", {"messages": rows})
    assert conv.system is None and [r for r, _ in conv.turns] == [Role.USER, Role.ASSISTANT]
    assert _convert("chat", {"messages": rows}, filter_words=True) == "filtered_words"


def test_dolly_defaults_keep_en_de_es_fr_and_filter_the_instruction():
    """Dolly's default languages are Open-Assistant's four (fr included), and its word filter reads
    the instruction as well as the response."""
    row = {"instruction": "Who?", "context": "", "response": "Ana."}
    for code in ("en", "de", "es", "fr"):
        assert _convert("dolly15k_multilingual", row, path=f"{code}.jsonl")[0].lang == code
    assert _convert("dolly15k_multilingual", row, path="it.jsonl") == "lang"
    refusal = {**row, "instruction": "Say 'as an AI language model'."}
    assert _convert("dolly15k_multilingual", refusal, path="en.jsonl") == "filtered_words"


def test_dolly_upper_case_letter_citations_are_removed():
    """Letter citation marks come in both cases (`[a]`, `[A]`); both are removed from the
    context, while longer bracketed words stay."""
    row = {"instruction": "Q", "context": "x [A] y [b] z [ab]", "response": "R"}
    [conv] = _convert("dolly15k_multilingual", row, path="en.jsonl")
    assert conv.turns[1] == (Role.CONTEXT, "x  y  z [ab]")


def test_file_lang_takes_three_letter_codes():
    """ISO 639-2/3 codes (`yue.jsonl`, `fil-00000-of-00001.parquet`) name a language too."""
    assert file_lang(Path("yue.jsonl")) == "yue"
    assert file_lang(Path("fil-00000-of-00001.parquet")) == "fil"
    assert file_lang(Path("data.jsonl")) is None


def test_oasst_export_keeps_english_trees_by_default():
    """The OASST export's default language is English (the seed's setting): a German tree is
    dropped unless `lang` names it."""
    t = {"tree_state": "ready_for_export", "prompt": {
        "role": "prompter", "text": "P", "lang": "de", "review_result": True,
        "replies": [{"role": "assistant", "text": "A"}]}}  # fmt: skip
    assert _convert("oasst_export", t) == "lang"
    assert len(_convert("oasst_export", t, lang="en,de")) == 1


# -- oasst_export -----------------------------------------------------------------------------


def _msg(role, text, rank=None, replies=(), **kw):
    return {"role": role, "text": text, "rank": rank, "lang": "en", "review_result": True,
            "deleted": False, "synthetic": False, "replies": list(replies), **kw}  # fmt: skip


def _tree(prompt, **kw):
    return {"message_tree_id": "t", "tree_state": "ready_for_export", "prompt": prompt, **kw}


def _oasst(tree_obj, top_k=None, lang="en"):
    return _convert("oasst_export", tree_obj, top_k=top_k, lang=lang)


def _texts(result):
    return [[t for _, t in c.turns] for c in result]


def test_oasst_top_k_ranks_only_assistant_messages():
    """Open-Assistant's top_k filter reads the rank of assistant messages only: prompter
    follow-ups are ranked too, but a second-ranked follow-up does not reject its thread."""
    t = _tree(
        _msg("prompter", "P", replies=[
            _msg("assistant", "A", rank=0, replies=[
                _msg("prompter", "F1", rank=0, replies=[_msg("assistant", "B", rank=0)]),
                _msg("prompter", "F2", rank=1, replies=[_msg("assistant", "C", rank=0)]),
            ]),
        ])
    )  # fmt: skip
    assert _texts(_oasst(t, top_k=1)) == [["P", "A", "F1", "B"], ["P", "A", "F2", "C"]]


def test_oasst_unanswered_follow_up_counts_only_as_the_first_reply():
    """A trailing prompter is dropped, and the thread is taken only through the parent's *first*
    reply (Open-Assistant's `thread[-2].replies[0] == thread[-1]`): when the first follow-up is
    answered, a later unanswered one adds no extra copy of the shorter thread."""
    answered_first = _tree(
        _msg("prompter", "P", replies=[
            _msg("assistant", "A", replies=[
                _msg("prompter", "F1", replies=[_msg("assistant", "B")]),
                _msg("prompter", "F2"),
            ]),
        ])
    )  # fmt: skip
    assert _texts(_oasst(answered_first)) == [["P", "A", "F1", "B"]]
    unanswered_first = _tree(
        _msg("prompter", "P", replies=[
            _msg("assistant", "A", replies=[
                _msg("prompter", "F1"),
                _msg("prompter", "F2", replies=[_msg("assistant", "B")]),
            ]),
        ])
    )  # fmt: skip
    assert _texts(_oasst(unanswered_first)) == [["P", "A"], ["P", "A", "F2", "B"]]


def test_oasst_thread_without_an_assistant_turn_is_not_a_conversation():
    """A prompt whose only reply is an unanswered prompter message leaves the prompt alone once
    the trailing prompter is dropped: no conversation (a user turn alone trains nothing)."""
    assert _oasst(_tree(_msg("prompter", "P", replies=[_msg("prompter", "P2")]))) == []


def test_oasst_conversations_carry_the_tree_language():
    """Each thread's conversation carries the root's language (the stats and the `lang`
    selection downstream read it)."""
    t = _tree(_msg("prompter", "P", lang="de", replies=[_msg("assistant", "A")]))
    assert [c.lang for c in _oasst(t, lang="de")] == ["de"]


def test_oasst_tree_without_a_language_is_dropped_by_a_language_filter():
    """With a language filter (the default, en), a tree whose root has no `lang` is dropped as
    "lang": it cannot be shown to be in a selected language."""
    root = _msg("prompter", "P", replies=[_msg("assistant", "A")])
    del root["lang"]
    assert _oasst(_tree(root)) == "lang"
    assert _texts(_oasst(_tree(root), lang=None)) == [["P", "A"]]


@pytest.mark.parametrize(
    "tree_obj, match",
    [
        (5, "expected a message tree object, found int"),
        (["prompt"], "expected a message tree object, found list"),
        ({"prompt": {"role": "prompter", "text": "P"}}, "missing key 'tree_state'"),
        (_tree(["prompter", "P"]), "'prompt' must be a message object"),
        (_tree(_msg("prompter", "P", replies=["A"])), r"prompt\.replies\[0\]: expected a message"),
        (_tree(_msg("prompter", "P", replies=[_msg("assistant", None)])), "text must be a string"),
        (_tree(_msg("prompter", 5)), r"prompt: message text must be a string"),
        (_tree(_msg("prompter", "P") | {"replies": {"a": 1}}), "'replies' must be a list"),
    ],
)
def test_oasst_malformed_trees_are_bad_records(tree_obj, match):
    """Every malformed tree (as a JSON array element or a line) is a BadRecord naming what is
    wrong and where, never a TypeError/KeyError/AttributeError that aborts the run (and escapes
    --skip-bad-records)."""
    opts = dict(KINDS["oasst_export"].options, lang=parse_langs("en"))
    with pytest.raises(BadRecord, match=match):
        KINDS["oasst_export"].convert(tree_obj, "t.jsonl:3", Path("t.jsonl"), opts)


def test_oasst_null_replies_is_a_leaf():
    """Exports write `"replies": null` for a leaf as well as `[]` or no key: all three are a
    message without replies, not a malformed tree."""
    for leaf in ({"replies": None}, {"replies": []}, {}):
        answer = {"role": "assistant", "text": "A", **leaf}
        t = _tree(_msg("prompter", "P") | {"replies": [answer]})
        assert _texts(_oasst(t)) == [["P", "A"]]
