import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from data.atomic import AtomicFileSet
from data.chat import Conversation, format_text, render
from data.indexed import IndexedDataset

REPO = Path(__file__).resolve().parents[2]

STATS_CHATS = [
    [("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5.")],  # 28 tokens, 14 assistant
    [
        ("user", 'Reverse the word "apple".'),
        ("assistant", 'The word "apple" reversed is "elppa".'),
    ],  # 31, 19
    [
        ("system", "Be brief."),
        ("user", "Sort the list [3, 1, 2]."),
        ("assistant", "The sorted list is [1, 2, 3]."),
    ],  # 48, 19
    [("user", "Hi"), ("assistant", "Hello")],  # 17, 9
]
STATS_CODE = [
    (
        "Write a Python function named `add` that returns the sum of two numbers.",
        "def add(a, b):\n    return a + b",
    ),  # 41, 18
    ("What is 7 * 6?", "7 * 6 = 42. The answer is 42."),  # 36, 22
]


def _chat_rows(chats):
    return [{"messages": [{"role": r, "content": c} for r, c in chat]} for chat in chats]


def _stats_fixture(files):
    files.jsonl("src/chat/c.jsonl", _chat_rows(STATS_CHATS))
    rows = [{"USER": q, "ASSISTANT": a} for q, a in STATS_CODE]
    files.parquet(
        "src/megacode2/train.parquet",
        rows[:1] + [{"USER": "dropped: blank", "ASSISTANT": " "}] + rows[1:],
    )
    return files.mix(
        "st",
        [{"chat": {"val_split": 0}}, {"megacode2": {"val_split": 0}}],
        min_assistant_tokens=15,
    )


def test_stats_on_a_hand_computed_fixture(files, tok, pretok):
    # Token counts by the tokenizer alone (not the pipeline): the numbers below follow from them.
    counts = [(len(tok.encode(format_text(c))), render(c, tok)[1].count(2)) for c in STATS_CHATS]
    assert counts == [(28, 14), (31, 19), (48, 19), (17, 9)]
    code = [render([("user", q), ("assistant", a)], tok) for q, a in STATS_CODE]
    assert [(len(i), r.count(2)) for i, r in code] == [(41, 18), (36, 22)]

    config = _stats_fixture(files)
    rc, out, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 0, err
    out_dir = files.root / "out" / "st"
    expected = f"""# Stats for {out_dir}

## Stats for 'ChatDataset (chat)' (4 samples (100.0%))
-----------------
  Accepted: 2/4 (50.0%)
  Accepted tokens: 79
  Skipped: 2 (50.0%)
  Min tokens per sample: 31
  Max tokens per sample: 48
  Avg tokens per sample: 39.5
-----------------

## Stats for 'InstructionDataset (megacode2)' (2 samples (100.0%))
-----------------
  Accepted: 2/2 (100.0%)
  Accepted tokens: 77
  Skipped: 0 (0.0%)
  Min tokens per sample: 36
  Max tokens per sample: 41
  Avg tokens per sample: 38.5
-----------------

## Stats for 'total' (6 samples (100.0%))
-----------------
  Accepted: 4/6 (66.7%)
  Accepted tokens: 156
  Skipped: 2 (33.3%)
  Min tokens per sample: 31
  Max tokens per sample: 48
  Avg tokens per sample: 39.0
-----------------
"""
    assert (out_dir / "st-train_stats.txt").read_text() == expected
    assert expected in out  # printed too, as Open-Assistant's pretokenizer does
    val = (out_dir / "st-val_stats.txt").read_text()
    assert (
        "## Stats for 'total' (0 samples (100.0%))\n-----------------\n  Accepted: 0/0 (0.0%)"
        in val
    )

    stats = json.loads((out_dir / "stats.json").read_text())
    total = stats["splits"]["train"]["total"]
    assert total["skipped_tokens"] == 28 + 17 and total["skipped_samples"] == 2
    assert total["accepted_assistant_tokens"] == 19 + 19 + 18 + 22
    assert stats["datasets"]["megacode2"]["dropped"] == {"blank": 1}
    meta = json.loads((out_dir / "st-train-meta.json").read_text())
    assert (meta["num_samples"], meta["num_tokens"]) == (4, 156)
    # The one-pass route assigns the usable records to train, not the dropped one.
    assert stats["datasets"]["megacode2"]["assigned"] == {"train": 2, "val": 0}
    assert stats["datasets"]["chat"]["records"] == 4 and stats["min_assistant_tokens"] == 15


