"""Shared pieces of the pipeline tests: a tiny Llama, packed micro-batches, the loss, the
single-process reference and a launcher for gloo worker processes."""

import os

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.llama import Llama
from tests.gloo_ranks import REPO, run_ranks

# hidden 128 (head_dim 16, the smallest the attention kernel accepts), 8 layers (PP=4 x 2 virtual
# stages gets one layer per stage), GQA 8 / 2 heads, vocabulary 300 padded to 384.
CFG = ModelConfig(
    name="pp-test",
    vocab_size=300,
    hidden_size=128,
    ffn_hidden_size=192,
    num_layers=8,
    num_attention_heads=8,
    num_kv_heads=2,
    max_position_embeddings=64,
)
SEQ = 32  # tokens per micro-batch (one packed row)
STEPS = 10
EVAL_STEP = 99  # data of the forward-only pass after training
LR = 3e-3


def full_state(seed: int = 1234) -> dict[str, torch.Tensor]:
    model = Llama(CFG)
    model.init_weights(torch.Generator().manual_seed(seed))
    return {k: v.clone() for k, v in model.state_dict().items()}


def build_stage(state: dict, layers: range | None, pre: bool, post: bool) -> Llama:
    """A stage holding `layers`, its weights cut from the full state dict by global name."""
    stage = Llama(CFG, layer_ids=layers, pre=pre, post=post)
    stage.load_state_dict({k: state[k] for k in stage.state_dict()}, strict=True)
    return stage


def microbatch(step: int, index: int) -> dict:
    """One packed row of SEQ tokens: 1-4 documents of random lengths, positions restarting per
    document, a random loss mask, labels a fixed function of the token. Deterministic in
    (step, index), so every rank builds the same micro-batches."""
    g = torch.Generator().manual_seed(10_000 * step + index)
    n_docs = int(torch.randint(1, 5, (1,), generator=g))
    cuts = sorted(torch.randperm(SEQ - 1, generator=g)[: n_docs - 1].add(1).tolist())
    bounds = [0, *cuts, SEQ]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    tokens = torch.randint(0, CFG.vocab_size, (SEQ,), generator=g)
    return {
        "tokens": tokens,
        "labels": (tokens * 7 + 3) % CFG.vocab_size,  # learnable, so the loss falls in 10 steps
        "loss_mask": (torch.rand(SEQ, generator=g) < 0.7).float(),
        "position_ids": torch.cat([torch.arange(n) for n in lengths]),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max(lengths),
    }


def global_batch(step: int, n_micro: int) -> list[dict]:
    return [microbatch(step, i) for i in range(n_micro)]


def make_loss_fn(batch: list[dict]):
    """Mean over all loss-mask tokens of the global batch, as the trainer normalises it."""
    total = sum(float(mb["loss_mask"].sum()) for mb in batch)

    def loss_fn(logits: torch.Tensor, mb: dict) -> torch.Tensor:
        per_token = F.cross_entropy(logits.float(), mb["labels"], reduction="none")
        return (per_token * mb["loss_mask"]).sum() / total

    return loss_fn


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)


def reference_run(n_micro: int, steps: int = STEPS) -> dict:
    """Single process, whole model, plain forward/backward per micro-batch. One thread, as the
    workers: a different thread count changes GEMM reduction order, and AdamW amplifies those
    last-bit differences in near-zero gradients over 10 steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_run(n_micro, steps)
    finally:
        torch.set_num_threads(threads)


def _reference_run(n_micro: int, steps: int) -> dict:
    model = build_stage(full_state(), None, True, True)
    opt = make_optimizer(model.parameters())
    losses, grads = [], None
    for step in range(steps):
        batch = global_batch(step, n_micro)
        loss_fn = make_loss_fn(batch)
        total = 0.0
        for mb in batch:
            out = model(mb["tokens"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"])
            loss = loss_fn(out, mb)
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.eval()
        eval_loss = sum(float(eval_fn(model(mb["tokens"], mb["position_ids"], mb["cu_seqlens"],
                                            mb["max_seqlen"]), mb))
                        for mb in global_batch(EVAL_STEP, n_micro))  # fmt: skip
    return {"losses": losses, "grads": grads, "params": params, "eval": eval_loss}


def eval_fn(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    """Summed masked cross-entropy of one micro-batch (what an evaluation accumulates)."""
    per_token = F.cross_entropy(logits.float(), mb["labels"], reduction="none")
    return (per_token * mb["loss_mask"]).sum()


def launch(world: int, out_dir: str, timeout: float = 170.0) -> None:
    """Run tests/parallel_pipeline/pp_worker.py as `world` gloo ranks (file:// rendezvous, so no
    port can collide with another user's run) and fail with the ranks' output if any fails."""
    worker = os.path.join(REPO, "tests", "parallel_pipeline", "pp_worker.py")
    run_ranks(worker, [out_dir], world, timeout, "pipeline worker")
