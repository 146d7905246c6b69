"""Command line: Megatron-LLM's flags (every flag of the seed's two argument lists, with their
Megatron-LLM meaning) plus ours. `python -m train [flags] [@file.args]`.

An `@file` argument is replaced by the flags in that file, read line by line with shell quoting
rules (`#` starts a comment), so the seed's lists can be pasted verbatim, including
`--vocab_extra_ids_list "\\"<|im_start|>,<|im_end|>\\""` and `--vocab_file=./...`. Flags given
after an @file override the file's values (argparse keeps the last occurrence).

Defaults follow Megatron-LLM's `arguments.py` except `--attention_dropout` (0.0 here: the
flash-attention path has no dropout) and `--metrics` (all four here; Megatron-LLM's default is
none, validation loss and perplexity only). Flags of a later issue fail when a run starts (not in
`--dry_run`, which only reports them).
"""

import argparse
import difflib
import re
import shlex
import sys
from pathlib import Path

METRICS = ("perplexity", "accuracy", "instruct_accuracy", "count_loss_mask")


class ArgsError(ValueError):
    """Bad command-line input; the message says what to change."""


# Megatron-LLM flags accepted so the seed's lists parse verbatim, that change nothing here: what
# each asks for is already how this trainer works. Given, each is named in the run's notes
# (start-up log and --dry_run), so none passes silently.
NO_EFFECT = {
    "use_flash_attn": ("--use_flash_attn", "attention is always the varlen flash kernel"),
    "bias_gelu_fusion": ("--no_bias_gelu_fusion", "Llama has no biases, nothing to fuse"),
    "bias_dropout_fusion": ("--no_bias_dropout_fusion", "Llama has no biases, nothing to fuse"),
    "use_multiquery_attn": (
        "--use_multiquery_attn",
        "the KV heads come from --num_attention_heads_kv (or the model preset) alone",
    ),
}


def no_effect_notes(given: set[str]) -> list[str]:
    """One note per flag of NO_EFFECT that was given (`given`: destinations, as parse_args)."""
    return [f"{flag}: accepted without effect ({why})"
            for dest, (flag, why) in NO_EFFECT.items() if dest in given]  # fmt: skip


def expand_args_files(argv: list[str]) -> list[str]:
    """Replace every `@path` by the flags in that file (recursively), shell-quoted per line."""
    out: list[str] = []
    _expand(argv, "the command line", out, [], ())
    return out


