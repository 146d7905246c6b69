"""Parsed Megatron-LLM flags -> RunConfig: the model from --model / the checkpoint / explicit
flags, the vocabulary, the parallel layout, and every check, so that all problems are reported
together (ArgsError) before any work starts."""

import json
import math
import os
from pathlib import Path

from model.config import PRESETS, ModelConfig
from train.args import ArgsError
from train.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    LoopConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
)
from train.describe import megatron_differences

# Llama-2's SentencePiece model has 32000 pieces; Megatron-LLM adds <CLS> <SEP> <EOD> <MASK> <PAD>.
LLAMA2_BASE_VOCAB = 32000
MEGATRON_SPECIALS = 5


ARCH_FLAGS = {  # flag dest -> ModelConfig field
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_attention_heads_kv": "num_kv_heads",
    "max_position_embeddings": "max_position_embeddings",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
    "layernorm_epsilon": "norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling_factor": "rope_scaling_factor",
    "init_method_std": "init_std",
}


def _fail(problems: list[str]) -> None:
    if problems:
        raise ArgsError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _refuse_unsupported(ns, problems: list[str]) -> None:
    """Megatron flags whose feature this trainer does not have (the message says what to use)."""
    if ns.fp16:
        problems.append("--fp16 (loss-scaled fp16) is not supported: use --bf16")
    if ns.train_samples is not None or ns.lr_decay_samples is not None or ns.lr_warmup_samples:
        problems.append(
            "sample-based training (--train_samples/--lr_decay_samples/--lr_warmup_samples) is not "
            "supported: give --train_iters, --lr_decay_iters, --lr_warmup_iters"
        )
    if ns.rampup_batch_size:
        problems.append("--rampup_batch_size is not supported: use a constant --global_batch_size")
    if ns.optimizer != "adam":
        problems.append(f"--optimizer {ns.optimizer}: only adam (AdamW) is implemented")
    if ns.optimizer_cpu_offload and not ns.use_distributed_optimizer:
        problems.append(
            "--optimizer_cpu_offload needs --use_distributed_optimizer (as in Megatron): add it, "
            "and each data-parallel rank keeps only its share of the state in host memory"
        )
    if ns.data_path and len(ns.data_path) > 1:
        problems.append(
            f"--data_path takes one pretokenized prefix, got {ns.data_path}: blends are made by "
            "the pretokenizer's dataset mix (configs/data/*.yaml)"
        )
    # The architecture is Llama: contradicting flags are errors, as in Megatron-LLM's LlamaModel.
    if ns.glu_activation not in (None, "swiglu"):
        problems.append(f"--glu_activation {ns.glu_activation}: Llama uses swiglu")
    if ns.position_embedding_type not in (None, "rotary"):
        problems.append(
            f"--position_embedding_type {ns.position_embedding_type}: Llama uses rotary"
        )
    if ns.use_bias:
        problems.append("--use_bias: Llama has no biases")
    if ns.use_post_ln:
        problems.append("--use_post_ln: Llama is pre-norm")
    if ns.model_name is not None:
        missing = []
        if not ns.use_rms_norm:
            missing.append("--use_rms_norm")
        if ns.glu_activation != "swiglu":
            missing.append("--glu_activation swiglu")
        if ns.position_embedding_type != "rotary":
            missing.append("--position_embedding_type rotary")
        if ns.tie_embed_logits:
            missing.append("--no_tie_embed_logits")
        if missing:
            problems.append(
                f"--model_name {ns.model_name} needs {', '.join(missing)} (mandatory for Llama in "
                "Megatron-LLM); or drop --model_name, and the Llama architecture is implied"
            )


