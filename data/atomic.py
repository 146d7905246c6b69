"""Write a set of files under temporary names and rename them into place together.

Nothing is renamed until every file of the set is complete, so a failed or interrupted run leaves
the previous outputs (if any) untouched and no half-written file under a final name. Should one
of the renames fail (a directory in the way, a permission), the files already renamed get their
previous contents back, so the set is never half old and half new.

A run killed outright (SIGKILL, the machine's OOM killer) cannot clean up after itself: its
temporary files carry its host name and process id, and the next run on that host writing the
same outputs removes those whose process is gone (another host's are left alone: their process
may be alive, writing into a shared file system).
"""

import os
import re
import socket
from pathlib import Path


def _owner() -> str:
    """`HOST-PID`, the host name with no dots, so a temporary name splits unambiguously."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def _backup(final: Path) -> Path:
    """Where commit() links the previous `final` while it renames (`.NAME.HOST-PID.old`)."""
    return final.with_name(f".{final.name}.{_owner()}.old")


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove_stale(final: Path) -> None:
    """Remove what a killed run on this host left for `final` (`.NAME.HOST-PID.tmp` / `.old`)."""
    host, pid = _owner().rsplit("-", 1)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.{re.escape(host)}-(\d+)\.(tmp|old)")
    for p in final.parent.glob(f".{_glob_escape(final.name)}.*"):
        m = pattern.fullmatch(p.name)
        if m and m.group(1) != pid and _process_gone(int(m.group(1))):
            p.unlink(missing_ok=True)


class AtomicFileSet:
    """`path(final)` hands out a temporary name in the same directory; `commit()` renames all of
    them to their final names; `abort()` (or leaving a `with` block uncommitted) removes them."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: str | Path) -> Path:
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(final)
        tmp = final.with_name(f".{final.name}.{_owner()}.tmp")
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        missing = [str(tmp) for tmp, _ in self._pending if not tmp.exists()]
        if missing:
            raise RuntimeError(f"temporary output files were never written: {missing}")
        # Each previous file is first linked under a backup name (the final name keeps its
        # contents meanwhile), so a failed rename can put back the ones already replaced.
        done: list[tuple[Path, Path | None, bool]] = []
        current: tuple[Path, Path, bool] | None = None  # (tmp, final, existed) being renamed
        try:
            for tmp, final in self._pending:
                backup = None
                existed = final.exists()
                current = (tmp, final, existed)
                if final.is_file():
                    backup = _backup(final)
                    backup.unlink(missing_ok=True)
                    try:
                        os.link(final, backup)
                    except OSError:  # no hard links on this file system: no way back for it
                        backup = None
                os.replace(tmp, final)
                done.append((final, backup, existed))
                current = None
        except BaseException:
            if current is not None:
                tmp, final, existed = current
                backup = _backup(final)
                if tmp.exists():  # not renamed: the final name kept its contents
                    backup.unlink(missing_ok=True)
                else:  # renamed, but stopped before it was counted
                    done.append((final, backup if backup.exists() else None, existed))
            for final, backup, existed in reversed(done):
                if backup is not None:
                    os.replace(backup, final)
                elif not existed:
                    final.unlink(missing_ok=True)
                # else: no backup could be made; the new, complete file stays
            raise
        for _, backup, _ in done:
            if backup is not None:
                backup.unlink(missing_ok=True)
        self._pending = []
        return [final for final, _, _ in done]

    def abort(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []

    def __enter__(self) -> "AtomicFileSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # whatever was not committed (an exception, or no commit() call)