def _expand(
    argv: list[str], where: str, out: list[str], origins: list[str], stack: tuple[Path, ...]
) -> None:
    """expand_args_files into `out`, with `origins[i]` saying where out[i] came from ("FILE:LINE"
    or "the command line"), so errors can name the line to change."""
    for a in argv:
        if not a.startswith("@"):
            out.append(a)
            origins.append(where)
            continue
        path = Path(a[1:])
        within = "" if where == "the command line" else f" (at {where})"
        if not a[1:]:
            raise ArgsError(f"'@'{within} names no file: write @path/to/file.args")
        if path.is_dir():
            raise ArgsError(
                f"arguments file {path} (from {a!r}{within}) is a directory, not a file"
            )
        if not path.is_file():
            raise ArgsError(f"arguments file {path} (from {a!r}{within}) does not exist")
        if path.resolve() in stack:
            chain = " -> ".join(str(p) for p in (*stack, path.resolve()))
            raise ArgsError(f"arguments file {path} includes itself ({chain}): remove the cycle")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ArgsError(f"arguments file {path}: unreadable as text ({e})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            try:
                tokens = shlex.split(line, comments=True, posix=True)
            except ValueError as e:
                raise ArgsError(f"{path}:{lineno}: cannot parse {line.strip()!r}: {e}") from e
            _expand(tokens, f"{path}:{lineno}", out, origins, (*stack, path.resolve()))


class _Parser(argparse.ArgumentParser):
    """argparse that raises ArgsError instead of exiting, so callers (and tests) see the text."""

    def error(self, message: str):
        raise ArgsError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m train",
        description="Llama-2 SFT trainer (Megatron-LLM flags). Arguments may come from @file.args.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="preset (tiny, llama2-7b, llama2-13b, llama2-70b) or a Hugging "
        "Face config.json path; architecture flags below override its fields",
    )
    g.add_argument(
        "--model_name",
        choices=["llama", "llama2", "codellama"],
        help="Megatron-LLM model family; with it the Llama flags are mandatory, as there",
    )
    g.add_argument("--num_layers", type=int)
    g.add_argument("--hidden_size", type=int)
    g.add_argument("--ffn_hidden_size", type=int)
    g.add_argument("--num_attention_heads", type=int)
    g.add_argument("--num_attention_heads_kv", type=int, help="KV heads (GQA)")
    g.add_argument(
        "--use_multiquery_attn",
        action="store_true",
        help="Megatron-LLM's GQA switch; GQA follows --num_attention_heads_kv here",
    )
    g.add_argument("--max_position_embeddings", type=int)
    g.add_argument("--make_vocab_size_divisible_by", type=int)
    g.add_argument("--layernorm_epsilon", type=float)
    g.add_argument("--rope_theta", type=float)
    g.add_argument("--rope_scaling_factor", type=float, help="linear position interpolation")
    g.add_argument("--init_method_std", type=float)
    g.add_argument("--use_rms_norm", action="store_true", help="Llama: always RMSNorm")
    g.add_argument("--glu_activation", choices=["swiglu", "geglu", "reglu", "liglu"])
    g.add_argument("--position_embedding_type", choices=["rotary", "absolute"])
    g.add_argument(
        "--no_tie_embed_logits",
        action="store_false",
        dest="tie_embed_logits",
        default=True,
        help="untied embedding and output head (Llama)",
    )
    g.add_argument("--use_bias", action="store_true")
    g.add_argument("--use_post_ln", action="store_true")
    g.add_argument(
        "--use_flash_attn",
        action="store_true",
        help="accepted: attention is always the varlen flash kernel",
    )
    g.add_argument(
        "--no_bias_gelu_fusion",
        action="store_false",
        dest="bias_gelu_fusion",
        help="accepted: no biases, nothing to fuse",
    )
    g.add_argument(
        "--no_gradient_accumulation_fusion",
        action="store_false",
        dest="gradient_accumulation_fusion",
        help="weight-gradient GEMMs write bf16 gradients that a second pass adds into the fp32 "
        "buffer, instead of accumulating into it directly (kernels/linear.py)",
    )
    g.add_argument(
        "--no_bias_dropout_fusion",
        action="store_false",
        dest="bias_dropout_fusion",
        help="accepted: no biases, nothing to fuse",
    )

    g = p.add_argument_group("regularization")
    g.add_argument("--hidden_dropout", type=float, default=0.1)
    g.add_argument("--attention_dropout", type=float, default=0.0)
    g.add_argument(
        "--lima_dropout",
        action="store_true",
        help="layer i of L gets hidden_dropout * i / (L - 1) (0 when L = 1)",
    )
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--clip_grad", type=float, default=1.0, help="global L2 norm; 0 disables")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_eps", type=float, default=1e-8)
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")

    g = p.add_argument_group("training")
    g.add_argument("--micro_batch_size", type=int)
    g.add_argument("--global_batch_size", type=int)
    g.add_argument("--train_iters", type=int)
    g.add_argument("--train_samples", type=int)
    g.add_argument(
        "--loss_reduction",
        choices=["global", "microbatch"],
        default="global",
        help="global: mean over every loss-mask token of the global batch; "
        "microbatch: Megatron-LLM's mean of per-micro-batch means",
    )
    g.add_argument("--recompute_granularity", choices=["full", "selective"])
    g.add_argument("--recompute_activations", action="store_true", help="= selective")
    g.add_argument("--recompute_method", choices=["uniform", "block"])
    g.add_argument("--recompute_num_layers", type=int, default=1)
    g.add_argument("--bf16", action="store_true", help="bf16 model on GPU (fp32 on CPU)")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--exit_interval", type=int, help="stop after an iteration divisible by it")
    g.add_argument(
        "--exit_duration_in_mins",
        type=float,
        help="save and stop after the first iteration that ends this many minutes after the "
        "start (set-up included; all ranks stop together)",
    )
    g.add_argument(
        "--exit_signal_handler",
        action="store_true",
        help="on SIGTERM (e.g. a scheduler's pre-emption), finish the iteration, save and stop",
    )
    g.add_argument("--rampup_batch_size", nargs="*")
    g.add_argument("--use_distributed_optimizer", action="store_true")
    g.add_argument(
        "--optimizer_cpu_offload",
        action="store_true",
        help="keep the masters and Adam moments in host memory and update them on the CPU "
        "(with --use_distributed_optimizer; each DP rank keeps its share)",
    )
    g.add_argument(
        "--dry_run",
        action="store_true",
        help="validate, print the resolved config and parameter count, exit",
    )

    g = p.add_argument_group("learning rate")
    g.add_argument("--lr", type=float)
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument(
        "--lr_decay_style",
        choices=["constant", "linear", "cosine", "inverse-square-root"],
        default="linear",
    )
    g.add_argument("--lr_decay_iters", type=int)
    g.add_argument("--lr_warmup_iters", type=int, default=0)
    g.add_argument("--lr_warmup_fraction", type=float)
    g.add_argument("--lr_decay_samples", type=int)
    g.add_argument("--lr_warmup_samples", type=int, default=0)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save")
    g.add_argument("--save_interval", type=int)
    g.add_argument(
        "--keep_last_n_checkpoints",
        type=int,
        help="after each save, delete this run's older iterations in --save but the newest N "
        "(iterations numbered above the one saved are never touched); default: keep all",
    )
    g.add_argument("--load")
    g.add_argument(
        "--finetune",
        action="store_true",
        help="load weights only: iteration 0, fresh optimizer, no RNG/data restore",
    )
    g.add_argument(
        "--no_finetune",
        dest="finetune",
        action="store_false",
        help="undo an argument file's --finetune (to resume a fine-tuning run from its own --save)",
    )
    g.add_argument(
        "--overwrite_save",
        action="store_true",
        help="let this run save into a --save that holds an earlier run it does not resume "
        "(its iterations of the same number are replaced); refused without it",
    )
    g.add_argument(
        "--use_checkpoint_args",
        action="store_true",
        help="architecture flags not given here come from the checkpoint",
    )
    g.add_argument("--no_save_optim", action="store_true")
    g.add_argument("--no_save_rng", action="store_true")
    g.add_argument("--no_load_optim", action="store_true")
    g.add_argument("--no_load_rng", action="store_true")

    g = p.add_argument_group("distributed")
    g.add_argument("--tensor_model_parallel_size", type=int, default=1)
    g.add_argument("--pipeline_model_parallel_size", type=int, default=1)
    g.add_argument("--num_layers_per_virtual_pipeline_stage", type=int)
    g.add_argument("--sequence_parallel", action="store_true")
    g.add_argument("--distributed_backend", choices=["nccl", "gloo"])
    g.add_argument(
        "--distributed_timeout_minutes",
        type=float,
        default=10.0,
        help="how long a collective may wait for the slowest rank before the run fails (as in "
        "Megatron); raise it when saving or loading large checkpoints on slow storage",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data_path",
        nargs="+",
        help="pretokenized prefix: {PREFIX}-text / {PREFIX}-role (.bin/.idx); the "
        "validation split is the same prefix with -train replaced by -val",
    )
    g.add_argument("--vocab_file", help="SentencePiece tokenizer.model")
    g.add_argument("--tokenizer_type", choices=["SentencePieceTokenizer"])
    g.add_argument("--vocab_extra_ids_list", help='e.g. "<|im_start|>,<|im_end|>"')
    g.add_argument("--seq_length", type=int)
    g.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pack documents into seq_length with per-document attention "
        "(--no-packing: one padded document per row, as Megatron-LLM)",
    )
    g.add_argument(
        "--global_batch_unit",
        choices=["samples", "rows"],
        default="samples",
        help="with --packing, what --global_batch_size counts: samples (default; each step packs "
        "that many samples into the rows they need, so batch size, --train_iters and epochs mean "
        "what they meant in Megatron-LLM's one padded sample per row) or packed rows",
    )
    g.add_argument(
        "--variable_seq_lengths",
        action="store_true",
        help="without packing: pad each micro-batch to its longest document only",
    )

    g = p.add_argument_group("validation")
    g.add_argument("--eval_iters", type=int, default=100)
    g.add_argument("--eval_interval", type=int, default=1000)
    g.add_argument(
        "--metrics",
        nargs="*",
        choices=list(METRICS),
        default=list(METRICS),
        help="validation metrics besides the loss; default: all (Megatron-LLM's default: none, "
        "and it always logged perplexity)",
    )

    g = p.add_argument_group("logging")
    g.add_argument("--log_interval", type=int, default=100)
    g.add_argument("--tensorboard_dir")
    g.add_argument("--log_timers_to_tensorboard", action="store_true")
    g.add_argument("--wandb_logger", action="store_true")
    g.add_argument("--wandb_project", default="oasst-trainer")
    g.add_argument("--wandb_entity")
    g.add_argument("--wandb_id")
    g.add_argument("--run_dir", help="where metrics.jsonl goes (default: --save)")
    g.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler trace of iterations [--profile_step_start, --profile_step_end) "
        "into <run_dir>/profile/ (Chrome/Perfetto JSON and a table of the costliest ops)",
    )
    g.add_argument("--profile_step_start", type=int, default=10)
    g.add_argument("--profile_step_end", type=int, default=12)
    g.add_argument("--profile_ranks", type=int, nargs="+", default=[0])
    g.add_argument(
        "--activation_memory_report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure activation bytes per layer with/without recompute",
    )
    return p


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def _places(indices: list[int], origins: list[str]) -> str:
    """Where the tokens at `indices` came from ("" when all from the command line itself)."""
    places = list(dict.fromkeys(origins[i] for i in indices))
    return "" if places in ([], ["the command line"]) else ", ".join(places)


