"""Generation: KV-cache decode against recomputation, against transformers, sampling, report."""

import json
from pathlib import Path

import pytest
import torch

from data.chat import render_prompt
from model.generate import LLAMA2_SYSTEM_MESSAGE, main, read_prompts
from model.sampling import (
    KVCache,
    SamplingParams,
    filter_logits,
    forward_cached,
    generate,
    load_model,
    sample_next,
)
from train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [
    [("user", "hello world")],
    [("user", "the quick brown fox jumps over a lazy dog while assistant and user talk")],
    [("system", "be brief"), ("user", "python code?"), ("assistant", "yes"), ("user", "42")],
    [("user", "cats")],
]


def _prompts(tokenizer) -> list[list[int]]:
    return [render_prompt(m, tokenizer) for m in MESSAGES]


def _greedy_without_cache(model, prompt: list[int], steps: int, stop: set[int]) -> list[int]:
    """Reference: the model's own forward over the whole sequence for every new token."""
    seq, out = list(prompt), []
    dev = model.embed.weight.device
    for _ in range(steps):
        n = len(seq)
        with torch.no_grad():
            logits = model(
                torch.tensor(seq, device=dev),
                torch.arange(n, device=dev),
                torch.tensor([0, n], dtype=torch.int32, device=dev),
                n,
            )
        tok = int(logits[-1, : model.cfg.vocab_size].argmax())
        out.append(tok)
        seq.append(tok)
        if tok in stop:
            break
    return out


def test_cached_greedy_equals_recomputation(our_model, tokenizer):
    prompts = _prompts(tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    stop = {tokenizer.im_end_id}
    # batch_size 3: prompts of different lengths share a batch, so prefill padding is exercised.
    got = generate(our_model, prompts, params, stop, tokenizer.vocab_size, batch_size=3)
    for prompt, c in zip(prompts, got):
        want = _greedy_without_cache(our_model, prompt, 10, stop)
        assert c.tokens == want
        assert c.stop_reason == ("stop" if want[-1] in stop else "length")
    assert len({tuple(c.tokens) for c in got}) > 1  # the prompts do steer the outputs


def test_greedy_equals_transformers_generate(exported, our_model, tokenizer):
    transformers = pytest.importorskip("transformers")
    # .float(), not dtype=: transformers < 4.56 calls it torch_dtype, later ones deprecate that.
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported).float()
    hf_model.eval()
    prompts = _prompts(tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    ours = generate(our_model, prompts, params, {tokenizer.im_end_id}, tokenizer.vocab_size, 4)
    for prompt, c in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
            )
        assert out[0, len(prompt) :].tolist() == c.tokens


