"""Parallel runtime on torch.distributed: process groups (ParallelDims), communication as autograd
functions, tensor/sequence-parallel layers, vocab-parallel cross-entropy, data-parallel gradient
buffers, gradient norm, pipeline schedule and executor. Nothing here keeps module-level state:
every function takes its process group explicitly."""
