"""The shared --save probe (train/shared_fs.py) seen from one rank, with the process group
played in process (tests/parallel3d/test_multinode.py runs it on real gloo ranks): pinned
where a hand mutation pass found that test blind. Each case is one rank's side of the protocol:
rank 0 writes the probe before the barrier, the others look after it, for up to wait_s."""

import socket
import threading

from train import shared_fs


class _Group:
    """torch.distributed as one rank of `world` sees it; the other ranks' texts are given."""

    def __init__(self, rank: int, world: int, token: str = "t0k3n", views=None, on_barrier=None):
        self.rank, self.world, self.token = rank, world, token
        self.views = views or {}  # rank -> its "1host" / "0host"
        self.on_barrier = on_barrier
        self.gathers: list[str | None] = []

    def install(self, monkeypatch) -> None:
        d = shared_fs.dist
        monkeypatch.setattr(d, "is_available", lambda: True)
        monkeypatch.setattr(d, "is_initialized", lambda: True)
        monkeypatch.setattr(d, "get_world_size", lambda: self.world)
        monkeypatch.setattr(d, "get_rank", lambda: self.rank)
        monkeypatch.setattr(d, "barrier", self.barrier)
        monkeypatch.setattr(shared_fs, "gather_texts", self.gather_texts)

    def barrier(self) -> None:
        if self.on_barrier is not None:
            self.on_barrier()

    def gather_texts(self, text):
        self.gathers.append(text)
        if len(self.gathers) == 1:  # the token: rank 0's
            return [text if self.rank == 0 else self.token] + [None] * (self.world - 1)
        return [text if r == self.rank else self.views[r] for r in range(self.world)]


def test_one_process_makes_no_collective_and_writes_nothing(tmp_path, monkeypatch):
    group = _Group(0, 1)
    group.install(monkeypatch)
    assert shared_fs.ranks_not_sharing(tmp_path / "missing") == []
    assert group.gathers == [] and not (tmp_path / "missing").exists()


def test_rank_0_that_cannot_write_reports_itself_instead_of_raising(tmp_path, monkeypatch):
    """An exception on rank 0 alone would leave the other ranks waiting in the barrier."""
    host = socket.gethostname()
    group = _Group(0, 2, views={1: "0node1"})
    group.install(monkeypatch)
    blind = shared_fs.ranks_not_sharing(tmp_path / "missing", wait_s=0.1)
    assert blind == [(0, host), (1, "node1")]
    assert group.gathers[1] == f"0{host}"


def test_a_rank_looks_only_after_rank_0_wrote(tmp_path, monkeypatch):
    """Rank 0's write is complete when the barrier returns: a rank that looked before it could
    give up (wait_s 0 here) on a file that was on its way."""
    group = _Group(1, 2, views={0: "1node0"})
    probe = tmp_path / f".shared_fs_probe_{group.token}"
    group.on_barrier = lambda: probe.write_text(group.token)  # rank 0 writes, then the barrier
    group.install(monkeypatch)
    assert shared_fs.ranks_not_sharing(tmp_path, wait_s=0.0) == []
    assert group.gathers[1] == f"1{socket.gethostname()}"


def test_a_file_system_that_publishes_late_is_waited_for_by_default(tmp_path, monkeypatch):
    """NFS may show a new file a second or so late: the default wait covers it."""
    group = _Group(1, 2, views={0: "1node0"})
    probe = tmp_path / f".shared_fs_probe_{group.token}"
    timer = threading.Timer(1.0, lambda: probe.write_text(group.token))
    group.on_barrier = timer.start
    group.install(monkeypatch)
    try:
        assert shared_fs.ranks_not_sharing(tmp_path) == []
    finally:
        timer.cancel()


def test_a_probe_this_rank_cannot_read_is_not_seen(tmp_path, monkeypatch):
    """Something unreadable under the probe's name (here a directory; on NFS a stale handle):
    this rank reports that it does not see rank 0's file and raises nothing (the other ranks
    would hang in the next collective)."""
    group = _Group(1, 2, views={0: "1node0"})
    (tmp_path / f".shared_fs_probe_{group.token}").mkdir()
    group.install(monkeypatch)
    assert shared_fs.ranks_not_sharing(tmp_path, wait_s=0.3) == [(1, socket.gethostname())]
