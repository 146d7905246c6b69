"""Readers against Open-Assistant's loaders for the seed's datasets (SFT v10), and bad input that
used to escape as a traceback instead of a BadRecord naming the file and line."""

import pytest

from data.chat import Role
from data.config import load_mixes
from data.errors import BadRecord, DataError
from data.sources import KINDS, iter_records
from tests.data.test_sources import convert


def turns(result):
    [conv] = result
    return conv.turns


# -- orca-chat: the seed's orca-best rows ----------------------------------------------------

PAIRS = [{"input": "2+2?", "output": "4"}, {"input": "3+3?", "output": "6"}]


def test_orca_best_rows_take_the_first_pair_like_open_assistant():
    # OrcaChat (v10) reads shahules786/orca-best and keeps conversation["samples"][:1].
    row = {"instruction": "Be brief.", "conversation": {"samples": PAIRS}}
    assert turns(convert("orca-chat", row)) == [(Role.USER, "2+2?"), (Role.ASSISTANT, "4")]
    assert len(turns(convert("orca-chat", row, rows_per_conv=2))) == 4
    # Pairs past rows_per_conv are never read, malformed or not.
    row = {"instruction": "", "conversation": {"samples": PAIRS[:1] + [{"input": 5}]}}
    assert turns(convert("orca-chat", row)) == [(Role.USER, "2+2?"), (Role.ASSISTANT, "4")]


def test_orca_plain_list_is_whole_unless_rows_per_conv_is_set():
    row = {"instruction": "", "conversation": PAIRS}
    assert len(turns(convert("orca-chat", row))) == 4
    assert len(turns(convert("orca-chat", row, rows_per_conv=1))) == 2


def test_orca_whitespace_instruction_is_still_a_system_message():
    # format_sft_entry renders any non-empty system_message.
    [conv] = convert("orca-chat", {"instruction": " \n", "conversation": PAIRS[:1]})
    assert conv.system == " \n"
    [conv] = convert("orca-chat", {"instruction": "", "conversation": PAIRS[:1]})
    assert conv.system is None


def test_rows_per_conv_in_the_yaml(files):
    files.jsonl("d/orca-chat/o.jsonl", [{"instruction": "", "conversation": PAIRS}])
    for value, ok in [(2, True), (None, True), (0, False), ("1", False), (True, False)]:
        cfg = files.mix(datasets=[{"orca-chat": {"rows_per_conv": value}}])
        if ok:
            [mix] = load_mixes(cfg, files.root / "d")
            assert mix.datasets[0].options["rows_per_conv"] == value
        else:
            with pytest.raises(DataError, match="rows_per_conv"):
                load_mixes(cfg, files.root / "d")


# -- dolly15k_multilingual ---------------------------------------------------------------------


def dolly(**row):
    return convert("dolly15k_multilingual", row, path="en.jsonl")


def test_dolly_whitespace_context_is_a_context_turn():
    # `if m.context:` in format_sft_entry: whitespace is not empty.
    assert turns(dolly(instruction="q", context="\n", response="a")) == [
        (Role.USER, "q"),
        (Role.CONTEXT, "\n"),
        (Role.ASSISTANT, "a"),
    ]
    # A context that was only citation marks is empty once they are removed: no context turn.
    assert [r for r, _ in turns(dolly(instruction="q", context="[1][a]", response="a"))] == [
        Role.USER,
        Role.ASSISTANT,
    ]


def test_dolly_drops_only_empty_instruction_or_response():
    # _filter_by_words("") returns "" (falsy): dropped. "  " is returned as is (truthy): kept.
    assert dolly(instruction="", context="", response="a") == "blank"
    assert dolly(instruction="q", context="", response="") == "blank"
    assert turns(dolly(instruction="q", context="", response=" ")) == [
        (Role.USER, "q"),
        (Role.ASSISTANT, " "),
    ]
    assert turns(dolly(instruction="\n", context="", response="a"))[0] == (Role.USER, "\n")


def test_dolly_citations_are_removed_in_open_assistants_order():
    # Numbers first, then [citation needed], then letters: each pass can expose a new mark.
    got = turns(dolly(instruction="q", context="x [[1]a] y [[citation needed]b] z", response="a"))
    assert got[1] == (Role.CONTEXT, "x  y  z")
    # The literal "[citation needed]" only, case and all, as str.replace does.
    got = turns(dolly(instruction="q", context="a [Citation Needed] b", response="a"))
    assert got[1] == (Role.CONTEXT, "a [Citation Needed] b")


# -- megacode2: the file Open-Assistant reads of the hub repository --------------------------

DEDUPED = "DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json"


