"""Unit tests of the benchmark plumbing: rows, ratios, goals, tables, JSON, plots, gpu_check.

Every number below is a FAKE TIMING made up to test the table/JSON/plot code; none is a
measurement, and everything is written under pytest's tmp_path only.
"""

import json
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.harness import (
    Row,
    add_ratios,
    format_summary,
    format_table,
    read_json,
    time_quantiles,
    write_json,
)

CEILINGS = {"copy_gbps": 2000.0, "matmul_tflops": 800.0}  # fake


def _fake_rows() -> list[Row]:
    rows = [
        Row(
            "rmsnorm",
            "16x32",
            "bf16",
            "fwd",
            "ours",
            ms=1.0,
            bytes=10**9,
            goals={"pct_of_ceiling": 40, "torch_compile": 1.0},
        ),
        Row("rmsnorm", "16x32", "bf16", "fwd", "torch_eager", ms=2.0, bytes=10**9),
        Row("rmsnorm", "16x32", "bf16", "fwd", "torch_compile", ms=0.8, bytes=10**9),
        Row(
            "rmsnorm",
            "16x32",
            "bf16",
            "bwd",
            "ours",
            ms=4.0,
            bytes=10**9,
            goals={"pct_of_ceiling": 10},
        ),
        Row("attention", "seq=8", "bf16", "fwd", "ours", ms=2.0, flops=1e12),
        Row("swiglu", "8x8", "bf16", "fwd", "liger", error="ImportError: fake"),
    ]
    for r in rows:
        r.fill_rates(CEILINGS)
    add_ratios(rows)
    return rows


def test_rates_ratios_and_goals():
    rows = _fake_rows()
    ours_fwd, eager, _, ours_bwd, attn, _ = rows
    assert ours_fwd.gbps == pytest.approx(1000.0) and ours_fwd.pct_of_ceiling == pytest.approx(50.0)
    assert attn.tflops == pytest.approx(500.0) and attn.pct_of_ceiling == pytest.approx(62.5)
    assert ours_fwd.ratio_vs == pytest.approx({"torch_eager": 2.0, "torch_compile": 0.8})
    assert eager.ratio_vs == {} and ours_bwd.ratio_vs == {}
    assert ours_fwd.missed_goals() == ["torch_compile 0.80 < 1"]
    assert ours_bwd.missed_goals() == []  # 12.5% >= 10%
    assert Row("x", "s", "bf16", "fwd", "ours", goals={"torch_fused": 1.05}).missed_goals() == [
        "torch_fused ? < 1.05"
    ]


def test_check_result_flags_a_wrong_result():
    ref = [torch.ones(8)]
    ok = Row("x", "s", "bf16", "fwd", "ours")
    assert ok.check_result([torch.ones(8) * 1.001], ref, 1e-2, "torch_eager")
    assert ok.error is None and ok.rel_err == pytest.approx(1e-3, rel=1e-3)
    bad = Row("x", "s", "bf16", "fwd", "ours")
    assert not bad.check_result([torch.ones(8) * 1.5], ref, 1e-2, "torch_eager")
    assert "differs from torch_eager" in bad.error


def test_tables_show_every_case_and_error():
    rows = _fake_rows()
    table, summary = format_table(rows), format_summary(rows)
    assert len(table.splitlines()) == 2 + len(rows)
    assert "ERROR: ImportError: fake" in table and "ERROR: ImportError: fake" in summary
    assert "MISSED torch_compile 0.80 < 1" in summary
    assert "1000 GB/s" in summary and "500 TF/s" in summary


def test_json_round_trip(tmp_path):
    rows = _fake_rows()
    path = write_json(
        rows, {"date": "2000-01-01", "extra": {"ceilings": CEILINGS}}, tmp_path / "r.json"
    )
    back, doc = read_json(path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in rows]
    assert doc["meta"] == {"date": "2000-01-01"} and doc["ceilings"] == CEILINGS
    assert json.loads(path.read_text())["rows"][0]["pass"] == "fwd"


def test_cpu_timer_returns_ordered_quantiles():
    x = torch.randn(1000)
    t = time_quantiles(lambda: x.sum(), warmup=1, rep=5, cuda=False)
    assert 0 < t.p20 <= t.ms <= t.p80