def test_stops_at_stop_id(our_model, tokenizer):
    prompt = _prompts(tokenizer)[1]
    free = generate(
        our_model, [prompt], SamplingParams(max_new_tokens=12), set(), tokenizer.vocab_size
    )
    tokens = free[0].tokens
    assert free[0].stop_reason == "length" and len(tokens) == 12
    stop = tokens[5]
    first = tokens.index(stop)
    got = generate(
        our_model, [prompt], SamplingParams(max_new_tokens=12), {stop}, tokenizer.vocab_size
    )
    assert got[0].tokens == tokens[: first + 1] and got[0].stop_reason == "stop"


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.05, 0.6, 0.3, 0.05], [0.4, 0.05, 0.3, 0.25]]))
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingParams(temperature=0.0)).tolist() == [1, 0]
    draws = torch.stack([sample_next(logits, SamplingParams(1.0, top_k=2), g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) == {0, 2}
    # top_p 0.5: row 0 keeps {1} (0.6 >= 0.5); row 1 keeps {0, 2} (0.4 < 0.5 <= 0.7).
    draws = torch.stack(
        [sample_next(logits, SamplingParams(1.0, top_p=0.5), g) for _ in range(300)]
    )
    assert set(draws[:, 0].tolist()) == {1} and set(draws[:, 1].tolist()) == {0, 2}
    # A low temperature sharpens towards the argmax.
    draws = torch.stack([sample_next(logits, SamplingParams(0.05), g) for _ in range(100)])
    assert draws[:, 0].eq(1).all() and draws[:, 1].eq(0).all()
    with pytest.raises(ValueError):
        SamplingParams(temperature=1.0, top_p=0.0).validate()


def test_seeded_sampling_is_reproducible(our_model, tokenizer):
    prompts = _prompts(tokenizer)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=8)
    runs = [
        generate(
            our_model,
            prompts,
            params,
            {tokenizer.im_end_id},
            tokenizer.vocab_size,
            2,
            torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]]
    assert all(t < tokenizer.vocab_size for c in runs[0] for t in c.tokens)


def test_report_cli(tmp_path, imported, tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps("hello world"),
        json.dumps({"prompt": "python code?", "system": "be brief"}),
        json.dumps({"messages": [{"role": "user", "content": "cats"}]}),
    ]
    prompts.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "r" / "report.json"
    args = ["--load", str(imported), "--prompts", str(prompts), "--out", str(out)]
    assert (
        main(args + ["--max_new_tokens", "6", "--system_preset", "llama2", "--batch_size", "2"])
        == 0
    )
    report = json.loads(out.read_text())
    assert report["system_message"] == LLAMA2_SYSTEM_MESSAGE
    assert report["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert [p["prompt"] for p in report["prompts"]] == ["hello world", "python code?", "cats"]
    assert report["prompts"][2]["messages"] == [{"role": "user", "content": "cats"}]
    # The per-prompt system message wins over the preset: that prompt is much shorter.
    n_tokens = [p["prompt_tokens"] for p in report["prompts"]]
    assert n_tokens[1] < n_tokens[0] and n_tokens[0] == len(
        render_prompt([("user", "hello world")], tokenizer, system=LLAMA2_SYSTEM_MESSAGE)
    )
    for p in report["prompts"]:
        assert [r["sampling_config"] for r in p["results"]] == ["greedy", "nucleus9"]
        for r in p["results"]:
            assert len(r["outputs"]) == 1 and isinstance(r["outputs"][0], str)
            assert 1 <= r["output_tokens"][0] <= 6
            ids = r["output_ids"][0]
            assert len(ids) == r["output_tokens"][0]
            # the text is the ids decoded, the stop id left out
            kept = ids[:-1] if r["stop_reasons"][0] == "stop" else ids
            assert r["outputs"][0] == tokenizer.decode(kept)
            assert r["sampling_params"]["max_new_tokens"] == 6
    assert report["stats"]["generated_tokens"] == sum(
        r["output_tokens"][0] for p in report["prompts"] for r in p["results"]
    )
    # custom sampling with several samples per prompt
    assert main(args + ["--max_new_tokens", "4", "--top_k", "5", "--num_samples", "2"]) == 0
    report = json.loads(out.read_text())
    r = report["prompts"][0]["results"]
    assert [x["sampling_config"] for x in r] == ["custom"] and len(r[0]["outputs"]) == 2
    assert r[0]["sampling_params"] == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 5,
        "max_new_tokens": 4,
    }


def test_prompt_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_prompts(bad)
    bad.write_text('"ok"\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        read_prompts(bad)


def test_help_says_what_a_prompt_line_holds(capsys):
    # Without it the only way to learn the format was to read the bundled file or the code.
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert '{"prompt": str}' in out and '{"messages": [{"role", "content"}, ...]}' in out


def test_bundled_prompts_parse():
    prompts = read_prompts(REPO / "configs" / "prompts" / "sample_prompts.jsonl")
    assert len(prompts) >= 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cached_decode_matches_model_forward(random_ckpt, tokenizer, dtype):
    """On GPU (Triton rmsnorm/rotary/swiglu, flash attention in the model's forward): the cached
    decode's logits at every generated position match the model's full forward of the sequence,
    and in fp32 greedy decoding equals recomputation without a cache."""
    model, _, _ = load_model(random_ckpt, torch.device("cuda"), dtype)
    prompts = _prompts(tokenizer)
    stop = {tokenizer.im_end_id}
    got = generate(model, prompts, SamplingParams(max_new_tokens=10), stop, tokenizer.vocab_size, 4)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    for prompt, c in zip(prompts, got):
        seq = prompt + c.tokens
        n = len(seq)
        with torch.no_grad():
            full = model(
                torch.tensor(seq, device="cuda"),
                torch.arange(n, device="cuda"),
                torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                n,
            )
            # Prefill the prompt, then feed the generated tokens one by one through the cache.
            cache = KVCache(model, 1, n, dtype, "cuda")
            ids = torch.tensor([seq], device="cuda")
            pos = torch.arange(n, device="cuda")[None]
            step = [forward_cached(model, ids[:, : len(prompt)], pos[:, : len(prompt)], cache)[0]]
            for i in range(len(prompt), n):
                step.append(forward_cached(model, ids[:, i : i + 1], pos[:, i : i + 1], cache)[0])
            cached = torch.cat(step)
        torch.testing.assert_close(cached.float(), full.float(), **tol)
        if dtype == torch.float32:
            assert c.tokens == _greedy_without_cache(model, prompt, 10, stop)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "hi", "system": 5}', r"p\.jsonl:1: 'system' must be a string"),  # was "5"
        ('{"messages": [{"role": "user", "content": 42}]}',
         r"p\.jsonl:1: message 0 needs a string 'role' .* and a string 'content'"),
        ('{"messages": [{"role": 1, "content": "hi"}]}', r"p\.jsonl:1: message 0 needs a string"),
        (b'"ok"\n"caf\xe9"\n', r"p\.jsonl:2: invalid UTF-8"),
    ],
)  # fmt: skip
def test_prompt_values_of_the_wrong_type(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompts(path)
    with pytest.raises(FileNotFoundError, match=r"is a directory \(--prompts expects"):
        read_prompts(tmp_path)


def test_report_cli_rejects_bad_arguments_before_generating(tmp_path, random_ckpt, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hello"\n')
    base = ["--load", str(random_ckpt), "--prompts", str(prompts), "--max_new_tokens", "2"]
    # --out naming a folder used to fail only after generating (IsADirectoryError).
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "r.json"), "--num_prompts", "0"])
    assert "--num_prompts must be >= 1" in capsys.readouterr().err
    # An unknown device was a RuntimeError traceback; a missing GPU an AssertionError.
    assert main([*base, "--out", str(tmp_path / "r.json"), "--device", "gpu0"]) == 1
    assert "--device 'gpu0': expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--out", str(tmp_path / "r.json"), "--device", "cuda"]) == 1
        assert "0 CUDA device(s); use --device cpu" in capsys.readouterr().err
    # A bad prompt file is reported before the model is loaded.
    prompts.write_text('{"prompt": 3}\n')
    no_model = ["--load", str(tmp_path / "none"), "--prompts", str(prompts)]
    assert main([*no_model, "--out", str(tmp_path / "r.json")]) == 1
    assert "p.jsonl:1: expected a JSON string" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_sampled_outputs_do_not_depend_on_batch_size(our_model, tokenizer):
    # One multinomial over the batch drew all rows from one stream: the same seed gave other
    # samples for every prompt when --batch_size (a speed setting) changed.
    prompts = _prompts(tokenizer)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8)
    vocab = tokenizer.vocab_size
    runs = [
        generate(our_model, prompts, params, set(), vocab, bs, torch.Generator().manual_seed(5))
        for bs in (1, 3, 4)
    ]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]] == [c.tokens for c in runs[2]]
    other = generate(
        our_model, prompts, params, set(), tokenizer.vocab_size, 4, torch.Generator().manual_seed(6)
    )
    assert [c.tokens for c in other] != [c.tokens for c in runs[0]]  # the seed does matter


