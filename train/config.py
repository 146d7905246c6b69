"""Resolved run configuration: one small dataclass per component, built and validated from the
parsed flags before any work starts. Each component is handed only its own part.

The flags are turned into a RunConfig by train.resolve; train.describe prints it."""

from dataclasses import asdict, dataclass, field

from model.config import ModelConfig, param_count


@dataclass(frozen=True)
class ParallelConfig:
    """Process layout (Megatron rank order)."""

    tp: int = 1  # tensor model parallel size
    pp: int = 1  # pipeline model parallel size
    dp: int = 1  # data parallel size = world / (tp * pp)
    sequence_parallel: bool = False  # shard norms/dropout over the sequence (only with tp > 1)
    virtual_stage_layers: int | None = None  # layers per virtual pipeline stage (interleaved)
    backend: str | None = None  # torch.distributed backend; None: nccl on GPU, gloo on CPU
    timeout_minutes: float = 10.0  # --distributed_timeout_minutes: a collective's longest wait


@dataclass(frozen=True)
class DataConfig:
    """What the data loader needs."""

    train_prefix: str  # {prefix}-text / {prefix}-role .bin/.idx
    valid_prefix: str | None  # the -val twin, None when the prefix has no -train suffix
    vocab_file: str | None  # SentencePiece model
    vocab_extra_ids: str | None  # --vocab_extra_ids_list as given
    seq_length: int  # tokens per row
    micro_batch_size: int  # rows per micro-batch
    global_batch_size: int  # samples (batch_unit "samples") or rows per optimizer step, all DP
    packing: bool  # pack documents with per-document attention
    variable_seq_lengths: bool  # without packing, pad to the longest row of the micro-batch
    seed: int  # shuffling seed
    # "samples": a step is global_batch_size samples, packed per step into the rows they need
    # (Megatron-LLM's batch and epochs); "rows": global_batch_size packed rows (data/loader.py)
    batch_unit: str = "samples"


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (decoupled weight decay) and clipping."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float  # on matrices; norms get none
    clip_grad: float  # global L2 norm bound; 0 disables
    # --use_distributed_optimizer: master weights and moments split over DP (ShardedAdamW)
    distributed: bool = False
    # --optimizer_cpu_offload: those masters and moments in host memory, updated on the CPU
    cpu_offload: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule in iterations (see train.lr)."""

    lr: float
    min_lr: float
    decay_style: str  # constant | linear | cosine | inverse-square-root
    warmup_iters: int
    decay_iters: int


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving and loading."""

    save: str | None
    save_interval: int | None  # None: only at the end
    load: str | None
    finetune: bool  # weights only
    use_checkpoint_args: bool
    save_optim: bool = True
    save_rng: bool = True
    load_optim: bool = True
    load_rng: bool = True
    keep_last: int | None = None  # --keep_last_n_checkpoints: older iterations are deleted
    overwrite_save: bool = False  # --overwrite_save: --save may hold a run this one replaces


@dataclass(frozen=True)
class LogConfig:
    """Console, TensorBoard, metrics.jsonl, wandb."""

    log_interval: int
    tensorboard_dir: str | None
    log_timers: bool
    wandb: bool
    wandb_project: str
    wandb_entity: str | None
    wandb_id: str | None
    run_dir: str | None  # metrics.jsonl lives here
    activation_memory_report: bool
    profile: tuple[int, int] | None = None  # [start, end) iterations traced by torch.profiler
    profile_ranks: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class EvalConfig:
    """Validation."""

    interval: int
    iters: int
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class LoopConfig:
    """The training loop proper."""

    train_iters: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int  # per DP rank per step (global batches of samples: at most this,
    # interleaved fillers included)
    loss_reduction: str  # global | microbatch
    bf16: bool  # honoured on GPU only
    recompute_granularity: str  # none | selective | full
    recompute_method: str | None  # uniform | block, with full only
    recompute_num_layers: int
    seed: int
    exit_interval: int | None
    gradient_accumulation_fusion: bool = True  # weight grads accumulate into the fp32 buffer
    exit_duration_in_mins: float | None = None  # save and stop once the run is this old
    exit_signal_handler: bool = False  # SIGTERM: finish the iteration, save and stop


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    optim: OptimizerConfig
    schedule: ScheduleConfig
    ckpt: CheckpointConfig
    log: LogConfig
    eval: EvalConfig
    loop: LoopConfig
    notes: list[str] = field(default_factory=list)  # decisions worth printing
    deferred: list[str] = field(default_factory=list)  # valid, but needs a later issue to run
    unchecked: list[str] = field(default_factory=list)  # could not be checked on this machine
    checkpoint_meta: dict | None = None  # meta.json of --load, when readable

    def to_dict(self) -> dict:
        d = {
            k: asdict(getattr(self, k))
            for k in (
                "model",
                "parallel",
                "data",
                "optim",
                "schedule",
                "ckpt",
                "log",
                "eval",
                "loop",
            )
        }
        d["eval"]["metrics"] = list(d["eval"]["metrics"])
        return d

    def param_count(self) -> int:
        return param_count(self.model, self.model.padded_vocab_size(self.parallel.tp))
