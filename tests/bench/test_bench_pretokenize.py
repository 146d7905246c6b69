"""The pretokenizer benchmark's own mix builder (run by `make bench`, not by the suite): it must
keep working as the readers change, and its expected texts must be what the pretokenizer reads."""

import subprocess
import sys
from pathlib import Path

from bench.bench_pretokenize import make_mix
from data.loader import SFTDataset

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_mix_is_what_the_pretokenizer_reads(tmp_path):
    config, texts = make_mix(tmp_path / "mix", 60)
    assert len(texts) == 60
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "data.pretokenize", str(config), "--data-root",
                    str(config.parent), "--output-dir", str(out), "--no-progress"], cwd=ROOT,
                   check=True, capture_output=True, text=True)  # fmt: skip
    [idx] = out.glob("*-train-text.idx")
    ds = SFTDataset(str(idx).removesuffix("-text.idx"))
    [val] = out.glob("*-val-text.idx") or [None]
    n_val = len(SFTDataset(str(val).removesuffix("-text.idx"))) if val else 0
    assert len(ds) + n_val == len(texts)