def _base_model(ns, given: set[str], rc_notes: list[str], unchecked: list[str]):
    """ModelConfig before vocabulary: --model, then the checkpoint's (--use_checkpoint_args),
    then explicit architecture flags. Returns (config or None, checkpoint meta or None)."""
    cfg = None
    if ns.model:
        if ns.model in PRESETS:
            cfg = PRESETS[ns.model]
        elif ns.model.endswith(".json") or Path(ns.model).is_dir():
            path = Path(ns.model)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise ArgsError(f"--model {ns.model}: {path} does not exist")
            try:
                hf = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(hf, dict):
                    raise ValueError(f"expected a JSON object, found {type(hf).__name__}")
                cfg = ModelConfig.from_hf_config(hf, name=f"hf:{path}")
            except KeyError as e:
                raise ArgsError(
                    f"--model {path}: no {e} key; a Hugging Face Llama config.json has it"
                ) from None
            except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
                raise ArgsError(
                    f"--model {path}: not a usable Hugging Face Llama config.json ({e})"
                ) from None
        else:
            raise ArgsError(
                f"--model {ns.model!r}: not a preset ({', '.join(PRESETS)}) nor a Hugging Face "
                "config.json path"
            )
    meta = None
    if ns.load:
        from train import checkpoint as ckpt

        try:
            meta = ckpt.read_meta(ckpt.resolve_iteration_dir(ns.load))
        except ckpt.CheckpointError as e:
            if Path(ns.load).exists():  # here and unusable: the run would fail on it
                raise ArgsError(f"--load {ns.load}: {e}") from None
            unchecked.append(f"--load {ns.load}: {e}")  # maybe on the machine that trains
    if ns.use_checkpoint_args and meta is not None:
        saved = ModelConfig.from_dict(meta["model"])
        arch = {f: getattr(saved, f) for f in ARCH_FLAGS.values()}
        arch.update(name=saved.name, vocab_size=saved.vocab_size)
        if cfg is not None and any(getattr(cfg, k) != v for k, v in arch.items() if k != "name"):
            rc_notes.append(
                f"--use_checkpoint_args: the checkpoint's architecture overrides --model {ns.model}"
            )
        cfg = (cfg or ModelConfig()).replace(**arch)
    elif ns.use_checkpoint_args and cfg is None:
        unchecked.append(
            "--use_checkpoint_args: checkpoint unreadable, architecture not known from it"
        )
    overrides = {ARCH_FLAGS[k]: getattr(ns, k) for k in ARCH_FLAGS if k in given}
    if cfg is None:
        required = ("num_layers", "hidden_size", "num_attention_heads")
        if not all(k in given for k in required):
            raise ArgsError(
                "the model architecture is not known: pass --model (a preset or HF config.json), "
                "--load with --use_checkpoint_args, or --num_layers/--hidden_size/"
                "--num_attention_heads (and --ffn_hidden_size, --num_attention_heads_kv)"
            )
        cfg = ModelConfig(name="custom")
        overrides.setdefault("num_kv_heads", overrides["num_attention_heads"])
        overrides.setdefault("ffn_hidden_size", 4 * overrides["hidden_size"])
    if overrides:
        cfg = cfg.replace(**overrides)
    return cfg, meta


def _check_architecture(model: ModelConfig) -> list[str]:
    """Sizes the model divides by or allocates with, named by their flag (the value may also have
    come from --model, a config.json or the checkpoint): checked before any arithmetic on them."""
    flag = {v: k for k, v in ARCH_FLAGS.items()}
    problems = []
    sizes = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_kv_heads",
             "max_position_embeddings", "make_vocab_size_divisible_by")  # fmt: skip
    for f in sizes:
        if getattr(model, f) < 1:
            problems.append(f"--{flag[f]} {getattr(model, f)}: must be >= 1")
    for f in ("rope_theta", "rope_scaling_factor", "norm_eps"):
        if not 0 < getattr(model, f) < math.inf:
            problems.append(f"--{flag[f]} {getattr(model, f)}: must be > 0 and finite")
    if not 0 <= model.init_std < math.inf:
        problems.append(f"--init_method_std {model.init_std}: must be >= 0 and finite")
    return problems


