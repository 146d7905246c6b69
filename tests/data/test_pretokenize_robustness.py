"""Robustness and determinism of `python -m data.pretokenize`: worker counts, failures in and of
worker processes, interrupts, write errors, earlier outputs, memory, paths and progress."""

import errno
import hashlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _ctrl_c_delivered():
    """The interrupt tests need Ctrl-C to arrive: a runner started in the background of a shell
    without job control starts pytest with SIGINT ignored, which its children inherit."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _leftovers(root: Path) -> list[str]:
    """Temporary outputs and staging files (every name the pretokenizer hides starts with .)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def _run(script: str, cwd: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh interpreter (spawned workers, signals, ru_maxrss)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def _mixed_config(files, make_chat_rows, bad: bool = False) -> Path:
    """Every route on many chunks: one pass, scan + tokenize (fraction), staged (val_split);
    `bad`: with a bad record (to skip)."""
    rows = [json.dumps(r) for r in make_chat_rows(700)]
    if bad:
        rows[333] = '{"messages": []}'
    files.jsonl("src/a.jsonl", rows)
    files.jsonl("src/b/1.jsonl", make_chat_rows(300, start=1000))
    files.jsonl("src/b/2.jsonl.gz", make_chat_rows(300, start=2000), gz=True)
    files.jsonl("src/c.jsonl", make_chat_rows(500, start=5000))
    datasets = [
        {"one": {"kind": "chat", "path": "c.jsonl"}},
        {"frac": {"kind": "chat", "path": "a.jsonl", "fraction": 0.6, "val_split": 0.1}},
        {"staged": {"kind": "chat", "path": "b", "val_split": 0.2, "max_val_set": 30}},
    ]
    return files.mix("det", datasets, min_assistant_tokens=10)


# -- determinism --------------------------------------------------------------------------------


def test_outputs_do_not_depend_on_workers_or_run(files, pretok, make_chat_rows, monkeypatch):
    from data import pretokenize

    monkeypatch.setattr(pretokenize, "_CHUNK_RECORDS", 37)  # many chunks, several in flight
    config = _mixed_config(files, make_chat_rows, bad=True)
    out = files.root / "out"
    digests = []
    for workers in ("1", "2", "3", "1"):
        rc, _, err = pretok(
            config, "--data-root", files.root / "src", "--workers", workers, "--skip-bad-records"
        )
        assert rc == 0, err
        digests.append(_digest(out))
        assert not _leftovers(out)
    assert len(digests[0]) == 14  # 4 indexed pairs, 2 stats, 2 meta, stats.json, special tokens
    assert all(d == digests[0] for d in digests[1:])
    stats = json.loads((out / "det" / "stats.json").read_text())
    assert stats["datasets"]["frac"]["bad_records"] == 1
    assert stats["datasets"]["frac"]["records"] == 700
    assert stats["splits"]["val"]["total"]["accepted_samples"] > 0


def test_sample_mixes_identical_with_three_workers(tmp_path, pretok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pretok(REPO / "configs/data/sample.yaml", "--data-root", REPO)[0] == 0
    one = _digest(tmp_path / "runs")
    rc, _, err = pretok(REPO / "configs/data/sample.yaml", "--data-root", REPO, "--workers", "3")
    assert rc == 0, err
    assert _digest(tmp_path / "runs") == one


# -- failures inside a worker -------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_record_deep_in_a_file_fails_with_file_line(
    files, pretok, make_chat_rows, monkeypatch, workers
):
    from data import pretokenize

    monkeypatch.setattr(pretokenize, "_CHUNK_RECORDS", 50)
    config = _mixed_config(files, make_chat_rows)
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    before = _digest(files.root / "out")
    rows = [json.dumps(r) for r in make_chat_rows(300, start=1000)]
    rows[271] = '{"messages": [{"role": "user", "content": "hi"}'  # truncated JSON
    files.jsonl("src/b/1.jsonl", rows)
    rc, _, err = pretok(config, "--data-root", files.root / "src", "--workers", workers)
    assert rc == 2 and "1.jsonl:272:" in err and "Traceback" not in err
    assert _digest(files.root / "out") == before
    assert mp.active_children() == []  # no worker process left behind


def _chunk_hook(kind: str, after: int) -> str:
    """Source that makes the chunks of pretokenize from record `after` on use kind `kind` (an
    unknown kind fails inside `process`, in whichever process runs it)."""
    return f"""
        from data import pretokenize
        _orig = pretokenize._chunk
        def _chunk(spec, path, start, records, assign, tokenize):
            c = _orig(spec, path, start, records, assign, tokenize)
            if start >= {after}:
                c.kind = {kind!r}
            return c
        pretokenize._chunk = _chunk
        pretokenize._CHUNK_RECORDS = 50
    """


def test_a_dataset_rewritten_between_the_two_passes_is_an_error(
    files, pretok, make_chat_rows, monkeypatch
):
    """With a fraction the records are read twice (scan, then tokenize): a file rewritten in
    between would route samples by a stale assignment."""
    from data import pretokenize

    files.jsonl("src/c.jsonl", make_chat_rows(10))
    real = pretokenize._chunks

    def chunks(spec, assign, tokenize):
        if tokenize:  # after the scan: no record is usable any more
            files.jsonl("src/c.jsonl", ['{"messages": []}'] * 10)
        yield from real(spec, assign, tokenize)

    monkeypatch.setattr(pretokenize, "_chunks", chunks)
    config = files.mix("ch", [{"chat": {"path": "c.jsonl", "val_split": 0, "fraction": 0.5}}])
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "changed between the scanning and the tokenizing pass" in err, err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unexpected_worker_error_names_the_record(files, make_chat_rows, workers):
    files.jsonl("src/c.jsonl", make_chat_rows(400))
    config = files.mix("ue", [{"chat": {"path": "c.jsonl"}}])
    script = (
        _chunk_hook("no-such-kind", 200)
        + f"""
        import multiprocessing as mp, sys
        if __name__ == "__main__":
            rc = pretokenize.main([{str(config)!r}, "--data-root", "src", "--workers",
                                   {workers!r}, "--no-progress"])
            print("children", len(mp.active_children()), file=sys.stderr)
            sys.exit(rc)
    """
    )
    r = _run(script, files.root)
    assert r.returncode == 2, r.stderr
    assert "c.jsonl:201: unexpected KeyError" in r.stderr and "Traceback" not in r.stderr
    assert "children 0" in r.stderr
    assert not [p for p in (files.root / "out").rglob("*") if p.is_file()]


def test_tokenizer_failure_names_the_record(files, pretok, make_chat_rows, monkeypatch):
    from data.tokenizer import Tokenizer

    rows = make_chat_rows(300)
    rows[123]["messages"][1]["content"] = "boom"
    files.jsonl("src/c.jsonl", rows)
    config = files.mix("tf", [{"chat": {"path": "c.jsonl", "val_split": 0.1}}])
    orig = Tokenizer.encode_turns

    def encode_turns(self, contents, dtype=None):
        if any(c.endswith("boom") for c in contents):
            raise RuntimeError("SentencePiece: internal error")
        return orig(self, contents, dtype)

    monkeypatch.setattr(Tokenizer, "encode_turns", encode_turns)
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "c.jsonl:124: the tokenizer failed on this record" in err, err
    assert "SentencePiece: internal error" in err
    assert not [p for p in (files.root / "out").rglob("*") if p.is_file()]


def test_worker_process_that_dies_fails_the_run_instead_of_hanging(files, make_chat_rows):
    """A worker killed mid-run (the OOM killer, a crash): with a multiprocessing.Pool the lost
    chunk was waited for forever."""
    files.jsonl("src/c.jsonl", make_chat_rows(400))
    config = files.mix("wd", [{"chat": {"path": "c.jsonl"}}])
    script = f"""
        import multiprocessing as mp, os, sys
        from data import pretokenize

        class Die:  # unpickled in the worker: the worker exits on the spot
            def __reduce__(self):
                return (os._exit, (9,))

        _orig = pretokenize._chunk
        def _chunk(spec, path, start, records, assign, tokenize):
            if start == 200:
                records = [(records[0][0], Die())] + records[1:]
            return _orig(spec, path, start, records, assign, tokenize)
        pretokenize._chunk = _chunk
        pretokenize._CHUNK_RECORDS = 50
        if __name__ == "__main__":
            rc = pretokenize.main([{str(config)!r}, "--data-root", "src", "--workers", "2",
                                   "--no-progress"])
            print("children", len(mp.active_children()), file=sys.stderr)
            sys.exit(rc)
    """
    try:
        r = _run(script, files.root, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung after a worker process died")
    assert r.returncode == 2, r.stderr
    assert "worker process ended abruptly" in r.stderr and "c.jsonl" in r.stderr
    assert "children 0" in r.stderr
    assert not [p for p in (files.root / "out").rglob("*") if p.is_file()]


class _ExitOnUnpickle:
    """Unpickled in a worker, it ends that worker on the spot (as the OOM killer would)."""

    def __reduce__(self):
        return (os._exit, (9,))


def test_a_chunk_sent_after_a_worker_died_reports_it(tok):
    """The executor may already be broken when the next chunk is submitted: that too is the
    WorkerDied message, not a raw BrokenProcessPool traceback."""
    from data.tokenizer import DEFAULT_TOKENIZER_PATH
    from data.workers import Chunk, WorkerDied, Workers, process

    def chunk(start: int, raw) -> Chunk:
        return Chunk("chat", {}, "x.jsonl", start, [(f"x.jsonl:{start + 1}", raw)], None, False)

    ok = json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode()
    with Workers(2, DEFAULT_TOKENIZER_PATH, tok.extra_ids) as pool:
        dead = pool._pool.submit(process, chunk(0, _ExitOnUnpickle()))
        assert dead.exception(timeout=60) is not None  # the executor is broken from here on
        with pytest.raises(WorkerDied, match="x.jsonl"):
            list(pool.map(iter([chunk(1, ok)])))
    assert mp.active_children() == []


# -- interrupts ---------------------------------------------------------------------------------


def test_keyboard_interrupt_mid_run_keeps_earlier_outputs(
    files, pretok, make_chat_rows, monkeypatch
):
    from data import indexed

    files.jsonl("src/a.jsonl", make_chat_rows(200))
    files.jsonl("src/b.jsonl", make_chat_rows(200, start=500))
    ds_a = [{"chat": {"path": "a.jsonl", "val_split": 0.1}}]
    ds_b = [{"chat": {"path": "b.jsonl", "val_split": 0.1}}]
    body = {
        name: {
            "datasets": ds,
            "output_dir": str(files.root / "out" / name),
            "filename_prefix": name,
        }
        for name, ds in (("first", ds_a), ("second", ds_b))
    }
    config = files.text("two.yaml", json.dumps(body))
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    before = _digest(files.root / "out")
    files.jsonl("src/a.jsonl", make_chat_rows(250))
    files.jsonl("src/b.jsonl", make_chat_rows(250, start=500))
    calls = []
    orig = indexed.IndexedWriter.add_many

    def add_many(self, flat, sizes):
        calls.append(str(self.bin_path))
        if any("second" in c for c in calls):  # mid-way through the second mix
            raise KeyboardInterrupt
        return orig(self, flat, sizes)

    monkeypatch.setattr(indexed.IndexedWriter, "add_many", add_many)
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 130
    # The first mix was rewritten and renamed into place: the message must not say otherwise.
    assert "mix 'second' was not written" in err and "written by this run: first" in err
    after = _digest(files.root / "out")
    assert {k: v for k, v in after.items() if k.startswith("second")} == {
        k: v for k, v in before.items() if k.startswith("second")
    }
    assert after["first/first-train-text.bin"] != before["first/first-train-text.bin"]
    assert not _leftovers(files.root / "out")


def test_interrupt_while_renaming_renames_every_file(files, pretok, make_chat_rows, monkeypatch):
    """Ctrl-C between two renames of the commit would leave old and new files of one mix side
    by side (a new .bin with an old .idx): the signal waits until the set is renamed."""
    files.jsonl("src/c.jsonl", make_chat_rows(100))
    config = files.mix("cm", [{"chat": {"path": "c.jsonl", "val_split": 0.1}}])
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    before = _digest(files.root / "out")
    files.jsonl("src/c.jsonl", make_chat_rows(120))
    renames = []
    orig = os.replace

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives mid-commit
        return orig(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert len(renames) == 14 and rc == 130
    assert "mixes written by this run: cm" in err and "was not written" not in err
    after = _digest(files.root / "out")
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in after if k.endswith("-train-text.idx"))
    assert not _leftovers(files.root / "out")


def _proc_group(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(d.name))
    return pids


@pytest.mark.parametrize(
    "how",
    ["ctrl-c", "sigterm", "sigkill"],
    ids=["ctrl_c_to_the_group", "sigterm_to_the_main_process", "sigkill_to_the_main_process"],
)
def test_interrupt_with_workers_is_one_clean_message(files, make_chat_rows, how):
    """Ctrl-C reaches the whole process group, SIGTERM (`timeout`, a scheduler) the main process:
    one message, no worker tracebacks, nothing left (temporary files or processes), the previous
    outputs untouched. Before: Ctrl-C could hang the run for good (a multiprocessing.Pool whose
    workers died of the KeyboardInterrupt), and SIGTERM left the temporary files behind.
    SIGKILL (the out-of-memory killer) lets the main process clean up nothing, but its workers
    end by themselves (they stayed alive for good before) and the previous outputs stay."""
    files.jsonl("src/c.jsonl", make_chat_rows(3000))
    config = files.mix("ci", [{"chat": {"path": "c.jsonl", "val_split": 0.1}}])
    script = f"""
        import sys, time
        from pathlib import Path
        from data import pretokenize
        _orig = pretokenize._route
        def _route(*a):  # slow, so that the interrupt lands mid-run
            Path("midrun").touch()
            time.sleep(0.02)
            return _orig(*a)
        pretokenize._route = _route
        pretokenize._CHUNK_RECORDS = 20
        if __name__ == "__main__":
            sys.exit(pretokenize.main([{str(config)!r}, "--data-root", "src", "--workers", "2",
                                       "--no-progress"]))
    """
    assert _run(script, files.root).returncode == 0
    before = _digest(files.root / "out")
    (files.root / "midrun").unlink()
    files.jsonl("src/c.jsonl", make_chat_rows(3000, start=1))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=files.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0 = time.monotonic()
    while not (files.root / "midrun").exists() and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be interrupted"
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)
    else:
        os.kill(p.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"the run, or a worker holding its output open, did not end after {how}")
    if how != "sigkill":
        what, code = ("interrupted", 130) if how == "ctrl-c" else ("terminated", 143)
        assert p.returncode == code, err
        assert err.startswith(what) and "Traceback" not in err, err
        assert "mix 'ci' was not written" in err
    else:
        assert p.returncode == -signal.SIGKILL, err
    t0 = time.monotonic()  # the resource tracker exits once it sees its parent gone
    while _proc_group(p.pid) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    left = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _proc_group(p.pid)]
    assert left == []  # no orphan worker
    hidden = set(_leftovers(files.root / "out"))
    if how != "sigkill":  # a killed run's temporary files go at the next run
        assert not hidden
    assert {k: v for k, v in _digest(files.root / "out").items() if k not in hidden} == before