def _consumed(parser: argparse.ArgumentParser, argv: list[str], i: int) -> bool:
    """Whether argv[i] is the value of the flag before it (a value like any other, not stray)."""
    action = parser._option_string_actions.get(argv[i - 1]) if i else None
    return action is not None and action.nargs != 0


# Other trainers' names (Hugging Face Trainer, torchtitan) for what this one spells the
# Megatron way: difflib would offer a look-alike instead (--learning_rate -> --clip_grad).
_OTHER_NAMES = {
    "learning_rate": "--lr",
    "max_steps": "--train_iters",
    "num_train_epochs": "--train_iters or --train_samples (there are no epochs)",
    "warmup_steps": "--lr_warmup_iters",
    "warmup_ratio": "--lr_warmup_fraction",
    "lr_scheduler_type": "--lr_decay_style",
    "per_device_train_batch_size": "--micro_batch_size",
    "batch_size": "--micro_batch_size (rows a forward) and --global_batch_size (a step)",
    "gradient_accumulation_steps": (
        "--global_batch_size (= --micro_batch_size x data-parallel ranks x accumulation steps)"
    ),
    "max_grad_norm": "--clip_grad",
    "adam_epsilon": "--adam_eps",
    "output_dir": "--save",
    "resume_from_checkpoint": "--load",
    "max_seq_length": "--seq_length",
    "max_seq_len": "--seq_length",
    "seq_len": "--seq_length",
    "gradient_checkpointing": "--recompute_granularity full",
    "logging_steps": "--log_interval",
    "save_steps": "--save_interval",
    "eval_steps": "--eval_interval",
    "tensor_parallel_degree": "--tensor_model_parallel_size",
    "pipeline_parallel_degree": "--pipeline_model_parallel_size",
}


