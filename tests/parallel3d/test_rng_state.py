"""The RNG state a checkpoint saves, restored on a rank of another layout.

On a GPU each rank draws its dropout masks from the generator of its own device
(cuda:LOCAL_RANK), and the ranks of a pipeline stage draw alike (train.main seeds them alike), so
a stage's stream is the saver's *own-device* state. A resume at another TP/DP size reads a file of
the stage written by a rank with another local rank (train.loop._restore_rank_state); a state
restored by device index would hand the loader an untouched device's stream (the TP ranks of the
stage then draw different masks on replicated activations), or fail outright on a node with
fewer devices. No GPU here: a fake torch.cuda with per-device generator states stands in.
"""

import json

import pytest
import torch

from train import checkpoint as ckpt

SEEDED = [7] * 16  # every device's state right after torch.manual_seed (same on all devices)
ADVANCED = [9] * 16  # the state of the device that drew masks


class FakeCuda:
    """Per-device generator states and a current device, as torch.cuda keeps them."""

    def __init__(self, devices: int, current: int):
        self.states = [torch.tensor(SEEDED, dtype=torch.uint8) for _ in range(devices)]
        self.current = current

    def patch(self, mp: pytest.MonkeyPatch) -> None:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "is_initialized", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: len(self.states))
        mp.setattr(torch.cuda, "current_device", lambda: self.current)
        mp.setattr(torch.cuda, "get_rng_state", self.get)
        mp.setattr(torch.cuda, "set_rng_state", self.set)
        mp.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        mp.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def _index(self, device) -> int:
        if device is None or device == "cuda":
            return self.current
        return device if isinstance(device, int) else torch.device(device).index

    def get(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self._index(device)] = state.clone()

    def set_all(self, states) -> None:
        for i, s in enumerate(states):
            self.set(s, i)


def _saved_on(local_rank: int, devices: int = 8) -> dict:
    """What a rank on cuda:`local_rank` saves after drawing (JSON round trip, as on disk)."""
    with pytest.MonkeyPatch.context() as mp:
        cuda = FakeCuda(devices, local_rank)
        cuda.patch(mp)
        cuda.states[local_rank] = torch.tensor(ADVANCED, dtype=torch.uint8)
        return json.loads(json.dumps(ckpt.rng_state()))


@pytest.mark.parametrize(
    ("saver", "loader", "devices"), [(0, 0, 8), (0, 3, 8), (5, 1, 8), (6, 1, 2)]
)
def test_cuda_stream_lands_on_the_loaders_own_device(saver, loader, devices):
    """saver: the local rank that wrote the file; loader: the local rank reading it, on a node
    with `devices` GPUs. The loader's own device must continue the saver's stream."""
    state = _saved_on(saver)
    with pytest.MonkeyPatch.context() as mp:
        cuda = FakeCuda(devices, loader)
        cuda.patch(mp)
        cpu_before = torch.get_rng_state()
        try:
            ckpt.set_rng_state(state)
            assert cuda.states[loader].tolist() == ADVANCED, (
                f"cuda:{loader} got {cuda.states[loader].tolist()[:4]}..., not the stream of "
                f"the saver's cuda:{saver}"
            )
            assert torch.get_rng_state().tolist() == state["cpu"]
        finally:
            torch.set_rng_state(cpu_before)


def test_a_checkpoint_without_cuda_state_restores_the_cpu_stream():
    cpu_before = torch.get_rng_state()
    try:
        torch.manual_seed(3)
        state = json.loads(json.dumps(ckpt.rng_state()))
        want = torch.rand(4)
        torch.manual_seed(4)
        ckpt.set_rng_state(state)
        assert torch.equal(torch.rand(4), want)
    finally:
        torch.set_rng_state(cpu_before)
