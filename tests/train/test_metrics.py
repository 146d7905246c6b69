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


def test_small_helpers(monkeypatch):
    from train import metrics

    assert metrics.format_eta(-5.0) == "0:00:00"  # an overrun estimate is no negative ETA
    # The last rank logs (it holds the loss when pipelined), and a lone process does.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert metrics.is_logging_rank()
    monkeypatch.setenv("RANK", "0")
    assert not metrics.is_logging_rank()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert metrics.is_logging_rank()
    # ru_maxrss is in KiB on Linux: 3 GiB = 3 * 2**20 KiB.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    usage = type("U", (), {"ru_maxrss": 3 * 2**20})
    monkeypatch.setattr(metrics.resource, "getrusage", lambda *a: usage)
    assert metrics.memory_gib() == (3.0, "max RSS")


def test_line_details():
    from train.metrics import eval_line

    row = {"consumed_samples": 0, "iter_ms": 1.0, "lr": 1e-5, "global_batch_size": 1,
           "lm_loss": 1.0, "grad_norm": 0.5, "skipped": 0, "tokens_per_s": 1.0, "truncated": 0,
           "mem_gib": 1.5, "mem_what": "max RSS", "eta_s": 0}  # fmt: skip
    assert "samples cut" not in train_line(1, 1, row)  # nothing cut: no field
    assert "samples cut to seq_length: 2" in train_line(1, 1, {**row, "truncated": 2})
    line = eval_line(5, "valid", {"loss": 2.0, "ppl": 7.389, "accuracy": 0.5})
    want = " | loss: 2.000000E+00 | ppl: 7.389000E+00 | accuracy: 0.5000 |"
    assert line == " validation (valid) at iteration 5" + want


def test_telemetry_appends_and_keeps_non_finite_out_of_tensorboard(tmp_path):
    scalars = []
    for launch in range(2):  # a resume appends to the same metrics.jsonl
        t = Telemetry(str(tmp_path), None, None, {})
        t.tb = type("TB", (), {"add_scalar": lambda s, *a: scalars.append(a),
                               "flush": lambda s: None, "close": lambda s: None})()  # fmt: skip
        t.run_start(launch, {})
        t.record("train", launch, {"lm_loss": float("nan"), "grad_norm": 1.5}, "train")
        t.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows] == ["run_start", "train"] * 2
    assert scalars == [("train/grad_norm", 1.5, 0), ("train/grad_norm", 1.5, 1)]