# -- write errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["writer", "staging", "json"])
def test_disk_full_leaves_previous_outputs(files, pretok, make_chat_rows, monkeypatch, where):
    from data import indexed, pretokenize

    files.jsonl("src/c.jsonl", make_chat_rows(600))
    config = files.mix("df", [{"chat": {"path": "c.jsonl", "val_split": 0.1}}])
    monkeypatch.setattr(pretokenize, "_CHUNK_RECORDS", 50)
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    before = _digest(files.root / "out")
    files.jsonl("src/c.jsonl", make_chat_rows(700))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    calls = []
    if where == "writer":
        orig = indexed.IndexedWriter.add_many

        def add_many(self, flat, sizes):
            calls.append(1)
            if len(calls) == 4:
                self._file.write(b"\0" * 64)  # half-written, then the disk is full
                raise full
            return orig(self, flat, sizes)

        monkeypatch.setattr(indexed.IndexedWriter, "add_many", add_many)
    elif where == "staging":
        orig = pretokenize._Staging.add

        def add(self, res):
            calls.append(1)
            if len(calls) == 5:
                raise full
            return orig(self, res)

        monkeypatch.setattr(pretokenize._Staging, "add", add)
    else:

        def write_json(path, obj):
            path.write_text("{", encoding="utf-8")
            raise full

        monkeypatch.setattr(pretokenize, "_write_json", write_json)
    rc, out, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "No space left on device" in err and "mix 'df' was not written" in err
    assert "Traceback" not in err and out == ""
    assert _digest(files.root / "out") == before
    assert not _leftovers(files.root / "out")