def test_megacode2_reads_only_the_deduped_file_when_the_directory_has_it(files):
    row = {"USER": "q", "ASSISTANT": "a"}
    files.jsonl(f"d/megacode2/{DEDUPED}", [row])
    files.jsonl("d/megacode2/LosslessMegaCodeTrainingV2_1m_Evol_Uncensored.json", [row, row])
    cfg = files.mix(datasets=["megacode2"])
    [mix] = load_mixes(cfg, files.root / "d")
    assert [p.name for p in mix.datasets[0].files] == [DEDUPED]
    # data_files overrides the choice; a directory without the file is read whole.
    cfg = files.mix(datasets=[{"megacode2": {"data_files": "*.json"}}])
    assert len(load_mixes(cfg, files.root / "d")[0].datasets[0].files) == 2
    files.jsonl("d2/megacode2/train.jsonl", [row])
    files.jsonl("d2/megacode2/more.jsonl", [row])
    cfg = files.mix(datasets=["megacode2"])
    assert len(load_mixes(cfg, files.root / "d2")[0].datasets[0].files) == 2


def test_data_files_errors_name_the_key(files):
    files.jsonl("d/chat/a.jsonl", [{"messages": []}])
    cfg = files.mix(datasets=[{"chat": {"data_files": "*.parquet"}}])
    with pytest.raises(DataError, match=r"data_files \['\*\.parquet'\] match none.*a\.jsonl"):
        load_mixes(cfg, files.root / "d")
    cfg = files.mix(datasets=[{"chat": {"data_files": [3]}}])
    with pytest.raises(DataError, match="data_files must be a file name or glob pattern"):
        load_mixes(cfg, files.root / "d")
    cfg = files.mix(datasets=[{"chat": {"path": "chat/a.jsonl", "data_files": "*.jsonl"}}])
    with pytest.raises(DataError, match="data_files picks files of a directory"):
        load_mixes(cfg, files.root / "d")


def test_empty_lang_list_is_refused(files):
    files.jsonl("d/chat/a.jsonl", [{"messages": []}])
    for value in ("", " , ", []):
        cfg = files.mix(datasets=[{"chat": {"lang": value}}])
        with pytest.raises(DataError, match="lang names no language"):
            load_mixes(cfg, files.root / "d")


# -- bad input: BadRecord naming file:line, never a TypeError / RecursionError ----------------


@pytest.mark.parametrize("role", [None, ["user"], 1, True])
def test_chat_role_of_the_wrong_type_is_a_bad_record(role):
    row = {"messages": [{"role": role, "content": "hi"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(BadRecord, match=r"x\.jsonl:7: messages\[0\] must be \{'role': str"):
        convert("chat", row)


def _tree(prompt):
    return {"message_tree_id": "t", "tree_state": "ready_for_export", "prompt": prompt}


def _msg(role, text, replies=()):
    return {"role": role, "text": text, "lang": "en", "review_result": True, "rank": None,
            "deleted": False, "synthetic": False, "replies": list(replies)}  # fmt: skip


def test_oasst_unhashable_role_is_a_bad_record():
    with pytest.raises(BadRecord, match=r"x\.jsonl:7: prompt: role must be .*\['prompter'\]"):
        convert("oasst_export", _tree({**_msg("prompter", "P"), "role": ["prompter"]}))


def test_oasst_thread_that_does_not_alternate_is_a_bad_record():
    # Open-Assistant asserts prompter/assistant alternation on every selected thread.
    t = _tree(_msg("prompter", "P", [_msg("prompter", "P2", [_msg("assistant", "A")])]))
    with pytest.raises(BadRecord, match=r"x\.jsonl:7: thread prompter > prompter > assistant"):
        convert("oasst_export", t)
    # Threads that are not selected are not looked at (a deleted one here).
    bad = {**_msg("prompter", "P2", [_msg("assistant", "B")]), "deleted": True}
    t = _tree(_msg("prompter", "P", [bad, _msg("assistant", "A")]))
    assert [[x for _, x in c.turns] for c in convert("oasst_export", t)] == [["P", "A"]]


def test_oasst_messages_export_is_named_as_such():
    line = {"message_id": "m", "parent_id": None, "role": "prompter", "text": "hi", "lang": "en"}
    with pytest.raises(BadRecord, match=r"x\.jsonl:7: this is a message, not a message tree"):
        convert("oasst_export", line)


def test_deeply_nested_json_line_is_a_bad_record():
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadRecord, match=r"x\.jsonl:7: JSON nested too deeply"):
        convert("chat", deep)


def test_deeply_nested_json_array_element_names_the_line(files):
    p = files.text("deep.json", '[\n{"a": 1},\n' + "[" * 100_000 + "]" * 100_000 + "\n]\n")
    with pytest.raises(DataError, match=r"deep\.json:3: JSON nested too deeply"):
        list(iter_records(p))


def test_orca_best_parquet_layout_end_to_end(files):
    # The hub's orca-best Parquet: `conversation` is a struct holding the `samples` list.
    rows = [{"instruction": "S", "conversation": {"samples": PAIRS}}]
    p = files.parquet("orca-chat/train-00000-of-00001.parquet", rows)
    [(location, raw)] = list(iter_records(p, list(KINDS["orca-chat"].columns)))
    opts = dict(KINDS["orca-chat"].options)
    [conv] = KINDS["orca-chat"].convert(raw, location, p, opts)
    assert conv.system == "S" and conv.turns == [(Role.USER, "2+2?"), (Role.ASSISTANT, "4")]
