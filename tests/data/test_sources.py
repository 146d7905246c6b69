import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from data.chat import Role
from data.errors import BadRecord, DataError
from data.sources import KINDS, iter_records, list_files, parse_langs
from data.sources.kinds import file_lang


def convert(kind: str, row, path: str = "x.jsonl", **opts):
    options = dict(KINDS[kind].options)
    options.update(opts)
    if "lang" in options:
        options["lang"] = parse_langs(options["lang"])
    raw = json.dumps(row).encode() if isinstance(row, dict) else row
    return KINDS[kind].convert(raw, f"{path}:7", Path(path), options)


# -- instruction pairs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, q, a", [("megacode2", "USER", "ASSISTANT"), ("oa_leet10k", "INSTRUCTION", "RESPONSE")]
)
def test_instruction_pairs(kind, q, a):
    [conv] = convert(kind, {q: "Sort [2, 1].", a: "[1, 2]", "SOURCE": "ignored"})
    assert (
        conv.turns == [(Role.USER, "Sort [2, 1]."), (Role.ASSISTANT, "[1, 2]")]
        and conv.system is None
    )
    assert convert(kind, {q: None, a: "x"}) == "blank"
    assert convert(kind, {q: "x", a: "  \n"}) == "blank"
    refusal = {q: "Add 2 and 2.", a: "AS AN AI LANGUAGE MODEL, I cannot add."}
    assert convert(kind, refusal) == "filtered_words"  # case-insensitive, on by default
    assert convert(kind, refusal, filter_words=False)[0].turns[1][1].startswith("AS AN AI")
    with pytest.raises(BadRecord, match=f"x.jsonl:7: missing column '{a}'"):
        convert(kind, {q: "only the question"})
    with pytest.raises(BadRecord, match="must be a string"):
        convert(kind, {q: "x", a: 5})


# -- orca-chat --------------------------------------------------------------------------------


def test_orca_chat():
    row = {
        "instruction": "You are terse.",
        "conversation": [{"input": "2+2?", "output": "4"}, {"input": "and 3+3?", "output": "6"}],
    }
    [conv] = convert("orca-chat", row)
    assert conv.system == "You are terse."
    assert [r for r, _ in conv.turns] == [Role.USER, Role.ASSISTANT, Role.USER, Role.ASSISTANT]
    assert conv.turns[3] == (Role.ASSISTANT, "6")
    # No system message when the instruction is empty; the hub's {"samples": [...]} layout too.
    [conv] = convert(
        "orca-chat", {"instruction": "", "conversation": {"samples": row["conversation"][:1]}}
    )
    assert conv.system is None and len(conv.turns) == 2
    with pytest.raises(BadRecord, match="empty conversation"):
        convert("orca-chat", {"instruction": "x", "conversation": []})
    with pytest.raises(BadRecord, match=r"conversation\[0\]"):
        convert("orca-chat", {"instruction": "x", "conversation": [{"input": "q"}]})


# -- dolly15k_multilingual --------------------------------------------------------------------


def test_dolly_context_language_and_citations():
    row = {
        "instruction": "Who wrote it?",
        "context": "It was written by Ana [1] in 1990 [2, 3] or so[citation needed], see [a].",
        "response": "Ana wrote it.",
    }
    [conv] = convert("dolly15k_multilingual", row, path="de-00000-of-00001.parquet")
    assert conv.lang == "de"
    assert conv.turns == [
        (Role.USER, "Who wrote it?"),
        (Role.CONTEXT, "It was written by Ana  in 1990  or so, see ."),
        (Role.ASSISTANT, "Ana wrote it."),
    ]
    [conv] = convert("dolly15k_multilingual", {**row, "context": ""}, path="en.jsonl")
    assert [r for r, _ in conv.turns] == [Role.USER, Role.ASSISTANT]
    # A `lang` column wins over the file name; en, de, es, fr kept by default.
    assert convert("dolly15k_multilingual", {**row, "lang": "it"}, path="en.jsonl") == "lang"
    assert convert("dolly15k_multilingual", row, path="it.jsonl") == "lang"
    assert convert("dolly15k_multilingual", row, path="it.jsonl", lang="it,en")[0].lang == "it"
    with pytest.raises(BadRecord, match="no language"):
        convert("dolly15k_multilingual", row, path="train.jsonl")