# -- earlier outputs ----------------------------------------------------------------------------


def test_rerun_with_other_settings_replaces_the_whole_mix(files, pretok, make_chat_rows):
    files.jsonl("src/c.jsonl", make_chat_rows(300))
    first = [{"chat": {"path": "c.jsonl", "val_split": 0.2}}]
    second = [{"chat": {"path": "c.jsonl", "fraction": 0.5}}]
    config = files.mix("rr", first)
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    files.mix("rr", second)  # same mix name, output_dir and prefix, other settings
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 0 and "replaced the previous outputs of mix 'rr'" in err
    replaced = _digest(files.root / "out" / "rr")
    # The same files as a run into an empty folder (the stats files name their folder).
    fresh = files.root / "fresh"
    rc, _, err = pretok(config, "--data-root", files.root / "src", "--output-dir", fresh)
    assert rc == 0 and "replaced" not in err
    again = _digest(fresh)
    assert replaced.keys() == again.keys()
    assert _no_paths(replaced) == _no_paths(again)
    # A different prefix for the same folder would leave the first mix's prefixed files beside
    # the new ones and replace its stats.json: refused, nothing written.
    before = _digest(files.root / "out")
    files.mix("rr", second, filename_prefix="other")
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "filename_prefix 'rr'" in err
    assert _digest(files.root / "out") == before