def test_min_assistant_tokens_keeps_a_sample_with_exactly_that_many(files, pretok):
    # Assistant tokens: chat 14, 19, 19, 9; megacode2 18, 22. "Fewer than" 19 are skipped.
    _stats_fixture(files)
    ds = [{"chat": {"val_split": 0}}, {"megacode2": {"val_split": 0}}]
    config = files.mix("eq", ds, min_assistant_tokens=19)
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 0, err
    train = json.loads((files.root / "out/eq/stats.json").read_text())["splits"]["train"]
    assert train["datasets"]["chat"]["accepted_samples"] == 2
    assert train["datasets"]["megacode2"]["accepted_samples"] == 1


def test_text_bin_decode_round_trip(files, tok, pretok):
    config = _stats_fixture(files)
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    prefix = files.root / "out" / "st" / "st-train"
    text, role = IndexedDataset(f"{prefix}-text"), IndexedDataset(f"{prefix}-role")
    assert text.dtype == np.uint16 and role.dtype == np.uint16
    kept = [Conversation.from_messages(STATS_CHATS[i]) for i in (1, 2)]
    kept += [Conversation.from_messages([("user", q), ("assistant", a)]) for q, a in STATS_CODE]
    assert len(text) == len(kept)
    for i, conv in enumerate(kept):
        assert tok.decode(text[i]) == format_text(conv)
        ids, roles = render(conv, tok)
        assert text[i].tolist() == ids and role[i].tolist() == roles
    meta = json.loads(Path(f"{prefix}-meta.json").read_text())
    assert meta["dataset_ranges"] == {"chat": [0, 2], "megacode2": [2, 4]}
    assert (
        meta["tokenizer"]["fingerprint"] == tok.fingerprint
        and meta["tokenizer"]["vocab_size"] == 1031
    )
    special = json.loads((files.root / "out" / "st" / "special_tokens.json").read_text())
    assert special["<|im_start|>"] == tok.im_start_id and special["<|im_end|>"] == tok.im_end_id


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sample_config_writes_the_makefile_paths_and_is_worker_independent(
    tmp_path, pretok, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # output_dir in sample.yaml is relative: runs/data/...
    rc, _, err = pretok(REPO / "configs/data/sample.yaml", "--data-root", REPO)
    assert rc == 0, err
    for mix in ("sample_stage1", "sample_stage2"):
        d = tmp_path / "runs" / "data" / mix
        for split in ("train", "val"):
            for feature in ("text", "role"):
                for ext in ("bin", "idx"):
                    assert (d / f"{mix}-{split}-{feature}.{ext}").is_file()
            assert (d / f"{mix}-{split}_stats.txt").is_file() and (
                d / f"{mix}-{split}-meta.json"
            ).is_file()
        assert (d / "stats.json").is_file() and (d / "special_tokens.json").is_file()
        assert not list(d.glob(".*.tmp"))
    one = _digest(tmp_path / "runs")
    rc, _, err = pretok(REPO / "configs/data/sample.yaml", "--data-root", REPO, "--workers", "2")
    assert rc == 0, err
    assert _digest(tmp_path / "runs") == one


def test_fraction_val_split_max_val_set(files, pretok, make_chat_rows, tok):
    files.jsonl("src/c.jsonl", make_chat_rows(100))
    ds = {"chat": {"path": "c.jsonl", "val_split": 0.1, "max_val_set": 4, "fraction": 0.5}}
    config = files.mix("fr", [ds])
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    out = files.root / "out" / "fr"
    train, val = IndexedDataset(out / "fr-train-text"), IndexedDataset(out / "fr-val-text")
    # ceil(100 * 0.1) = 10 held out, 4 of them kept; int(90 * 0.5) = 45 train samples.
    assert (len(train), len(val)) == (45, 4)
    train_texts = {tok.decode(train[i]) for i in range(len(train))}
    val_texts = {tok.decode(val[i]) for i in range(len(val))}
    assert len(train_texts) == 45 and not train_texts & val_texts
    stats = (out / "fr-train_stats.txt").read_text()
    assert "## Stats for 'Subset of ChatDataset (chat)' (45 samples (50.0%))" in stats
    # `fraction` samples the train part only: the val block is at 100%.
    val_stats = (out / "fr-val_stats.txt").read_text()
    assert "## Stats for 'Subset of ChatDataset (chat)' (4 samples (100.0%))" in val_stats
    assert json.loads((out / "stats.json").read_text())["datasets"]["chat"]["assigned"] == {
        "train": 45,
        "val": 4,
    }

    # Same seed -> same selection; another rng_seed -> another one.
    again = files.mix("fr2", [ds])
    assert pretok(again, "--data-root", files.root / "src")[0] == 0
    assert (files.root / "out/fr2/fr2-train-text.bin").read_bytes() == (
        out / "fr-train-text.bin"
    ).read_bytes()
    other = files.mix("fr3", [ds], rng_seed=7)
    assert pretok(other, "--data-root", files.root / "src")[0] == 0
    assert (files.root / "out/fr3/fr3-train-text.bin").read_bytes() != (
        out / "fr-train-text.bin"
    ).read_bytes()


def test_runs_without_tqdm_and_with_progress_asked_for(files, make_chat_rows, monkeypatch):
    """A bare environment (the GPU image has no tqdm): no progress bar, the same outputs."""
    import sys

    from data import pretokenize

    files.jsonl("src/c.jsonl", make_chat_rows(30))
    ds = {"chat": {"path": "c.jsonl", "val_split": 0.1}}
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError
    root = str(files.root / "src")
    assert pretokenize.main([str(files.mix("nt", [ds])), "--data-root", root]) == 0
    monkeypatch.delitem(sys.modules, "tqdm")
    assert pretokenize.main([str(files.mix("wt", [ds])), "--data-root", root, "--no-progress"]) == 0
    for split in ("train", "val"):
        assert (files.root / f"out/nt/nt-{split}-text.bin").read_bytes() == (
            files.root / f"out/wt/wt-{split}-text.bin"
        ).read_bytes()


def test_oasst_split_by_tree(files, pretok, tok):
    def tree(i):
        def m(role, text, replies=()):
            return {"role": role, "text": text, "lang": "en", "review_result": True, "rank": None,
                    "deleted": False, "synthetic": False, "replies": list(replies)}  # fmt: skip

        prompt = m(
            "prompter",
            f"tree {i}",
            [m("assistant", f"answer {i} one"), m("assistant", f"answer {i} two")],
        )
        return {"message_tree_id": str(i), "tree_state": "ready_for_export", "prompt": prompt}

    files.jsonl("src/trees.jsonl.gz", [tree(i) for i in range(20)], gz=True)
    config = files.mix(
        "oa", [{"oasst_export": {"input_file_path": "trees.jsonl.gz", "val_split": 0.25}}]
    )
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    out = files.root / "out" / "oa"
    trees_of = {}
    for split in ("train", "val"):
        ds = IndexedDataset(out / f"oa-{split}-text")
        trees_of[split] = [
            tok.decode(ds[i]).split("tree ")[1].split("<")[0] for i in range(len(ds))
        ]
    assert (
        len(trees_of["val"]) == 2 * 5 and len(trees_of["train"]) == 2 * 15
    )  # threads, by whole trees
    assert not set(trees_of["train"]) & set(trees_of["val"])
    assert (
        "## Stats for 'ListDataset' (30 samples (100.0%))"
        in (out / "oa-train_stats.txt").read_text()
    )


def test_dataset_locations(files, pretok, make_chat_rows, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("abs") / "data.jsonl"
    elsewhere.write_text("".join(json.dumps(r) + "\n" for r in make_chat_rows(3)))
    files.jsonl("root/chat/a.jsonl", make_chat_rows(2))  # by name under --data-root
    files.jsonl("root/sub/b.jsonl", make_chat_rows(4))  # `path:` relative to --data-root
    config = files.mix(
        "loc",
        [
            {"chat": {"val_split": 0}},
            {"mine": {"kind": "chat", "path": "sub/b.jsonl", "val_split": 0}},
            {"far": {"kind": "chat", "path": str(elsewhere), "val_split": 0}},
        ],
    )
    rc, _, err = pretok(
        config, "--data-root", files.root / "root", "--output-dir", files.root / "o"
    )
    assert rc == 0, err
    meta = json.loads((files.root / "o" / "loc-train-meta.json").read_text())
    assert meta["dataset_ranges"] == {"chat": [0, 2], "mine": [2, 6], "far": [6, 9]}


# -- bad input ----------------------------------------------------------------------------------


def _outputs(files) -> list[Path]:
    out = files.root / "out"
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [', "malformed JSON"),
        (b'{"messages": [{"role": "user", "content": "\xff"}]}', "invalid UTF-8"),
        ('{"text": "no messages"}', "missing column 'messages'"),
        ('{"messages": []}', "empty conversation"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
        ('{"messages": [{"role": "robot", "content": "q"}]}', "messages[0]: unknown role 'robot'"),
    ],
)
def test_bad_records_error_with_file_line_or_are_counted(
    files, pretok, make_chat_rows, line, message
):
    good = [json.dumps(r).encode() for r in make_chat_rows(4)]
    bad = line if isinstance(line, bytes) else line.encode()
    path = files.raw("src/chat.jsonl", b"\n".join(good[:2] + [bad] + good[2:]) + b"\n")
    config = files.mix("bad", [{"chat": {"path": "chat.jsonl", "val_split": 0.25}}])
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "Traceback" not in err
    assert f"{path}:3: {message}" in err and "--skip-bad-records" in err
    assert _outputs(files) == []  # nothing half-written

    rc, _, err = pretok(config, "--data-root", files.root / "src", "--skip-bad-records")
    assert rc == 0, err
    info = json.loads((files.root / "out/bad/stats.json").read_text())["datasets"]["chat"]
    assert (
        info["bad_records"] == 1
        and info["valid"] == 4
        and info["bad_examples"][0].startswith(f"{path}:3")
    )
    assert "skipped 1 bad record" in err


def test_skip_bad_records_counts_several(files, pretok, make_chat_rows):
    rows = [json.dumps(r) for r in make_chat_rows(12)]
    rows[1], rows[4] = "not json", '{"messages": []}'
    rows[6:11] = ["not json"] * 5
    files.jsonl("src/c.jsonl", rows)
    config = files.mix("sk", [{"chat": {"path": "c.jsonl", "val_split": 0}}])
    assert pretok(config, "--data-root", files.root / "src", "--skip-bad-records")[0] == 0
    stats = json.loads((files.root / "out/sk/stats.json").read_text())
    assert stats["datasets"]["chat"]["bad_records"] == 7
    assert stats["datasets"]["chat"]["dropped"] == {}  # bad records are not also "dropped"
    assert len(stats["datasets"]["chat"]["bad_examples"]) == 5  # all counted, 5 shown
    assert stats["splits"]["train"]["total"]["total_samples"] == 5


def test_a_mix_with_no_training_sample_is_an_error_naming_the_counts(files, pretok):
    """A file in another format (ShareGPT's "conversations"/"from"/"value") under kind chat, with
    --skip-bad-records: every record skipped. The run wrote an empty mix and exited 0, and the
    trainer failed on it only after loading the model."""
    rows = [json.dumps({"conversations": [{"from": "human", "value": "hi"}]})] * 3
    path = files.jsonl("src/share.jsonl", rows)
    config = files.mix("empty", [{"chat": {"path": "share.jsonl", "val_split": 0}}])
    rc, _, err = pretok(config, "--data-root", files.root / "src", "--skip-bad-records")
    assert rc == 2 and "Traceback" not in err
    assert "mix 'empty' gives no training sample (chat: 3 records read, 0 usable, 3 bad" in err
    assert f"e.g. {path}:1: " in err
    assert _outputs(files) == []  # nothing written


def test_parquet_missing_column_is_fatal_even_when_skipping(files, pretok):
    files.parquet("src/megacode2/x.parquet", [{"USER": "q", "RESPONSE": "a"}])
    config = files.mix("pq", [{"megacode2": {}}])
    rc, _, err = pretok(config, "--data-root", files.root / "src", "--skip-bad-records")
    assert rc == 2 and "x.parquet: missing column(s) ['ASSISTANT']" in err


TAIL = "  output_dir: o\n  filename_prefix: m\n"


def _one(dataset: str, option: str) -> str:
    return f"m:\n  datasets:\n    - {dataset}:\n        {option}\n" + TAIL


@pytest.mark.parametrize(
    "body, message",
    [
        (_one("chat", "fractoin: 0.5"),
         r":4: unknown key 'fractoin' for dataset 'chat' \(chat\); allowed: kind, path, fraction"),
        ("m:\n  datasets:\n    - chat: {}\n" + TAIL + "  epochs: 2\n",
         r":6: unknown key 'epochs' in mix 'm'; allowed: datasets, output_dir"),
        ("m:\n  datasets:\n    - alpaca: {}\n" + TAIL,
         r":3: unknown dataset 'alpaca' in mix 'm'; known kinds: megacode2, oa_leet10k, orca-chat"),
        (_one("chat", "path: nowhere.jsonl"), r"nowhere\.jsonl does not exist"),
        (_one("chat", "fraction: 1.5"), r":4: dataset 'chat': fraction = 1.5 is outside \(0, 1\]"),
        (_one("chat", "val_split: 1"), r"val_split = 1 is outside \[0, 1\)"),
        (_one("oasst_export", "top_k: 0"), r"top_k = 0 is outside"),
        # NaN compares false with every bound: fraction was a traceback, val_split accepted.
        (_one("chat", "fraction: .nan"), r":4: dataset 'chat': fraction = nan is outside"),
        (_one("chat", "val_split: .nan"), r":4: dataset 'chat': val_split = nan is outside"),
        ("m:\n  datasets: [chat]\n  output_dir: o\n", r"mix 'm' has no 'filename_prefix'"),
        ("m:\n  datasets:\n    - chat: {}\n   bad indent: x\n", r":4: invalid YAML"),
        ("m: {}\nm: {}\n", r":2: duplicate key 'm'"),
        ("- just\n- a list\n", r"expected a mapping of mix names"),
    ],
)  # fmt: skip
def test_config_errors_name_file_line_and_allowed_keys(
    files, pretok, make_chat_rows, body, message
):
    files.jsonl("src/chat/c.jsonl", make_chat_rows(2))
    config = files.text("bad.yaml", body)
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "Traceback" not in err
    assert str(config) in err or "does not exist" in err
    import re

    assert re.search(message, err), err


def test_cli_errors(files, pretok, make_chat_rows):
    files.jsonl("src/chat/c.jsonl", make_chat_rows(2))
    config = files.mix("m", [{"chat": {}}])
    rc, _, err = pretok(config, "--mix", "other")
    assert rc == 2 and "no mix named 'other'; the file defines m" in err
    rc, _, err = pretok(
        config, "--data-root", files.root / "src", "--tokenizer", files.root / "none.model"
    )
    assert rc == 2 and "none.model: tokenizer model not found" in err
    rc, _, err = pretok(files.root / "missing.yaml")
    assert rc == 2 and "missing.yaml: config file not found" in err


# -- atomic outputs -----------------------------------------------------------------------------


def test_failed_run_keeps_previous_outputs(files, pretok, make_chat_rows):
    files.jsonl("src/a/x.jsonl", make_chat_rows(10))
    files.jsonl("src/b/y.jsonl", make_chat_rows(10, start=10))
    config = files.mix(
        "at", [{"first": {"kind": "chat", "path": "a"}}, {"second": {"kind": "chat", "path": "b"}}]
    )
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    before = _digest(files.root / "out")
    # The second dataset now fails after the first one has been tokenized and partly written.
    files.jsonl("src/b/y.jsonl", [json.dumps(r) for r in make_chat_rows(3)] + ["{broken"])
    files.jsonl("src/a/x.jsonl", make_chat_rows(12))
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "y.jsonl:4: malformed JSON" in err
    assert _digest(files.root / "out") == before  # untouched, and no temporary file left behind


def test_atomic_file_set(tmp_path):
    final = tmp_path / "d" / "f.txt"
    with AtomicFileSet() as files:
        tmp = files.path(final)
        tmp.write_text("new")
        assert not final.exists() and tmp.name.startswith(".f.txt.")
        files.commit()
    assert final.read_text() == "new" and not tmp.exists()
    with pytest.raises(RuntimeError), AtomicFileSet() as files:
        files.path(final).write_text("half")
        raise RuntimeError("interrupted")
    assert final.read_text() == "new" and list(final.parent.iterdir()) == [final]


def test_atomic_commit_puts_back_what_a_failed_rename_replaced(tmp_path, monkeypatch):
    from data import atomic

    old_a, new_b, dir_c = tmp_path / "a.idx", tmp_path / "b.bin", tmp_path / "c.json"
    old_a.write_text("old a")
    dir_c.mkdir()  # a directory under a final name: its rename fails, after a's and b's
    with pytest.raises(OSError), AtomicFileSet() as files:
        for final in (old_a, new_b, dir_c):
            files.path(final).write_text("new")
        files.commit()
    # a has its previous contents, b (new in this commit) is gone, nothing temporary is left
    assert old_a.read_text() == "old a" and not new_b.exists() and dir_c.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "c.json"]

    # Without hard links a replaced file cannot be put back: the new, complete one stays.
    dir_c.rmdir()
    monkeypatch.setattr(atomic.os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links")))
    with AtomicFileSet() as files:
        files.path(old_a).write_text("new a")
        files.commit()
    assert old_a.read_text() == "new a"


def test_atomic_file_set_removes_what_a_killed_run_left(tmp_path):
    import os
    import subprocess
    import sys

    from data.atomic import _owner

    final = tmp_path / "x.bin"
    host = _owner().rsplit("-", 1)[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    left = [tmp_path / f".x.bin.{host}-{dead}.tmp", tmp_path / f".x.bin.{host}-{dead}.old"]
    alive = tmp_path / f".x.bin.{host}-{os.getppid()}.tmp"  # a live process: maybe writing
    elsewhere = tmp_path / f".x.bin.otherhost-{dead}.tmp"  # another host's: cannot be checked
    other_file = tmp_path / f".y.bin.{host}-{dead}.tmp"  # another output's: not this one's
    for p in [*left, alive, elsewhere, other_file]:
        p.write_text("junk")
    with AtomicFileSet() as files:
        files.path(final).write_text("new")
        files.commit()
    assert final.read_text() == "new" and not any(p.exists() for p in left)
    assert alive.exists() and elsewhere.exists() and other_file.exists()


def test_staged_and_scanning_routes_agree(files, pretok, make_chat_rows, monkeypatch):
    from data import pretokenize

    rows = [json.dumps(r) for r in make_chat_rows(60)]
    rows[7] = '{"messages": []}'  # a bad record shifts the indices of the valid ones
    files.jsonl("src/c.jsonl", rows)
    ds = [{"chat": {"path": "c.jsonl", "val_split": 0.2, "max_val_set": 5}}]
    staged = files.mix("staged", ds, min_assistant_tokens=12)
    scanned = files.mix("scanned", ds, min_assistant_tokens=12)
    assert pretok(staged, "--data-root", files.root / "src", "--skip-bad-records")[0] == 0
    monkeypatch.setattr(pretokenize, "_STAGE_SPLITS", False)
    assert pretok(scanned, "--data-root", files.root / "src", "--skip-bad-records")[0] == 0
    a, b = files.root / "out" / "staged", files.root / "out" / "scanned"
    for split in ("train", "val"):
        for f in ("text.bin", "text.idx", "role.bin", "role.idx"):
            assert (a / f"staged-{split}-{f}").read_bytes() == (
                b / f"scanned-{split}-{f}"
            ).read_bytes()
    assert (a / "staged-train_stats.txt").read_text().split("\n", 1)[1] == (
        (b / "scanned-train_stats.txt").read_text().split("\n", 1)[1]
    )
    assert sorted(p.name for p in a.iterdir() if p.name.startswith(".")) == []  # staging removed
    assert json.loads((a / "stats.json").read_text())["datasets"]["chat"]["assigned"] == {
        "train": 47,
        "val": 5,
    }


def test_the_seeds_configs_are_read_verbatim(files):
    from data.config import load_mixes

    for name in ("megacode2", "orca-chat", "dolly15k_multilingual", "oa_leet10k"):
        files.jsonl(f"hub/{name}/train.jsonl", [{}])
    files.raw("hub/2023-07-23_oasst_ready.tar.gz", b"")
    [stage1] = load_mixes(REPO / "configs/data/oasst_pre10_min25.yaml", files.root / "hub")
    assert stage1.name == "oasst_pre10_min25" and stage1.filename_prefix == "oasst_pre10"
    assert (
        str(stage1.output_dir) == "output/oasst_pre10_min25" and stage1.min_assistant_tokens == 25
    )
    got = [(d.name, d.fraction, d.val_split, d.max_val_set) for d in stage1.datasets]
    assert got == [
        ("megacode2", 0.5, 0.01, 1000),
        ("orca-chat", 1.0, 0.01, 1000),
        ("dolly15k_multilingual", 1.0, 0.05, 300),
        ("oa_leet10k", 1.0, 0.05, 250),
    ]
    assert stage1.datasets[0].display == "Subset of InstructionDataset (megacode2)"
    [stage2] = load_mixes(
        REPO / "configs/data/oasst_top1.yaml", files.root / "hub", files.root / "o"
    )
    [oasst] = stage2.datasets
    assert (
        oasst.options["top_k"] == 1
        and "sv" in oasst.options["lang"]
        and len(oasst.options["lang"]) == 20
    )
    assert (
        oasst.files == [files.root / "hub" / "2023-07-23_oasst_ready.tar.gz"]
        and oasst.val_split == 0.05
    )
    assert stage2.output_dir == files.root / "o" and oasst.display == "ListDataset"
    # Several mixes with --output-dir: one folder per mix.
    both = load_mixes(REPO / "configs/data/sample.yaml", REPO, files.root / "o")
    assert [m.output_dir for m in both] == [
        files.root / "o" / "sample_stage1",
        files.root / "o" / "sample_stage2",
    ]


def test_config_defaults_and_bounds(files):
    """A dataset without val_split holds out Open-Assistant's default 0.2; min_assistant_tokens
    may be 0 (keep every sample)."""
    from data.config import load_mixes

    files.jsonl("src/chat/c.jsonl", [{}])
    config = files.mix("d", [{"chat": {}}], min_assistant_tokens=0)
    [mix] = load_mixes(config, files.root / "src")
    [chat] = mix.datasets
    assert (chat.fraction, chat.val_split, chat.max_val_set) == (1.0, 0.2, None)
    assert mix.min_assistant_tokens == 0 and mix.rng_seed == 42


def test_token_stats_accumulate_over_batches():
    """The pipeline adds one batch (chunk) at a time: every counter sums over batches, and the
    minimum and maximum are over all accepted samples of all batches."""
    from data.stats import TokenStats

    s = TokenStats("x")
    s.add(np.array([30, 10, 50]), np.array([20, 1, 30]), np.array([True, False, True]))
    s.add(np.array([40, 20]), np.array([25, 2]), np.array([True, False]))
    assert (s.accepted_samples, s.skipped_samples, s.total_samples) == (3, 2, 5)
    assert (s.accepted_tokens, s.skipped_tokens, s.accepted_assistant_tokens) == (120, 30, 75)
    assert (s.min_tokens, s.max_tokens, s.avg_tokens) == (30, 50, 40.0)
    # A dataset that contributed nothing: zeros, not "None" or a division by zero.
    empty = TokenStats("e").block()
    assert "Accepted: 0/0 (0.0%)" in empty and "Min tokens per sample: 0\n" in empty


# -- bad input found by trying the CLI as a user would -------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        # A null or list output_dir used to be written to a folder named "None" / "['a']".
        ("m:\n  datasets:\n    - chat: {}\n  output_dir:\n  filename_prefix: m\n",
         r":4: mix 'm': output_dir must be a path \(a non-empty string\), found None"),
        ("m:\n  datasets:\n    - chat: {}\n  output_dir: [a]\n  filename_prefix: m\n",
         r":4: mix 'm': output_dir must be a path"),
        # A list path used to be searched as "<data-root>/['a']".
        (_one("chat", "path: [a]"), r":4: dataset 'chat': path must be a path"),
        # A scalar entry has no line of its own: the datasets key's line, not ":0".
        ("m:\n  datasets:\n    - 5\n" + TAIL, r"bad\.yaml:2: each entry of m\.datasets"),
        # Numbers as language codes used to filter out every record without a word.
        (_one("chat", "lang: [1, 2]"), r":4: dataset 'chat': lang must be a comma-separated"),
        # A fractional cap has no meaning as a count of samples.
        (_one("chat", "max_val_set: 2.5"), r":4: dataset 'chat': max_val_set must be an integer"),
        ("m:\n  datasets:\n    - chat:\n    - chat:\n" + TAIL,
         r"bad\.yaml:4: dataset 'chat' appears twice in mix 'm' \(first at line 3\)"),
        ("m:\n  datasets:\n    - chat:\n  output_dir: o\n  filename_prefix: a/b\n",
         r":5: filename_prefix must be a file name"),
    ],
)  # fmt: skip
def test_config_value_types_are_checked(files, pretok, make_chat_rows, body, message, monkeypatch):
    import re

    monkeypatch.chdir(files.root)  # a relative output_dir, if ever written, lands here
    files.jsonl("src/chat/c.jsonl", make_chat_rows(2))
    config = files.text("bad.yaml", body)
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (files.root / "None").exists() and not (files.root / "['a']").exists()


def test_tokenizer_that_is_not_sentencepiece_is_a_clear_error(files, pretok, make_chat_rows):
    files.jsonl("src/chat/c.jsonl", make_chat_rows(2))
    config = files.mix("m", [{"chat": {}}])
    bogus = files.text("tokenizer.json", '{"model": {"type": "BPE"}}')
    rc, _, err = pretok(config, "--data-root", files.root / "src", "--tokenizer", bogus)
    assert rc == 2 and "Traceback" not in err
    assert f"{bogus} is not a SentencePiece model" in err and "--tokenizer" in err
    rc, _, err = pretok(config, "--data-root", files.root / "src", "--tokenizer", files.root)
    assert rc == 2 and "is a directory" in err
    assert _outputs(files) == []


def test_empty_dataset_file_is_an_error(files, pretok, make_chat_rows):
    files.jsonl("src/good/c.jsonl", make_chat_rows(4))
    empty = files.raw("src/empty/part-0.jsonl", b"")  # e.g. an interrupted download
    config = files.mix(
        "e",
        [{"good": {"kind": "chat", "path": "good"}}, {"bad": {"kind": "chat", "path": "empty"}}],
    )
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "Traceback" not in err
    assert f"dataset 'bad' holds no records ({empty})" in err
    assert _outputs(files) == []


def test_mixes_sharing_an_output_dir_are_refused(files, pretok, make_chat_rows):
    files.jsonl("src/chat/c.jsonl", make_chat_rows(4))
    body = {
        name: {"datasets": ["chat"], "output_dir": str(files.root / "out"), "filename_prefix": name}
        for name in ("a", "b")
    }
    config = files.text("two.yaml", json.dumps(body))
    rc, _, err = pretok(config, "--data-root", files.root / "src")
    assert rc == 2 and "mixes 'a' and 'b' both write to" in err
    assert _outputs(files) == []


def test_output_dir_of_another_mix_is_not_clobbered(files, pretok, make_chat_rows):
    files.jsonl("src/chat/c.jsonl", make_chat_rows(4))
    out = files.root / "out" / "shared"
    first = files.text("first.yaml", json.dumps({"first": {
        "datasets": ["chat"], "output_dir": str(out), "filename_prefix": "first"}}))  # fmt: skip
    second = files.text("second.yaml", json.dumps({"second": {
        "datasets": ["chat"], "output_dir": str(out), "filename_prefix": "second"}}))  # fmt: skip
    assert pretok(first, "--data-root", files.root / "src")[0] == 0
    before = _digest(out)
    rc, _, err = pretok(second, "--data-root", files.root / "src")
    assert rc == 2 and f"{out} holds the outputs of mix 'first'" in err
    assert _digest(out) == before  # its stats.json and special_tokens.json are untouched
    # The same mix again replaces its own outputs as a whole, and says so.
    rc, _, err = pretok(first, "--data-root", files.root / "src")
    assert rc == 0 and "replaced the previous outputs of mix 'first'" in err
    assert _digest(out) == before
    # An output_dir that is a file, or holds a stats.json of another tool.
    files.text("afile", "x")
    rc, _, err = pretok(
        first, "--data-root", files.root / "src", "--output-dir", files.root / "afile"
    )
    assert rc == 2 and "exists and is not a directory" in err and "Traceback" not in err
    # ... or is under a file: refused before tokenizing, not as a bare OSError when writing.
    rc, _, err = pretok(
        first, "--data-root", files.root / "src", "--output-dir", files.root / "afile" / "sub"
    )
    assert rc == 2 and f"is under {files.root / 'afile'}, which is a file" in err
    assert "Errno" not in err and "Traceback" not in err
    files.text("other/stats.json", '{"accuracy": 1}')
    rc, _, err = pretok(
        first, "--data-root", files.root / "src", "--output-dir", files.root / "other"
    )
    assert rc == 2 and "not written by data.pretokenize" in err
    assert (files.root / "other/stats.json").read_text() == '{"accuracy": 1}'


def test_output_dir_without_write_permission_is_refused_before_tokenizing(tmp_path, monkeypatch):
    """A folder the user may not write into (a shared cluster's dataset directory) is named
    before any tokenizing, whether the output_dir exists or would be created under it. (The
    tests run as root, which os.access lets write anywhere, so the permission is faked.)"""
    import re
    from types import SimpleNamespace

    import data.pretokenize as pre
    from data.errors import DataError

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(pre.os, "access", lambda p, mode: Path(p) != locked)
    for out, where in ((locked / "a" / "b", locked), (locked, locked)):
        mix = SimpleNamespace(name="m", output_dir=out)
        with pytest.raises(DataError, match=f"no permission to write into {re.escape(str(where))}"):
            pre.check_output_dir(mix)
    assert pre.check_output_dir(SimpleNamespace(name="m", output_dir=tmp_path / "free")) is False


def test_output_dir_whose_name_is_too_long_is_refused_with_the_flag(tmp_path):
    """Even asking whether a 300-character name exists fails (ENAMETOOLONG): the error names the
    mix, the output_dir and the flag, not only the OS's text."""
    from types import SimpleNamespace

    import data.pretokenize as pre
    from data.errors import DataError

    mix = SimpleNamespace(name="m", output_dir=tmp_path / ("a" * 300) / "m")
    with pytest.raises(DataError, match=r"of mix 'm': cannot use it \(File name too long\): set"):
        pre.check_output_dir(mix)
