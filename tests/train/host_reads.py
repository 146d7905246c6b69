"""Counting device-to-host reads of a training run on CPU (tests/train/test_host_syncs.py).

On a GPU every `.item()`, `float(t)`, `int(t)`, `bool(t)`, `.tolist()`, `.cpu()`, `.numpy()`,
`nonzero` (and what calls it: boolean-mask indexing, `unique`, `masked_select`,
`repeat_interleave` without output_size) of a device tensor, and every `torch.tensor(...,
device=...)` (a blocking host-to-device copy, which waits for the stream), stalls the host until
the GPU queue drains. On CPU nothing tells a would-be device tensor from a host one, so
`HostReads` follows provenance: the loader's batch tensors are host tensors, and so is whatever
is computed from host tensors alone; everything else (parameters, gradients, anything made by a
factory call inside the step) would live on the GPU. `device_copies` makes the trainer's copy of
a batch a distinct (would-be device) tensor, as `to_device` does on a GPU.

Reads under kernels/reference.py are the CPU stand-ins for Triton kernels (never run on a GPU)
and are counted apart, as `cpu_path`.
"""

import collections
import contextlib
import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_THIS = os.path.abspath(__file__)
_READ_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # item / float / int / bool / `if t:`
    torch.ops.aten.nonzero.default,  # boolean-mask indexing, masked_select, unique, ...
    torch.ops.aten.repeat_interleave.Tensor,  # without output_size: reads the repeats' sum
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
}
# Indexing ops that call nonzero on a boolean index inside their kernel (not seen as its own op).
_INDEX_OPS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


def _bool_index(func, args) -> bool:
    if func not in _INDEX_OPS or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


def _site() -> str | None:
    """file:line function of the innermost project frame outside this module; None inside
    Triton (the interpreter's own copies, under TRITON_INTERPRET=1)."""
    f = sys._getframe(1)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if f"{os.sep}triton{os.sep}" in path:
            return None
        if path.startswith(REPO) and path != _THIS and "/.venv/" not in path:
            return f"{os.path.relpath(path, REPO)}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "?"


class HostReads(TorchDispatchMode):
    """Counts would-be device-to-host reads by site while active (module docstring)."""

    def __init__(self):
        super().__init__()
        self._host: dict[int, weakref.ref] = {}
        self.reads: collections.Counter = collections.Counter()  # site -> would-be device reads
        self.cpu_path: collections.Counter = collections.Counter()  # under kernels/reference.py
        self.counting = True
        self._patches: list = []

    # --- provenance
    def mark_host(self, obj) -> None:
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                self._host[id(t)] = weakref.ref(t)

    def mark_device(self, obj) -> None:
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                self._host.pop(id(t), None)

    def is_host(self, t: torch.Tensor) -> bool:
        r = self._host.get(id(t))
        return r is not None and r() is t

    def _record(self, what: str) -> None:
        if not self.counting:
            return
        site = _site()
        if site is None:
            return
        (self.cpu_path if site.startswith("kernels/reference.py") else self.reads)[
            f"{site} [{what}]"
        ] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = bool(ins) and all(self.is_host(t) for t in ins)
        if (func in _READ_OPS or _bool_index(func, args)) and not host:
            self._record(func.__name__)
        if host:
            self.mark_host(out)
        return out

    # --- reads that do not dispatch on CPU, and blocking host-to-device copies
    def _patch(self, owner, name: str, make) -> None:
        old = getattr(owner, name)
        self._patches.append((owner, name, old))
        setattr(owner, name, make(old))

    def __enter__(self):
        mode = self

        def method(name):
            def make(old):
                def wrapper(t, *a, **k):
                    if not mode.is_host(t):
                        mode._record(name)
                    return old(t, *a, **k)

                return wrapper

            return make

        for name in ("tolist", "numpy", "cpu"):
            self._patch(torch.Tensor, name, method(name))

        def make_tensor(old):
            def tensor(*a, **k):
                t = old(*a, **k)
                if k.get("device") is not None:  # a blocking copy to the device on a GPU
                    mode._record("torch.tensor(device=)")
                else:
                    mode.mark_host(t)
                return t

            return tensor

        self._patch(torch, "tensor", make_tensor)
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, old in reversed(self._patches):
            setattr(owner, name, old)
        self._patches.clear()
        return super().__exit__(*exc)

    def total(self) -> int:
        return sum(self.reads.values())


@contextlib.contextmanager
def paused(mode: HostReads):
    """Not counted: the data loader's own host work."""
    was, mode.counting = mode.counting, False
    try:
        yield
    finally:
        mode.counting = was


def device_copies(monkeypatch_setattr, mode: HostReads) -> None:
    """Make `train.loop.to_device` return fresh copies (would-be device tensors, as on a GPU,
    where the copy is another tensor than the loader's) instead of the same CPU tensors."""
    import train.loop as loop

    def to_device(mb: dict, device) -> dict:
        out = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        mode.mark_device(out)  # a clone of host tensors would count as one
        return out

    monkeypatch_setattr(loop, "to_device", to_device)


class CountingLoader:
    """Wraps a loader: batches are host tensors, the loader's work is not counted, and the reads
    of each iteration (from one batch request to the next) are kept in `per_iteration`."""

    def __init__(self, inner, mode: HostReads):
        self.inner, self.mode = inner, mode
        self.per_iteration: list[collections.Counter] = []
        self._start: collections.Counter | None = None

    def _close_iteration(self) -> None:
        if self._start is not None:
            self.per_iteration.append(collections.Counter(self.mode.reads) - self._start)
            self._start = None

    def next_global_batch(self) -> list[dict]:
        self._close_iteration()
        with paused(self.mode):
            batch = self.inner.next_global_batch()
        self.mode.mark_host(batch)
        self._start = collections.Counter(self.mode.reads)
        return batch

    def finish(self) -> None:
        """Close the last iteration (after run_training returned)."""
        self._close_iteration()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
