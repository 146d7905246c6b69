"""pytest plugin: keep every K-th selected test, for gpu_check's concurrent test shards.

`PYTEST_SHARD=i/K python3 -m pytest -p bench.pytest_shard ...` runs the tests whose position in
the selected list (after `-m` and `-k` deselection) is i modulo K. Round-robin over the selected
list spreads each parametrized family (the kernels' hundreds of compiles) over every shard, which
a split by file would not.
"""

from __future__ import annotations

import os

import pytest


def parse_shard(text: str) -> tuple[int, int]:
    """'i/K' -> (i, K) with 0 <= i < K."""
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        i, k = -1, 0
    if not 0 <= i < k:
        raise pytest.UsageError(f"PYTEST_SHARD={text!r}: expected i/K with 0 <= i < K, e.g. 0/4")
    return i, k


@pytest.hookimpl(trylast=True)  # after the marker and keyword deselection
def pytest_collection_modifyitems(config, items) -> None:
    text = os.environ.get("PYTEST_SHARD")
    if not text:
        return
    i, k = parse_shard(text)
    keep = [it for n, it in enumerate(items) if n % k == i]
    drop = [it for n, it in enumerate(items) if n % k != i]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