def _check_ranges(ns) -> list[str]:
    """Numeric flags outside the range they mean anything in (the loader, the schedule and AdamW
    would otherwise fail deep inside, or train silently on nonsense)."""
    problems = []
    at_least = {"global_batch_size": 1, "seq_length": 2, "lr_decay_iters": 1, "exit_interval": 1,
                "lr_warmup_iters": 0, "keep_last_n_checkpoints": 1, "seed": 0}  # fmt: skip
    for name, low in at_least.items():
        v = getattr(ns, name)
        if v is not None and v < low:
            problems.append(f"--{name} {v}: must be >= {low}")
    if ns.exit_duration_in_mins is not None and not ns.exit_duration_in_mins > 0:
        problems.append(f"--exit_duration_in_mins {ns.exit_duration_in_mins:g}: must be > 0")
    if not 0 < ns.distributed_timeout_minutes < math.inf:  # a timedelta cannot hold inf
        problems.append(
            f"--distributed_timeout_minutes {ns.distributed_timeout_minutes}: must be > 0 and "
            "finite"
        )
    for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
        v = getattr(ns, name)
        if v is not None and not v >= 0:  # also NaN
            problems.append(f"--{name} {v}: must be >= 0")
        elif name != "clip_grad" and v == math.inf:  # clip_grad inf only never clips
            problems.append(f"--{name} {v}: must be >= 0 and finite")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(ns, name)
        if not 0 <= v < 1:
            problems.append(f"--{name} {v}: must be in [0, 1)")
    if not 0 < ns.adam_eps < math.inf:  # Adam divides by sqrt(v) + eps; v is 0 on unused rows
        problems.append(f"--adam_eps {ns.adam_eps}: must be > 0 and finite")
    if ns.lr_warmup_fraction is not None and not 0 <= ns.lr_warmup_fraction <= 1:
        problems.append(f"--lr_warmup_fraction {ns.lr_warmup_fraction}: must be in [0, 1]")
    return problems


def _check_output_dirs(ns) -> list[str]:
    """Output directories that cannot be directories (a file there or above): found now, not
    when the first metrics line or checkpoint is written. Writability is checked when a run
    starts (train.main), on the machine that writes."""
    problems = []
    for flag, value in (("--save", ns.save), ("--run_dir", ns.run_dir),
                        ("--tensorboard_dir", ns.tensorboard_dir)):  # fmt: skip
        if not value:
            continue
        path = Path(value)
        for p in (path, *path.parents):
            if p.exists():
                if not p.is_dir():
                    where = "is a file" if p == path else f"is under {p}, a file"
                    problems.append(f"{flag} {value} {where}: give a directory")
                break
    return problems


def _vocab_size(ns, meta, extra_ids: list[str], notes: list[str], unchecked: list[str]) -> int:
    """The tokenizer's vocabulary (Megatron-LLM layout), from the tokenizer file when present."""
    if ns.vocab_file and Path(ns.vocab_file).is_file():
        from data.tokenizer import Tokenizer

        try:
            return Tokenizer(ns.vocab_file, extra_ids).vocab_size
        except (OSError, ValueError) as e:
            raise ArgsError(
                f"--vocab_file {ns.vocab_file}: {e}; pass the SentencePiece tokenizer.model the "
                "data was pretokenized with"
            ) from None
    if meta is not None:
        notes.append(f"vocabulary size {meta['vocab_size']} taken from the checkpoint")
        return int(meta["vocab_size"])
    v = LLAMA2_BASE_VOCAB + MEGATRON_SPECIALS + len(extra_ids)
    unchecked.append(
        f"--vocab_file {ns.vocab_file}: not found here; vocabulary assumed to be Llama-2's "
        f"32000 pieces + 5 Megatron specials + {len(extra_ids)} extra ids = {v}"
    )
    return v


