"""Split sizes and caps against Open-Assistant's pretokenizer semantics (SFT v10).

Open-Assistant splits sample datasets with sklearn's `train_test_split(test_size=val_split)`
(val = ceil(val_split * n), exactly) and the OASST export by tree with torch's
`random_split(trees, [1 - val_split, val_split])` (floor of each share, the remainder dealt out
from train on), counting every tree that passes the tree filters, threads or not; `max_val_set`
then caps the flattened val *samples* (threads for the export), and `fraction` keeps
int(len(train) * fraction) samples (train threads for the export). The stats name each dataset
as Open-Assistant's `get_dataset_name` does, and the val stats leave out sample datasets with
val_split 0 (no val set there).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from data.config import DatasetSpec
from data.indexed import IndexedDataset
from data.pretokenize import TRAIN, VAL, split_assignment
from data.sources import KINDS


def _spec(kind: str, **kw) -> DatasetSpec:
    return DatasetSpec(name=kind, kind=KINDS[kind], location=Path("."), files=[], **kw)


def _sizes(assign: np.ndarray) -> tuple[int, int]:
    return int((assign == TRAIN).sum()), int((assign == VAL).sum())


@pytest.mark.filterwarnings("ignore:Length of split")  # torch's note on an empty val share
@pytest.mark.parametrize("n", [1, 3, 7, 20, 21, 39, 101, 10001])
@pytest.mark.parametrize("val_split", [0.05, 0.1, 0.25, 0.5])
def test_tree_split_sizes_follow_torch_random_split(n, val_split):
    torch = pytest.importorskip("torch")
    from torch.utils.data import random_split

    parts = random_split(range(n), [1.0 - val_split, val_split], torch.Generator())
    want = (len(parts[0]), len(parts[1]))
    spec = _spec("oasst_export", val_split=val_split)
    assert _sizes(split_assignment(np.ones(n, dtype=bool), spec, 42)) == want


def test_sample_split_sizes_are_sklearns_exact_ceil_and_int_fraction():
    # 0.07 * 100 = 7.000000000000001: train_test_split holds out ceil() = 8 samples.
    spec = _spec("chat", val_split=0.07)
    assert _sizes(split_assignment(np.ones(100, dtype=bool), spec, 42)) == (92, 8)
    assert math.ceil(0.07 * 100) == 8
    # 0.29 * 100 = 28.999999999999996: the pretokenizer keeps int() = 28 train samples.
    spec = _spec("chat", val_split=0.0, fraction=0.29)
    assert _sizes(split_assignment(np.ones(100, dtype=bool), spec, 42)) == (28, 0)


def test_max_val_set_leaves_the_train_part_as_it_was():
    # The cap drops val samples (unused), it does not hand them to train: the train part is the
    # same with and without it.
    valid = np.ones(200, dtype=bool)
    full = split_assignment(valid, _spec("chat", val_split=0.25, fraction=0.5), 42)
    capped = split_assignment(
        valid, _spec("chat", val_split=0.25, fraction=0.5, max_val_set=10), 42
    )
    assert _sizes(full) == (75, 50) and _sizes(capped) == (75, 10)
    assert np.array_equal(full == TRAIN, capped == TRAIN)
    assert np.all(full[capped == VAL] == VAL)


def test_split_is_seeded_by_the_dataset_name_too():
    # Two datasets of the same size in one mix do not get the same permutation.
    valid = np.ones(100, dtype=bool)
    a = split_assignment(valid, DatasetSpec("a", KINDS["chat"], Path("."), [], val_split=0.1), 42)
    b = split_assignment(valid, DatasetSpec("b", KINDS["chat"], Path("."), [], val_split=0.1), 42)
    assert _sizes(a) == _sizes(b) == (90, 10)
    assert not np.array_equal(a, b)


def _tree(i: int, threads: int = 2) -> dict:
    def m(role, text, replies=()):
        return {"role": role, "text": text, "lang": "en", "review_result": True, "rank": None,
                "deleted": False, "synthetic": False, "replies": list(replies)}  # fmt: skip

    replies = [m("assistant", f"answer {i} {k}") for k in range(threads)]
    return {"message_tree_id": str(i), "tree_state": "ready_for_export",
            "prompt": m("prompter", f"tree {i}", replies)}  # fmt: skip


def test_oasst_max_val_set_caps_threads_not_trees(files, pretok, tok):
    files.jsonl("src/trees.jsonl.gz", [_tree(i) for i in range(20)], gz=True)
    ds = {
        "oasst_export": {"input_file_path": "trees.jsonl.gz", "val_split": 0.25, "max_val_set": 3}
    }
    config = files.mix("oa", [ds])
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 0, err
    out = files.root / "out" / "oa"
    val = IndexedDataset(out / "oa-val-text")
    train = IndexedDataset(out / "oa-train-text")
    # 5 val trees of 2 threads each; the cap keeps 3 of those 10 threads (whole trees in train).
    assert (len(train), len(val)) == (30, 3)
    val_trees = {tok.decode(val[i]).split("tree ")[1].split("<")[0] for i in range(len(val))}
    train_trees = {tok.decode(train[i]).split("tree ")[1].split("<")[0] for i in range(len(train))}
    assert not val_trees & train_trees
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["val"]["total"]["total_samples"] == 3


def test_oasst_max_val_set_with_fraction_is_seeded(files, pretok):
    files.jsonl("src/trees.jsonl.gz", [_tree(i, 1 + i % 3) for i in range(40)], gz=True)
    opts = {"input_file_path": "trees.jsonl.gz", "val_split": 0.2, "max_val_set": 5}
    config = files.mix("of", [{"oasst_export": {**opts, "fraction": 0.5}}])
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 0, err
    out = files.root / "out" / "of"
    assert len(IndexedDataset(out / "of-val-text")) == 5
    again = files.mix("of2", [{"oasst_export": {**opts, "fraction": 0.5}}])
    assert pretok(again, "--data-root", files.root / "src")[0] == 0
    for f in ("train-text.bin", "val-text.bin"):
        assert (files.root / f"out/of2/of2-{f}").read_bytes() == (out / f"of-{f}").read_bytes()


def test_max_val_set_zero_is_refused(files, pretok, make_chat_rows):
    # Open-Assistant skips the cap when max_val_set is falsy, so 0 would mean "no cap" there and
    # "no val set" here: refuse it and name the two spellings that say what is meant.
    files.jsonl("src/c.jsonl", make_chat_rows(10))
    config = files.mix("z", [{"chat": {"path": "c.jsonl", "max_val_set": 0}}])
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2
    assert "max_val_set" in err and "val_split: 0" in err and "z.yaml:" in err


_ROW = '{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "yo"}]}'


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_lone_surrogate_is_a_bad_record_not_a_tokenizer_crash(files, pretok, layout):
    # "\ud800" is valid JSON but no Unicode text: SentencePiece cannot take it. The record is
    # named (file:line) and --skip-bad-records counts it, like any unusable record.
    rows = [_ROW % "hi", _ROW % "half a pair \\ud800 here", _ROW % "a whole pair \\ud83d\\ude00"]
    if layout == "jsonl":
        name, where = "c.jsonl", "c.jsonl:2:"
        files.text(f"src/{name}", "\n".join(rows) + "\n")
    else:
        name, where = "c.json", "c.json:3:"  # the array's "[" is line 1
        files.text(f"src/{name}", "[\n" + ",\n".join(rows) + "\n]\n")
    ds = [{"chat": {"path": name, "val_split": 0}}]
    rc, _, err = pretok(files.mix("s", ds), "--data-root", files.root / "src")
    assert rc == 2 and where in err and "surrogate" in err, err
    rc, _, err = pretok(files.mix("k", ds), "--data-root", files.root / "src", "--skip-bad-records")
    assert rc == 0, err
    info = json.loads((files.root / "out/k/stats.json").read_text())["datasets"]["chat"]
    assert (info["bad_records"], info["valid"]) == (1, 2)


def test_jsonl_with_a_byte_order_mark(files, pretok):
    # Editors on Windows write one; the JSON-array reader already skipped it.
    files.raw("src/c.jsonl", b"\xef\xbb\xbf" + (_ROW % "hi").encode() + b"\n")
    ds = [{"chat": {"path": "c.jsonl", "val_split": 0}}]
    rc, _, err = pretok(files.mix("b", ds), "--data-root", files.root / "src")
    assert rc == 0, err
    assert len(IndexedDataset(files.root / "out/b/b-train-text")) == 1


# -- the OASST export's thread-level semantics and the statistics' names ---------------------------


def _tree_ids(ds: IndexedDataset, tok) -> list[str]:
    return [tok.decode(ds[i]).split("tree ")[1].split("<")[0] for i in range(len(ds))]


def _oasst_run(files, pretok, name: str, trees: list, *args: str, **opts) -> Path:
    files.jsonl(f"src/{name}.jsonl.gz", trees, gz=True)
    ds = {"oasst_export": {"input_file_path": f"{name}.jsonl.gz", **opts}}
    rc, _, err = pretok(files.mix(name, [ds]), "--data-root", files.root / "src", *args)
    assert rc == 0, err
    return files.root / "out" / name


def test_oasst_fraction_samples_train_threads_not_trees(files, pretok):
    # Open-Assistant's pretokenizer keeps int(len(train) * fraction) of what get_one_dataset
    # returned for train: for the export, the flattened list of train threads. One tree of 10
    # threads and 9 of one: 19 threads, 9 kept; picking 5 of the 10 trees gives 5 or 14.
    trees = [_tree(0, threads=10)] + [_tree(i, threads=1) for i in range(1, 10)]
    out = _oasst_run(files, pretok, "fr", trees, val_split=0, fraction=0.5)
    assert len(IndexedDataset(out / "fr-train-text")) == 9
    assert len(IndexedDataset(out / "fr-val-text")) == 0


def test_oasst_fraction_with_val_split_keeps_trees_whole(files, pretok, tok):
    trees = [_tree(i, threads=1 + i % 3) for i in range(40)]
    out = _oasst_run(files, pretok, "fv", trees, val_split=0.25, fraction=0.5)
    val, train = IndexedDataset(out / "fv-val-text"), IndexedDataset(out / "fv-train-text")
    val_trees = set(_tree_ids(val, tok))
    assert len(val_trees) == 10  # random_split(40 trees, [0.75, 0.25]): 10 val trees, whole
    assert len(val) == sum(1 + i % 3 for i in range(40) if str(i) in val_trees)
    train_threads = sum(1 + i % 3 for i in range(40) if str(i) not in val_trees)
    assert len(train) == int(train_threads * 0.5)
    assert not val_trees & set(_tree_ids(train, tok))
    # Seeded by (rng_seed, dataset name) only: the same bytes with two worker processes.
    again = _oasst_run(files, pretok, "fv2", trees, "--workers", "2", val_split=0.25, fraction=0.5)
    for f in ("train-text.bin", "val-text.bin"):
        assert (again / f"fv2-{f}").read_bytes() == (out / f"fv-{f}").read_bytes()


def test_oasst_trees_without_threads_still_count_in_the_split(files, pretok):
    # Open-Assistant keeps a tree that passes the tree filters (state, review, language) in the
    # list it hands to random_split even when no thread of it passes the thread filters: 20
    # trees give 5 val trees at 0.25, not 2 of the 10 that have a thread.
    trees = [_tree(i, threads=i % 2) for i in range(20)]
    out = _oasst_run(files, pretok, "em", trees, val_split=0.25)
    info = json.loads((out / "stats.json").read_text())["datasets"]["oasst_export"]
    assert (info["valid"], info["assigned"]) == (20, {"train": 15, "val": 5})
    assert info["no_samples"] == 10  # reported, no longer dropped
    n = len(IndexedDataset(out / "em-train-text")) + len(IndexedDataset(out / "em-val-text"))
    assert n == 10


def _blocks(text: str) -> list[str]:
    return [line.split("'")[1] for line in text.splitlines() if line.startswith("## Stats for")]


def test_val_stats_leave_out_sample_datasets_without_a_val_split(files, pretok, make_chat_rows):
    # get_one_dataset returns no val set for a sample dataset with val_split 0 (train_val_dataset
    # gives None), so it has no eval entry; the export's loader always returns its val
    # ListDataset (empty at val_split 0), so it stays listed.
    files.jsonl("src/a.jsonl", make_chat_rows(10))
    files.jsonl("src/b.jsonl", make_chat_rows(10, start=10))
    files.jsonl("src/t.jsonl.gz", [_tree(i) for i in range(4)], gz=True)
    ds = [
        {"a": {"kind": "chat", "path": "a.jsonl", "val_split": 0}},
        {"b": {"kind": "chat", "path": "b.jsonl", "val_split": 0.5}},
        {"oasst_export": {"input_file_path": "t.jsonl.gz", "val_split": 0}},
    ]
    rc, _, err = pretok(files.mix("vs", ds), "--data-root", files.root / "src")
    assert rc == 0, err
    out = files.root / "out" / "vs"
    train = _blocks((out / "vs-train_stats.txt").read_text())
    assert train == ["ChatDataset (a)", "Subset of ChatDataset (b)", "ListDataset", "total"]
    val = _blocks((out / "vs-val_stats.txt").read_text())
    assert val == ["Subset of ChatDataset (b)", "ListDataset", "total"]
    stats = json.loads((out / "stats.json").read_text())["splits"]
    assert list(stats["val"]["datasets"]) == ["b", "oasst_export"]
    assert stats["val"]["total"]["total_samples"] == 5


def test_stats_names_are_open_assistants_dataset_names(files, pretok, make_chat_rows):
    # get_dataset_name() prints the class of what get_one_dataset returned, `Subset of ...` when
    # it is a Subset: a sample dataset's train part is one once val_split cut it
    # (train_test_split), its val part always; the export's parts are ListDatasets, and its val
    # part a Subset once max_val_set cut it. The pretokenizer takes the name before it samples
    # `fraction`, so fraction never renames.
    files.jsonl("src/c.jsonl", make_chat_rows(10))
    files.jsonl("src/t.jsonl.gz", [_tree(i) for i in range(20)], gz=True)
    tree = {"kind": "oasst_export", "input_file_path": "t.jsonl.gz", "val_split": 0.25}
    ds = [
        {"c": {"kind": "chat", "path": "c.jsonl", "val_split": 0, "fraction": 0.5}},
        {"capped": {**tree, "max_val_set": 3, "fraction": 0.5}},  # 10 val threads > 3
        {"uncapped": {**tree, "max_val_set": 10}},  # 10 val threads, not more
        {"mid": {**tree, "max_val_set": 6}},  # 5 val trees but 10 val threads > 6
    ]
    rc, _, err = pretok(files.mix("nm", ds), "--data-root", files.root / "src")
    assert rc == 0, err
    out = files.root / "out" / "nm"
    train = _blocks((out / "nm-train_stats.txt").read_text())
    assert train == ["ChatDataset (c)", "ListDataset", "ListDataset", "ListDataset", "total"]
    val = _blocks((out / "nm-val_stats.txt").read_text())
    assert val == ["Subset of ListDataset", "ListDataset", "Subset of ListDataset", "total"]
    splits = json.loads((out / "stats.json").read_text())["splits"]
    assert splits["val"]["datasets"]["capped"]["name"] == "Subset of ListDataset"
    assert splits["train"]["datasets"]["c"]["name"] == "ChatDataset (c)"
