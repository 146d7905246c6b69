"""Triton kernels (one family per file) and their plain-PyTorch references (reference.py).

Each public function runs the Triton kernel for CUDA tensors (and for CPU tensors under
`TRITON_INTERPRET=1`, which is how the CPU test suite exercises the kernels) and the reference
otherwise. This package never imports parallel/, model/ or train/.
"""