def resolve(ns, given: set[str], world_size: int | None = None) -> RunConfig:
    """Validate the flags and build the run configuration; raise ArgsError listing every problem.

    world_size: processes of the run (default: $WORLD_SIZE, or tp * pp when not launched, which
    a dry run reports)."""
    problems: list[str] = []
    notes: list[str] = []
    deferred: list[str] = []
    unchecked: list[str] = []
    _refuse_unsupported(ns, problems)
    _fail(problems)

    from data.tokenizer import parse_extra_ids

    extra_ids = parse_extra_ids(ns.vocab_extra_ids_list)
    base, meta = _base_model(ns, given, notes, unchecked)
    vocab = _vocab_size(ns, meta, extra_ids, notes, unchecked)
    model = base.replace(
        vocab_size=vocab,
        hidden_dropout=ns.hidden_dropout,
        attention_dropout=ns.attention_dropout,
        lima_dropout=ns.lima_dropout,
    )
    _fail(_check_architecture(model))

    tp, pp = ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        _fail([f"parallel sizes must be >= 1 (tensor {tp}, pipeline {pp})"])
    if world_size is None:
        env = os.environ.get("WORLD_SIZE")
        if env is None:
            world_size = tp * pp
            if ns.dry_run and tp * pp > 1:
                notes.append(
                    f"world size assumed {world_size} (tp x pp, data parallel 1); set WORLD_SIZE "
                    "to check another"
                )
        else:
            try:
                world_size = int(env)
            except ValueError:
                world_size = 0
            if world_size < 1:
                _fail([f"environment variable WORLD_SIZE={env!r}: expected a process count >= 1 "
                       "(torchrun sets it; unset it for a single process)"])  # fmt: skip
    if world_size % (tp * pp):
        problems.append(
            f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) "
            "parallel size"
        )
    dp = max(1, world_size // (tp * pp))
    if ns.profile and not any(0 <= r < world_size for r in ns.profile_ranks):
        notes.append(
            f"--profile_ranks {' '.join(map(str, ns.profile_ranks))}: no such rank at world size "
            f"{world_size} (ranks 0 to {world_size - 1}), so nothing is traced"
        )
    sp = ns.sequence_parallel and tp > 1
    if ns.sequence_parallel and tp == 1:
        notes.append("--sequence_parallel ignored at tensor parallel size 1 (as Megatron)")
    vsl = ns.num_layers_per_virtual_pipeline_stage
    if vsl is not None:
        if pp < 2:
            problems.append(
                "--num_layers_per_virtual_pipeline_stage (interleaved 1F1B) needs "
                "--pipeline_model_parallel_size > 1"
            )
        elif vsl < 1 or model.num_layers % (pp * vsl):
            problems.append(
                f"--num_layers_per_virtual_pipeline_stage {vsl} x pipeline size {pp} must divide "
                f"num_layers {model.num_layers} (each rank holds num_layers / (pp x that) chunks)"
            )
    if sp and ns.micro_batch_size and ns.seq_length and (ns.micro_batch_size * ns.seq_length) % tp:
        problems.append(
            f"--sequence_parallel splits each micro-batch's {ns.micro_batch_size} x "
            f"{ns.seq_length} tokens over tensor parallel size {tp}: make micro_batch_size x "
            f"seq_length divisible by {tp}"
        )
    padded_short = ns.variable_seq_lengths and not ns.packing
    if sp and padded_short and ns.micro_batch_size and (ns.micro_batch_size * 16) % tp:
        # Rows are then padded to a multiple of 16 tokens, not to seq_length: a short
        # micro-batch (training or validation) would not split evenly, hours into the run.
        problems.append(
            f"--sequence_parallel with --variable_seq_lengths: micro-batches of "
            f"{ns.micro_batch_size} rows padded to a multiple of 16 tokens do not split over "
            f"tensor parallel size {tp}; make micro_batch_size x 16 divisible by {tp}, or drop "
            "--variable_seq_lengths"
        )
    if pp > 1 and ns.variable_seq_lengths:
        problems.append(
            "--variable_seq_lengths with pipeline parallelism: stage boundaries need one "
            "activation shape per step (micro_batch_size x seq_length); drop the flag or use "
            "pipeline size 1"
        )
    if model.num_layers % pp:
        problems.append(
            f"num_layers {model.num_layers} is not divisible by pipeline parallel size {pp}"
        )
    try:
        model.validate(tp)
    except ValueError as e:
        problems.append(str(e))

    if ns.micro_batch_size is None or ns.micro_batch_size < 1:
        given = "" if ns.micro_batch_size is None else f" (got {ns.micro_batch_size})"
        problems.append(f"--micro_batch_size (>= 1) is required{given}")
    micro = ns.micro_batch_size or 1
    global_bs = ns.global_batch_size if ns.global_batch_size is not None else micro * dp
    by_samples = ns.packing and ns.global_batch_unit == "samples"
    if by_samples:
        # Each DP rank packs its equal share of the samples into the rows they need; the
        # micro-batch count follows from the data (interleaved 1F1B gets filler micro-batches).
        if global_bs % dp:
            problems.append(
                f"--global_batch_size {global_bs} samples is not divisible by data parallel size "
                f"{dp}"
            )
    elif global_bs % (micro * dp):
        problems.append(
            f"--global_batch_size {global_bs} is not divisible by --micro_batch_size {micro} x "
            f"data parallel size {dp}"
        )
    elif vsl is not None and (global_bs // (micro * dp)) % pp:
        problems.append(
            f"interleaved 1F1B (--num_layers_per_virtual_pipeline_stage) needs the micro-batches "
            f"per step ({global_bs // (micro * dp)} = global_batch_size {global_bs} / "
            f"(micro_batch_size {micro} x data parallel size {dp})) to be a multiple of pipeline "
            f"size {pp}: raise --global_batch_size or drop the flag"
        )
    if ns.seq_length is None:
        problems.append("--seq_length is required")
    elif ns.seq_length > model.max_position_embeddings:
        problems.append(
            f"--seq_length {ns.seq_length} exceeds max_position_embeddings "
            f"{model.max_position_embeddings}"
        )
    if not ns.train_iters or ns.train_iters < 1:
        given = "" if ns.train_iters is None else f" (got {ns.train_iters})"
        problems.append(f"--train_iters (>= 1) is required{given}")
    if ns.lr is None:
        problems.append("--lr is required")
    elif ns.min_lr > ns.lr:
        problems.append(
            f"--min_lr {ns.min_lr} exceeds --lr {ns.lr}: the schedule decays from --lr down to "
            "--min_lr; lower --min_lr or raise --lr"
        )
    if ns.lr_warmup_fraction is not None and ns.lr_warmup_iters:
        problems.append("give only one of --lr_warmup_fraction and --lr_warmup_iters")
    if not ns.data_path:
        problems.append("--data_path is required")
    for name in ("log_interval", "eval_interval"):
        if getattr(ns, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if ns.eval_iters < 0:
        problems.append("--eval_iters must be >= 0")
    if ns.save_interval is not None and ns.save_interval < 1:
        problems.append("--save_interval must be >= 1")
    elif ns.save_interval is not None and not ns.save:
        # A note, not an error: an args file's --save_interval with the --save left out on
        # purpose (a trial run, a benchmark) is a run users mean, as in Megatron-LLM.
        notes.append(
            f"--save_interval {ns.save_interval} without --save: no checkpoint will be written "
            "(give --save DIR to keep them)"
        )
    if ns.finetune and not ns.load:
        problems.append("--finetune needs --load (the weights to start from)")
    if ns.use_checkpoint_args and not ns.load:
        problems.append("--use_checkpoint_args needs --load")
    granularity = "selective" if ns.recompute_activations else (ns.recompute_granularity or "none")
    method = ns.recompute_method
    if granularity == "selective" and method is not None:
        problems.append(
            "--recompute_method applies to --recompute_granularity full only (as Megatron)"
        )
    if granularity == "full" and method is None:
        method = "uniform"
        notes.append("--recompute_granularity full without --recompute_method: uniform")
    if ns.recompute_num_layers < 1:
        problems.append("--recompute_num_layers must be >= 1")
    if ns.profile:
        start, end = ns.profile_step_start, ns.profile_step_end
        if not 1 <= start < end:
            problems.append(
                f"--profile_step_start {start} / --profile_step_end {end}: want 1 <= start < end "
                "(iterations [start, end) are traced)"
            )
        elif ns.train_iters is not None and start > ns.train_iters:
            problems.append(
                f"--profile_step_start {start} is past --train_iters {ns.train_iters}: nothing "
                "would be traced"
            )
        if not (ns.run_dir or ns.save):
            problems.append("--profile writes into <run_dir>/profile: give --run_dir or --save")
        negative = [r for r in ns.profile_ranks if r < 0]
        if negative:
            problems.append(
                f"--profile_ranks {' '.join(map(str, negative))}: ranks are numbered from 0"
            )
    problems += _check_ranges(ns)
    problems += _check_output_dirs(ns)
    _fail(problems)

    train_iters = ns.train_iters
    decay_iters = ns.lr_decay_iters if ns.lr_decay_iters is not None else train_iters
    warmup = ns.lr_warmup_iters
    if ns.lr_warmup_fraction is not None:
        exact = ns.lr_warmup_fraction * decay_iters
        warmup = int(exact)
        # The schedule counts whole iterations; Megatron divides by the fractional count, so
        # its ramp is a little shallower. Say so when the two differ (0 means no warm-up at all).
        if exact != warmup:
            notes.append(
                f"--lr_warmup_fraction {ns.lr_warmup_fraction} of {decay_iters} decay iterations "
                f"is {exact:g}: warm-up over {warmup} whole iteration(s)"
                + (" (none: give --lr_warmup_iters 1 or more for a warm-up)" if warmup == 0 else "")
            )
    if warmup > decay_iters and ns.lr_decay_style != "constant":
        source = "--lr_decay_iters" if ns.lr_decay_iters is not None else "--train_iters"
        msg = (f"warm-up ({warmup} iterations, --lr_warmup_iters) is longer than the decay "
               f"({decay_iters}, {source}): lower --lr_warmup_iters or raise {source}")  # fmt: skip
        _fail([msg])

    prefix = ns.data_path[0]
    valid = prefix[: -len("-train")] + "-val" if prefix.endswith("-train") else None
    if valid is None:
        notes.append(f"--data_path {prefix} does not end in -train: no validation split")
    notes.extend(megatron_differences(ns, prefix, valid, global_bs, train_iters))

    if tp > 1:
        try:
            import parallel.parallelize  # noqa: F401
        except ImportError:
            deferred.append(
                f"--tensor_model_parallel_size {tp}: tensor parallelism arrives with the parallel "
                "runtime issue (parallel/parallelize.py)"
            )
    if (ns.exit_signal_handler or ns.exit_duration_in_mins is not None) and not ns.save:
        notes.append(
            "--exit_signal_handler / --exit_duration_in_mins without --save: the run stops "
            "early without a checkpoint to resume from"
        )
    if ns.bf16:
        notes.append("--bf16: bf16 model on GPU with fp32 master weights; fp32 everywhere on CPU")
    for flag, value in (("--vocab_file", ns.vocab_file), ("--load", ns.load)):
        if value and not Path(value).exists() and not any(value in u for u in unchecked):
            unchecked.append(f"{flag} {value}: not found here")
    for suffix in ("-text.idx", "-text.bin", "-role.idx", "-role.bin"):
        if not Path(prefix + suffix).is_file():
            unchecked.append(f"--data_path: {prefix}{suffix} not found here")
            break

    most_micro = -(-global_bs // (micro * dp))  # by_samples: at most (a row holds >= 1 sample)
    if vsl and model.num_layers // (pp * vsl) > 1:  # interleaved: fillers to a multiple of pp
        most_micro = -(-most_micro // pp) * pp
    return RunConfig(
        model=model,
        parallel=ParallelConfig(
            tp,
            pp,
            dp,
            sp,
            ns.num_layers_per_virtual_pipeline_stage,
            ns.distributed_backend,
            ns.distributed_timeout_minutes,
        ),
        data=DataConfig(
            prefix,
            valid,
            ns.vocab_file,
            ns.vocab_extra_ids_list,
            ns.seq_length,
            micro,
            global_bs,
            ns.packing,
            ns.variable_seq_lengths,
            ns.seed,
            "samples" if by_samples else "rows",
        ),
        optim=OptimizerConfig(
            ns.adam_beta1,
            ns.adam_beta2,
            ns.adam_eps,
            ns.weight_decay,
            ns.clip_grad,
            ns.use_distributed_optimizer,
            ns.optimizer_cpu_offload,
        ),
        schedule=ScheduleConfig(ns.lr, ns.min_lr, ns.lr_decay_style, warmup, decay_iters),
        ckpt=CheckpointConfig(
            ns.save,
            ns.save_interval,
            ns.load,
            ns.finetune,
            ns.use_checkpoint_args,
            not ns.no_save_optim,
            not ns.no_save_rng,
            not ns.no_load_optim,
            not ns.no_load_rng,
            ns.keep_last_n_checkpoints,
            ns.overwrite_save,
        ),
        log=LogConfig(
            ns.log_interval,
            ns.tensorboard_dir,
            ns.log_timers_to_tensorboard,
            ns.wandb_logger,
            ns.wandb_project,
            ns.wandb_entity,
            ns.wandb_id,
            ns.run_dir or ns.save,
            ns.activation_memory_report,
            (ns.profile_step_start, ns.profile_step_end) if ns.profile else None,
            tuple(ns.profile_ranks),
        ),
        eval=EvalConfig(ns.eval_interval, ns.eval_iters, tuple(ns.metrics)),
        loop=LoopConfig(
            train_iters,
            micro,
            global_bs,
            most_micro,
            ns.loss_reduction,
            ns.bf16,
            granularity,
            method,
            ns.recompute_num_layers,
            ns.seed,
            ns.exit_interval,
            ns.gradient_accumulation_fusion,
            ns.exit_duration_in_mins,
            ns.exit_signal_handler,
        ),
        notes=notes,
        deferred=deferred,
        unchecked=unchecked,
        checkpoint_meta=meta,
    )
