"""The trainer: build, (re)load, step, evaluate, save (train/run.py runs the steps, logs and
schedules evaluations, saves and stops).

One step = the micro-batches of one global batch on this data-parallel rank, each forward +
backward into the fp32 GradBuffer, one DP reduction, the global gradient norm, clipping, and
one fused AdamW update (skipped, and logged, when the gradients are not finite).

Pipeline: a rank holds its `build_stages` chunks (one, or L / (pp x layers per virtual stage)
interleaved ones) and runs every step through `parallel.pipeline.PipelineExecutor` (at PP = 1
that is plain forward/backward per micro-batch, no messages). Every pipeline rank of a DP
replica reads the same micro-batches from its own loader; the loss function runs on the last
stage, and the step's loss is broadcast from there over the pipeline group, then summed over DP.
The DP all-reduce of a chunk's gradients starts with that chunk's last backward (grad_sync).
Parameter names are global, so the optimizer, the gradient norm and checkpoints are the same at
any layout; `Trainer.load` reads a checkpoint saved at any TP/PP/DP layout.

Loss normalisation (`--loss_reduction`):
- global (default): every micro-batch's masked token-loss sum is divided by N, the loss-mask
  token count of the whole global batch (all micro-batches, all DP ranks; one all-reduce before
  the first forward). Summing gradients over micro-batches and DP ranks then gives exactly the
  gradient of (sum of masked token losses) / N, however the tokens fall into micro-batches.
- microbatch: Megatron-LLM's mean of per-micro-batch means: each micro-batch's masked mean
  divided by the number of micro-batches over all DP ranks. A micro-batch without loss tokens
  contributes 0 (Megatron's 0 / 0 would be NaN). With global batches of samples each rank packs
  its own share, so the micro-batches (and this mean) depend on the DP size; `global` does not.

Micro-batches per step: a global batch of samples (`--global_batch_unit samples`, the default)
is packed per DP rank into as many micro-batches as it fills, so their number varies by step and
rank; under interleaved 1F1B, fillers without loss tokens round it up to a multiple of pp.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from model.llama import Llama, init_parameter
from parallel.cross_entropy import argmax, check_labels, cross_entropy
from parallel.data_parallel import GradBuffer
from parallel.dims import ParallelDims
from parallel.grad_norm import (
    clip_coefficient,
    global_grad_norm_sq,
    sharded_grad_norm_sq,
    sharded_norm_segments,
)
from parallel.layers import check_token_ids
from parallel.pipeline import PipelineExecutor, pipeline_loss
from parallel.pipeline_schedule import stage_spec
from train import checkpoint as ckpt
from train.config import RunConfig, ScheduleConfig
from train.data import TokenizerInfo, to_device
from train.evaluate import EvalStats
from train.lr import lr_at
from train.metrics import causal_pairs, is_logging_rank, log
from train.optimizer import FlatAdamW, ShardedAdamW, param_order
from train.profile import PhaseClock


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


@dataclass
class StepResult:
    loss: float  # the step's loss as defined by --loss_reduction
    loss_tokens: int  # loss-mask tokens of the global batch
    tokens: int  # tokens of the step's micro-batches (all rows, all DP ranks; no fillers)
    pairs: int  # causal attention pairs of those (for FLOPs)
    grad_norm: float
    skipped: bool
    phases: PhaseClock | None = None  # per-phase times, read after the device is synced
    truncated: int = 0  # samples cut to --seq_length (all DP ranks)


def virtual_stages(rc: RunConfig) -> int:
    """Model chunks per pipeline rank: L / (pp x layers per virtual stage), or 1 (plain 1F1B)."""
    per = rc.parallel.virtual_stage_layers
    return rc.model.num_layers // (rc.parallel.pp * per) if per else 1


def build_stages(rc: RunConfig, dims: ParallelDims, device, dtype) -> list[Llama]:
    """This rank's pipeline stages (chunk 0 first; at PP = 1 the whole model), made parallel,
    recompute set, on the device.

    Stages are built on the meta device, sharded there, and only this rank's slices are
    allocated: no rank ever holds the whole model (a 70B fp32 copy is 280 GB). Weights are the
    seed's full-model initialisation (`Llama.init_weights` order, one generator), streamed one
    global tensor at a time and sliced, so every layout starts from the same weights; with --load
    the drawing is skipped (the checkpoint overwrites every parameter).

    On a CUDA device the draws run there, from a generator on that device: a host generator
    takes about 5 ns a value (10 s for a 7B model, minutes for a 70B rank's full tensors). The
    CUDA and CPU streams differ, so a GPU run starts from other (equally distributed) weights
    than a CPU run with the same seed; every layout on one kind of card starts from the same."""
    from parallel.parallelize import materialize, parallelize, take_shard

    padded = rc.model.padded_vocab_size(1)
    v = virtual_stages(rc)
    specs = [stage_spec(rc.model.num_layers, dims.pp, dims.pp_rank, v, c) for c in range(v)]
    stages = []
    for s in specs:
        with torch.device("meta"):
            stage = Llama(rc.model, padded, layer_ids=s.layers, pre=s.pre, post=s.post)
        stage = materialize(parallelize(stage, dims, rc.parallel.sequence_parallel), "cpu")
        stage.set_recompute(rc.loop.recompute_granularity, rc.loop.recompute_method or "uniform",
                            rc.loop.recompute_num_layers)  # fmt: skip
        stages.append(stage)
    local = {n: p for stage in stages for n, p in stage.named_parameters()}
    with torch.no_grad():
        if rc.ckpt.load:
            for p in local.values():
                p.zero_()
        else:
            draw = torch.device(device)
            draw = draw if draw.type == "cuda" else torch.device("cpu")
            gen = torch.Generator(device=draw).manual_seed(rc.loop.seed)
            for name, shape in rc.model.param_shapes(padded).items():
                full = torch.empty(shape, device=draw)
                init_parameter(rc.model, name, full, gen)
                if name in local:
                    local[name].copy_(take_shard(full, local[name], name))
    return [stage.to(device=device, dtype=dtype) for stage in stages]


def build_model(rc: RunConfig, dims: ParallelDims, device, dtype) -> Llama:
    """The whole model of a PP = 1 layout (see build_stages)."""
    if dims.pp != 1:
        raise ValueError(f"build_model builds the whole model; at PP={dims.pp} use build_stages")
    return build_stages(rc, dims, device, dtype)[0]


class Trainer:
    """Owns the model, optimizer, gradient buffer and loop state of one rank."""

    def __init__(self, rc: RunConfig, dims: ParallelDims, tok: TokenizerInfo, device=None):
        self.rc, self.dims, self.tok = rc, dims, tok
        self.device = torch.device(device or "cpu")
        on_gpu = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if (rc.loop.bf16 and on_gpu) else torch.float32
        self.stages = build_stages(rc, dims, self.device, self.dtype)
        for s in self.stages:
            if s.embed is not None:
                # train_step and evaluate check the token ids on the loader's host copy; the
                # embedding's own check would read the device ids' range, a synchronisation
                # per micro-batch.
                s.embed.check_ids = False
        self.model = self.stages[0]  # the whole model at PP = 1; the first local chunk otherwise
        self.padded_vocab = self.model.padded_vocab
        fuse = rc.loop.gradient_accumulation_fusion
        if rc.optim.distributed:  # the buffer's layout first: the optimizer adopts it
            named = param_order(self.named_parameters())
            self.params = [p for _, p in named]
            self.grads = GradBuffer(self.params, dims.dp_group, tp_group=dims.tp_group,
                                    fuse_weight_grads=fuse, shard_over_dp=True)  # fmt: skip
            self.optimizer = ShardedAdamW(named, rc.optim, self.grads)
            self._norm_segments = sharded_norm_segments(self.grads)
        else:
            self.optimizer = FlatAdamW(self.named_parameters(), rc.optim)
            self.params = self.optimizer.params_in_order()
            self.grads = GradBuffer(self.params, dims.dp_group, tp_group=dims.tp_group,
                                    fuse_weight_grads=fuse)  # fmt: skip
        self.pipe = self._executor(rc.data.micro_batch_size * rc.data.seq_length)
        self._eval_pipes: dict[int, PipelineExecutor] = {}
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_total = 0

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(global name, parameter) of every local stage; names are the same at any layout."""
        return [(n, p) for s in self.stages for n, p in s.named_parameters()]

    def _executor(self, tokens: int) -> PipelineExecutor:
        """The pipeline for micro-batches of `tokens` tokens (stage boundaries carry the token
        shard under sequence parallelism). At PP = 1 it is plain forward/backward in turn."""
        tp = self.dims.tp
        if self.rc.parallel.sequence_parallel and tokens % tp:
            raise ValueError(
                f"sequence parallelism splits the {tokens} tokens of a micro-batch over tensor "
                f"parallel size {tp}: make micro_batch_size x seq_length divisible by {tp}"
            )
        shard = tokens // tp if self.rc.parallel.sequence_parallel else tokens
        return PipelineExecutor(self.stages, self.dims, (shard, self.rc.model.hidden_size),
                                dtype=self.dtype, grad_sync=self.grads.set_sync)  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # one step

    def _per_token(self, logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token loss (T,), loss mask (T,)) of one micro-batch's logits."""
        # train_step checked the labels on the host copy
        per_token = cross_entropy(logits, mb["labels"].reshape(-1), group=self.dims.tp_group,
                                  vocab_size=self.rc.model.vocab_size,
                                  labels_checked=True)  # fmt: skip
        return per_token, mb["loss_mask"].reshape(-1).to(per_token.dtype)

    def train_step(self, micro_batches: list[dict], lr: float) -> StepResult:
        """One step. Every pipeline rank of a DP replica gets the same micro-batches (it reads
        them from its own loader); only the first stage uses the tokens, the last the labels."""
        rc, dims = self.rc, self.dims
        clock = PhaseClock(self.device)
        real = len(micro_batches)
        if self.pipe.v > 1 and real % dims.pp:
            # Global batches of samples give a data-dependent micro-batch count; the interleaved
            # table wants a multiple of pp. Fillers without loss tokens add no gradient.
            mb0 = micro_batches[0]
            filler = {**mb0, "loss_mask": torch.zeros_like(mb0["loss_mask"])}
            micro_batches = micro_batches + [filler] * (dims.pp - real % dims.pp)
        # Ids, labels and counts from the loader's host tensors: no device round trip for them.
        for mb in micro_batches:
            check_token_ids(mb["tokens"], rc.model.vocab_size)
            check_labels(mb["labels"], rc.model.vocab_size)
        # Tokens and attention pairs of the real micro-batches only: a filler's compute is
        # schedule overhead, not model FLOPs, and would inflate tokens/s and MFU.
        counts = [sum(float(mb["loss_mask"].sum()) for mb in micro_batches),
                  sum(mb["tokens"].numel() for mb in micro_batches[:real]),
                  sum(causal_pairs(mb["cu_seqlens"]) for mb in micro_batches[:real]),
                  real,
                  sum(mb.get("num_truncated", 0) for mb in micro_batches[:real])]  # fmt: skip
        mbs = [to_device(mb, self.device) for mb in micro_batches]
        if dims.dp > 1:
            # The global token count divides every micro-batch's loss, so it is read before the
            # first forward: one synchronisation per step, on DP > 1 only (at DP 1 the host
            # numbers are the sums: no copy to the device and back).
            t = torch.tensor(counts, dtype=torch.float64).to(self.device, non_blocking=True)
            counts = _all_reduce(t, dims.dp_group).tolist()
        n_loss, n_tokens, n_pairs, n_micro, n_cut = (int(x) for x in counts)
        global_mode = rc.loop.loss_reduction == "global"
        # Megatron-LLM's mean of per-micro-batch means, over every DP rank's micro-batches (their
        # number may differ between ranks when a global batch counts samples); fillers excluded.
        denom_micro = max(n_micro, 1)
        logged = [torch.zeros((), dtype=torch.float64, device=self.device)]

        def loss_fn(logits: torch.Tensor, mb: dict) -> torch.Tensor:  # last stage only
            per_token, mask = self._per_token(logits, mb)
            masked = (per_token * mask).sum()
            if global_mode:
                logged[0] += masked.detach().double()
                return masked / max(n_loss, 1)
            mean = masked / mask.sum().clamp(min=1.0)
            logged[0] += mean.detach().double()
            return mean / denom_micro

        for s in self.stages:
            s.train()
        self.grads.zero()
        self.pipe.step(mbs, loss_fn)
        clock.mark("fwd_bwd")
        self.grads.finish()
        clock.mark("grad_sync")
        # The loss lives on the last stage; every pipeline rank gets it, then the DP sum.
        total = pipeline_loss([logged[0]] if dims.is_last_stage else [], dims, self.device)
        _all_reduce(total, dims.dp_group)
        if rc.optim.distributed:
            groups = (dims.dp_group, dims.tp_group, dims.pp_group)
            sq = sharded_grad_norm_sq(self._norm_segments, groups)
        else:
            sq = global_grad_norm_sq(self.params, groups=(dims.tp_group, dims.pp_group))
        # The step's one read of the device (two fp64 scalars at once): the skip decision and
        # the clip factor need the norm on the host before the update is launched.
        loss_sum, sq = torch.stack([total, sq]).tolist()
        step_loss = loss_sum / (max(n_loss, 1) if global_mode else denom_micro)
        norm = math.sqrt(sq)
        skipped = not math.isfinite(norm)
        if skipped:
            self.skipped_total += 1
        else:
            coef = clip_coefficient(norm, rc.optim.clip_grad) if rc.optim.clip_grad > 0 else 1.0
            self.optimizer.step(lr, grad_scale=coef)
        clock.mark("optimizer")  # the loss, the gradient norm, clipping and the update
        return StepResult(step_loss, n_loss, n_tokens, n_pairs, norm, skipped, clock, n_cut)

    # ------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def evaluate(self, micro_batches) -> dict:
        """Metrics over an iterable of this rank's validation micro-batches (see train.evaluate).
        Under PP the forward-only pipeline runs them; the last stage's sums reach every rank."""
        stats = EvalStats(self.device)
        vocab, tp_group = self.rc.model.vocab_size, self.dims.tp_group

        def add(logits: torch.Tensor, mb: dict) -> None:
            per_token = cross_entropy(logits, mb["labels"].reshape(-1), group=tp_group,
                                      vocab_size=vocab, labels_checked=True)  # fmt: skip
            pred = argmax(logits, tp_group, vocab_size=vocab)
            stats.add(per_token, pred, mb["labels"], mb["loss_mask"].to(per_token.dtype),
                      self.tok.im_start, self.tok.im_end,
                      mb.get("num_samples", mb.get("num_rows")))  # fmt: skip

        for s in self.stages:
            s.eval()
        try:
            # Runs of equal-size micro-batches share one executor: the boundary shape is fixed
            # per pipeline pass, and the last validation micro-batch may be a short one.
            run: list[dict] = []
            for mb in micro_batches:
                check_token_ids(mb["tokens"], vocab)  # on the host copy (see train_step)
                check_labels(mb["labels"], vocab)
                mb = to_device(mb, self.device)
                if run and run[0]["tokens"].numel() != mb["tokens"].numel():
                    self._eval_pass(run, add)
                    run = []
                run.append(mb)
            if run:
                self._eval_pass(run, add)
        finally:
            for s in self.stages:
                s.train()
        if self.dims.pp > 1:
            dist.broadcast(stats.sums, src=self.dims.pp_ranks[-1], group=self.dims.pp_group)
        return stats.result(self.dims.dp_group, self.rc.eval.metrics)

    def _eval_pass(self, mbs: list[dict], fn) -> None:
        tokens = mbs[0]["tokens"].numel()
        if tokens not in self._eval_pipes:
            self._eval_pipes[tokens] = self._executor(tokens)
        pipe = self._eval_pipes[tokens]
        if pipe.v > 1 and len(mbs) % self.dims.pp:
            # The interleaved table wants a multiple of pp micro-batches (a validation split can
            # be shorter): fill with copies of the first whose results are not counted.
            filler = {**mbs[0], "skip": True}
            mbs = mbs + [filler] * (self.dims.pp - len(mbs) % self.dims.pp)
        pipe.forward(mbs, lambda logits, mb: None if mb.get("skip") else fn(logits, mb))

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def checkpoint_meta(self) -> dict:
        rc = self.rc
        return {
            "model": rc.model.to_dict(),
            "vocab_size": rc.model.vocab_size,
            "padded_vocab_size": self.padded_vocab,
            "tokenizer": self.tok.to_dict(),
            "layout": {
                "tp": self.dims.tp,
                "pp": self.dims.pp,
                "dp": self.dims.dp,
                "sequence_parallel": rc.parallel.sequence_parallel,
            },  # fmt: skip
            "args": rc.to_dict(),
            "consumed_train_samples": self.consumed_samples,
            "scheduler": {
                "lr": rc.schedule.lr,
                "min_lr": rc.schedule.min_lr,
                "decay_style": rc.schedule.decay_style,
                "warmup_iters": rc.schedule.warmup_iters,
                "decay_iters": rc.schedule.decay_iters,
                "last_lr": lr_at(rc.schedule, max(self.iteration, 1)),
            },  # fmt: skip
            "optimizer": {"step": self.optimizer.step_count, "skipped": self.skipped_total},
            "has_optimizer": rc.ckpt.save_optim,
            "has_trainer_state": True,
        }

    def save(self, loader_state: dict | None) -> None:
        rc, d = self.rc, self.dims
        rank_state = {"loader": loader_state, "consumed_train_samples": self.consumed_samples}
        if rc.ckpt.save_rng:
            rank_state["rng"] = ckpt.rng_state()
        ckpt.save_checkpoint(
            rc.ckpt.save, self.iteration,
            params=dict(self.named_parameters()),
            optim_state=self.optimizer.state_tensors() if rc.ckpt.save_optim else None,
            meta=self.checkpoint_meta(), rank_state=rank_state,
            ranks=(d.rank, d.tp_rank, d.pp_rank, d.dp_rank),
        )  # fmt: skip
        if rc.ckpt.keep_last and d.rank == 0:
            try:
                gone = ckpt.prune_iterations(rc.ckpt.save, self.iteration, rc.ckpt.keep_last)
            except (OSError, ckpt.CheckpointError) as e:  # training goes on; the disk fills
                log(f" WARNING: could not delete older checkpoints in {rc.ckpt.save}: {e}")
            else:
                if gone:
                    names = ", ".join(p.name for p in gone)
                    log(f" deleted older checkpoints ({names}): --keep_last_n_checkpoints "
                        f"{rc.ckpt.keep_last}")  # fmt: skip

    def _say(self, msg: str) -> None:
        """A loading message, from the logging rank only (every rank loads the same checkpoint;
        the others would print it once each)."""
        if is_logging_rank():
            log(msg)

    def load(self, path: str) -> dict | None:
        """Load --load, saved at this or any other TP/PP/DP layout: every rank reads just the
        slices of its own parameters (and optimizer state) from whatever shards are on disk.
        Returns the saved loader state when training resumes (None for --finetune or a
        weights-only checkpoint); it is the same on every rank (consumed rows, DP-independent)."""
        rc = self.rc
        iter_dir = ckpt.resolve_iteration_dir(path)
        meta = ckpt.read_meta(iter_dir)
        self._check_compatible(meta, iter_dir)
        resume = not rc.ckpt.finetune and meta.get("has_trainer_state", False)
        with_optim = bool(resume and rc.ckpt.load_optim and meta.get("has_optimizer"))
        # Only what will be read is indexed: --finetune or --no_load_optim go on past a damaged
        # optimizer file (the way the messages below offer out of one).
        index = ckpt.ShardIndex(iter_dir, optimizer=with_optim)
        padded = self.padded_vocab
        saved = meta.get("layout", {})
        ours = {"tp": self.dims.tp, "pp": self.dims.pp, "dp": self.dims.dp}
        same_layout = all(saved.get(k) == v for k, v in ours.items())
        with torch.no_grad():
            for name, p in self.named_parameters():
                dim = getattr(p, "tp_dim", None)
                t = ckpt.read_param(index, name, meta, padded, dim=dim,
                                    pieces=getattr(p, "tp_pieces", None))  # fmt: skip
                if tuple(t.shape) != tuple(p.shape):
                    # _check_compatible found meta.json's architecture to be this run's, so the
                    # tensor file disagrees with its own meta.json (swapped in from another model)
                    files = sorted({str(e.file) for e in index.entries[("model", name)]})
                    raise ckpt.CheckpointError(
                        f"{', '.join(files[:2])}: {name} has shape {tuple(t.shape)} here, where "
                        f"{iter_dir / ckpt.META_FILE}'s model config (this run's too) gives "
                        f"{tuple(p.shape)}: the file is from another model; restore it, or "
                        f"{ckpt.another_iteration(iter_dir)}"
                    )
                p.copy_(t)
        self.optimizer.sync_master_from_model()
        if not resume:
            why = "--finetune" if rc.ckpt.finetune else "a weights-only checkpoint"
            self._say(f" loaded weights of {iter_dir} ({why}): iteration 0, fresh optimizer")
            # Starting stage 2 from a stage 1 that stopped early is legal but rarely meant.
            planned = ((meta.get("args") or {}).get("loop") or {}).get("train_iters")
            done = meta.get("iteration")
            if planned and done is not None and int(done) < int(planned):
                self._say(f" note: {iter_dir} is iteration {done} of the {planned} its run was "
                          "set to train: that run did not finish")  # fmt: skip
            return None
        self.iteration = int(meta["iteration"])
        self.consumed_samples = int(meta["consumed_train_samples"])
        self.skipped_total = int(meta["optimizer"].get("skipped", 0))
        self._note_schedule_change(meta.get("scheduler") or {}, iter_dir)
        if with_optim:
            # Every shard directory holds its optimizer file (dp rank 0 writes it); one that
            # lacks it (a partial copy) would fail on the first tensor without naming the file.
            gone = [sd / ckpt.optim_file_name(0) for sd in sorted(iter_dir.glob("mp_rank_*"))
                    if sd.is_dir() and not any(sd.glob("optim_dp*.safetensors"))]  # fmt: skip
            if gone:
                raise ckpt.CheckpointError(
                    f"{gone[0]} is missing, though {iter_dir / ckpt.META_FILE} records optimizer "
                    "state (an incomplete copy): copy it, resume with --no_load_optim (these "
                    f"weights, fresh Adam moments), or {ckpt.another_iteration(iter_dir)}"
                )
            self.optimizer.load_state_tensors(
                lambda kind, name, p: ckpt.read_param(
                    index, name, meta, padded, kind=kind, dim=getattr(p, "tp_dim", None),
                    pieces=getattr(p, "tp_pieces", None), dtype=torch.float32)
            )  # fmt: skip
            self.optimizer.step_count = int(meta["optimizer"]["step"])
        else:
            self._say(" optimizer state not loaded (--no_load_optim or none saved): fresh moments")
        loader_state = self._restore_rank_state(iter_dir, saved, same_layout)
        where = "" if same_layout else (
            f" (saved at tp {saved.get('tp')} pp {saved.get('pp')} dp {saved.get('dp')}, "
            f"resharded to tp {ours['tp']} pp {ours['pp']} dp {ours['dp']})"
        )  # fmt: skip
        self._say(f" resumed from {iter_dir} at iteration {self.iteration}{where}")
        return loader_state

    def _note_schedule_change(self, saved: dict, iter_dir) -> None:
        """Warn when the run resumes under other schedule flags than the checkpoint's (an
        extended --train_iters also moves the default --lr_decay_iters): the lr then jumps at
        the resume. Megatron-LLM refuses such a resume unless told which values to keep; here
        this run's flags win, and the log says what changed."""
        sc = self.rc.schedule
        ours = {"lr": sc.lr, "min_lr": sc.min_lr, "decay_style": sc.decay_style,
                "warmup_iters": sc.warmup_iters, "decay_iters": sc.decay_iters}  # fmt: skip
        changed = [k for k, v in ours.items() if k in saved and saved[k] != v]
        if not changed:
            return
        diff = ", ".join(f"{k} {saved[k]} -> {ours[k]}" for k in changed)
        nxt = self.iteration + 1
        line = f" WARNING: resuming {iter_dir} under another learning-rate schedule ({diff})"
        try:
            theirs = ScheduleConfig(**{k: saved.get(k, v) for k, v in ours.items()})
            line += (f": step {nxt} runs at lr {lr_at(sc, nxt):.6E}, where the checkpoint's "
                     f"schedule gave {lr_at(theirs, nxt):.6E}")  # fmt: skip
        except (TypeError, ValueError, ZeroDivisionError):
            pass
        self._say(line + "; give the saved values to continue its schedule")

    def _restore_rank_state(self, iter_dir, saved: dict, same_layout: bool) -> dict | None:
        """RNG and data position from the per-rank state files.

        Data: the loader state is the global row position (consumed samples), the same in every
        file, so any file serves when this rank's (tp, pp, dp) has none. RNG: the trainer seeds
        every TP and DP rank of a pipeline stage alike and they draw alike, so a stage's stream
        is in any of its files: restored when the pipeline split is the saved one (this rank's
        own file at the same layout). Under another PP size the stage holds other layers and no
        saved stream maps; the rank reseeds deterministically and says so."""
        d, rc = self.dims, self.rc
        own = ckpt.read_rank_state(iter_dir, d.tp_rank, d.pp_rank, d.dp_rank)
        stage = None
        if saved.get("pp") == d.pp:
            stage = own if own is not None else ckpt.find_rank_state(iter_dir, pp_rank=d.pp_rank)
        state = own or stage or ckpt.find_rank_state(iter_dir)
        if state is None:
            raise ckpt.CheckpointError(
                f"{iter_dir} has no state_dp*.json file at all (data position unknown): resume "
                "with --finetune to start at iteration 0 from these weights"
            )
        if not rc.ckpt.load_rng:
            return state.get("loader")
        if not any("rng" in f for f in (own, stage, state) if f is not None):
            self._say(
                " RNG: the checkpoint holds no RNG state (--no_save_rng): generators as seeded"
            )
        elif stage is not None and "rng" in stage:
            ckpt.set_rng_state(stage["rng"])
            if not same_layout:
                self._say(f" RNG: pipeline stage {d.pp_rank}'s saved stream restored (same "
                          "pipeline split; TP/DP ranks of a stage share it)")  # fmt: skip
        else:
            seed = rc.loop.seed + 100 * d.pp_rank + 1_000_003 * self.iteration
            torch.manual_seed(seed)
            self._say(
                f" RNG: no saved stream maps to pipeline stage {d.pp_rank} (saved at pipeline "
                f"size {saved.get('pp')}, now {d.pp}); reseeded with {seed} (seed + 100 x stage "
                "+ 1000003 x iteration): dropout masks differ from an uninterrupted run"
            )
        return state.get("loader")

    def _check_compatible(self, meta: dict, iter_dir) -> None:
        saved_tok = meta.get("tokenizer") or {}
        ours = self.tok
        fp = saved_tok.get("fingerprint")
        if meta["vocab_size"] != ours.vocab_size or (
            fp and ours.fingerprint and fp != ours.fingerprint
        ):
            raise ckpt.CheckpointError(
                f"{iter_dir} was trained with another tokenizer/vocabulary (vocab "
                f"{meta['vocab_size']}, fingerprint {fp}, extra ids {saved_tok.get('extra_ids')}) "
                f"than this run (vocab {ours.vocab_size}, fingerprint {ours.fingerprint}, extra "
                f"ids {ours.extra_ids}): use the same --vocab_file and --vocab_extra_ids_list, "
                "and data pretokenized with them"
            )
        saved = meta["model"]
        arch = (
            "hidden_size",
            "ffn_hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_kv_heads",
        )
        diff = [f"{k}: checkpoint {saved[k]}, run {getattr(self.rc.model, k)}"
                for k in arch if saved[k] != getattr(self.rc.model, k)]  # fmt: skip
        if diff:
            raise ckpt.CheckpointError(
                f"{iter_dir} holds another architecture ({'; '.join(diff)}): pass "
                "--use_checkpoint_args or the matching --model"
            )
