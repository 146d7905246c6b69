"""ParallelDims: the (tp, pp, dp) layout and its process groups, built once, passed explicitly."""

import datetime
import itertools
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

AXES = ("tp", "dp", "pp")


def local_cuda_device() -> torch.device:
    """This process's GPU: cuda:LOCAL_RANK (torchrun), or the only one it sees when a launcher
    gives each process its own GPU through CUDA_VISIBLE_DEVICES (srun --gpus-per-task=1), where
    LOCAL_RANK still counts the node's processes. More local processes than visible GPUs
    (LOCAL_WORLD_SIZE, set by torchrun) or a LOCAL_RANK past several visible GPUs is an error
    that says so, not CUDA's "invalid device ordinal" at the first allocation or NCCL's
    duplicate-GPU error at the first collective.

    Checked on each rank by itself: under NCCL it runs before init_process_group, where no rank
    can hear another (torchrun stops the others when one exits)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"this process sees {count} GPUs" + (
        f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    )
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    if per_node is not None and int(per_node) > count:
        raise ValueError(
            f"{per_node} processes on this node (LOCAL_WORLD_SIZE), but {seen}: launch at most "
            f"{count} per node (torchrun --nproc_per_node {count}, make train NPROC={count})"
        )
    if count == 1:
        return torch.device("cuda", 0)
    if local >= count:
        raise ValueError(
            f"LOCAL_RANK {local}, but {seen}: launch at most {count} processes per node "
            "(torchrun --nproc_per_node), or give each process one GPU"
        )
    return torch.device("cuda", local)


@dataclass
class ParallelDims:
    """Megatron rank order: TP innermost (stays inside a node), then DP, then PP outermost.

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
    """

    tp: int = 1  # tensor (and sequence) parallel size
    pp: int = 1  # pipeline parallel size
    dp: int = 1  # data parallel size
    rank: int = 0  # global rank of this process
    tp_group: object = field(default=None, repr=False)  # ProcessGroup, None when tp == 1
    pp_group: object = field(default=None, repr=False)  # ProcessGroup, None when pp == 1
    dp_group: object = field(default=None, repr=False)  # ProcessGroup, None when dp == 1
    pp_ranks: list[int] = field(default_factory=list, repr=False)  # global ranks of my pipeline

    def __post_init__(self):
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} size must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside tp*pp*dp = {self.world_size} ranks")
        if not self.pp_ranks:
            self.pp_ranks = [
                self.global_rank(self.tp_rank, self.dp_rank, p) for p in range(self.pp)
            ]

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def global_rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return pp_rank * (self.dp * self.tp) + dp_rank * self.tp + tp_rank

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Every group of global ranks that differ only along `axis` ("tp", "dp" or "pp"), in a
        fixed order; together they partition the world."""
        a, b = (x for x in AXES if x != axis)
        groups = []
        for i, j in itertools.product(range(getattr(self, a)), range(getattr(self, b))):
            fixed = {f"{a}_rank": i, f"{b}_rank": j}
            groups.append(
                [
                    self.global_rank(**fixed, **{f"{axis}_rank": k})
                    for k in range(getattr(self, axis))
                ]
            )
        return groups

    @staticmethod
    def check(world_size: int, tp: int, pp: int) -> int:
        """Return dp = world / (tp * pp), or raise a ValueError that says what to change."""
        if world_size % (tp * pp):
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
                f"pipeline_model_parallel_size ({pp}); launch a multiple of {tp * pp} processes "
                "(torchrun --nproc_per_node) or change the parallel sizes"
            )
        return world_size // (tp * pp)

    @staticmethod
    def check_backend(backend: str, cuda: bool, pp: int) -> None:
        """Refuse a backend that cannot move this run's tensors, before any rank connects.

        gloo's send and recv hand the tensor's pointer to its TCP transport (ProcessGroupGloo,
        and torch.distributed's backend table marks them unsupported on GPU), and pipeline
        stages exchange activations on the GPU: gloo with GPUs and PP > 1 is refused. The calls
        made at PP 1 (all-reduce, all-gather into a tensor, reduce-scatter into a tensor, which
        ProcessGroupGloo runs as an all-reduce, broadcast, barrier) have CUDA paths there (the
        table's older versions mark some unsupported), so TP and DP alone are left to run; no
        GPU run with gloo has been made here. NCCL needs GPUs."""
        if backend == "nccl" and not cuda:
            raise ValueError(
                "--distributed_backend nccl, but torch sees no GPU (torch.cuda.is_available() is "
                "False): use --distributed_backend gloo (the default without CUDA) on CPU"
            )
        if backend == "gloo" and cuda and pp > 1:
            raise ValueError(
                f"--distributed_backend gloo with GPUs and pipeline_model_parallel_size {pp}: "
                "gloo cannot send or receive CUDA tensors, which pipeline stages exchange. Use "
                "--distributed_backend nccl (the default when CUDA is available), or train on "
                "CPU with the GPUs hidden (CUDA_VISIBLE_DEVICES=)"
            )

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, backend: str | None = None,
              timeout_minutes: float = 10.0) -> "ParallelDims":  # fmt: skip
        """Initialise torch.distributed from torchrun's environment (if launched by it) and create
        the TP, PP and DP groups. A single process without torchrun needs no process group.
        timeout_minutes: how long a collective waits for the slowest rank (saving a 70B
        checkpoint's 30 GB per rank on slow storage can take longer than the default 10)."""
        if dist.is_initialized():
            world = dist.get_world_size()
        else:
            world = int(os.environ.get("WORLD_SIZE", "1"))
        dp = cls.check(world, tp, pp)
        if world == 1:
            return cls(tp=tp, pp=pp, dp=dp, rank=0)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            cls.check_backend(backend, torch.cuda.is_available(), pp)
            if backend == "nccl":
                torch.cuda.set_device(local_cuda_device())
            dist.init_process_group(backend, timeout=timeout)
        rank = dist.get_rank()
        dims = cls(tp=tp, pp=pp, dp=dp, rank=rank)
        # Every process must create every group, in the same order (torch.distributed rule).
        for axis in AXES:
            for ranks in dims.axis_groups(axis):
                g = dist.new_group(ranks, timeout=timeout)
                if rank in ranks and getattr(dims, axis) > 1:
                    setattr(dims, f"{axis}_group", g)
        return dims
