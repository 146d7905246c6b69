import torch

# The models here are tiny: one thread is faster than two, and on a shared, busy machine an
# OpenMP team spinning for a core it does not get makes every op tens of times slower.
torch.set_num_threads(1)