def test_plots_from_result_json(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plots

    write_json(
        _fake_rows(),
        {"card": "fake", "date": "2000-01-01", "extra": {"ceilings": CEILINGS}},
        tmp_path / "r.json",
    )
    (tmp_path / "not_a_result.json").write_text('{"rows": [{"op": 1}]}')
    assert plots.main([str(tmp_path)]) == 0
    assert (tmp_path / "r-bandwidth.png").stat().st_size > 1000
    assert (tmp_path / "r-tflops.png").stat().st_size > 1000


def test_card_slug_and_commit_without_git(tmp_path):
    assert gpu_check.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "packed-refs").write_text(
        "# pack-refs\n" + "ab" * 20 + " refs/heads/main\n"
    )
    assert gpu_check.git_commit(tmp_path)["commit"] == "ab" * 20
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text("cd" * 20 + "\n")
    assert gpu_check.git_commit(tmp_path)["commit"] == "cd" * 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_check_without_cuda_says_so(capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


FAKE_MODULES = {
    # gpu_rows with FAKE TIMINGS: a unit test of the section plumbing, not a measurement
    "fake_good.py": """
        import glob, json, os
        from bench.harness import Row
        def gpu_rows(ceilings, quick, deadline=None, device="cuda"):
            # what the parent saved in $OUT before starting this section
            [saved] = glob.glob(os.path.join(os.environ["OUT"], "*-cpu-smoke.json"))
            seen = json.load(open(saved))["sections"]
            note = "FAKE; saved: " + ",".join(f"{k}={v['status']}" for k, v in seen.items())
            r = Row("fakeop", "1x1", "bf16", "fwd", "ours", ms=1.0, bytes=10**6, note=note)
            return [r.fill_rates(ceilings)]
    """,
    "fake_cut.py": """
        import time
        from bench.harness import Row
        def gpu_rows(ceilings, quick, deadline=None, device="cuda"):
            rows = []
            for i in range(3):
                r = Row("cutop", str(i), "bf16", "fwd", "ours")
                rows.append(r)
                if time.time() > deadline:
                    r.error = "skipped"
                    continue
                try:  # as every family: a failed measurement is a row, the others go on
                    if i == 1:
                        time.sleep(600)  # a compile that outlasts the section's limit
                    r.ms = 1.0
                except Exception as e:
                    r.error = f"{type(e).__name__}: {e}"
            return rows
    """,
    "fake_bad.py": """
        def gpu_rows(ceilings, quick, deadline=None, device="cuda"):
            raise RuntimeError("fake kernel crash")
    """,
    "fake_slow.py": """
        import time
        def gpu_rows(ceilings, quick, deadline=None, device="cuda"):
            time.sleep(600)
    """,
    "test_fake_gpu.py": """
        import pytest
        @pytest.mark.gpu
        def test_ok():
            pass
        @pytest.mark.gpu
        def test_broken():
            assert False
    """,
}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode")
def test_gpu_check_sections_report_crashes_and_timeouts(tmp_path, monkeypatch, capsys):
    for name, text in FAKE_MODULES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setattr(gpu_check, "MIN_SECTION_S", 1)
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    monkeypatch.setattr(gpu_check, "INTERRUPT_S", 1)
    monkeypatch.setattr(
        gpu_check,
        "SECTIONS",
        [
            ("tests", None, 60),
            ("good", "fake_good", 60),
            ("bad", "fake_bad", 60),
            ("cut", "fake_cut", 6),  # 12 s (twice nominal): time for the child to start
            ("slow", "fake_slow", 2),
            ("later", "not_written_yet", 60),
        ],
    )
    rc = gpu_check.main(
        [
            "--cpu-smoke",
            "--out-dir",
            str(tmp_path / "res"),
            "--budget-s",
            "400",
            "--tests-path",
            str(tmp_path / "test_fake_gpu.py"),
            "--test-shards",
            "2",
            "--log-dir",
            str(tmp_path / "logs"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1, out  # a failed test and two failed sections
    [json_path] = (tmp_path / "res").glob("*-cpu-smoke.json")
    rows, doc = read_json(json_path)
    assert doc["meta"]["cpu_smoke"] and doc["meta"]["git"]["commit"]
    # two concurrent shards, one test each: the counts are their sum
    assert doc["tests"]["passed"] == 1 and doc["tests"]["failed"] == 1
    assert doc["tests"]["shards"] == 2 and "over 2 shards" in doc["tests"]["summary"]
    # junit names the class relative to pytest's rootdir, which depends on where the checkout
    # and the temporary directory sit (a clone under /tmp prefixes the tmp path).
    [failed_id] = doc["tests"]["failed_ids"]
    assert failed_id.endswith("test_fake_gpu::test_broken"), failed_id
    s = doc["sections"]
    assert [s[k]["status"] for k in ("good", "bad", "cut", "slow", "later")] == [
        "ok",
        "FAILED",
        "FAILED",
        "FAILED",
        "absent",
    ]
    assert s["slow"]["timed_out"] and "fake kernel crash" in s["bad"]["tail"]
    assert [r.op for r in rows] == ["fakeop", "bad", "cutop", "cutop", "cutop", "cut", "slow"]
    assert (
        rows[0].pct_of_ceiling is not None
        and "fake kernel crash" in rows[1].error
        and "timed out" in rows[-1].error
    )
    # the results so far were saved before each section: the good one saw the tests' record
    assert "tests=FAILED" in rows[0].note and "good=RUNNING" in rows[0].note
    # interrupted at its limit, a section keeps what it measured: the row in flight says so,
    # the next was skipped by its deadline
    assert s["cut"]["timed_out"] and rows[2].ms == 1.0 and rows[2].error is None
    assert "SectionInterrupted" in rows[3].error and rows[4].error == "skipped"
    out_dir = tmp_path / "out"
    assert (out_dir / json_path.name).exists() and (
        out_dir / json_path.with_suffix(".md").name
    ).exists()
    # the device tool brings back at most 8 files from $OUT: the logs travel as one archive
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert len(files) == 3, files
    [archive] = out_dir.glob("*-logs.tar.gz")
    with tarfile.open(archive) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"tests-0.log", "tests-1-junit.xml", "cut.log", "good-rows.json"} <= names
    # --log-dir keeps them where it says (the default is a new temporary folder), and the
    # results name that folder
    assert doc["meta"]["log_dir"] == str(tmp_path / "logs")
    assert names <= {p.name for p in (tmp_path / "logs").iterdir()} | {json_path.stem + "-logs"}
    assert f"section logs in {tmp_path / 'logs'}" in out
    assert out.rstrip().splitlines()[-1].startswith("slow"), "the short table must come last"


_MANY_TESTS = """
import pytest
@pytest.mark.parametrize("i", range(7))
@pytest.mark.gpu
def test_gpu(i):
    assert i != 4
def test_not_gpu():
    pass
"""


@pytest.mark.parametrize("shards", [1, 3])
def test_gpu_tests_split_over_shards_count_every_test_once(tmp_path, shards):
    """The shards deal the gpu-marked tests round-robin: the sums are one run's counts, the
    failure is reported once, and no test runs twice or not at all."""
    (tmp_path / "test_many.py").write_text(_MANY_TESTS)
    logdir = tmp_path / "logs"
    logdir.mkdir()
    rec = gpu_check.run_tests(60, logdir, str(tmp_path / "test_many.py"), shards)
    assert (rec["passed"], rec["failed"], rec["errors"], rec["skipped"]) == (6, 1, 0, 0), rec
    [failed] = rec["failed_ids"]
    assert failed.endswith("test_gpu[4]") and not rec["ok"] and not rec["timed_out"]
    ran = []
    for xml in logdir.glob("*junit.xml"):
        ran += [c.get("name") for c in ET.parse(xml).getroot().iter("testcase")]
    assert sorted(ran) == sorted(f"test_gpu[{i}]" for i in range(7))
    assert len(list(logdir.glob("*junit.xml"))) == shards


def test_pytest_shard_refuses_a_bad_spec():
    from bench.pytest_shard import parse_shard

    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(pytest.UsageError, match="expected i/K"):
            parse_shard(bad)


def test_gpu_tests_run_the_kernels_last():
    """The kernels' compiles take most of the tests section: every other folder goes first, so
    an interrupted run still has the quick GPU tests (training, optimizers)."""
    paths = gpu_check.ordered_test_paths("tests")
    assert paths[-1] == "tests/kernels" and paths.count("tests/kernels") == 1
    assert {"tests/train", "tests/parallel3d", "tests/hf"} <= set(paths)
    assert not any(p.endswith("__pycache__") for p in paths)
    assert gpu_check.ordered_test_paths("tests/train") == ["tests/train"]
    # the tests folder's own test files are not left out (tests/test_makefile.py), nor its
    # helpers taken for tests
    assert "tests/test_makefile.py" in paths and "tests/conftest.py" not in paths
    assert "tests/gloo_ranks.py" not in paths


def test_gpu_tests_at_an_absolute_path_outside_the_checkout(tmp_path):
    """--tests-path may name a folder outside the repository (a copy of the tests): its paths
    stay absolute instead of failing relative_to."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "test_top.py").write_text("")
    paths = gpu_check.ordered_test_paths(str(tmp_path))
    assert paths == [
        str(tmp_path / "test_top.py"),
        str(tmp_path / "train"),
        str(tmp_path / "kernels"),
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode")
def test_gpu_check_verdict_fits_the_device_tools_output_tail(tmp_path, monkeypatch, capsys):
    """The device tool returns the last 12,000 characters of the run's output. A long short
    table (tune candidates, every skipped baseline of a starved run) must not push the verdict
    lines above it out of that tail: the table printed last is cut to fit, and says where the
    rest is."""
    from bench import harness

    long_table = "\n".join(f"op{i:03d}  " + "x" * 150 for i in range(300))  # 47k characters
    monkeypatch.setattr(harness, "format_summary", lambda rows: long_table)
    monkeypatch.setattr(gpu_check, "SECTIONS", [])
    monkeypatch.delenv("OUT", raising=False)
    rc = gpu_check.main(
        ["--cpu-smoke", "--out-dir", str(tmp_path), "--log-dir", str(tmp_path / "logs")]
    )
    out = capsys.readouterr().out
    tail = out[-12_000:]
    assert rc == 0 and "gpu_check ok in" in tail and "wrote " in tail, tail[:300]
    assert out.rstrip().splitlines()[-1].startswith("... "), "the cut table comes last"
    assert "op000" in tail  # the table's first lines are the ones kept
    [md] = tmp_path.glob("*-cpu-smoke.md")
    assert long_table in md.read_text()  # the files keep the whole table


# one row with a FAKE TIMING: the plumbing of the results, not a measurement
FAKE_PLAIN = """
from bench.harness import Row
def gpu_rows(ceilings, quick, deadline=None, device="cuda"):
    return [Row("fakeop", "1x1", "bf16", "fwd", "ours", ms=1.0, bytes=10**6).fill_rates(ceilings)]
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode")
def test_gpu_check_prints_its_table_when_the_results_cannot_be_written(
    tmp_path, monkeypatch, capsys
):
    """A results folder that fails at the end (disk full, $OUT gone) still leaves the table in
    the output, which is then all that comes back from the device, and the run says it failed;
    a log archive that cannot be written does not cost the results written before it."""
    (tmp_path / "fake_plain.py").write_text(FAKE_PLAIN)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(gpu_check, "SECTIONS", [("good", "fake_plain", 60)])
    monkeypatch.delenv("OUT", raising=False)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gpu_check, "_save", no_space)
    rc = gpu_check.main(
        ["--cpu-smoke", "--out-dir", str(tmp_path / "res"), "--log-dir", str(tmp_path / "l1")]
    )
    out = capsys.readouterr().out
    assert rc == 1 and "could not save the final results: [Errno 28]" in out
    assert out.rstrip().splitlines()[-1].startswith("fakeop"), out[-500:]

    monkeypatch.undo()
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(gpu_check, "SECTIONS", [("good", "fake_plain", 60)])
    monkeypatch.setenv("OUT", str(tmp_path / "out"))

    def broken_tar(*args, **kwargs):
        raise tarfile.TarError("broken")

    monkeypatch.setattr(gpu_check.tarfile, "open", broken_tar)
    rc = gpu_check.main(
        ["--cpu-smoke", "--out-dir", str(tmp_path / "res2"), "--log-dir", str(tmp_path / "l2")]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "could not archive the logs into $OUT: broken" in out
    assert len(list((tmp_path / "out").glob("*-cpu-smoke.json"))) == 1
