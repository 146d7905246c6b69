"""Intra-op threads for work on the CPU (training, sampling): one unless OMP_NUM_THREADS says."""

import os

import torch


def one_thread_unless_asked(device: torch.device) -> None:
    """On the CPU, one intra-op thread unless OMP_NUM_THREADS is set.

    Measured on this project's 2-core machine: on the tiny preset a second thread gains 1.3x
    when the machine is idle (training, 0.55 vs 0.72 s/iteration) and loses badly when another
    process holds a core, because OpenMP's threads spin waiting for a core they do not get:
    training 2.7x slower; `make sample`'s 8 prompts 0.40 s at one thread and 5.3 to 14.5 s at two.
    torchrun's CPU ranks want one thread each anyway."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
