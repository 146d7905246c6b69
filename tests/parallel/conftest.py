"""`dist_job(name)`: the outcome of a multi-rank job. On first use the session runs every job
that the selected tests name (their `job` parameter), one gloo launch per world size."""

import pytest

from tests.parallel._harness import job_outcome, run_jobs
from tests.parallel.jobs import JOBS


@pytest.fixture(scope="session")
def dist_job(request, tmp_path_factory):
    wanted = {
        item.callspec.params["job"]
        for item in request.session.items
        if "dist_job" in getattr(item, "fixturenames", ())
        and "job" in getattr(getattr(item, "callspec", None), "params", {})
    }
    jobs = [make() for name, make in JOBS.items() if name in wanted]
    out = str(tmp_path_factory.mktemp("dist_jobs"))
    errors = {}
    for world in sorted({j.world for j in jobs}):
        errors[world] = run_jobs([j for j in jobs if j.world == world], out)
    world_of = {j.name: j.world for j in jobs}

    def check(name: str) -> None:
        why = job_outcome(name, out, errors.get(world_of.get(name)))
        if why is not None:
            pytest.fail(why, pytrace=False)

    return check