def _unknown_message(
    parser: argparse.ArgumentParser, unknown: list[str], argv: list[str], origins: list[str]
) -> str:
    known = _option_strings(parser)
    lines = []
    for u in unknown:
        stray = [i for i, a in enumerate(argv) if a == u and not _consumed(parser, argv, i)]
        at = _places(stray, origins)
        at = f" (at {at})" if at else ""
        if not u.startswith("-"):
            lines.append(f"unexpected value {u!r}{at} (no flag takes it here)")
            continue
        flag = u.split("=", 1)[0]
        guess = difflib.get_close_matches(
            flag.replace("-", "_"), [k.replace("-", "_") for k in known], n=1, cutoff=0.5
        )
        hint = ""
        other = _OTHER_NAMES.get(flag.lstrip("-").replace("-", "_").lower())
        if other:
            hint = f"; this trainer's flag for it is {other}"
        elif guess:
            real = next(k for k in known if k.replace("-", "_") == guess[0])
            hint = f"; did you mean {real}?"
        lines.append(f"unknown flag {flag}{at}{hint}")
    return "; ".join(lines)


def _occurrences(parser: argparse.ArgumentParser, argv: list[str]) -> list[tuple[str, int, str]]:
    """(dest, index, value text) of every known flag in argv; the value is the flag's own
    `=value` or the tokens up to the next flag."""
    out = []
    for i, a in enumerate(argv):
        if not a.startswith("--"):
            continue
        flag, eq, value = a.partition("=")
        action = parser._option_string_actions.get(flag)
        if action is None:
            continue
        if not eq:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            value = " ".join(argv[i + 1 : j])
        out.append((action.dest, i, f"{flag} {value}".strip()))
    return out


