"""model.generate without a model: prompt files, sampling flags and parameter checks."""

import codecs
import json
import re

import pytest

from model.generate import parse_args, read_prompts
from model.sampling import SamplingParams


def _write(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_line_separators_inside_json_strings_stay_in_the_line(tmp_path):
    # json.dumps(..., ensure_ascii=False) leaves U+2028, U+2029 and U+0085 unescaped; they were
    # taken as line breaks, so a valid line read as "not JSON" and later lines got wrong numbers.
    texts = ["one\u2028two", "three\u2029four", "five\x85six"]
    path = tmp_path / "p.jsonl"
    _write(path, [json.dumps(t, ensure_ascii=False) for t in texts] + ['{"prompt": 3}'])
    with pytest.raises(ValueError, match=r"p\.jsonl:4: expected a JSON string"):
        read_prompts(path)
    _write(path, [json.dumps(t, ensure_ascii=False) for t in texts])
    assert [p.text for p in read_prompts(path)] == texts


def test_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b'"first"\r\n\r\n{"prompt": "second"}\r\n')
    prompts = read_prompts(path)
    assert [p.text for p in prompts] == ["first", "second"]
    assert [p.where for p in prompts] == [f"{path}:1", f"{path}:3"]
    # After a BOM, an invalid byte is still reported on its own line.
    path.write_bytes(codecs.BOM_UTF8 + b'"ok"\n"caf\xe9"\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: invalid UTF-8"):
        read_prompts(path)


def test_system_key_and_leading_system_message_conflict(tmp_path):
    path = tmp_path / "p.jsonl"
    messages = [{"role": "System", "content": "be brief"}, {"role": "user", "content": "hi"}]
    # Both were rendered, as two system turns one after the other.
    _write(path, ['"ok"', json.dumps({"system": "be long", "messages": messages})])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: both a 'system' key and a leading system"):
        read_prompts(path)
    _write(path, [json.dumps({"messages": messages})])
    (prompt,) = read_prompts(path)
    assert prompt.conversation.system == "be brief" and len(prompt.conversation.turns) == 1


BASE = ["--load", "ckpt", "--prompts", "p.jsonl", "--out", "r.json"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top_p", "1.5"], r"top_p 1\.5 must be in \(0, 1\]"),
        (["--temperature", "-1"], r"temperature -1\.0 must be >= 0"),
        (["--temperature", "inf"], r"temperature inf must be >= 0 and finite"),  # was accepted
        (["--top_k", "-2"], r"top_k -2 must be >= 0"),
        (["--max_new_tokens", "0"], r"max_new_tokens 0 must be >= 1"),
        # Custom values with presets only were silently ignored.
        (["--sampling", "greedy", "nucleus9", "--top_k", "5"],
         r"--top_k set the custom sampling configuration, which --sampling greedy nucleus9 does "
         r"not run; add custom"),
    ],
)  # fmt: skip
def test_sampling_flags_rejected_when_parsed(capsys, flags, message):
    # Bad sampling values used to surface only after the checkpoint had loaded.
    with pytest.raises(SystemExit):
        parse_args([*BASE, *flags])
    err = capsys.readouterr().err
    assert re.search(message, err), err
    if "top_p" in flags:  # only the wrong value is named, not "temperature 1.0 must be >= 0"
        assert "temperature" not in err


def test_out_under_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    # It used to fail only when the report was written, after every prompt was generated.
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        parse_args([*BASE[:4], "--out", str(tmp_path / "afile" / "r.json")])
    assert f"is under {tmp_path / 'afile'}, a file" in capsys.readouterr().err


def test_sampling_flags_accepted():
    args = parse_args([*BASE, "--sampling", "greedy", "custom", "--top_k", "5"])
    assert args.sampling == ["greedy", "custom"] and args.top_k == 5
    parse_args([*BASE, "--top_p", "0.5"])  # custom implied


def test_sampling_params_validate_names_each_problem():
    with pytest.raises(ValueError) as e:
        SamplingParams(temperature=float("nan"), top_p=0.0, top_k=-1, max_new_tokens=0).validate()
    for field in ("temperature nan", "top_p 0.0", "top_k -1", "max_new_tokens 0"):
        assert field in str(e.value)
    SamplingParams(temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=1).validate()
