"""Telemetry: FLOP formula, the console line, metrics.jsonl/TensorBoard, the wandb fallback."""

import json
import sys

import pytest
import torch

from model.config import PRESETS
from train.metrics import Telemetry, causal_pairs, matmul_params, step_flops, train_line


def test_flops_formula_by_hand():
    cfg = PRESETS["llama2-70b"]
    v = 32768
    h, f, L = 8192, 28672, 80
    qkv = (64 + 2 * 8) * 128 * h
    per_layer = qkv + h * h + 3 * h * f
    assert matmul_params(cfg, v) == L * per_layer + v * h  # + output head, not the embedding
    cu = torch.tensor([0, 3, 7, 7, 12], dtype=torch.int32)  # documents of 3, 4, 0, 5 tokens
    assert causal_pairs(cu) == 6 + 10 + 0 + 15
    assert step_flops(cfg, v, 12, 31) == 6 * matmul_params(cfg, v) * 12 + 12 * L * h * 31


def test_train_line_has_megatrons_shape():
    row = {"consumed_samples": 640, "iter_ms": 1234.5, "lr": 1e-5, "global_batch_size": 64,
           "lm_loss": 1.234567, "grad_norm": 0.5, "skipped": 0, "tokens_per_s": 1000.0,
           "tflops": 400.0, "mfu": 0.4044, "mem_gib": 1.5, "mem_what": "max allocated",
           "eta_s": 3725}  # fmt: skip
    line = train_line(10, 200, row)
    for part in ("iteration       10/     200", "consumed samples:          640",
                 "learning rate: 1.000000E-05", "lm loss: 1.234567E+00", "grad norm: 0.500",
                 "tokens/s: 1000", "TFLOP/s: 400.0", "MFU: 40.4%", "ETA: 1:02:05"):  # fmt: skip
        assert part in line, part


def test_telemetry_writes_jsonl_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.warns(UserWarning, match="wandb is not installed"):
        t = Telemetry(str(tmp_path), str(tmp_path / "tb"), {"project": "x"}, {})
    t.record("train", 3, {"lm_loss": 2.5, "tflops": None, "note": "s"}, "train")
    t.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["type"] == "train" and rows[0]["iteration"] == 3 and rows[0]["lm_loss"] == 2.5
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
     ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12),
     ("Tesla V100-SXM2-16GB", None)],
)  # fmt: skip
def test_mfu_peak_is_the_cards_own(monkeypatch, name, peak):
    # The PCIe and NVL cards share the SXM card's name prefix but not its clocks and power:
    # dividing by the SXM peak would under-report their MFU by a fifth or more.
    from train.metrics import peak_flops_per_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert peak_flops_per_gpu() == peak
