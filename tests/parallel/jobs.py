"""The multi-rank jobs the tests ask for, by name. Arguments (one-process references) are
computed in the pytest process, only for the jobs a run selects."""

from collections.abc import Callable
from functools import cache

from tests.parallel import audit_workers, workers
from tests.parallel._harness import NORM_CFG, Job, reference

ref = cache(reference)

# name -> factory; each launch runs its world size's jobs in this order.
JOBS: dict[str, Callable[[], Job]] = {
    "comm-tp2": lambda: Job("comm-tp2", 2, 2, workers.comm_worker),
    "comm-tp4": lambda: Job("comm-tp4", 4, 4, workers.comm_worker),
    "ce-tp2": lambda: Job("ce-tp2", 2, 2, workers.cross_entropy_worker),
    "ce-tp4": lambda: Job("ce-tp4", 4, 4, workers.cross_entropy_worker),
    "norm-tp2": lambda: Job("norm-tp2", 2, 2, workers.grad_norm_worker, (NORM_CFG, True)),
    "norm-tp4": lambda: Job("norm-tp4", 4, 4, workers.grad_norm_worker, (NORM_CFG, True)),
    "meta-tp2": lambda: Job("meta-tp2", 2, 2, workers.meta_worker),
    "buckets-dp2": lambda: Job("buckets-dp2", 2, 1, workers.bucket_overlap_worker),
    "buckets-dp2-fused": lambda: Job(
        "buckets-dp2-fused", 2, 1, workers.bucket_overlap_worker, (True,)
    ),
    "tp2": lambda: Job("tp2", 2, 2, workers.layout_worker, ((False, True), 2, ref(2))),
    "tp4": lambda: Job("tp4", 4, 4, workers.layout_worker, ((False, True), 2, ref(2))),
    "dp2": lambda: Job("dp2", 2, 1, workers.layout_worker, ((False,), 4, ref(4))),
    "tp2dp2-sp": lambda: Job("tp2dp2-sp", 4, 2, workers.layout_worker, ((True,), 4, ref(4))),
    "dropout-tp2": lambda: Job("dropout-tp2", 2, 2, workers.dropout_worker),
    "padding-tp2": lambda: Job("padding-tp2", 2, 2, audit_workers.padding_rows_worker),
    "align-dp3": lambda: Job("align-dp3", 3, 1, audit_workers.sharded_alignment_worker),
    "none-group-w3": lambda: Job("none-group-w3", 3, 3, audit_workers.none_group_worker),
    "ce-edges-tp3": lambda: Job("ce-edges-tp3", 3, 3, audit_workers.cross_entropy_edges_worker),
    "memory-tp2": lambda: Job("memory-tp2", 2, 2, audit_workers.activation_memory_worker),
}
