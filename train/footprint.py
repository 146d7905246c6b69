"""What a rank will hold for weights, gradients and optimizer state, from the configuration alone:
printed by `--dry_run` (and at start-up), so "will it fit" is answered before anything is
allocated. Activations come on top; `train.memory` measures those per layer.

The byte counts follow what the trainer allocates (train.optimizer, parallel.data_parallel):
  weights      bf16 on GPU with --bf16 (2 B), else fp32 (4 B)
  gradients    the fp32 gradient buffer (4 B); with the distributed optimizer at DP > 1 also the
               rank's reduced share of it (4 / DP B)
  optimizer    fp32 masters and two moments: 12 B replicated (8 B when the weights are fp32
               themselves: the masters are the weights); with the distributed optimizer at
               DP > 1, (12 + the bf16 staging copy 2) / DP B
  host         with --optimizer_cpu_offload the masters and moments (12 / DP B) move to host
               memory; the device keeps only the staging copy at DP > 1
"""

from dataclasses import dataclass

from model.config import ModelConfig
from parallel.pipeline_schedule import stage_layers

GIB = 2**30


@dataclass(frozen=True)
class Footprint:
    """Bytes per parameter of each kind (see the module docstring) and the parameter count of
    the largest rank."""

    params: int
    weights: float
    gradients: float
    optimizer: float
    host: float = 0.0  # bytes per parameter in host memory (an offloaded optimizer)

    @property
    def total_bytes(self) -> float:
        return self.params * (self.weights + self.gradients + self.optimizer)

    def line(self) -> str:
        parts = [(k, self.params * getattr(self, k) / GIB) for k in ("weights", "gradients",
                                                                     "optimizer")]  # fmt: skip
        text = " + ".join(f"{k} {v:.2f}" for k, v in parts)
        text += f" = {self.total_bytes / GIB:.2f} GiB"
        if self.host:
            text += f" (and {self.params * self.host / GIB:.2f} GiB of host memory)"
        return text


def bytes_per_param(bf16: bool, dp: int, distributed: bool,
                    offload: bool = False) -> tuple[float, float, float, float]:  # fmt: skip
    """(weights, gradients, optimizer, host) bytes per parameter on one rank."""
    weights = 2.0 if bf16 else 4.0
    if offload:  # needs the distributed optimizer; the staging copy only at DP > 1
        grads = 4.0 + (4.0 / dp if dp > 1 else 0.0)
        return weights, grads, (weights / dp if dp > 1 else 0.0), 12.0 / dp
    if distributed and dp > 1:
        return weights, 4.0 + 4.0 / dp, (12.0 + (2.0 if bf16 else 0.0)) / dp, 0.0
    return weights, 4.0, 12.0 if bf16 else 8.0, 0.0


def rank_params(model: ModelConfig, padded_vocab: int, tp: int, pp: int, pp_rank: int,
                virtual_stages: int = 1) -> int:  # fmt: skip
    """Parameters held by one (tp, pp) rank: matrices split over TP (rows of wqkv, w13, the
    embedding and the output head; columns of wo and w2), norm weights whole; the layers of
    every virtual chunk of `pp_rank`, the embedding on the first stage, the final norm and the
    head on the last."""
    layers = {i for c in range(virtual_stages)
              for i in stage_layers(model.num_layers, pp, pp_rank, virtual_stages, c)}  # fmt: skip
    total = 0
    for name, shape in model.param_shapes(padded_vocab).items():
        if name.startswith("layers."):
            if int(name.split(".")[1]) not in layers:
                continue
        elif name == "embed.weight" and pp_rank != 0:
            continue
        elif name in ("norm.weight", "output.weight") and pp_rank != pp - 1:
            continue
        n = 1
        for d in shape:
            n *= d
        total += n // tp if len(shape) == 2 else n
    return total


def footprint(model: ModelConfig, padded_vocab: int, tp: int, pp: int, dp: int, bf16: bool,
              distributed: bool, virtual_stages: int = 1,
              offload: bool = False) -> Footprint:  # fmt: skip
    """The footprint of the rank with the most parameters (the last pipeline stage: the head
    and the final norm, or the first one's embedding when that is larger)."""
    params = max(rank_params(model, padded_vocab, tp, pp, r, virtual_stages) for r in range(pp))
    return Footprint(params, *bytes_per_param(bf16, dp, distributed, offload))
