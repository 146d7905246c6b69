"""The per-card tuning table: file format, errors that name the file, and how entries apply."""

import json
from typing import NamedTuple

import pytest
import torch

from kernels import tuning


class _Cfg(NamedTuple):
    warps: int
    rows: int
    cache: bool


def test_card_slug():
    assert tuning.card_slug("NVIDIA H200") == "nvidia-h200"
    assert tuning.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_load_table(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    assert tuning.load_table(path) == {}  # no file: no entries
    ops = {"rmsnorm_bwd": {"hidden=8192": {"warps": 16, "rows": 2}}}
    path.write_text(json.dumps({"card": "NVIDIA H200", "ops": ops}))
    tuning.load_table.cache_clear()
    assert tuning.load_table(path) == ops


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"ops": {"rmsnorm_bwd": ', r"nvidia-h200.json:1: not valid JSON"),
        ('{"ops": {"rmsnorm_bwd": [1, 2]}}', r"nvidia-h200.json: expected"),
        ("[]", r"nvidia-h200.json: expected"),
    ],
)
def test_bad_table_names_the_file(tmp_path, text, match):
    path = tmp_path / "nvidia-h200.json"
    path.write_text(text)
    tuning.load_table.cache_clear()
    with pytest.raises(ValueError, match=match):
        tuning.load_table(path)


def test_apply():
    d = _Cfg(8, 1, False)
    assert tuning.apply(d, None, "src") is d
    assert tuning.apply(d, {"rows": 4, "cache": True}, "src") == _Cfg(8, 4, True)
    with pytest.raises(ValueError, match="src: unknown parameter.*'block'"):
        tuning.apply(d, {"block": 4}, "src")
    with pytest.raises(ValueError, match="src: parameter warps=8.0 should be int"):
        tuning.apply(d, {"warps": 8.0}, "src")
    with pytest.raises(ValueError, match="src: parameter rows=True should be int"):
        tuning.apply(d, {"rows": True}, "src")


def test_no_table_off_cuda(tmp_path):
    assert tuning.lookup("rmsnorm_fwd", "hidden=8", torch.device("cpu"), tmp_path) is None
