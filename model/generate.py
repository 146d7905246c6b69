"""Sampling report: continuations of a prompt file, batched, with a KV cache.

    python -m model.generate --load CKPT --prompts FILE --out REPORT.json
        [--sampling greedy nucleus9 k50 custom] [--temperature T --top_p P --top_k K]
        [--max_new_tokens N] [--num_samples N] [--system TEXT | --system_preset llama2]

Prompts are rendered with ChatML (`data.chat.render_prompt`, ending in `<|im_start|>assistant\\n`)
and generation stops at `<|im_end|>` (or EOS). The report has the shape of Open-Assistant's sampling
reports (model_name, date, args, prompts[].results[].outputs), which their viewer reads, plus the
checkpoint, tokenizer and per-output token counts and stop reasons.

The decoding itself (KV cache, cached forward, sampling, batching) is `model.sampling`.
"""

import argparse
import codecs
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from data.chat import Conversation, render_prompt
from data.tokenizer import Tokenizer
from model.hf_tokenizer import checkpoint_tokenizer
from model.sampling import (
    SAMPLING_PRESETS,
    Completion,
    SamplingParams,
    check_prompt_lengths,
    generate,
    load_model,
)
from train.cpu import one_thread_unless_asked

# The system message the model card recommends (Llama-2's official one), verbatim with its
# trailing newline before <|im_end|>.
LLAMA2_SYSTEM_MESSAGE = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of "
    "answering something not correct. If you don't know the answer to a question, please don't "
    "share false information.\n"
)
SYSTEM_PRESETS = {"none": None, "llama2": LLAMA2_SYSTEM_MESSAGE}


# ----------------------------------------------------------------------------------------------
# Prompt file and report


@dataclass
class Prompt:
    text: str  # what the report shows: the (last) user message
    conversation: Conversation
    messages: list | None  # as given, when the line held a conversation
    where: str = ""  # "file:line", for errors about this prompt


