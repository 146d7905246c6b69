"""parallel.host_text pinned in one process: gather_texts and agree on a 1-rank gloo group, and
agree's message built from faked views of a larger world.

Found by a mutation pass: the 3-rank test never sends an empty text, a text of more than 255
bytes or a text longer than the default width through agree, and its two failing texts happen to
sort by text in the same order as by rank, so those behaviours could change unnoticed."""

import pytest

from parallel import host_text
from parallel.host_text import WIDTH, agree, gather_texts


def test_an_empty_text_is_a_text_not_none(one_rank):
    """ "" travels as "" (length 0 + 1), not as None: a start-up step that failed with an
    exception whose text is empty has still failed, and agree must still report a problem, or
    every rank would go on into training as if the step had gone through."""
    assert gather_texts("") == [""]
    assert gather_texts(None) == [None]
    assert agree("") == ""
    assert agree(None) is None


def test_lengths_beyond_one_byte_and_the_width_argument(one_rank):
    """The length travels in an int32 (a text of 300 or 1000 bytes comes back whole, not with its
    length wrapped at 256), and agree passes its width on: train.main's start-up messages get
    4096 bytes, which the default 1024 would cut."""
    for n in (255, 256, 300, WIDTH):
        assert gather_texts("x" * n) == ["x" * n]
    long = "--load /ckpt: " + "y" * 3000
    assert agree(long, width=4096) == long
    assert agree(long) == long[:WIDTH]  # the default width cuts


@pytest.mark.parametrize(
    ("views", "want"),
    [
        # named in the order of each text's first rank, not sorted by text
        (["disk full", "bad file", None, "disk full"], "ranks 0, 3: disk full; rank 1: bad file"),
        ([None, "z", "a", "z"], "ranks 1, 3: z; rank 2: a"),
        (["same"] * 4, "same"),  # every rank: the text alone
        (["same", "same", None, "same"], "ranks 0-1, 3: same"),
        ([None, "", None], "rank 1: "),  # an empty text is still a failure
        ([None] * 4, None),
    ],
)
def test_agree_names_ranks_by_first_failure(monkeypatch, views, want):
    """agree's one message from every rank's view (gather_texts faked for a 3- or 4-rank world):
    the groups are joined in the order of each text's first failing rank, so the rank that failed
    first in rank order is read first, on every rank the same."""
    monkeypatch.setattr(host_text, "gather_texts", lambda text, width=WIDTH: list(views))
    assert agree("anything") == want
