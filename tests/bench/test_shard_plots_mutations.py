"""bench.pytest_shard and bench.plots pinned by a mutation pass.

pytest_shard: every selected test in exactly one shard, dealt round-robin after -m/-k
deselection, and the dropped ones reported as deselected. plots: which rows become bars (a value,
no error), at which x and height, under which impl and case labels, with which ceiling line, and
which files the folder form reads or skips. Every number is a FAKE value for the plot code.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import pytest_shard
from bench.harness import Row, write_json

REPO = Path(__file__).resolve().parents[2]


class _Hook:
    def __init__(self):
        self.deselected: list = []

    def pytest_deselected(self, items):
        self.deselected.append(list(items))


class _Config:
    def __init__(self):
        self.hook = _Hook()


@pytest.mark.parametrize("n_items, k", [(10, 3), (2, 4), (9, 1)])
def test_shards_deal_every_item_once_round_robin(monkeypatch, n_items, k):
    """Shard i keeps the items at positions i, i+K, ... (more items than K*K too), reports the
    rest to pytest as deselected, and the shards together hold each item exactly once."""
    items = [f"t{n}" for n in range(n_items)]
    seen = []
    for i in range(k):
        monkeypatch.setenv("PYTEST_SHARD", f"{i}/{k}")
        mine, config = list(items), _Config()
        pytest_shard.pytest_collection_modifyitems(config, mine)
        assert mine == items[i::k]
        dropped = [it for it in items if it not in mine]
        assert config.hook.deselected == ([dropped] if dropped else [])
        seen += mine
    assert sorted(seen) == sorted(items)


def test_without_pytest_shard_nothing_is_dropped(monkeypatch):
    monkeypatch.delenv("PYTEST_SHARD", raising=False)
    items, config = ["a", "b"], _Config()
    pytest_shard.pytest_collection_modifyitems(config, items)
    assert items == ["a", "b"] and config.hook.deselected == []


def _collected(tmp_path, shard: str) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "bench.pytest_shard", "-p", "no:cacheprovider",
         "-c", str(tmp_path / "pytest.ini"), "--collect-only", "-q", "-m", "gpu",
         str(tmp_path / "test_alt.py")],
        env={"PYTEST_SHARD": shard, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return [line.split("::")[1] for line in r.stdout.splitlines() if "::" in line]


def test_shards_split_after_marker_deselection(tmp_path):
    """The split runs after -m: with gpu tests interleaved among others, both shards get half of
    the gpu tests. Split before -m, the gpu tests at even positions would all land in one."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: fake\n")
    (tmp_path / "test_alt.py").write_text(
        "import pytest\n"
        + "".join(
            f"@pytest.mark.gpu\ndef test_g{n}():\n    pass\ndef test_c{n}():\n    pass\n"
            for n in range(4)
        )
    )
    a, b = _collected(tmp_path, "0/2"), _collected(tmp_path, "1/2")
    assert a == ["test_g0", "test_g2"] and b == ["test_g1", "test_g3"]


# ------------------------------------------------------------------------------------------------
# plots

CEILINGS = {"copy_gbps": 2000.0, "matmul_tflops": 800.0}  # fake
BIG, SMALL = "4096x8192", "1024x8192"  # first-seen order is not sorted order


def _rows() -> list[Row]:
    def r(op, shape, impl, **kw):
        return Row(op, shape, "bf16", "fwd", impl, **kw)

    return [
        r("swiglu", "8x8", "ours", gbps=0.0),  # a zero rate is still a bar
        r("swiglu", "8x8", "torch_eager", gbps=20.0),
        r("rmsnorm", BIG, "ours", gbps=100.0),
        r("rmsnorm", SMALL, "ours", gbps=110.0),
        r("rmsnorm", BIG, "torch_eager", gbps=50.0),
        r("rmsnorm", SMALL, "torch_eager", gbps=55.0),
        r("rmsnorm", BIG, "liger", gbps=70.0),  # no SMALL row for liger
        r("rmsnorm", BIG, "torch_compile", gbps=999.0, error="differs from torch_eager"),
        r("rmsnorm", SMALL, "triton_only_ms", ms=1.0),  # neither rate: not plotted
        r("attention", "seq=8", "ours", tflops=300.0),
    ]


@pytest.fixture
def figures(monkeypatch):
    """The figures bench.plots draws, kept open (plt.close recorded instead) for inspection."""
    plt = pytest.importorskip("matplotlib.pyplot")
    real_close, figs = plt.close, []
    monkeypatch.setattr(plt, "close", figs.append)
    yield figs
    for f in figs:
        real_close(f)


