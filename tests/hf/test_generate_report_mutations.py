"""The sampling report end to end on a tiny checkpoint, pinned by a mutation pass: <|im_end|> stops
a reply, seeds, samples per configuration, the seeded prompt subset, system messages and the
report's bookkeeping (token counts, checkpoint iteration, dtype)."""

import json

import pytest
import torch

from data.chat import Conversation, render_prompt
from model.generate import main
from model.sampling import SamplingParams, generate, load_model
from train import checkpoint as ckpt


def _report(tmp_path, load, lines: list[str], *flags: str) -> dict:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.json"
    argv = ["--load", str(load), "--prompts", str(prompts), "--out", str(out), "--device", "cpu"]
    assert main([*argv, *flags]) == 0
    return json.loads(out.read_text())


def test_report_stops_at_im_end(tmp_path, random_ckpt, tokenizer):
    """<|im_end|> closes a ChatML reply: generation stops there (kept in output_ids, left out
    of the text). Without it a fine-tuned model's reply runs on into the next turn."""
    model, meta, _ = load_model(random_ckpt, torch.device("cpu"), torch.float32)
    prompt = render_prompt([("user", "hello world")], tokenizer)
    free = generate(model, [prompt], SamplingParams(max_new_tokens=3), set(), tokenizer.vocab_size)
    first, second, third = free[0].tokens
    im_end = tokenizer.im_end_id
    assert im_end not in (first, second, third) and third not in (first, second)
    # Swapping the output rows of <|im_end|> and the third greedy token makes greedy decoding
    # emit <|im_end|> third and leaves the first two tokens as they were.
    sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd["output.weight"][[im_end, third]] = sd["output.weight"][[third, im_end]]
    ckpt.write_full_checkpoint(
        tmp_path / "ckpt", 1, sd, {"model": meta["model"], "tokenizer": meta["tokenizer"]}
    )
    report = _report(
        tmp_path, tmp_path / "ckpt", ['"hello world"'], "--sampling", "greedy",
        "--max_new_tokens", "6",
    )  # fmt: skip
    (result,) = report["prompts"][0]["results"]
    assert result["stop_reasons"] == ["stop"] and result["output_ids"] == [[first, second, im_end]]
    assert result["outputs"] == [tokenizer.decode([first, second])]


def test_samples_counts_and_bookkeeping(tmp_path, random_ckpt):
    """Greedy runs once whatever --num_samples; each sampled output draws on from one seeded
    generator (two samples of a prompt differ); generated_tokens counts every output; the report
    names the checkpoint's iteration and the dtype used."""
    flags = ["--sampling", "greedy", "custom", "--temperature", "1.0", "--num_samples", "2",
             "--max_new_tokens", "4"]  # fmt: skip
    report = _report(tmp_path, random_ckpt, ['"hello world"', '"cats"'], *flags)
    for p in report["prompts"]:
        greedy, custom = p["results"]
        assert len(greedy["outputs"]) == 1 and len(custom["output_ids"]) == 2
        assert custom["output_ids"][0] != custom["output_ids"][1]
    assert report["stats"]["generated_tokens"] == sum(
        n for p in report["prompts"] for r in p["results"] for n in r["output_tokens"]
    )
    assert report["checkpoint"]["iteration"] == 1
    assert report["dtype"] == "float32" and report["device"] == "cpu"


def test_seed_decides_the_samples(tmp_path, random_ckpt):
    """--seed reproduces a report's samples and another seed gives other samples."""
    flags = ["--sampling", "nucleus9", "--max_new_tokens", "4"]

    def ids(seed: int) -> list:
        report = _report(tmp_path, random_ckpt, ['"hello world"'], *flags, "--seed", str(seed))
        return report["prompts"][0]["results"][0]["output_ids"]

    assert ids(1) == ids(1) != ids(2)


def test_num_prompts_is_a_seeded_subset_in_file_order(tmp_path, random_ckpt):
    """--num_prompts N keeps N prompts chosen by --seed, in the file's order (reports of one
    seed line up prompt by prompt), and another seed picks another subset."""
    lines = [json.dumps(f"prompt {k}") for k in range(10)]
    flags = ["--sampling", "greedy", "--max_new_tokens", "1", "--num_prompts", "4"]

    def chosen(seed: int) -> list[int]:
        report = _report(tmp_path, random_ckpt, lines, *flags, "--seed", str(seed))
        return [int(p["prompt"].split()[1]) for p in report["prompts"]]

    a, b = chosen(1), chosen(2)
    assert len(a) == len(b) == 4 and a == sorted(a) and b == sorted(b)
    assert a != b and chosen(1) == a
    # Not a subset when N covers the file: every prompt, in order.
    report = _report(tmp_path, random_ckpt, lines[:3], *flags[:-1], "3")
    assert [p["prompt"] for p in report["prompts"]] == ["prompt 0", "prompt 1", "prompt 2"]


@pytest.mark.parametrize("how", [["--system", "global message"], ["--system_preset", "llama2"]])
def test_a_prompts_own_system_message_wins(tmp_path, random_ckpt, tokenizer, how):
    """--system / --system_preset fill in prompts that have no system message; a prompt's own
    "system" is kept (it is part of the prompt being evaluated)."""
    report = _report(
        tmp_path, random_ckpt,
        [json.dumps({"prompt": "python code?", "system": "be brief"}), '"hello world"'],
        *how, "--sampling", "greedy", "--max_new_tokens", "1",
    )  # fmt: skip
    own, filled = report["prompts"]
    want = render_prompt(
        Conversation(turns=[("user", "python code?")], system="be brief"), tokenizer
    )
    assert own["prompt_tokens"] == len(want)
    glob = report["system_message"]
    assert glob is not None and filled["prompt_tokens"] == len(
        render_prompt(Conversation(turns=[("user", "hello world")], system=glob), tokenizer)
    )
