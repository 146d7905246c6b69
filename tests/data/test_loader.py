import json
import math

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.indexed import write_indexed
from data.loader import BatchLoader, LoaderConfig, SFTDataset, iter_eval_batches, pack_rows

VOCAB, PAD = 5000, 4999


def make_dataset(tmp_path, lengths, name="ds", vocab=VOCAB, roles_fn=None, meta=True, seed=0):
    """Sample i starts with the marker token 10 + i (so a segment tells which sample it holds),
    then random ids; roles in blocks of all four kinds."""
    rng = np.random.default_rng(seed)
    texts, roles = [], []
    for i, n in enumerate(lengths):
        t = rng.integers(2000, 4000, size=n)
        t[0] = 10 + i
        texts.append(t)
        r = np.array([1, 2, 3, 2])[(np.arange(n) // 5) % 4]  # user, assistant, context, assistant
        if i % 3 == 0:
            r[:3] = 0  # a system message

        roles.append(roles_fn(i, n) if roles_fn else r)
    prefix = tmp_path / name
    write_indexed(f"{prefix}-text", texts, np.uint16)
    write_indexed(f"{prefix}-role", roles, np.uint16)
    if meta:
        info = {
            "tokenizer": {"fingerprint": "f" * 64, "vocab_size": vocab, "pad_id": PAD},
            "dataset_ranges": {"a": [0, len(lengths) // 2], "b": [len(lengths) // 2, len(lengths)]},
        }
        (tmp_path / f"{name}-meta.json").write_text(json.dumps(info))
    return str(prefix), texts, roles


def check_micro_batch(mb, texts, roles, cfg):
    """Packing invariants; returns the samples seen (in order)."""
    tokens, labels, mask, pos, cu = (
        mb[k].numpy() for k in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens")
    )
    B, S = tokens.shape
    assert (
        tokens.dtype == labels.dtype == pos.dtype == np.int64
        and mask.dtype == np.float32
        and cu.dtype == np.int32
    )
    assert cu[0] == 0 and cu[-1] == B * S and np.all(np.diff(cu) > 0)
    assert set(range(0, B * S + 1, S)) <= set(cu.tolist())  # no segment crosses a row
    assert mb["max_seqlen"] == int(np.diff(cu).max())
    flat = {
        k: v.reshape(-1) for k, v in dict(tokens=tokens, labels=labels, mask=mask, pos=pos).items()
    }
    seen, truncated = [], 0
    for a, b in zip(cu[:-1], cu[1:]):
        n = b - a
        assert np.array_equal(flat["pos"][a:b], np.arange(n))  # positions restart per segment
        seg = flat["tokens"][a:b]
        if seg[0] == PAD:  # padding at the end of a row: its own segment, no loss
            assert np.all(seg == PAD) and b % S == 0 and not flat["mask"][a:b].any()
            continue
        i = int(seg[0]) - 10
        t, r = texts[i], roles[i]
        seen.append(i)
        assert n == min(t.size, S) and np.array_equal(seg, t[:n])  # one whole document
        if t.size > n:  # truncated on the right: the last label is the true next token
            truncated += 1
            exp_labels, exp_mask = t[1 : n + 1], r[1 : n + 1] == 2
        else:
            exp_labels = np.concatenate([t[1:], [PAD]])
            exp_mask = np.concatenate([r[1:] == 2, [False]])  # 0 at the document's last token
        assert np.array_equal(flat["labels"][a:b], exp_labels)
        assert np.array_equal(flat["mask"][a:b], exp_mask.astype(np.float32))
    assert mb["num_truncated"] == truncated
    return seen


def test_packing_invariants_and_one_pass_per_epoch(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 90, size=60).tolist() + [130, 200]  # two longer than a row
    prefix, texts, roles = make_dataset(tmp_path, lengths)
    ds = SFTDataset(prefix)
    cfg = LoaderConfig(seq_length=128, micro_batch_size=3, global_batch_size=6)
    loader = BatchLoader(ds, cfg)
    rows = loader.rows_per_epoch
    assert sum(min(n, 128) for n in lengths) <= rows * 128
    seen = []
    while loader.epoch == 0:
        for mb in loader.next_global_batch():
            assert mb["tokens"].shape == (3, 128)
            seen += check_micro_batch(mb, texts, roles, cfg)
    # Every sample exactly once in epoch 0 (the last global batch may run into epoch 1).
    first_epoch = seen[: len(lengths)]
    assert sorted(first_epoch) == list(range(len(lengths)))


def test_pack_rows_is_first_fit_over_open_rows():
    lengths = np.array([60, 50, 30, 20, 64, 10, 64])
    samples, offsets = pack_rows(np.arange(7), lengths, 64)
    rows = [samples[offsets[k] : offsets[k + 1]].tolist() for k in range(len(offsets) - 1)]
    assert rows == [[4], [6], [0], [1, 5], [2, 3]]  # full rows leave as soon as they are full
    assert sorted(samples.tolist()) == list(range(7))


def test_padding_mode(tmp_path):
    lengths = [5, 40, 17, 100]
    prefix, texts, roles = make_dataset(tmp_path, lengths)
    ds = SFTDataset(prefix)
    cfg = LoaderConfig(
        seq_length=64, micro_batch_size=2, global_batch_size=4, packing=False, shuffle=False
    )
    [mb0, mb1] = BatchLoader(ds, cfg).next_global_batch()
    assert mb0["tokens"].shape == (2, 64)
    assert mb0["cu_seqlens"].tolist() == [0, 64, 128] and mb0["max_seqlen"] == 64
    assert np.array_equal(mb0["tokens"][0, :5].numpy(), texts[0]) and np.all(
        mb0["tokens"][0, 5:].numpy() == PAD
    )
    assert mb0["position_ids"][0].tolist() == list(range(64))
    assert mb0["loss_mask"][0, 4:].sum() == 0  # last real token and padding carry no loss
    assert mb1["num_truncated"] == 1 and np.array_equal(mb1["labels"][1].numpy(), texts[3][1:65])

    var = LoaderConfig(64, 2, 4, packing=False, shuffle=False, variable_seq_lengths=True)
    [v0, v1] = BatchLoader(ds, var).next_global_batch()
    assert v0["tokens"].shape == (2, 48)  # longest 40 -> rounded up to 48
    assert v1["tokens"].shape == (2, 64)  # 100 truncated to seq_length
    assert v0["cu_seqlens"].tolist() == [0, 48, 96]
    with pytest.raises(ValueError, match="padding mode only"):
        BatchLoader(ds, LoaderConfig(64, 2, 4, variable_seq_lengths=True))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b)
    )


def _cat(parts: list[list[dict]]) -> dict:
    """Global batch from per-rank micro-batches (rank-major, as rows are assigned)."""
    mbs = [mb for p in parts for mb in p]
    return {
        k: torch.cat([mb[k] for mb in mbs])
        for k in ("tokens", "labels", "loss_mask", "position_ids")
    }


@pytest.mark.parametrize("packing", [True, False])
def test_resume_yields_identical_batches(tmp_path, packing):
    prefix, _, _ = make_dataset(
        tmp_path, np.random.default_rng(2).integers(3, 70, size=41).tolist()
    )
    ds = SFTDataset(prefix)
    cfg = LoaderConfig(
        seq_length=96, micro_batch_size=2, global_batch_size=4, packing=packing, seed=5
    )
    a = BatchLoader(ds, cfg)
    for _ in range(7):
        a.next_global_batch()
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint holds
    expected = [a.next_global_batch() for _ in range(12)]  # runs past an epoch boundary
    assert a.epoch >= 1
    b = BatchLoader(ds, cfg)
    b.load_state_dict(state)
    for batch in expected:
        assert _same(b.next_global_batch(), batch)
    assert b.state_dict() == a.state_dict()


def test_global_batches_do_not_depend_on_dp_size(tmp_path):
    prefix, _, _ = make_dataset(
        tmp_path, np.random.default_rng(3).integers(3, 70, size=50).tolist()
    )
    ds = SFTDataset(prefix)

    def cfg(dp, rank):
        return LoaderConfig(
            seq_length=64, micro_batch_size=2, global_batch_size=8, dp_size=dp, dp_rank=rank
        )

    single = BatchLoader(ds, cfg(1, 0))
    pairs = [BatchLoader(ds, cfg(2, r)) for r in range(2)]
    quads = [BatchLoader(ds, cfg(4, r)) for r in range(4)]
    for _ in range(3):
        ref = _cat([single.next_global_batch()])
        for group in (pairs, quads):
            got = _cat([ld.next_global_batch() for ld in group])
            assert all(torch.equal(ref[k], got[k]) for k in ref)

    # Resume at another DP size: a state saved at dp=1 continues identically at dp=2.
    state = single.state_dict()
    ref = _cat([single.next_global_batch()])
    resumed = [BatchLoader(ds, cfg(2, r)) for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(state)
    got = _cat([ld.next_global_batch() for ld in resumed])
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert resumed[0].consumed_samples == single.consumed_samples == 4 * 8


def test_seed_and_epochs_change_the_order(tmp_path):
    prefix, _, _ = make_dataset(tmp_path, [20] * 30)
    ds = SFTDataset(prefix)
    cfg = LoaderConfig(seq_length=20, micro_batch_size=3, global_batch_size=3, packing=False)

    def first_tokens(seed, steps):
        ld = BatchLoader(ds, LoaderConfig(**{**cfg.__dict__, "seed": seed}))
        return [
            int(mb["tokens"][r, 0])
            for _ in range(steps)
            for mb in ld.next_global_batch()
            for r in range(3)
        ]

    a = first_tokens(1, 20)
    assert a == first_tokens(1, 20) and a != first_tokens(2, 20)
    assert sorted(a[:30]) == sorted(a[30:60]) == list(range(10, 40)) and a[:30] != a[30:60]


def test_drop_last_keeps_global_batches_within_an_epoch(tmp_path):
    prefix, _, _ = make_dataset(tmp_path, [10] * 10)
    ds = SFTDataset(prefix)
    cfg = LoaderConfig(
        seq_length=10, micro_batch_size=1, global_batch_size=4, packing=False, drop_last=True
    )
    ld = BatchLoader(ds, cfg)
    for _ in range(3):
        docs = [int(mb["tokens"][0, 0]) for _step in range(2) for mb in ld.next_global_batch()]
        assert len(set(docs)) == 8  # two full batches of the 10 rows, the last 2 dropped
    assert ld.epoch == 2
    with pytest.raises(DataError, match="fewer than global_batch_size"):
        BatchLoader(ds, LoaderConfig(10, 1, 16, packing=False, drop_last=True)).next_global_batch()


def test_state_from_another_stream_is_refused(tmp_path):
    prefix, _, _ = make_dataset(tmp_path, [10] * 10)
    ds = SFTDataset(prefix)
    state = BatchLoader(ds, LoaderConfig(10, 1, 2, seed=1)).state_dict()
    with pytest.raises(DataError, match="seed was 1 .* is 2"):
        BatchLoader(ds, LoaderConfig(10, 1, 2, seed=2)).load_state_dict(state)
    with pytest.raises(DataError, match="seq_length"):
        BatchLoader(ds, LoaderConfig(12, 1, 2, seed=1)).load_state_dict(state)


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of micro_batch_size x dp_size"):
        LoaderConfig(64, 2, 6, dp_size=2).validate()
    with pytest.raises(ValueError, match="dp_rank 2"):
        LoaderConfig(64, 1, 2, dp_size=2, dp_rank=2).validate()


def test_eval_iterator_covers_each_sample_once_across_ranks(tmp_path):
    lengths = np.random.default_rng(4).integers(3, 60, size=23).tolist()
    prefix, texts, roles = make_dataset(tmp_path, lengths)
    ds = SFTDataset(prefix)
    single = list(
        iter_eval_batches(ds, LoaderConfig(seq_length=64, micro_batch_size=2, global_batch_size=2))
    )
    real_rows = sum(mb["num_rows"] for mb in single)
    per_rank, rows_across_ranks = [], 0
    for rank in range(3):
        cfg = LoaderConfig(
            seq_length=64, micro_batch_size=2, global_batch_size=6, dp_size=3, dp_rank=rank
        )
        mbs = list(iter_eval_batches(ds, cfg))
        rows_across_ranks += sum(mb["num_rows"] for mb in mbs)
        for mb in mbs:  # filler rows hold no sample and no loss
            assert (mb["loss_mask"][mb["num_rows"] :] == 0).all()
        per_rank.append([i for mb in mbs for i in check_micro_batch(mb, texts, roles, cfg)])
        assert all(mb["tokens"].shape == (2, 64) for mb in mbs)
        if rank == 0:
            n_batches = len(mbs)
        assert len(mbs) == n_batches  # ranks stay in step (filler micro-batches carry no loss)
    assert sorted(i for r in per_rank for i in r) == list(range(23))
    # Per-row metrics (count_loss_mask) see the same rows at any DP size.
    assert rows_across_ranks == real_rows
    a, b = ds.dataset_ranges["b"]
    cfg = LoaderConfig(seq_length=64, micro_batch_size=2, global_batch_size=2)
    only_b = [
        i
        for mb in iter_eval_batches(ds, cfg, np.arange(a, b))
        for i in check_micro_batch(mb, texts, roles, cfg)
    ]
    assert sorted(only_b) == list(range(a, b))


def test_dataset_checks(tmp_path):
    prefix, _, _ = make_dataset(tmp_path, [5, 6, 7])
    ds = SFTDataset(prefix)
    assert (
        ds.fingerprint == "f" * 64 and ds.vocab_size == VOCAB and ds.pad_id == PAD and len(ds) == 3
    )
    assert ds.sizes.tolist() == [5, 6, 7] and ds.dataset_ranges == {"a": (0, 1), "b": (1, 3)}
    t, r = ds.sample(2)
    assert t.size == r.size == 7
    ds.check_tokenizer("f" * 64)
    with pytest.raises(DataError, match="made with tokenizer"):
        ds.check_tokenizer("0" * 64)
    # Token ids beyond the vocabulary (the meta file's, or the model's) are refused.
    with pytest.raises(
        DataError, match=r"ds-text\.bin: token id \d+ >= vocab size 3000 \(first in sequence 0\)"
    ):
        SFTDataset(prefix, vocab_size=3000)
    small, _, _ = make_dataset(tmp_path, [5, 6], name="small", vocab=100)
    with pytest.raises(DataError, match="small-text.bin: token id"):
        SFTDataset(small)
    bad_roles, _, _ = make_dataset(
        tmp_path, [4, 4], name="roles", roles_fn=lambda i, n: np.full(n, 7 if i else 1)
    )
    with pytest.raises(DataError, match=r"roles-role\.bin: role id 7 in sequence 1"):
        SFTDataset(bad_roles)
    no_meta, _, _ = make_dataset(tmp_path, [4], name="nometa", meta=False)
    assert SFTDataset(no_meta).fingerprint is None


def test_tokenizer_mismatch_by_extra_ids_names_the_flag_to_pass(tmp_path):
    # The pretokenizer adds <|im_start|>,<|im_end|> by default; the trainer's
    # --vocab_extra_ids_list defaults to none, the usual first-run mismatch.
    prefix, _, _ = make_dataset(tmp_path, [5, 6])
    meta_path = tmp_path / "ds-meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"]["extra_ids"] = ["<|im_start|>", "<|im_end|>"]
    meta_path.write_text(json.dumps(meta))
    ds = SFTDataset(prefix)
    with pytest.raises(DataError, match="extra ids differ") as e:
        ds.check_tokenizer("0" * 64, [])
    assert 'pass --vocab_extra_ids_list "<|im_start|>,<|im_end|>"' in str(e.value)
    assert "this run's --vocab_extra_ids_list gives none" in str(e.value)
    # Same extra ids: the model file differs, and the flag is no help.
    with pytest.raises(DataError) as e:
        ds.check_tokenizer("0" * 64, ["<|im_start|>", "<|im_end|>"])
    assert "--vocab_extra_ids_list" not in str(e.value)


def test_text_and_role_files_must_match(tmp_path):
    prefix, _, _ = make_dataset(tmp_path, [5, 6, 7])
    write_indexed(f"{prefix}-role", [np.ones(5), np.ones(7), np.ones(7)], np.uint16)
    with pytest.raises(DataError, match="first difference at sequence 1"):
        SFTDataset(prefix)


def test_on_pretokenized_chat_the_loss_covers_exactly_the_assistant_turns(
    files, pretok, tok, make_chat_rows
):
    from data.chat import Conversation, turn_strings

    rows = make_chat_rows(6)
    files.jsonl("src/c.jsonl", rows)
    config = files.mix("lm", [{"chat": {"path": "c.jsonl", "val_split": 0}}])
    assert pretok(config, "--data-root", files.root / "src")[0] == 0
    ds = SFTDataset(str(files.root / "out" / "lm" / "lm-train"))
    ds.check_tokenizer(tok.fingerprint)
    assert ds.vocab_size == tok.vocab_size and ds.pad_id == tok.pad_id
    cfg = LoaderConfig(
        seq_length=64, micro_batch_size=1, global_batch_size=1, packing=False, shuffle=False
    )
    for i, mb in enumerate(iter_eval_batches(ds, cfg)):
        labels, mask = mb["labels"][0], mb["loss_mask"][0].bool()
        texts, roles = turn_strings(Conversation.from_messages(rows[i]["messages"]))
        assistant = "".join(t for t, r in zip(texts, roles) if r == 2)
        assert tok.decode(labels[mask].tolist()) == assistant
    assert math.isclose(float(mb["loss_mask"].sum()), len(tok.encode(assistant)))


@pytest.mark.parametrize(
    "meta, message",
    [
        ("[1]", "expected a JSON object, found list"),
        ('{"tokenizer": "llama"}', "'tokenizer' must be an object"),
        ('{"tokenizer": {"vocab_size": "big"}}', "tokenizer.vocab_size must be a non-negative"),
        ('{"tokenizer": {"fingerprint": 5}}', "tokenizer.fingerprint must be a string"),
        ('{"dataset_ranges": [0, 4]}', "'dataset_ranges' must map dataset names"),
        ('{"dataset_ranges": {"a": [1]}}', r"dataset_ranges\['a'\] must be \[start, end\]"),
        ('{"dataset_ranges": {"a": ["0", "4"]}}', r"dataset_ranges\['a'\] must be \[start, end\]"),
    ],
)
def test_malformed_meta_file_is_a_data_error(tmp_path, meta, message):
    # These used to raise AttributeError / TypeError / ValueError from deep in __init__.
    prefix, _, _ = make_dataset(tmp_path, [4, 5])
    (tmp_path / "ds-meta.json").write_text(meta)
    with pytest.raises(DataError, match=message) as e:
        SFTDataset(prefix)
    assert "ds-meta.json" in str(e.value) and "re-run data.pretokenize" in str(e.value)


def test_a_file_name_for_the_prefix_gets_a_hint(tmp_path):
    prefix, _, _ = make_dataset(tmp_path, [4, 5])
    for wrong in (f"{prefix}-text", f"{prefix}-text.bin", f"{prefix}-role.idx"):
        with pytest.raises(DataError, match=f"the data prefix is .* e.g. {prefix}$"):
            SFTDataset(wrong)


# -- global batches of samples (batch_unit="samples", the trainer's default) -------------------


def _samples_cfg(**kw) -> LoaderConfig:
    base = dict(seq_length=64, micro_batch_size=2, global_batch_size=8, batch_unit="samples")
    return LoaderConfig(**{**base, **kw})


def _step_samples(loaders, texts, roles) -> list[int]:
    """The samples of one global step over the given DP ranks' loaders (packing invariants
    checked on every micro-batch; every micro-batch is micro_batch_size rows)."""
    seen = []
    for ld in loaders:
        for mb in ld.next_global_batch():
            assert mb["tokens"].shape == (ld.cfg.micro_batch_size, ld.cfg.seq_length)
            seen += check_micro_batch(mb, texts, roles, ld.cfg)
    return seen


def test_a_global_batch_of_samples_is_that_many_samples_whatever_the_dp_size(tmp_path):
    """Megatron-LLM's meaning of --global_batch_size (one padded sample per row): step i holds
    samples [i*G, (i+1)*G) of the epoch order, packed into the rows they need, at any DP size;
    an epoch is N / G steps, not N / (G x samples per row)."""
    lengths = np.random.default_rng(4).integers(3, 70, size=48).tolist()
    prefix, texts, roles = make_dataset(tmp_path, lengths)
    ds = SFTDataset(prefix)
    single = BatchLoader(ds, _samples_cfg())
    pairs = [BatchLoader(ds, _samples_cfg(dp_size=2, dp_rank=r)) for r in range(2)]
    order = single._order(0)
    for step in range(6):  # 48 samples / 8 = one epoch
        want = order[step * 8 : (step + 1) * 8].tolist()
        assert sorted(_step_samples([single], texts, roles)) == sorted(want)
        got = [_step_samples([ld], texts, roles) for ld in pairs]
        assert sorted(got[0]) == sorted(want[:4]) and sorted(got[1]) == sorted(want[4:])
    assert single.consumed_samples == pairs[0].consumed_samples == 48
    assert single.epoch == 0 and single.rows_per_epoch == 48
    _step_samples([single], texts, roles)
    assert single.epoch == 1  # the seventh step starts the second epoch


def test_samples_are_packed_into_as_many_micro_batches_as_they_fill(tmp_path):
    """Short samples pack densely (one micro-batch for a step), long ones need more; a last,
    partly filled micro-batch is topped up with all-padding rows that count no row."""
    prefix, texts, roles = make_dataset(tmp_path, [10] * 8 + [60] * 8)
    ds = SFTDataset(prefix)
    ld = BatchLoader(ds, _samples_cfg(shuffle=False))
    short = ld.next_global_batch()  # 8 x 10 tokens: two rows of 64, one micro-batch
    assert len(short) == 1 and short[0]["num_rows"] == 2
    long = ld.next_global_batch()  # 8 x 60 tokens: eight rows, four micro-batches
    assert len(long) == 4 and [mb["num_rows"] for mb in long] == [2, 2, 2, 2]
    three = BatchLoader(ds, _samples_cfg(shuffle=False, global_batch_size=3))
    three.next_global_batch(), three.next_global_batch()
    mbs = three.next_global_batch()  # samples 6, 7 (short) and 8 (long): two rows
    assert len(mbs) == 1 and mbs[0]["num_rows"] == 2
    for mb in short + long + mbs:
        check_micro_batch(mb, texts, roles, ld.cfg)


@pytest.mark.parametrize("dp", [1, 2])
def test_resume_of_a_sample_stream_at_another_dp_size(tmp_path, dp):
    prefix, texts, roles = make_dataset(
        tmp_path, np.random.default_rng(5).integers(3, 70, size=30).tolist()
    )
    ds = SFTDataset(prefix)
    a = BatchLoader(ds, _samples_cfg(seed=3))
    for _ in range(5):
        a.next_global_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert state["batch_unit"] == "samples" and state["consumed_samples"] == 40
    want = [sorted(_step_samples([a], texts, roles)) for _ in range(6)]  # across epochs
    b = [BatchLoader(ds, _samples_cfg(seed=3, dp_size=dp, dp_rank=r)) for r in range(dp)]
    for ld in b:
        ld.load_state_dict(state)
    assert [sorted(_step_samples(b, texts, roles)) for _ in range(6)] == want


def test_drop_last_with_samples(tmp_path):
    prefix, _, _ = make_dataset(tmp_path, [10] * 10)
    ds = SFTDataset(prefix)
    ld = BatchLoader(ds, _samples_cfg(global_batch_size=4, drop_last=True))
    for _ in range(4):
        ld.next_global_batch()  # two batches an epoch, the last 2 samples dropped
    assert ld.epoch == 1 and ld.consumed_samples == 16
    with pytest.raises(DataError, match="fewer than global_batch_size"):
        BatchLoader(ds, _samples_cfg(global_batch_size=16, drop_last=True)).next_global_batch()


def test_batch_unit_must_match_to_resume(tmp_path):
    """A state saved before batch_unit existed counts rows: it resumes a rows stream only."""
    prefix, _, _ = make_dataset(tmp_path, [10] * 10)
    ds = SFTDataset(prefix)
    old = BatchLoader(ds, LoaderConfig(10, 1, 2)).state_dict()
    del old["batch_unit"]
    BatchLoader(ds, LoaderConfig(10, 1, 2)).load_state_dict(old)
    with pytest.raises(DataError, match="batch_unit was 'rows'.*--global_batch_unit rows"):
        BatchLoader(ds, _samples_cfg(seq_length=10)).load_state_dict(old)


def test_samples_config_checks():
    _samples_cfg(global_batch_size=6, dp_size=2).validate()  # micro-batches need not divide it
    with pytest.raises(ValueError, match="multiple of dp_size 4"):
        _samples_cfg(global_batch_size=6, dp_size=4).validate()
    with pytest.raises(ValueError, match="batch_unit 'tokens'"):
        _samples_cfg(batch_unit="tokens").validate()
    # Without packing a row is a sample: the rows rules apply.
    with pytest.raises(ValueError, match="multiple of micro_batch_size x dp_size"):
        _samples_cfg(global_batch_size=6, dp_size=2, packing=False).validate()


def test_pack_rows_fills_a_row_exactly():
    """A sample whose length equals a row's room goes into that row (first fit is `room >= n`):
    with `>` every exactly-fitting sample would open a new row and waste a row's worth of
    padding, and no row could ever be filled to the last token."""
    samples, offsets = pack_rows(np.arange(3), np.array([40, 24, 64]), 64)
    rows = [samples[offsets[k] : offsets[k + 1]].tolist() for k in range(len(offsets) - 1)]
    assert rows == [[0, 1], [2]]


def test_pack_rows_keeps_at_most_eight_rows_open():
    """The ninth row that must be opened closes the oldest: a later small sample can no longer
    go into it (rows follow the sample order within a window of 8 open rows)."""
    lengths = np.array([6] * 9 + [4])  # nine samples that never share a 10-token row, then 4
    samples, offsets = pack_rows(np.arange(10), lengths, 10)
    rows = [samples[offsets[k] : offsets[k + 1]].tolist() for k in range(len(offsets) - 1)]
    assert rows == [[0], [1, 9], [2], [3], [4], [5], [6], [7], [8]]


def test_drop_last_takes_an_epochs_tail_that_exactly_fills_a_global_batch(tmp_path):
    """drop_last drops only a tail *shorter* than a global batch (`left < G`): 8 rows at G = 4
    are two whole batches per epoch; with `<=` the second would be dropped (half the data)."""
    prefix, _, _ = make_dataset(tmp_path, [10] * 8)
    cfg = LoaderConfig(10, 1, 4, packing=False, shuffle=False, drop_last=True)
    ld = BatchLoader(SFTDataset(prefix), cfg)
    docs = [int(mb["tokens"][0, 0]) - 10 for _ in range(2) for mb in ld.next_global_batch()]
    assert docs == list(range(8)) and ld.epoch == 0


@pytest.mark.parametrize("packing", [True, False])
def test_shuffled_epochs_draw_only_the_given_indices(tmp_path, packing):
    """A loader over a subset (one dataset's range, a split) shuffles that subset: the
    permutation indexes `indices`, it is not itself taken as sample ids (which would train on
    samples outside the subset, e.g. the validation split)."""
    prefix, _, _ = make_dataset(tmp_path, [8] * 30)
    cfg = LoaderConfig(16, 1, 2, packing=packing, shuffle=True)
    ld = BatchLoader(SFTDataset(prefix), cfg, indices=np.arange(20, 30))
    seen = set()
    for _ in range(10):
        for mb in ld.next_global_batch():
            seen |= {int(t) - 10 for t in mb["tokens"].reshape(-1).tolist() if 10 <= t < 40}
    assert seen == set(range(20, 30))