def test_file_lang():
    assert file_lang(Path("en.jsonl")) == "en"
    assert file_lang(Path("de-00000-of-00001.parquet")) == "de"
    assert file_lang(Path("fr.json")) == "fr"
    assert file_lang(Path("train.jsonl")) is None


# -- generic chat -----------------------------------------------------------------------------


def test_chat_kind():
    row = {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        "lang": "en",
    }
    [conv] = convert("chat", row)
    assert conv.system == "Be kind." and conv.turns == [
        (Role.USER, "hi"),
        (Role.ASSISTANT, "hello"),
    ]
    assert convert("chat", row, lang="de") == "lang"
    with pytest.raises(BadRecord, match="empty conversation"):
        convert("chat", {"messages": []})
    with pytest.raises(BadRecord, match="no assistant turn"):
        convert("chat", {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(BadRecord, match="unknown role 'bot'"):
        convert("chat", {"messages": [{"role": "bot", "content": "hi"}]})
    # ShareGPT's names are the usual slip: the message says which names are read.
    with pytest.raises(BadRecord, match=r"messages\[0\]: unknown role 'human': expected system, "):
        convert("chat", {"messages": [{"role": "human", "content": "hi"}]})
    with pytest.raises(BadRecord, match="missing column 'messages'"):
        convert("chat", {"text": "hi"})
    # A blank reply would train the model to answer with nothing: dropped and counted, as a
    # pair dataset's blank row; a blank user message is kept.
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]
    assert convert("chat", {"messages": turns}) == "blank"
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": "Hello."}]
    assert convert("chat", {"messages": turns})[0].turns[0] == (Role.USER, "")


def test_json_lines_errors_name_file_and_line():
    with pytest.raises(BadRecord, match=r"x\.jsonl:7: malformed JSON"):
        convert("chat", b'{"messages": [')
    with pytest.raises(BadRecord, match=r"x\.jsonl:7: invalid UTF-8 at byte 14"):
        convert("chat", b'{"messages": "\xff\xfe"}')
    with pytest.raises(BadRecord, match="expected a JSON object, found list"):
        convert("chat", b"[1, 2]")


# -- files ------------------------------------------------------------------------------------


def test_directory_files_in_sorted_order(files):
    files.jsonl("d/b.jsonl", [{"i": 2}])
    files.jsonl("d/a.jsonl.gz", [{"i": 1}], gz=True)
    files.jsonl("d/sub/c.jsonl", [{"i": 3}])
    files.text("d/README.md", "not data")
    files.jsonl("d/.cache/z.jsonl", [{"i": 9}])
    found = list_files(files.root / "d", "test")
    assert [p.relative_to(files.root / "d").as_posix() for p in found] == [
        "a.jsonl.gz",
        "b.jsonl",
        "sub/c.jsonl",
    ]
    with pytest.raises(DataError, match="does not exist"):
        list_files(files.root / "nope", "test")
    with pytest.raises(DataError, match="holds no"):
        list_files(files.path("empty/x.txt").parent, "test")


def test_jsonl_records_skip_blank_lines_and_count_lines(files):
    p = files.raw("a.jsonl", b'{"a": 1}\n\n  \n{"a": 2}\n')
    assert [loc for loc, _ in iter_records(p)] == [f"{p}:1", f"{p}:4"]


def test_json_array_is_streamed_with_line_numbers(files):
    rows = [{"n": i, "text": "x\n" * i} for i in range(5)]
    p = files.text("arr.json", "[\n" + ",\n".join(json.dumps(r, indent=1) for r in rows) + "\n]\n")
    got = list(iter_records(p))
    assert [obj for _, obj in got] == rows
    lines = p.read_text().split("\n")
    for loc, obj in got:
        line = int(loc.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{" and f'"n": {obj["n"]}' in lines[line]


def test_json_array_syntax_error_is_fatal_with_line(files):
    p = files.text("bad.json", '[\n{"a": 1},\n{"a": 2,,}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        list(iter_records(p))
    p = files.text("open.json", '[{"a": 1},')
    with pytest.raises(DataError, match="not closed"):
        list(iter_records(p))


def test_json_lines_under_a_json_name(files):
    p = files.jsonl("rows.json", [{"a": 1}, {"a": 2}])
    assert [json.loads(raw) for _, raw in iter_records(p)] == [{"a": 1}, {"a": 2}]


def test_parquet_columns(files):
    p = files.parquet("m.parquet", [{"USER": "q", "ASSISTANT": "a", "OTHER": 1}])
    assert list(iter_records(p, ["USER", "ASSISTANT"])) == [
        (f"{p}:row 1", {"USER": "q", "ASSISTANT": "a"})
    ]
    with pytest.raises(DataError, match=r"m\.parquet: missing column\(s\) \['INSTRUCTION'\]"):
        list(iter_records(p, ["INSTRUCTION", "USER"]))


def test_parquet_without_pyarrow_names_the_file_and_the_fix(tmp_path, monkeypatch):
    import sys

    p = tmp_path / "m.parquet"
    p.write_bytes(b"PAR1")  # never opened: the import fails first
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # `import` raises ImportError
    with pytest.raises(DataError, match=r"m\.parquet: reading Parquet files needs pyarrow"):
        list(iter_records(p))


def test_unreadable_files_name_the_file(files):
    p = files.raw(
        "broken.jsonl.gz", gzip.compress(b"".join(b'{"a": %d}\n' % i for i in range(500)))[:200]
    )
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: cannot read"):
        list(iter_records(p))
    p = files.raw("not.parquet", b"PAR1 not really")
    with pytest.raises(DataError, match=r"not\.parquet: not a readable Parquet file"):
        list(iter_records(p))


def test_tar_archive_and_misnamed_tar_gz(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in [
            ("x/trees.jsonl.gz", gzip.compress(b'{"a": 1}\n{"a": 2}\n')),
            ("x/readme.txt", b"hi"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    p = files.raw("export.tar.gz", buf.getvalue())
    got = list(iter_records(p))
    assert [json.loads(r) for _, r in got] == [{"a": 1}, {"a": 2}]
    assert got[1][0] == f"{p}!x/trees.jsonl.gz:2"
    # The seed's stage-2 input is named .tar.gz; a gzipped JSON Lines file under that name works.
    p = files.raw("2023-07-23_oasst_ready.tar.gz", gzip.compress(b'{"a": 3}\n'))
    assert [json.loads(r) for _, r in iter_records(p)] == [{"a": 3}]


# -- oasst_export -----------------------------------------------------------------------------


def msg(role, text, rank=None, replies=(), **kw):
    return {"role": role, "text": text, "rank": rank, "lang": "en", "review_result": True,
            "deleted": False, "synthetic": False, "replies": list(replies), **kw}  # fmt: skip


def tree(prompt, state="ready_for_export"):
    return {"message_tree_id": "t", "tree_state": state, "prompt": prompt}


def texts(result):
    return [[t for _, t in c.turns] for c in result]


def oasst(tree_obj, top_k=None, lang="en"):
    return convert("oasst_export", tree_obj, top_k=top_k, lang=lang)


def test_oasst_threads_and_top_k():
    t = tree(
        msg("prompter", "P", replies=[
            msg("assistant", "A0", rank=0, replies=[
                msg("prompter", "P2", replies=[msg("assistant", "B")]),
            ]),
            msg("assistant", "A1", rank=1),
            msg("assistant", "A2", rank=2),
        ])
    )  # fmt: skip
    assert texts(oasst(t)) == [["P", "A0", "P2", "B"], ["P", "A1"], ["P", "A2"]]
    # top_k=1: only rank-0 replies; "B" has no rank but is its parent's only reply, so it stays.
    assert texts(oasst(t, top_k=1)) == [["P", "A0", "P2", "B"]]
    assert texts(oasst(t, top_k=2)) == [["P", "A0", "P2", "B"], ["P", "A1"]]
    roles = [r for r, _ in oasst(t)[0].turns]
    assert roles == [Role.USER, Role.ASSISTANT, Role.USER, Role.ASSISTANT]


def test_oasst_missing_rank_rejects_only_among_siblings():
    t = tree(msg("prompter", "P", replies=[msg("assistant", "A"), msg("assistant", "B", rank=0)]))
    assert texts(oasst(t, top_k=1)) == [["P", "B"]]
    assert texts(oasst(t)) == [["P", "A"], ["P", "B"]]  # no top_k: rank is not looked at


def test_oasst_trailing_prompter_dropped_once():
    t = tree(
        msg("prompter", "P", replies=[
            msg("assistant", "A", replies=[msg("prompter", "F1"), msg("prompter", "F2")]),
        ])
    )  # fmt: skip
    # Both follow-ups are unanswered leaves: the thread P, A is taken once (via the first).
    assert texts(oasst(t)) == [["P", "A"]]


def test_oasst_deleted_and_synthetic_messages_reject_threads():
    t = tree(
        msg("prompter", "P", replies=[
            msg("assistant", "A", deleted=True),
            msg("assistant", "B", synthetic=True),
            msg("assistant", "C"),
        ])
    )  # fmt: skip
    assert texts(oasst(t)) == [["P", "C"]]


def test_oasst_tree_filters():
    good = msg("prompter", "P", replies=[msg("assistant", "A")])
    assert texts(oasst(tree(good))) == [["P", "A"]]
    assert oasst(tree(good, state="aborted_low_grade")) == "tree_state"
    assert oasst(tree({**good, "review_result": False})) == "review_result"
    assert oasst(tree({**good, "review_result": None})) == "review_result"
    assert oasst(tree({**good, "lang": "ja"}), lang="en,de") == "lang"
    assert texts(oasst(tree({**good, "lang": "de"}), lang="en,de")) == [["P", "A"]]
    # Passes the tree filters but has no thread: a valid tree with no conversation, not a drop
    # (Open-Assistant's loader keeps it in the tree list it splits).
    assert oasst(tree(msg("prompter", "lonely"))) == []


def test_oasst_bad_trees():
    with pytest.raises(BadRecord, match="missing key 'prompt'"):
        oasst({"tree_state": "ready_for_export"})
    bad_role = tree(msg("prompter", "P", replies=[msg("bot", "A")]))
    with pytest.raises(BadRecord, match=r"prompt\.replies\[0\]: role must be"):
        oasst(bad_role)


def test_non_string_languages_are_bad_records_not_type_errors():
    rows = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    # Used to raise TypeError (unhashable list) when the dataset filters by language.
    with pytest.raises(BadRecord, match="column 'lang' must be a string, found list"):
        convert("chat", {"messages": rows, "lang": ["en"]}, lang="en")
    assert (
        convert("chat", {"messages": rows, "lang": ["en"]})[0].lang is None
    )  # no filter: as before
    good = msg("prompter", "P", replies=[msg("assistant", "A")])
    with pytest.raises(BadRecord, match="prompt: 'lang' must be a language code"):
        oasst(tree({**good, "lang": ["en"]}))
    # A lang column that is there but not a string is named as such (it used to say "no 'lang'").
    with pytest.raises(BadRecord, match="column 'lang' must be a string, found int"):
        convert("dolly15k_multilingual", {"instruction": "q", "response": "a", "lang": 5})


def test_oasst_non_numeric_rank_with_top_k_is_a_bad_record():
    t = tree(msg("prompter", "P", replies=[msg("assistant", "A", rank="first")]))
    with pytest.raises(BadRecord, match=r"prompt\.replies\[0\]: 'rank' must be a number"):
        oasst(t, top_k=1)  # used to raise TypeError comparing str >= int
    assert texts(oasst(t)) == [["P", "A"]]  # without top_k the rank is never read