def _check_repeats_in_files(
    parser: argparse.ArgumentParser, argv: list[str], origins: list[str]
) -> None:
    """A flag set twice to different values inside one arguments file is a mistake (which one
    wins is invisible); after the file, on the command line or in a later file, it overrides."""
    seen: dict[tuple[str, str], tuple[str, str]] = {}  # (file, dest) -> (origin, value)
    for dest, i, value in _occurrences(parser, argv):
        origin = origins[i]
        if origin == "the command line":
            continue
        key = (origin.rsplit(":", 1)[0], dest)
        if key in seen and seen[key][1] != value:
            first, before = seen[key]
            raise ArgsError(
                f"{origin}: `{value}` contradicts `{before}` at {first}: keep one (to override a "
                "file's value, give the flag after the @file on the command line)"
            )
        seen[key] = (origin, value)


def _locate(message: str, argv: list[str], origins: list[str]) -> str:
    """Append where the flag an argparse message names was given (the lines of args files)."""
    m = re.match(r"argument (--[\w-]+)", message)
    if m is None:
        return message
    flag = m.group(1)
    at = [i for i, a in enumerate(argv) if a.split("=", 1)[0] == flag]
    bad = re.search(r"invalid .*?: '([^']*)'", message)
    if bad is not None:  # the occurrence(s) with that value
        v = bad.group(1)
        at = [i for i in at if argv[i] == f"{flag}={v}" or argv[i + 1 : i + 2] == [v]] or at
    elif "expected" in message:  # the occurrence(s) missing a value
        nexts = [argv[i + 1] for i in at if i + 1 < len(argv) and argv[i + 1].startswith("-")]
        at = [i for i in at if i + 1 >= len(argv) or argv[i + 1].startswith("-")] or at
        negative = [n for n in nexts if re.fullmatch(r"-[0-9.]+(e[-+]?[0-9]+)?", n, re.I)]
        if negative:
            message += f"; a negative value needs the = form: {flag}={negative[0]}"
    where = _places(at, origins)
    return f"{message} (at {where})" if where else message


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """Parse the command line. Returns the namespace and the set of destinations given explicitly
    (what `--use_checkpoint_args` must not override)."""
    expanded: list[str] = []
    origins: list[str] = []
    _expand(list(sys.argv[1:] if argv is None else argv), "the command line", expanded, origins, ())
    argv = expanded
    parser = build_parser()
    try:
        ns, unknown = parser.parse_known_args(argv)
    except ArgsError as e:
        raise ArgsError(_locate(str(e), argv, origins)) from None
    if unknown:
        raise ArgsError(_unknown_message(parser, unknown, argv, origins))
    _check_repeats_in_files(parser, argv, origins)
    # Which destinations were set on the command line: parse again against a namespace of sentinels.
    sentinel = object()
    probe = argparse.Namespace(**{k: sentinel for k in vars(ns)})
    parser.parse_known_args(argv, namespace=probe)
    given = {k for k, v in vars(probe).items() if v is not sentinel}
    return ns, given