def _no_paths(digest: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in digest.items() if not k.endswith(("stats.json", "_stats.txt"))}


# -- memory -------------------------------------------------------------------------------------


def _peak_rss_kib(files, n: int, name: str) -> int:
    words = " ".join(f"w{j}" for j in range(60))
    rows = (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": f"{i} {words}"},
                ]
            }
        )
        for i in range(n)
    )
    src = files.path(f"{name}/c.jsonl")
    src.write_text("".join(r + "\n" for r in rows))
    config = files.mix(name, [{"chat": {"path": "c.jsonl", "val_split": 0.05}}])
    script = f"""
        import resource, sys
        from data import pretokenize
        rc = pretokenize.main([{str(config)!r}, "--data-root", {str(src.parent)!r},
                               "--no-progress"])
        assert rc == 0
        # Peak RSS of this process image: VmHWM, as getrusage's ru_maxrss (Linux) also counts
        # the parent's memory that the child had between fork and exec.
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
        print(int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
    r = _run(script, files.root, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_the_tokens(files):
    """Tokens stream to disk (the staged route included): 4x the records (and tokens) adds only
    the per-sample sizes kept for the index, not the tokens themselves."""
    small = _peak_rss_kib(files, 20_000, "small")
    large = _peak_rss_kib(files, 80_000, "large")
    tokens = json.loads((files.root / "out/large/stats.json").read_text())["splits"]
    extra_tokens = tokens["train"]["total"]["accepted_tokens"] * 3 // 4
    assert extra_tokens > 5_000_000  # held in memory, text + roles would add > 15 MB
    assert large - small < 12 * 1024, (small, large)


# -- command line -------------------------------------------------------------------------------


def test_mix_selects_one_mix(files, pretok, make_chat_rows):
    files.jsonl("src/c.jsonl", make_chat_rows(40))
    ds = [{"chat": {"path": "c.jsonl"}}]
    body = {
        name: {
            "datasets": ds,
            "output_dir": str(files.root / "out" / name),
            "filename_prefix": name,
        }
        for name in ("one", "two")
    }
    config = files.text("two.yaml", json.dumps(body))
    rc, out, err = pretok(config, "--data-root", files.root / "src", "--mix", "two")
    assert rc == 0, err
    assert sorted(p.name for p in (files.root / "out").iterdir()) == ["two"]
    assert "two: wrote" in out and "one:" not in out
    rc, _, err = pretok(config, "--data-root", files.root / "src", "--mix", "three")
    assert rc == 2 and "no mix named 'three'" in err and "one, two" in err


def test_relative_paths_from_another_cwd(files, pretok, make_chat_rows, monkeypatch):
    files.jsonl("data/src/c.jsonl", make_chat_rows(40))
    files.text(
        "cfg/m.yaml",
        json.dumps(
            {
                "rel": {
                    "datasets": [{"chat": {"path": "src/c.jsonl"}}],
                    "output_dir": "o",
                    "filename_prefix": "rel",
                }
            }
        ),
    )
    work = files.root / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc, _, err = pretok("../cfg/m.yaml", "--data-root", "../data", "--output-dir", "out/x")
    assert rc == 0, err
    assert (work / "out/x/rel-train-text.bin").is_file() and not (work / "o").exists()
    stats = json.loads((work / "out/x/stats.json").read_text())
    assert Path(stats["datasets"]["chat"]["files"][0]).resolve() == (
        files.root / "data/src/c.jsonl"
    )
    # Without --output-dir the mix's relative output_dir is taken from the current directory.
    rc, _, err = pretok("../cfg/m.yaml", "--data-root", "../data")
    assert rc == 0, err
    assert (work / "o/rel-train-text.bin").read_bytes() == (
        work / "out/x/rel-train-text.bin"
    ).read_bytes()


def test_progress_when_stderr_is_not_a_terminal(files, make_chat_rows, capsys):
    """Progress asked for, but stderr is a pipe or a file: no bar, no carriage returns, a line
    per dataset (before: nothing at all until the whole mix was written); none with
    --no-progress."""
    from data import pretokenize

    files.jsonl("src/c.jsonl", make_chat_rows(300))
    files.jsonl("src/d.jsonl", make_chat_rows(20))
    datasets = [
        {"chat": {"path": "c.jsonl", "val_split": 0.1}},
        {"two": {"kind": "chat", "path": "d.jsonl"}},
    ]
    config = files.mix("pg", datasets)
    assert pretokenize.main([str(config), "--data-root", str(files.root / "src")]) == 0
    out = capsys.readouterr()
    assert "\r" not in out.err and "\r" not in out.out
    assert "pg: wrote" in out.out
    lines = [ln for ln in out.err.splitlines() if ln.startswith("pg: dataset")]
    assert lines == [
        "pg: dataset 1/2 chat: 300 records read, 300 usable",
        "pg: dataset 2/2 two: 20 records read, 20 usable",
    ]
    args = [str(config), "--data-root", str(files.root / "src"), "--no-progress"]
    assert pretokenize.main(args) == 0
    assert "pg: dataset" not in capsys.readouterr().err
