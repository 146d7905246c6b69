"""`make gpu-check`: test and benchmark everything on a lent GPU in one call (< 8 min on an H100).

    python3 -m bench.gpu_check [--full] [--out-dir bench/results] [--budget-s 470]

Steps, each under its own time budget, each reported (a failure is a loud row, never a lost run):
  1. telemetry (nvidia-ml-py: card, driver, clocks, power, memory, clock-limit reasons)
  2. ceilings in this process: a 2 GiB device-to-device copy (GB/s, read + write bytes) and an
     8192^3 bf16 matmul (TFLOP/s)
  3. `python3 -m pytest tests -m gpu` in concurrent subprocesses (`--test-shards`, 4 on the lent
     machine's 16 cores; the tests are bound by Triton's compiles): pass/fail/skip counts summed
     over the shards, failed test ids, the tail of each shard's output
  4. one subprocess per benchmark family that exists: bench.tune (the launch-settings sweep; it
     writes kernels/tuned/<card>.json, which the later sections then use), bench.bench_kernels,
     bench.bench_attention, bench.bench_parallel, bench.bench_train (whole training steps:
     tokens/s, MFU, peak memory), each calling `gpu_rows(ceilings, quick)` (plus
     `deadline=` when the function accepts it, so it can stop cleanly before the hard kill). A
     subprocess per family keeps a crashed kernel (a poisoned CUDA context) from taking the
     others down.
  5. telemetry again (clocks and power after load)
Then it writes bench/results/<YYYY-MM-DD>-<card>.json and .md (copies under $OUT when set, with
the per-section logs as one <stem>-logs.tar.gz) and prints the short table last (cut to
SUMMARY_CHARS, so the verdict above it stays in the device tool's 12,000-character output tail).
Both files are also written before each section, so a run killed from outside keeps its finished
sections.
Exit status 1 when a test failed or a section crashed or timed out; the files are written
either way.

Without a CUDA device it says so and exits 0. `--cpu-smoke` runs the whole plumbing on CPU with
tiny shapes (into a temporary folder unless --out-dir is given): a check of this script, not a
measurement.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import importlib.util
import inspect
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (name, module, nominal budget in seconds on one H100, quick mode). The total with start-up and
# ceilings stays under 8 minutes; time a section leaves unused goes to the ones after it.
# "tune" writes kernels/tuned/<card>.json (bench/tune.py) before "kernels" runs, so the kernel
# rows measure the card's tuned settings; the table is also copied under $OUT to be committed.
# On the H200 of 2026-11-28 the GPU tests took 109 s in one process (134 tests then; 4 shards
# now), kernels 45 s, attention 29 s, parallel 8 s.
# Since then the tests check every attention autotune candidate in bf16 and compile about twice
# as many tuning candidates (about a hundred more compiles), and the sweep has ~170 candidates
# (~0.3 s each plus ~90 compiles), likeliest winners first. "train" builds a 1.9B-parameter
# trainer (a few seconds) and compiles and autotunes at its first step, then times its cases in
# priority order until its deadline. A section that overruns is interrupted (pytest still
# writes its report).
SECTIONS = [
    ("tests", None, 200),
    ("tune", "bench.tune", 95),
    ("kernels", "bench.bench_kernels", 65),
    ("attention", "bench.bench_attention", 45),
    ("parallel", "bench.bench_parallel", 20),
    ("train", "bench.bench_train", 45),
]
TOTAL_BUDGET_S = 470
FULL_SCALE = 3  # --full: every budget times this
GRACE_S = 15  # a child's own deadline is this much before its hard kill
MIN_SECTION_S = 20  # a section with less time left is skipped (and reported)
INTERRUPT_S = 10  # a section past its budget gets SIGINT this long before SIGKILL
# After SIGKILL, how long to wait for the group's leader to go before leaving it behind.
KILLED_WAIT_S = 30.0
# The device tool returns only the last 12,000 characters of a run's output. The short table
# printed last gets at most this many of them, so the verdict lines just above it (tests,
# ceilings, files written, ok/FAILED) always come back too; the whole table is in the files.
SUMMARY_CHARS = 8000


def git_commit(repo: Path = REPO) -> dict:
    """{"commit", "dirty"} from $GIT_COMMIT (set it when the tree was copied without its history,
    e.g. `GIT_COMMIT=<sha> make gpu-check` on a lent machine), else git, else .git/HEAD and refs."""
    if os.environ.get("GIT_COMMIT"):
        return {"commit": os.environ["GIT_COMMIT"], "dirty": None}
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        # A copy of the tree with an empty .git (as the device tool may send) makes
        # `git rev-parse HEAD` echo "HEAD": only a real object name counts.
        if re.fullmatch(r"[0-9a-f]{40}", sha):
            return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        head = (repo / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return {
                "commit": head if re.fullmatch(r"[0-9a-f]{40}", head) else f"unknown ({head})",
                "dirty": None,
            }
        ref = head[5:]
        loose = repo / ".git" / ref
        if loose.exists():
            return {"commit": loose.read_text().strip(), "dirty": None}
        packed = repo / ".git" / "packed-refs"
        for line in packed.read_text().splitlines() if packed.exists() else []:
            if line.endswith(" " + ref):
                return {"commit": line.split()[0], "dirty": None}
        return {"commit": f"unknown ({ref} not found)", "dirty": None}
    except OSError as e:
        return {"commit": f"unknown ({e})", "dirty": None}


def clip_lines(text: str, limit: int, rest: str) -> str:
    """`text` when it fits in `limit` characters; else its first whole lines within `limit`, then
    one line with how many were left out and `rest` (where they are)."""
    if len(text) <= limit:
        return text
    lines = text.splitlines()
    kept, size = [], 0
    for line in lines:
        size += len(line) + 1
        if size > limit:
            break
        kept.append(line)
    return "\n".join([*kept, f"... {len(lines) - len(kept)} more lines: {rest}"])


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", s) or "unknown-card"


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.pop("TRITON_INTERPRET", None)  # the GPU run must compile the kernels, not interpret them
    env.update(extra or {})
    return env


def _run(cmd: list[str], timeout_s: float, log: Path, env: dict | None = None) -> dict:
    """Run cmd in its own process group within timeout_s; its output goes to log.

    At the limit the group gets SIGINT first (pytest then still writes its summary and JUnit
    XML; a section's child records the measurement in flight as interrupted and writes the rows
    it has), and SIGKILL INTERRUPT_S later: the group also holds any compile workers it started.
    env: variables added to the child's environment."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(env),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        soft = max(1.0, timeout_s - INTERRUPT_S)
        left_running = False
        try:
            rc, timed_out = proc.wait(timeout=soft), False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGINT)
            try:
                rc = proc.wait(timeout=INTERRUPT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                try:
                    rc = proc.wait(timeout=KILLED_WAIT_S)
                except subprocess.TimeoutExpired:
                    # Stuck in the driver (uninterruptible): leave it, the other sections and
                    # the table at the end matter more than its exit status.
                    rc, left_running = -signal.SIGKILL, True
                    print(f"gpu_check: the process writing {log.name} outlived SIGKILL", flush=True)
    text = log.read_text(errors="replace")
    return {
        "returncode": rc,
        "timed_out": timed_out,
        # still there after SIGKILL: it may hold GPU memory the later sections then lack
        "left_running": left_running,
        "seconds": round(time.time() - t0, 1),
        "tail": text[-3000:],
    }


def ordered_test_paths(tests_path: str) -> list[str]:
    """`tests_path`, with its `kernels` folder last when it has one: the other GPU tests (bf16
    training, the optimizers, HF) take seconds, the kernels' hundreds of compiles take most of
    the budget, so a run interrupted at its deadline still has the quick ones."""
    root = REPO / tests_path  # an absolute tests_path stays itself
    if not (root / "kernels").is_dir():
        return [tests_path]
    first = sorted(
        p
        for p in root.iterdir()
        if p.name[0] not in "._"
        and p.name != "kernels"
        and (p.is_dir() or (p.name.startswith("test_") and p.suffix == ".py"))
    )
    return [_repo_relative(p) for p in [*first, root / "kernels"]]


def _repo_relative(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def default_test_shards() -> int:
    """Concurrent pytest processes for the GPU tests: one per 4 cores, at most 4. The tests are
    bound by Triton's compiles (one core each, plus ptxas), not by the GPU, so on the lent
    machine's 16 cores 4 shards take about a quarter of the time of one."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def _junit(xml: Path) -> dict:
    """Counts and failed ids from one pytest JUnit XML file."""
    out = {"passed": None, "failed": None, "errors": None, "skipped": None, "failed_ids": []}
    if not xml.exists():
        return out
    try:
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        total = int(suite.get("tests", 0))
        out["failed"] = int(suite.get("failures", 0))
        out["errors"] = int(suite.get("errors", 0))
        out["skipped"] = int(suite.get("skipped", 0))
        out["passed"] = total - out["failed"] - out["errors"] - out["skipped"]
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed_ids"].append(f"{case.get('classname')}::{case.get('name')}")
    except (ET.ParseError, AttributeError, ValueError) as e:
        out["parse_error"] = str(e)
    return out


def run_tests(budget_s: float, logdir: Path, tests_path: str, shards: int = 1) -> dict:
    """`pytest <tests_path> -m gpu` in `shards` concurrent processes (bench/pytest_shard.py
    deals the selected tests round-robin); counts from their JUnit XML, which survives any
    output format, summed over the shards."""
    base = [
        sys.executable,
        "-m",
        "pytest",
        *ordered_test_paths(tests_path),
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
    ]

    def one(i: int) -> dict:
        name = "tests" if shards == 1 else f"tests-{i}"
        xml = logdir / f"{name}-junit.xml"
        # A report already in logdir (main refuses a used --log-dir; a caller may not) must not
        # stand in for this run's when pytest dies before writing one (SIGKILL, a crash).
        xml.unlink(missing_ok=True)
        cmd = base + [f"--junitxml={xml}"]
        env = None
        if shards > 1:
            cmd += ["-p", "bench.pytest_shard"]
            env = {"PYTEST_SHARD": f"{i}/{shards}"}
        return {**_run(cmd, budget_s, logdir / f"{name}.log", env=env), **_junit(xml)}

    with concurrent.futures.ThreadPoolExecutor(shards) as pool:
        parts = list(pool.map(one, range(shards)))
    out = {
        "shards": shards,
        "returncode": max((p["returncode"] for p in parts), key=lambda rc: (rc not in (0, 5), rc)),
        "timed_out": any(p["timed_out"] for p in parts),
        "left_running": any(p.get("left_running") for p in parts),
        "seconds": max(p["seconds"] for p in parts),
        "tail": "\n".join(p["tail"][-3000 // shards :] for p in parts),
        "failed_ids": [f for p in parts for f in p["failed_ids"]],
    }
    for key in ("passed", "failed", "errors", "skipped"):
        counts = [p[key] for p in parts]
        out[key] = None if None in counts else sum(counts)
    errors = [p["parse_error"] for p in parts if "parse_error" in p]
    if errors:
        out["parse_error"] = "; ".join(errors)
    summary = []
    for p in parts:
        lines = [
            ln
            for ln in p["tail"].splitlines()
            if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)
        ]
        summary.append(lines[-1].strip("= ") if lines else "no summary line")
    if shards == 1:
        out["summary"] = summary[0] if summary[0] != "no summary line" else ""
    elif out["passed"] is not None:
        out["summary"] = (
            f"{out['passed']} passed, {out['failed']} failed, {out['errors']} errors, "
            f"{out['skipped']} skipped in {out['seconds']} s over {shards} shards"
        )
    else:
        out["summary"] = " | ".join(summary)
    out["shard_summaries"] = summary
    # pytest's 0 is all passed, 5 is nothing collected (no gpu tests, or none in this shard);
    # anything else failed
    out["ok"] = not out["timed_out"] and all(p["returncode"] in (0, 5) for p in parts)
    return out


def run_section(
    name: str, module: str, budget_s: float, ceilings: dict, quick: bool, logdir: Path, device: str
) -> dict:
    """Run `module.gpu_rows` in a child process; returns the section record with its rows."""
    result = logdir / f"{name}-rows.json"
    # Rows already in logdir (main refuses a used --log-dir; a caller may not) must not be
    # reported as this run's when the child dies before writing its own (a crash, a SIGKILL).
    result.unlink(missing_ok=True)
    ceil = logdir / "ceilings.json"
    ceil.write_text(json.dumps(ceilings))
    deadline = time.time() + max(budget_s - GRACE_S, budget_s / 2)
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--child",
        module,
        "--ceilings",
        str(ceil),
        "--result",
        str(result),
        "--deadline",
        str(deadline),
        "--device",
        device,
    ] + (["--quick"] if quick else [])
    # Triton prints each autotuned kernel's winner into the section's log: which attention tiles
    # the autotuner kept is what NOTES.md's prediction 6 asks, and no row records it.
    out = _run(cmd, budget_s, logdir / f"{name}.log", env={"TRITON_PRINT_AUTOTUNING": "1"})
    out["rows"] = json.loads(result.read_text()) if result.exists() else []
    out["ok"] = out["returncode"] == 0 and not out["timed_out"] and result.exists()
    return out


class SectionInterrupted(Exception):
    """Raised in a section's child when `_run` interrupts it at its time limit. An Exception, not
    a KeyboardInterrupt: every family records an exception on the measurement in flight and goes
    on, and by then its deadline has passed, so it skips the rest and returns the rows it has
    instead of losing them all."""


def _interrupted(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # once: the next signal is the SIGKILL
    raise SectionInterrupted("interrupted at the section's time limit")


def child_main(args) -> int:
    """In the child: import the family's module, call gpu_rows, write its rows as JSON."""
    signal.signal(signal.SIGINT, _interrupted)
    import torch  # noqa: F401  (import before the module so its CUDA errors name the module)

    mod = importlib.import_module(args.child)
    ceilings = json.loads(Path(args.ceilings).read_text())
    fn = mod.gpu_rows
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "deadline" in params:
        kwargs["deadline"] = args.deadline
    if "device" in params:
        kwargs["device"] = args.device
    elif args.device != "cuda":
        print(f"{args.child}.gpu_rows has no device argument: skipped on {args.device}")
        Path(args.result).write_text("[]")
        return 0
    rows = fn(ceilings, args.quick, **kwargs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the rows are in hand: write them whole
    tmp = Path(args.result + ".tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in rows], default=str))
    tmp.replace(args.result)  # a SIGKILL mid-write leaves no half file for the parent to read
    return 0


def _versions() -> dict:
    out = {"python": platform.python_version(), "host": platform.node()}
    for mod in ("torch", "triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:
            out[mod] = f"not importable ({type(e).__name__})"
    return out


def _write_markdown(path: Path, doc: dict, summary: str, table: str) -> None:
    m, c, t = doc["meta"], doc.get("ceilings", {}), doc.get("tests", {})
    tel = doc.get("telemetry", {}).get("before", {})
    git, ver = m["git"], m["versions"]
    dirty = " (dirty tree)" if git.get("dirty") else ""
    mode = "quick" if m["quick"] else "full"
    lines = [f"# gpu-check {m['date']} on {m['card']}", ""]
    if m.get("cpu_smoke"):
        lines += ["**CPU SMOKE RUN: a check of the script's plumbing, not a measurement.**", ""]
    lines += [
        f"Commit `{git['commit']}`{dirty}; torch {ver.get('torch')}, triton {ver.get('triton')}; "
        f"{mode} mode; {m['seconds']:.0f} s in all.",
        "",
        f"Card: {tel.get('name', '-')}, driver {tel.get('driver', '-')}, "
        f"SM clock {tel.get('sm_clock_mhz', '-')} / {tel.get('sm_clock_max_mhz', '-')} MHz, "
        f"memory clock {tel.get('mem_clock_mhz', '-')} MHz, "
        f"power {tel.get('power_w', '-')} / {tel.get('power_limit_w', '-')} W.",
        "",
    ]
    if c.get("copy_gbps"):
        lines.append(
            f"Ceilings: copy {c['copy_gbps']:.4g} GB/s (read + write bytes); "
            f"matmul {c['matmul_n']}^3 {c['matmul_dtype']} {c['matmul_tflops']:.4g} TFLOP/s."
        )
    else:
        lines.append(f"Ceilings: FAILED {c.get('error', '')}")
    tests = f"Tests (`pytest tests -m gpu`): {t.get('summary') or t.get('returncode', 'not run')}"
    if t.get("failed_ids"):
        tests += "; failed: " + ", ".join(t["failed_ids"])
    if t.get("timed_out"):
        tests += " (TIMED OUT)"
    sections = ", ".join(
        f"{k} {v['status']} ({v.get('seconds', 0)} s)" for k, v in doc["sections"].items()
    )
    lines += ["", tests, "", f"Sections: {sections}", ""]
    lines += [
        "## Summary",
        "",
        "```",
        summary,
        "```",
        "",
        "## All rows",
        "",
        "```",
        table,
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def _save(rows: list, meta: dict, doc: dict, stem: Path, logdir: Path):
    """Write `stem`.json and .md as the run stands, with copies and the logs in $OUT when set;
    (json path, md path, the copies, the short table)."""
    from bench.harness import format_summary, format_table, write_json

    table, summary = format_table(rows), format_summary(rows)
    json_path = write_json(rows, {**meta, "extra": doc}, stem.with_name(stem.name + ".json"))
    md_path = stem.with_name(stem.name + ".md")
    _write_markdown(md_path, {"meta": meta, **doc}, summary, table)
    copies = []
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"])
        dest.mkdir(parents=True, exist_ok=True)
        for src in (json_path, md_path):
            if src.resolve() != (dest / src.name).resolve():  # --out-dir may already be $OUT
                shutil.copy2(src, dest / src.name)
            copies.append(str(dest / src.name))
        # The logs as one file: the device tool brings back at most 8 files from $OUT, and a
        # dozen loose logs would crowd out the results and the card's tuning table.
        archive = dest / f"{stem.name}-logs.tar.gz"
        tmp = archive.with_name(archive.name + ".tmp")
        try:
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(logdir, arcname=f"{stem.name}-logs")
            tmp.replace(archive)
            copies.append(str(archive))
        except (OSError, tarfile.TarError) as e:  # the results above matter more than the logs
            print(f"gpu_check: could not archive the logs into $OUT: {e}", flush=True)
    return json_path, md_path, copies, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m bench.gpu_check", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--full", action="store_true", help=f"every shape; budgets x{FULL_SCALE}")
    ap.add_argument(
        "--out-dir", default=None, help="where the JSON and .md go (default bench/results)"
    )
    ap.add_argument(
        "--log-dir",
        default=None,
        help="where each section's log goes, an empty or new folder (default: a new "
        "gpu_check_logs_* temporary folder; with $OUT set they are also archived there)",
    )
    ap.add_argument(
        "--budget-s", type=float, default=TOTAL_BUDGET_S, help="whole-run budget in seconds"
    )
    ap.add_argument("--tests-path", default="tests", help="what pytest -m gpu runs")
    ap.add_argument(
        "--test-shards",
        type=int,
        default=default_test_shards(),
        help="concurrent pytest processes for the GPU tests (default: one per 4 cores, at most 4)",
    )
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="run the plumbing on CPU with tiny shapes"
    )
    # child mode (internal)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ceilings", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir is not None and (log_dir.is_file() or (log_dir.is_dir() and any(log_dir.iterdir()))):
        # Its files would be archived with this run's (a section skipped or with another shard
        # count leaves an earlier run's in place), and deleting them is not ours to do.
        print(
            f"gpu_check: --log-dir {log_dir} already holds files (an earlier run's logs would "
            "travel with this run's) or is a file: give an empty or new folder",
            file=sys.stderr,
        )
        return 2

    t_start = time.time()
    import torch

    from bench.harness import Row, measure_ceilings, telemetry

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to measure "
            "here.\n"
            "Run it on the lent GPU machine (`make gpu-check`), or add --cpu-smoke to check this "
            "script's plumbing on CPU with tiny shapes."
        )
        return 0
    device = "cuda" if cuda else "cpu"
    quick = not args.full
    scale = 1 if quick else FULL_SCALE
    total_budget = args.budget_s * scale
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    card = torch.cuda.get_device_name(0) if cuda else "cpu-smoke"
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif cuda:
        out_dir = REPO / "bench" / "results"
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="gpu_check_smoke_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-{card_slug(card)}"
    if log_dir is not None:
        logdir = log_dir
        logdir.mkdir(parents=True, exist_ok=True)
    else:
        logdir = Path(tempfile.mkdtemp(prefix="gpu_check_logs_"))
    mode = "quick" if quick else "full"
    print(f"gpu_check: {card} ({device}), {mode} mode, budget {total_budget:.0f} s", flush=True)
    print(f"gpu_check: section logs in {logdir}", flush=True)

    meta = {
        "date": date,
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "card": card,
        "device": device,
        "quick": quick,
        "cpu_smoke": not cuda,
        "git": git_commit(),
        "versions": _versions(),
        "argv": sys.argv,
        "log_dir": str(logdir),
        "budgets_s": {},
        "seconds": None,
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        meta.update(
            capability=f"{p.major}.{p.minor}",
            sm_count=p.multi_processor_count,
            cuda_runtime=torch.version.cuda,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
        )
    doc: dict = {"telemetry": {"before": telemetry()}, "sections": {}}

    # ceilings, in this process (plain torch ops: no kernel of ours can poison this context)
    t0 = time.time()
    try:
        ceilings = (
            measure_ceilings(device) if cuda else measure_ceilings("cpu", copy_mib=64, matmul_n=512)
        )
        status = "ok"
    except Exception as e:
        ceilings = {"error": f"{type(e).__name__}: {e}"}
        status = "FAILED"
    doc["ceilings"] = ceilings
    doc["sections"]["ceilings"] = {"status": status, "seconds": round(time.time() - t0, 1)}
    shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in ceilings.items()}
    print(f"ceilings: {status} {json.dumps(shown)}", flush=True)

    rows: list[Row] = []
    failed = status != "ok"
    for i, (name, module, nominal) in enumerate(SECTIONS):
        if module is not None and importlib.util.find_spec(module) is None:
            doc["sections"][name] = {
                "status": "absent",
                "seconds": 0,
                "note": f"{module} does not exist yet",
            }
            continue
        remaining = total_budget - (time.time() - t_start)
        later = sum(
            n * scale
            for nm, mod, n in SECTIONS[i + 1 :]
            if mod is None or importlib.util.find_spec(mod)
        )
        # Later sections keep their nominal time when the run has it; a run given less (a short
        # device budget) shares what is left in proportion to the nominal budgets instead of
        # starving the first section.
        share = remaining * nominal * scale / (nominal * scale + later)
        budget = min(2 * nominal * scale, max(remaining - later, share))
        if budget < MIN_SECTION_S:
            doc["sections"][name] = {
                "status": "SKIPPED",
                "seconds": 0,
                "note": f"only {budget:.0f} s left of the run's budget",
            }
            rows.append(
                Row(name, "-", "-", "-", "-", error=f"section skipped: only {budget:.0f} s left")
            )
            failed = True
            continue
        meta["budgets_s"][name] = round(budget)
        # What has run so far, saved before each section: a run killed at the device's hard
        # limit (or hung) still leaves every finished section's rows.
        doc["sections"][name] = {"status": "RUNNING", "note": "the run ended inside it"}
        meta["seconds"] = round(time.time() - t_start, 1)
        try:
            _save(rows, meta, doc, out_dir / stem, logdir)
        except OSError as e:  # the run goes on: the final save comes after the last section
            print(f"gpu_check: could not save the results so far: {e}", flush=True)
        print(f"{name}: up to {budget:.0f} s ...", flush=True)
        if module is None:
            rec = run_tests(budget, logdir, args.tests_path, max(1, args.test_shards))
            doc["tests"] = rec
            status = "ok" if rec["ok"] and not rec["failed"] and not rec["errors"] else "FAILED"
            late = ", TIMED OUT" if rec["timed_out"] else ""
            summ = rec["summary"] or "no summary line"
            print(f"tests: {summ} (rc {rec['returncode']}{late})", flush=True)
        else:
            rec = run_section(name, module, budget, ceilings, quick, logdir, device)
            new = [Row.from_dict(d) for d in rec.pop("rows")]
            rows += new
            status = "ok" if rec["ok"] else "FAILED"
            if not rec["ok"]:
                why = "timed out" if rec["timed_out"] else f"exit {rec['returncode']}"
                if rec.get("left_running"):
                    why += " (still running after SIGKILL: later sections may lack its memory)"
                last = rec["tail"].strip().splitlines()[-1:] or [""]
                rows.append(
                    Row(
                        name,
                        "-",
                        "-",
                        "-",
                        "-",
                        error=f"section {why} after {rec['seconds']} s: {last[0][:200]}",
                    )
                )
            print(f"{name}: {status}, {len(new)} rows in {rec['seconds']} s", flush=True)
        failed |= status != "ok"
        keep = ("seconds", "returncode", "timed_out") + (("tail",) if status != "ok" else ())
        keep += ("left_running",) if rec.get("left_running") else ()
        doc["sections"][name] = {"status": status, **{k: rec[k] for k in keep}}

    doc["telemetry"]["after"] = telemetry()
    meta["seconds"] = round(time.time() - t_start, 1)
    try:
        json_path, md_path, copies, summary = _save(rows, meta, doc, out_dir / stem, logdir)
    except OSError as e:  # still print the table: it is all that comes back then
        print(f"gpu_check: could not save the final results: {e}", flush=True)
        from bench.harness import format_summary

        json_path = md_path = "(not written)"
        copies, summary, failed = [], format_summary(rows), True

    # The short table last (the device tool returns only the end of the output); every row is
    # in the .md and the JSON.
    print()
    t = doc.get("tests", {})
    print(
        f"tests -m gpu: {t.get('summary') or 'not run'}"
        + (f"; FAILED: {', '.join(t['failed_ids'][:10])}" if t.get("failed_ids") else "")
        + (" (TIMED OUT)" if t.get("timed_out") else "")
    )
    c = ceilings
    if c.get("copy_gbps"):
        print(
            f"ceilings: copy {c['copy_gbps']:.0f} GB/s, matmul {c['matmul_tflops']:.0f} TFLOP/s; "
            f"sections: " + ", ".join(f"{k}={v['status']}" for k, v in doc["sections"].items())
        )
    print(
        f"wrote {json_path} and {md_path}"
        + (f" (+ copies in $OUT: {', '.join(copies)})" if copies else "")
    )
    print(f"gpu_check {'FAILED' if failed else 'ok'} in {meta['seconds']:.0f} s on {card}")
    print()
    print(clip_lines(summary, SUMMARY_CHARS, f"every row is in {md_path}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
