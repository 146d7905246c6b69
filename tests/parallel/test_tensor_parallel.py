"""TP=2 and TP=4, with and without sequence parallelism, versus one process from the same full
weights: step-0 loss (rtol 1e-5), gathered gradients (rtol 1e-4), 10 AdamW steps of losses
(rtol 1e-5) and gradient norms; GQA heads split per KV group; dropout RNG streams."""

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("job", ["tp2", "tp4"])
def test_tp_sp_match_single_process(dist_job, job):
    dist_job(job)


@pytest.mark.parametrize("job", ["dropout-tp2"])
def test_dropout_streams(dist_job, job):
    dist_job(job)


@pytest.mark.parametrize("job", ["meta-tp2"])
def test_meta_model_parallelizes_then_loads(dist_job, job):
    dist_job(job)