def test_filter_logits_equals_transformers_warpers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        vocab = 3 + trial % 50
        # Continuous random logits: no ties, whose order at a cut neither side defines.
        logits = torch.randn(3, vocab, generator=g) * (0.5 + trial % 7)
        temperature = 0.1 + 1.9 * float(torch.rand(1, generator=g))
        top_k = [0, 1, 5, vocab - 1, vocab + 2][trial % 5]
        top_p = [1.0, 0.9, 0.5, 0.05][trial % 4]
        warpers = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(temperature)])
        if top_k:
            warpers.append(lp.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(lp.TopPLogitsWarper(top_p))
        want = warpers(None, logits.clone()).softmax(-1)
        got = filter_logits(logits, SamplingParams(temperature, top_p, top_k)).softmax(-1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prompt_at_the_position_limit_batched_with_a_short_one(our_model, tokenizer):
    # A prompt of max_position_embeddings - 1 tokens has room for one token; sharing a batch with
    # a short prompt must not cut that one short or let it see the long row's slots.
    max_pos = our_model.cfg.max_position_embeddings
    g = torch.Generator().manual_seed(1)
    long = torch.randint(tokenizer.base_vocab_size, (max_pos - 1,), generator=g).tolist()
    short = _prompts(tokenizer)[0]
    got = generate(
        our_model, [long, short], SamplingParams(max_new_tokens=4), set(), tokenizer.vocab_size, 2
    )
    assert got[0].stop_reason == "length" and got[0].tokens == _greedy_without_cache(
        our_model, long, 1, set()
    )
    assert got[1].tokens == _greedy_without_cache(our_model, short, 4, set())


def test_overlong_prompt_is_named(tmp_path, random_ckpt, tokenizer, capsys):
    model, _, _ = load_model(random_ckpt, torch.device("cpu"), torch.float32)
    max_pos = model.cfg.max_position_embeddings
    short, long = [5, 6, 7], [5] * max_pos
    # Sorted by length, the long prompt was "prompt 0" of its batch: the wrong prompt.
    with pytest.raises(ValueError, match=rf"prompt 1 has {max_pos} tokens"):
        generate(model, [short, long], SamplingParams(max_new_tokens=2), set(), 10, batch_size=2)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hi"\n\n' + json.dumps(" ".join(["fox"] * max_pos)) + "\n")
    out = tmp_path / "r.json"
    assert main(["--load", str(random_ckpt), "--prompts", str(prompts), "--out", str(out)]) == 1
    assert f"the prompt at {prompts}:3 has " in capsys.readouterr().err


def test_report_stops_at_eos(tmp_path, random_ckpt, tokenizer):
    """A model that emits EOS (an imported base Llama-2; its HF config stops there) ends its
    reply there: it used to run on past it until <|im_end|> or the token limit."""
    model, meta, _ = load_model(random_ckpt, torch.device("cpu"), torch.float32)
    prompt = render_prompt([("user", "hello world")], tokenizer)
    free = generate(model, [prompt], SamplingParams(max_new_tokens=3), set(), tokenizer.vocab_size)
    first, second, third = free[0].tokens
    eos = tokenizer.eos_id
    assert eos not in (first, second, third) and third not in (first, second)
    # Swapping the output rows of EOS and of the third greedy token makes greedy decoding emit
    # EOS third, and leaves the first two tokens as they were.
    sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd["output.weight"][[eos, third]] = sd["output.weight"][[third, eos]]
    ckpt.write_full_checkpoint(
        tmp_path / "ckpt", 1, sd, {"model": meta["model"], "tokenizer": meta["tokenizer"]}
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hello world"\n')
    out = tmp_path / "r.json"
    argv = ["--load", str(tmp_path / "ckpt"), "--prompts", str(prompts), "--out", str(out)]
    assert main([*argv, "--sampling", "greedy", "--max_new_tokens", "6"]) == 0
    (result,) = json.loads(out.read_text())["prompts"][0]["results"]
    assert result["stop_reasons"] == ["stop"] and result["output_tokens"] == [3]
    assert result["outputs"] == [tokenizer.decode([first, second])]


def test_more_prompts_asked_than_the_file_holds_says_so(tmp_path, random_ckpt, capsys):
    """--num_prompts above the file's count uses every prompt and says so (the seed's 250 asked
    of a shorter file would otherwise look like a sampled subset in the report)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hi"\n"there"\n')
    out = tmp_path / "r.json"
    argv = ["--load", str(random_ckpt), "--prompts", str(prompts), "--out", str(out),
            "--sampling", "greedy", "--max_new_tokens", "1"]  # fmt: skip
    assert main([*argv, "--num_prompts", "250"]) == 0
    assert f"--num_prompts 250: {prompts} holds 2 prompts; every one is used" in (
        capsys.readouterr().err
    )
    assert len(json.loads(out.read_text())["prompts"]) == 2
    assert main([*argv, "--num_prompts", "1"]) == 0
    assert "--num_prompts" not in capsys.readouterr().err
    assert len(json.loads(out.read_text())["prompts"]) == 1


@pytest.mark.parametrize("omp", [None, "2"])
def test_cpu_sampling_runs_one_thread_unless_asked(tmp_path, random_ckpt, monkeypatch, omp):
    """Two OpenMP threads on a 2-core machine with a core taken by another process made the
    sampling report 13 to 36 times slower (spinning threads); as training, the CPU path now
    runs one intra-op thread unless OMP_NUM_THREADS says otherwise."""
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hello world"\n')
    argv = ["--load", str(random_ckpt), "--prompts", str(prompts), "--out",
            str(tmp_path / "r.json"), "--max_new_tokens", "1", "--device", "cpu"]  # fmt: skip
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(argv) == 0
        assert torch.get_num_threads() == (1 if omp is None else 2)
    finally:
        torch.set_num_threads(before)
