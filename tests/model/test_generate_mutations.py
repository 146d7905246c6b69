"""model.generate without a model, pinned by a mutation pass: prompt-file shapes, CLI defaults and
bounds, --device/--dtype mapping, and main's error paths (message text, no leftover temp file)."""

import json

import pytest
import torch

from model import generate as gen
from model.generate import _device_and_dtype, main, parse_args, read_prompts

BASE = ["--load", "ckpt", "--prompts", "p.jsonl", "--out", "r.json"]


def _write(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize(
    "line, message",
    [
        # An empty list is not a conversation: it used to reach turns[-1] (an IndexError).
        ('{"messages": []}', r'expected a JSON string, \{"prompt": ...\}'),
        # A message that is not an object: m["role"] raises TypeError, not KeyError.
        ('{"messages": ["hi"]}', r"each message needs 'role' and 'content'"),
        ('{"messages": [{"role": "user"}]}', r"each message needs 'role' and 'content'"),
    ],
)
def test_malformed_messages_are_a_value_error_naming_the_line(tmp_path, line, message):
    """A malformed conversation is a ValueError with file:line, which main reports in one line;
    an IndexError or TypeError would escape main as a traceback."""
    path = tmp_path / "p.jsonl"
    _write(path, ['"ok"', line])
    with pytest.raises(ValueError, match=rf"p\.jsonl:2: {message}"):
        read_prompts(path)


def test_prompt_text_is_the_last_user_message(tmp_path):
    """The report's "prompt" is what the user asked last: the last user (or Open-Assistant's
    "prompter") turn, else the last turn. The viewer shows it as the question answered."""
    path = tmp_path / "p.jsonl"
    multi = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "follow-up"},
    ]
    prompter = [
        {"role": "prompter", "content": "oa question"},
        {"role": "assistant", "content": "oa answer"},
    ]
    no_user = [
        {"role": "assistant", "content": "one"},
        {"role": "assistant", "content": "two"},
    ]
    _write(path, [json.dumps({"messages": m}) for m in (multi, prompter, no_user)])
    assert [p.text for p in read_prompts(path)] == ["follow-up", "oa question", "two"]


def test_a_file_without_prompts_is_refused(tmp_path):
    """Blank lines only: an empty report (and a model load for nothing) would hide the mistake."""
    path = tmp_path / "p.jsonl"
    path.write_text("\n  \n\r\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(path)


@pytest.mark.parametrize("flag", ["--batch_size", "--num_samples"])
def test_batch_size_and_num_samples_below_1_are_refused(flag, capsys):
    """0 would make an empty batch loop (no outputs) or a report with no samples."""
    with pytest.raises(SystemExit):
        parse_args([*BASE, flag, "0"])
    assert "--batch_size and --num_samples must be >= 1" in capsys.readouterr().err
    assert getattr(parse_args([*BASE, flag, "1"]), flag[2:]) == 1


def test_defaults():
    """The defaults a report's args record and a rerun relies on: seed 42 (reruns reproduce),
    256 new tokens, batches of 8, one sample, no system message, auto device and dtype."""
    a = parse_args(BASE)
    assert (a.seed, a.max_new_tokens, a.batch_size, a.num_samples) == (42, 256, 8, 1)
    assert (a.system, a.system_preset, a.num_prompts) == (None, "none", None)
    assert (a.device, a.dtype, a.sampling) == ("auto", "auto", None)


def test_device_and_dtype_mapping():
    """--dtype names map to their torch dtypes, auto is fp32 on CPU (bf16 matmuls on CPU are
    slow and lossy), and a device that is neither CPU nor CUDA is refused."""
    cpu = torch.device("cpu")
    assert _device_and_dtype("cpu", "auto") == (cpu, torch.float32)
    assert _device_and_dtype("cpu", "fp32") == (cpu, torch.float32)
    assert _device_and_dtype("cpu", "bf16") == (cpu, torch.bfloat16)
    assert _device_and_dtype("cpu", "fp16") == (cpu, torch.float16)
    for bad in ("meta", "mps"):
        with pytest.raises(ValueError, match=rf"--device '{bad}': expected auto, cpu, cuda"):
            _device_and_dtype(bad, "auto")


def test_a_key_error_is_reported_without_quotes(tmp_path, monkeypatch, capsys):
    """A KeyError (a tensor missing from the checkpoint) carries its message as args[0]; str()
    of it would wrap the whole message in quotes."""

    def missing(args):
        raise KeyError("ckpt: tensor 'output.weight' is missing")

    monkeypatch.setattr(gen, "build_report", missing)
    assert main(["--load", "x", "--prompts", "p", "--out", str(tmp_path / "r.json")]) == 1
    assert capsys.readouterr().err == ("model.generate: ckpt: tensor 'output.weight' is missing\n")


def test_a_failed_report_write_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    """The report is written to a hidden temporary file and renamed; when the rename fails the
    temporary file is removed and nothing is left where --out points."""
    report = {"stats": {"prompts": 1, "generated_tokens": 1, "seconds": 1.0,
                        "tokens_per_second": 1.0}}  # fmt: skip
    monkeypatch.setattr(gen, "build_report", lambda args: report)

    def fail(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(gen.os, "replace", fail)
    out = tmp_path / "r.json"
    assert main(["--load", "x", "--prompts", "p", "--out", str(out)]) == 1
    assert "cannot write the report --out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
