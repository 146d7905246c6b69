"""Every communication function, forward and backward, and the column/row-parallel linear layers
(with and without SP) against single-process computations, at 2 and 4 gloo ranks."""

import pytest
import torch

from parallel import comm


@pytest.mark.slow
@pytest.mark.parametrize("job", ["comm-tp2", "comm-tp4"])
def test_comm_functions_and_linear_layers(dist_job, job):
    dist_job(job)


def test_size_one_is_identity():
    x = torch.randn(4, 6, requires_grad=True)
    for fn in (
        comm.copy_to_tp,
        comm.reduce_from_tp,
        comm.scatter_to_tp,
        comm.gather_from_tp,
        comm.scatter_to_sp,
        comm.gather_from_sp,
        comm.reduce_scatter_to_sp,
    ):
        assert fn(x, None) is x, fn.__name__
    t = torch.ones(3)
    assert comm.all_reduce_sum(t, None) is t and torch.equal(t, torch.ones(3))
