"""AtomicFileSet (data/atomic.py), pinned where a hand mutation pass found the pretokenizer's
tests blind: which leftovers of a killed run are removed (host names with dashes, output names
with glob characters, processes of another user), and the roll-back of a commit that fails
without hard links, over a stale backup, or by an interrupt."""

import errno
import os
import subprocess
import sys

import pytest

from data import atomic
from data.atomic import AtomicFileSet


def _dead_pid() -> int:
    """The id of a process that has ended (a child that ran and was reaped)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out)


def _commit(final, text: str = "new") -> None:
    with AtomicFileSet() as files:
        files.path(final).write_text(text)
        files.commit()


def test_a_killed_runs_leftovers_go_on_a_host_whose_name_has_dashes(tmp_path, monkeypatch):
    """Cluster host names are mostly like `gpu-node-3`: the process id is what follows the last
    dash, else no leftover of a killed run on such a host was ever recognized."""
    monkeypatch.setattr(atomic.socket, "gethostname", lambda: "gpu-node-3")
    dead = _dead_pid()
    left = [tmp_path / f".x.bin.gpu-node-3-{dead}.tmp", tmp_path / f".x.bin.gpu-node-3-{dead}.old"]
    for p in left:
        p.write_text("junk")
    _commit(tmp_path / "x.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_a_killed_runs_leftovers_go_when_the_output_name_has_glob_characters(tmp_path):
    """An output name comes from the user's filename_prefix, which may hold `[`, `*` or `?`."""
    host = atomic._owner().rsplit("-", 1)[0]
    dead = _dead_pid()
    (tmp_path / f".mix[1].bin.{host}-{dead}.tmp").write_text("junk")
    _commit(tmp_path / "mix[1].bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix[1].bin"]


def test_only_exact_leftover_names_of_gone_processes_are_removed(tmp_path, monkeypatch):
    """A process that exists under another user (os.kill answers EPERM) may be writing: its
    temporary file stays. So does a file that merely starts like a leftover's name."""
    host = atomic._owner().rsplit("-", 1)[0]
    dead, other_user = _dead_pid(), 999_999_999
    real_kill = os.kill

    def kill(pid, sig):
        if pid == other_user:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(atomic.os, "kill", kill)
    keep = [
        tmp_path / f".x.bin.{host}-{other_user}.tmp",
        tmp_path / f".x.bin.{host}-{dead}.tmp.keep",
    ]
    for p in keep:
        p.write_text("someone else's")
    _commit(tmp_path / "x.bin")
    assert all(p.read_text() == "someone else's" for p in keep)


def test_a_temporary_file_never_written_renames_nothing(tmp_path, monkeypatch):
    """Checked before the first rename: on a file system without hard links a renamed file cannot
    be put back, so finding the hole only at its rename would leave a half new set."""
    monkeypatch.setattr(atomic.os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links")))
    a, b = tmp_path / "a.idx", tmp_path / "b.bin"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(RuntimeError, match="never written"), AtomicFileSet() as files:
        files.path(a).write_text("new a")
        files.path(b)  # handed out, never written
        files.commit()
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "b.bin"]


def test_a_failed_commit_without_hard_links_still_undoes_what_it_can(tmp_path, monkeypatch):
    """Without hard links a replaced file keeps its new, complete contents; a file the commit
    created is still removed, and the rename's own error is what the caller sees."""
    monkeypatch.setattr(atomic.os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links")))
    new_b, old_a, dir_c = tmp_path / "b.bin", tmp_path / "a.idx", tmp_path / "c.json"
    old_a.write_text("old a")
    dir_c.mkdir()  # a directory under a final name: its rename fails, after b's and a's
    with pytest.raises(IsADirectoryError), AtomicFileSet() as files:
        for final in (new_b, old_a, dir_c):
            files.path(final).write_text("new")
        files.commit()
    assert not new_b.exists() and old_a.read_text() == "new" and dir_c.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "c.json"]


def test_a_failed_commit_puts_back_the_old_file_over_a_stale_backup_name(tmp_path):
    """A container's process often has the same id on every run, so a backup name of a killed
    earlier run can be this process's own (never removed as stale): it is replaced, not a
    reason to go without a way back."""
    old_a, dir_b = tmp_path / "a.idx", tmp_path / "b.json"
    old_a.write_text("old a")
    (tmp_path / f".a.idx.{atomic._owner()}.old").write_text("a killed run's backup")
    dir_b.mkdir()
    with pytest.raises(OSError), AtomicFileSet() as files:
        for final in (old_a, dir_b):
            files.path(final).write_text("new")
        files.commit()
    assert old_a.read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "b.json"]


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), OSError(errno.EIO, "I/O error")], ids=["ctrl_c", "eio"]
)
def test_a_rename_that_fails_puts_back_the_first_and_leaves_no_backup(tmp_path, monkeypatch, error):
    """Ctrl-C (KeyboardInterrupt) or an I/O error at the second rename: the first file gets its
    previous contents back (never half old and half new), and the backup link made for the
    second (whose rename failed, so it kept its contents) goes too: it was left behind, a hidden
    file in the output directory until a later run on this host removed it as stale."""
    a, b = tmp_path / "a.idx", tmp_path / "b.bin"
    a.write_text("old a")
    b.write_text("old b")
    real_replace = os.replace
    renames = []

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise error
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(type(error)), AtomicFileSet() as files:
        files.path(a).write_text("new a")
        files.path(b).write_text("new b")
        files.commit()
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "b.bin"]


def test_a_rename_stopped_before_it_was_counted_is_rolled_back_too(tmp_path, monkeypatch):
    """An interrupt can land after a rename went through and before the commit counted it: that
    file is put back as well."""
    a, b = tmp_path / "a.idx", tmp_path / "b.bin"
    a.write_text("old a")
    b.write_text("old b")
    real_replace = os.replace
    renames = []

    def replace(src, dst):
        real_replace(src, dst)
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt  # after b's rename, before the commit recorded it

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), AtomicFileSet() as files:
        files.path(a).write_text("new a")
        files.path(b).write_text("new b")
        files.commit()
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "b.bin"]
