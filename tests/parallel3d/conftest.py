"""Fixtures shared by the multi-process runs of `python -m train`."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel3d.common import REPO


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The bundled sample_stage1 mix, pretokenized afresh: its train prefix."""
    out = tmp_path_factory.mktemp("data")
    subprocess.run(
        [sys.executable, "-m", "data.pretokenize", "configs/data/sample.yaml", "--mix",
         "sample_stage1", "--output-dir", str(out), "--no-progress"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    return out / "sample_stage1-train"