def read_prompts(path: str | Path) -> list[Prompt]:
    """JSONL: each line a JSON string (a user message, as Open-Assistant's prompt lottery files),
    or {"prompt": str} or {"messages": [{"role", "content"}, ...]}, either with an optional
    "system"."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"prompt file {path} {what} (--prompts expects a JSONL file)")
    # A byte-order mark (editors on Windows write one) is not part of the first line's JSON.
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: invalid UTF-8 ({e.reason}); save the file as UTF-8"
        ) from None
    prompts = []
    # JSONL lines end at "\n" only: str.splitlines also splits at U+2028/U+2029/U+0085, which
    # JSON leaves unescaped inside strings (json.dumps(..., ensure_ascii=False) writes them raw).
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        system, messages = None, None
        if isinstance(obj, str):
            turns = [("user", obj)]
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            turns, system = [("user", obj["prompt"])], obj.get("system")
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
            messages, system = obj["messages"], obj.get("system")
            try:
                turns = [(m["role"], m["content"]) for m in messages]
            except (KeyError, TypeError):
                raise ValueError(f"{where}: each message needs 'role' and 'content'") from None
        else:
            raise ValueError(
                f'{where}: expected a JSON string, {{"prompt": ...}} or {{"messages": [...]}}'
            )
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{where}: 'system' must be a string, found {system!r:.60}")
        for k, (role, content) in enumerate(turns):
            # A number would otherwise be rendered as text, or taken as a role id.
            if not isinstance(role, str) or not isinstance(content, str):
                raise ValueError(
                    f"{where}: message {k} needs a string 'role' (system, user, assistant, "
                    f"context) and a string 'content', found {role!r:.30} / {content!r:.30}"
                )
        if system is not None and turns[0][0].strip().lower() == "system":
            # Conversation.from_messages keeps a leading system turn when a system message is
            # given, so both would be rendered, one after the other.
            raise ValueError(f"{where}: both a 'system' key and a leading system message; keep one")
        try:
            conv = Conversation.from_messages(turns, system=system)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        users = [text for role, text in turns if role in ("user", "prompter")]
        prompts.append(Prompt(users[-1] if users else turns[-1][1], conv, messages, where))
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def sampling_configs(args: argparse.Namespace) -> dict[str, SamplingParams]:
    custom = {
        k: getattr(args, k)
        for k in ("temperature", "top_p", "top_k")
        if getattr(args, k) is not None
    }
    names = args.sampling or (["custom"] if custom else ["greedy", "nucleus9"])
    if custom and "custom" not in names:
        # They only shape the custom configuration; the presets would silently run without them.
        flags = ", ".join(f"--{k}" for k in custom)
        raise ValueError(
            f"{flags} set the custom sampling configuration, which --sampling "
            f"{' '.join(names)} does not run; add custom to --sampling or leave {flags} out"
        )
    out = {}
    for name in names:
        fields = custom if name == "custom" else SAMPLING_PRESETS[name]
        if name == "custom" and "temperature" not in fields:
            fields = {"temperature": 1.0, **fields}
        out[name] = SamplingParams(**fields, max_new_tokens=args.max_new_tokens)
        out[name].validate()
    return out


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    expected = "expected auto, cpu, cuda or cuda:N"
    try:
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
    except RuntimeError:
        raise ValueError(f"--device {device!r}: {expected}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: {expected}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(
                f"--device {device!r}: this machine has {count} CUDA device(s); use --device cpu "
                "(or auto)"
            )
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def build_report(args: argparse.Namespace) -> dict:
    device, dtype = _device_and_dtype(args.device, args.dtype)
    one_thread_unless_asked(device)
    prompts = read_prompts(args.prompts)  # a bad prompt file fails before the model loads
    model, meta, iter_dir = load_model(args.load, device, dtype)
    tok: Tokenizer = checkpoint_tokenizer(meta, args.tokenizer)
    if args.num_prompts and args.num_prompts < len(prompts):
        keep = sorted(random.Random(args.seed).sample(range(len(prompts)), args.num_prompts))
        prompts = [prompts[i] for i in keep]
    elif args.num_prompts and args.num_prompts > len(prompts):
        print(
            f"model.generate: --num_prompts {args.num_prompts}: {args.prompts} holds "
            f"{len(prompts)} prompts; every one is used",
            file=sys.stderr,
        )
    system = args.system if args.system is not None else SYSTEM_PRESETS[args.system_preset]
    ids = []
    for p in prompts:
        conv = p.conversation
        if conv.system is None and system:
            conv = Conversation(turns=conv.turns, system=system)
        ids.append(render_prompt(conv, tok))
    # Before any generation, naming the prompt's line (generate only knows list indices).
    check_prompt_lengths(
        ids, model.cfg.max_position_embeddings, [f"the prompt at {p.where}" for p in prompts]
    )
    configs = sampling_configs(args)
    # <|im_end|> closes a ChatML reply; EOS ends a document for a model that was not fine-tuned
    # on ChatML (an imported Llama-2, whose HF config stops there): nothing after it is a reply.
    stop_ids = {tok.im_end_id, tok.eos_id}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    results = [[] for _ in prompts]
    total_new, t0 = 0, time.perf_counter()
    for name, params in configs.items():
        samples = 1 if params.greedy else args.num_samples
        runs = [
            generate(model, ids, params, stop_ids, tok.vocab_size, args.batch_size, generator)
            for _ in range(samples)
        ]
        for i in range(len(prompts)):
            comps = [run[i] for run in runs]
            total_new += sum(len(c.tokens) for c in comps)
            results[i].append(
                {
                    "sampling_config": name,
                    "sampling_params": asdict(params),
                    "outputs": [_decode_output(tok, c) for c in comps],
                    "output_tokens": [len(c.tokens) for c in comps],
                    # the ids themselves (stop id included): a token-by-token comparison with
                    # another runtime (transformers, TGI) needs no re-tokenizing of the text
                    "output_ids": [c.tokens for c in comps],
                    "stop_reasons": [c.stop_reason for c in comps],
                }
            )
    seconds = time.perf_counter() - t0
    cfg = meta["model"]
    return {
        "model_name": cfg.get("name", str(args.load)),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "checkpoint": {"path": str(iter_dir), "iteration": meta.get("iteration")},
        "model": cfg,
        "tokenizer": {k: tok.describe()[k] for k in ("model_path", "fingerprint", "vocab_size")},
        "system_message": system,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "stats": {
            "prompts": len(prompts),
            "generated_tokens": total_new,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(total_new / seconds, 1) if seconds > 0 else None,
        },
        "prompts": [
            {
                "prompt": p.text,
                **({"messages": p.messages} if p.messages is not None else {}),
                "prompt_tokens": len(i),
                "results": r,
            }
            for p, i, r in zip(prompts, ids, results)
        ],
    }


def _decode_output(tok: Tokenizer, c: Completion) -> str:
    # The closing <|im_end|> is the stop signal, not part of the reply.
    tokens = c.tokens[:-1] if c.stop_reason == "stop" else c.tokens
    return tok.decode(tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m model.generate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--load", required=True, help="checkpoint: save dir (follows latest) or iter dir"
    )
    p.add_argument(
        "--prompts",
        required=True,
        help='JSONL prompt file: per line a JSON string (a user message), {"prompt": str} or '
        '{"messages": [{"role", "content"}, ...]}, either with an optional "system"',
    )
    p.add_argument("--out", required=True, help="report JSON to write")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one the checkpoint names)")
    p.add_argument(
        "--sampling",
        nargs="+",
        choices=[*SAMPLING_PRESETS, "custom"],
        help="configurations to run (default: greedy nucleus9; custom when "
        "--temperature/--top_p/--top_k are given, which need custom in an explicit list)",
    )
    p.add_argument("--temperature", type=float, help="custom: softmax temperature (0 = greedy)")
    p.add_argument("--top_p", "--top-p", type=float, help="custom: nucleus mass")
    p.add_argument("--top_k", "--top-k", type=int, help="custom: keep the k most likely")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--num_samples",
        "--num-samples",
        type=int,
        default=1,
        help="outputs per prompt for sampled configurations (greedy runs once)",
    )
    p.add_argument(
        "--num_prompts",
        "--num-prompts",
        type=int,
        help="random subset of this many prompts (seeded), as the seed's 250",
    )
    p.add_argument("--batch_size", "--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    sys_group = p.add_mutually_exclusive_group()
    sys_group.add_argument("--system", help="system message for prompts that have none")
    sys_group.add_argument(
        "--system_preset",
        "--system-preset",
        choices=list(SYSTEM_PRESETS),
        default="none",
        help="llama2: the model card's recommended message",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 on GPU, fp32 on CPU",
    )
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_samples < 1:
        p.error("--batch_size and --num_samples must be >= 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        p.error("--num_prompts must be >= 1 (leave it out to use every prompt)")
    # Sampling flags are checked here too: build_report would only see them after the model
    # (minutes for a 70B checkpoint) has loaded.
    try:
        sampling_configs(args)
    except ValueError as e:
        p.error(str(e))
    # Checked before the model is loaded and the prompts generated, not when the report is due.
    if Path(args.out).is_dir():
        p.error(f"--out {args.out} is a directory; give the report's file name, e.g. report.json")
    above = next((d for d in Path(args.out).parents if d.exists()), None)
    if above is not None and not above.is_dir():
        p.error(f"--out {args.out} is under {above}, a file: give a path in a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = build_report(args)
    except (OSError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"model.generate: {msg}", file=sys.stderr)
        return 1
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # no half-written report left behind
        print(f"model.generate: cannot write the report --out {out}: {e}", file=sys.stderr)
        return 1
    s = report["stats"]
    print(
        f"wrote {out}: {s['prompts']} prompts, {s['generated_tokens']} tokens in {s['seconds']} s "
        f"({s['tokens_per_second']} tokens/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
