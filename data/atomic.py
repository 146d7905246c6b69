"""Write a set of files under temporary names and rename them into place together.

Nothing is renamed until every file of the set is complete, so a failed or interrupted run leaves
the previous outputs (if any) untouched and no half-written file under a final name.
"""

import os
from pathlib import Path


class AtomicFileSet:
    """`path(final)` hands out a temporary name in the same directory; `commit()` renames all of
    them to their final names; `abort()` (or leaving a `with` block uncommitted) removes them."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: str | Path) -> Path:
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        missing = [str(tmp) for tmp, _ in self._pending if not tmp.exists()]
        if missing:
            raise RuntimeError(f"temporary output files were never written: {missing}")
        done = []
        for tmp, final in self._pending:
            os.replace(tmp, final)
            done.append(final)
        self._pending = []
        return done

    def abort(self) -> None:
        for tmp, _ in self._pending:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._pending = []

    def __enter__(self) -> "AtomicFileSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # whatever was not committed (an exception, or no commit() call)
