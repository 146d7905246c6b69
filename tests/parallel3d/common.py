"""Shared pieces of the trainer-level 3-D parallel tests: the run arguments, a DP-sliced synthetic
loader and a launcher that runs tests/parallel3d/worker.py as gloo ranks.

Every job goes through train.loop's own Trainer and train.run's run_training, so what is
compared is the trainer's path (stage building, pipeline step, loss normalisation, grad sync,
checkpoints)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.gloo_ranks import REPO, run_ranks

STAGE1 = Path(REPO) / "configs" / "train" / "tiny-stage1.args"

STEPS = 10

# 8 layers (PP 4 x 2 virtual stages = one layer per stage), hidden 128 (head_dim 16, the
# attention kernel's minimum), GQA 8 / 4 heads so TP 4 holds one KV head per rank; the synthetic
# vocabulary (97) pads to 112 at TP 1 and to 128 at TP 2 and 4, so the padding differs between
# the layouts compared. Dropout 0: the layouts draw their masks differently.
ARGS = [
    "--num_layers", "8", "--hidden_size", "128", "--ffn_hidden_size", "192",
    "--num_attention_heads", "8", "--num_attention_heads_kv", "4",
    "--max_position_embeddings", "64", "--make_vocab_size_divisible_by", "16",
    "--seq_length", "32", "--micro_batch_size", "2", "--train_iters", str(STEPS),
    "--lr", "3e-3", "--min_lr", "3e-4", "--lr_decay_style", "cosine", "--lr_warmup_iters", "2",
    "--adam_beta2", "0.95", "--weight_decay", "0.01", "--clip_grad", "1.0",
    "--hidden_dropout", "0.0", "--data_path", "synthetic-train", "--log_interval", "1",
    "--eval_interval", "5", "--eval_iters", "1", "--no-activation_memory_report",
]  # fmt: skip


def run_config(tp: int, pp: int, world: int, global_batch: int, extra: list[str] = ()):
    """(RunConfig, TokenizerInfo) of a job: ARGS at this layout over the synthetic vocabulary."""
    from tests.train.helpers import VOCAB
    from train.args import parse_args
    from train.data import TokenizerInfo
    from train.resolve import resolve

    argv = [*ARGS, "--tensor_model_parallel_size", str(tp),
            "--pipeline_model_parallel_size", str(pp),
            "--global_batch_size", str(global_batch), *extra]  # fmt: skip
    ns, given = parse_args(argv)
    rc = resolve(ns, given, world_size=world)
    rc.model = rc.model.replace(vocab_size=VOCAB)
    return rc, TokenizerInfo(VOCAB, "synthetic", None, None, None, [])


def launch(world: int, out_dir: str, job: dict, timeout: float = 170.0) -> dict:
    """Run one job (a JSON-able dict, see worker.py) on `world` gloo ranks (file:// rendezvous,
    no port to collide on); fail with every rank's output if one fails. Returns the last rank's
    result."""
    os.makedirs(out_dir, exist_ok=True)
    name = job["name"]
    spec = os.path.join(out_dir, f"{name}.job.json")
    with open(spec, "w") as f:
        json.dump(job, f)
    worker = os.path.join(REPO, "tests", "parallel3d", "worker.py")
    logs = run_ranks(worker, [spec], world, timeout, f"job {name}")
    with open(os.path.join(out_dir, f"{name}.result.json")) as f:
        result = json.load(f)
    result["log"] = "\n".join(logs)
    return result


def train_stage1(run: Path, data: Path, nproc: int, args: list[str]) -> tuple[list[dict], str]:
    """`python -m train @tiny-stage1.args` on `data` (a train prefix) with `args`, on nproc ranks
    under torchrun (one plain process at 1), writing under `run`: (metrics.jsonl rows, stdout)."""
    argv = [f"@{STAGE1}", "--data_path", str(data), "--save", str(run / "ckpt"),
            "--run_dir", str(run), "--tensorboard_dir", str(run / "tb"), *args]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([*launcher, "-m", "train", *argv], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)  # fmt: skip
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows, p.stdout


def by_iteration(rows: list[dict], key: str = "lm_loss", kind: str = "train") -> dict:
    """iteration -> rows[key] of the metrics rows of one type."""
    return {r["iteration"]: r[key] for r in rows if r["type"] == kind}


# `python -m train`'s main on gloo ranks (file:// rendezvous), with faults made on some ranks:
#   no-data@R        rank R does not see the data (its --data_path elsewhere)
#   bug@R            rank R's data opening raises a RuntimeError (a bug, not the user's problem)
#   hang-shutdown@R  rank R's torch.distributed shutdown never returns (as under torch 2.4/2.5
#                    gloo, sometimes); main's watchdog is given 2 s
_MAIN_WORKER = r"""
import dataclasses, os, sys, time
import torch.distributed as dist
sys.path.insert(0, os.environ["PYTHONPATH"])
from train import data as train_data, main

rdzv, faults, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank,
                        world_size=int(os.environ["WORLD_SIZE"]))
real_open = train_data.open_datasets
for fault in filter(None, faults.split(",")):
    what, _, who = fault.partition("@")
    if int(who) != rank:
        continue
    if what == "no-data":
        train_data.open_datasets = lambda cfg: real_open(
            dataclasses.replace(cfg, train_prefix=cfg.train_prefix + "-elsewhere"))
    elif what == "bug":
        def broken(cfg):
            raise RuntimeError("a bug while opening the data")
        train_data.open_datasets = broken
    elif what == "hang-shutdown":
        dist.destroy_process_group = lambda *a, **k: time.sleep(3600)
        main._SHUTDOWN_S = 2.0
    else:
        raise SystemExit(f"unknown fault {fault}")
sys.exit(main.main(argv))
"""


def launch_main(tmp: Path, name: str, world: int, faults: str, args: list[str],
                timeout: float = 150.0) -> list[tuple[int, str]]:  # fmt: skip
    """The tiny stage-1 args (128 tokens, 2 per micro-batch, one micro-batch per rank, no
    activation report, logs under tmp/run, checkpoints in tmp/ckpt) plus `args` (later flags
    win), on `world` gloo ranks with `faults`
    ("" for none; see above): (exit code, output) of each rank."""
    from tests.gloo_ranks import start_ranks

    worker = tmp / "main_worker.py"
    worker.write_text(textwrap.dedent(_MAIN_WORKER))
    argv = [f"@{STAGE1}", "--seq_length", "128", "--micro_batch_size", "2",
            "--global_batch_size", str(2 * world), "--log_interval", "1",
            "--eval_interval", "100", "--lr_warmup_iters", "1", "--no-activation_memory_report",
            "--run_dir", str(tmp / "run"), "--tensorboard_dir", str(tmp / "run" / "tb"),
            "--save", str(tmp / "ckpt"), *args]  # fmt: skip
    return start_ranks(str(worker), [str(tmp / f"rdzv_{name}"), faults, *argv], world, timeout)