def _bars(ax) -> dict[str, list[tuple[float, float]]]:
    """impl -> [(bar centre x, height)] of one panel."""
    return {
        c.get_label(): [(p.get_x() + p.get_width() / 2, p.get_height()) for p in c.patches]
        for c in ax.containers
    }


def _write(path, rows, **meta) -> Path:
    meta = {"card": "fake-card", "date": "2000-01-01", **meta}
    return write_json(rows, {**meta, "extra": {"ceilings": CEILINGS}}, path)


def test_bars_show_each_rows_value_at_its_case_and_impl(tmp_path, figures):
    """Bandwidth: a panel per op in first-seen order, a tick per case in row order, a bar per
    (case, impl) with that row's GB/s, impls side by side around the tick (a missing case leaves
    a gap), error rows and rows without the metric left out, the copy ceiling dashed."""
    from bench import plots

    path = _write(tmp_path / "r.json", _rows())
    made = plots.plot_file(path)
    assert made == [tmp_path / "r-bandwidth.png", tmp_path / "r-tflops.png"]
    bw, tf = figures
    swiglu, rmsnorm = bw.axes
    assert [ax.get_title() for ax in bw.axes] == ["swiglu", "rmsnorm"]
    assert [t.get_text() for t in rmsnorm.get_xticklabels()] == [
        f"{BIG}\nbf16 fwd",
        f"{SMALL}\nbf16 fwd",
    ]
    w = 0.8 / 3
    got = _bars(rmsnorm)
    assert list(got) == ["ours", "torch_eager", "liger"]
    want = {
        "ours": [(-w, 100.0), (1 - w, 110.0)],
        "torch_eager": [(0.0, 50.0), (1.0, 55.0)],
        "liger": [(w, 70.0)],
    }
    for impl, bars in want.items():
        assert got[impl] == [pytest.approx(b) for b in bars], impl
    assert _bars(swiglu) == {"ours": [(-0.2, 0.0)], "torch_eager": [(0.2, 20.0)]}
    for ax in bw.axes:
        assert ax.get_ylabel() == "GB/s"
        (line,) = ax.lines
        assert list(line.get_ydata()) == [2000.0, 2000.0] and line.get_linestyle() == "--"
        assert line.get_label() == "measured copy 2000"
    (attn,) = tf.axes
    assert attn.get_title() == "attention" and attn.get_ylabel() == "TFLOP/s"
    assert _bars(attn) == {"ours": [(0.0, 300.0)]}
    assert attn.lines[0].get_label() == "measured matmul 800"


def test_title_names_card_date_short_commit_and_cpu_smoke(tmp_path, figures):
    """The title says which card, day and commit (10 hex digits) a chart is from, and marks a
    CPU smoke run, whose numbers are no measurement."""
    from bench import plots

    commit = "0123456789abcdef0123456789abcdef01234567"
    path = _write(tmp_path / "r.json", _rows()[2:3], git={"commit": commit}, cpu_smoke=True)
    plots.plot_file(path)
    (fig,) = figures
    assert fig._suptitle.get_text() == (
        "fake-card 2000-01-01 commit 0123456789 (CPU SMOKE: plumbing check, not a measurement)"
    )


def test_only_metrics_present_get_a_chart(tmp_path, figures):
    """A result without TFLOP/s rows gets the bandwidth chart only: no empty tflops chart."""
    from bench import plots

    path = _write(tmp_path / "r.json", _rows()[:2])
    assert plots.plot_file(path) == [tmp_path / "r-bandwidth.png"]
    assert not (tmp_path / "r-tflops.png").exists() and len(figures) == 1


def test_folder_form_reads_result_json_only_and_skips_the_rest(tmp_path, capsys):
    """`bench.plots FOLDER` reads its *.json; files that are not gpu_check results (a JSON
    array such as gpu_check's own *-rows.json logs, a non-list "rows") are skipped with a line
    each and the rest still plotted; an empty folder says so."""
    pytest.importorskip("matplotlib")
    from bench import plots

    assert plots.main([str(tmp_path)]) == 0
    assert "no result JSON in" in capsys.readouterr().out
    (tmp_path / "a-rows.json").write_text(json.dumps([{"op": "x"}]))
    (tmp_path / "b.json").write_text('{"rows": 5}')
    _write(tmp_path / "c.json", _rows()[:2])
    (tmp_path / "c.md").write_text("| not | json |\n")
    assert plots.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "a-rows.json: not a gpu_check result" in out and "b.json: not a gpu_check result" in out
    assert f"{tmp_path / 'c.json'}: {tmp_path / 'c-bandwidth.png'}" in out
    assert "c.md" not in out and (tmp_path / "c-bandwidth.png").exists()
    assert len(out.strip().splitlines()) == 3
