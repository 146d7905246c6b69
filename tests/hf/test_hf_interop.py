"""HF import/export: logits against transformers, bitwise round trips, vocabulary rows, files."""

import argparse
import json
import re

import pytest
import torch
from safetensors import safe_open

from data.chat import render_prompt
from data.tokenizer import Tokenizer
from model.config import ModelConfig
from model.hf import export_hf, import_hf, main, parse_size
from model.hf_io import HFWeights, SafetensorsStream, plan_shards, write_hf_shards
from model.hf_tokenizer import CHATML_TEMPLATE
from train import checkpoint as ckpt

transformers = pytest.importorskip("transformers")

TEXTS = [
    "the quick brown fox jumps over a lazy dog",
    "assistant and user talk about python code 42",
    "poems about cats",
]


def _hf_model(path):
    # .float(), not dtype=: transformers < 4.56 calls it torch_dtype, later ones deprecate that.
    return transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()


def _hf_tensors(path) -> dict[str, torch.Tensor]:
    hf = HFWeights(path)
    return {name: hf.get(name) for name in hf.weight_map}


def _ours_packed_logits(model, docs: list[list[int]]) -> list[torch.Tensor]:
    """Our logits for several documents packed into one flattened batch (varlen)."""
    tokens = torch.tensor([t for d in docs for t in d])
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    bounds = [0]
    for d in docs:
        bounds.append(bounds[-1] + len(d))
    cu = torch.tensor(bounds, dtype=torch.int32)
    with torch.no_grad():
        logits = model(tokens, positions, cu, max(len(d) for d in docs))
    return [logits[s:e] for s, e in zip(bounds[:-1], bounds[1:])]


def _docs(tokenizer: Tokenizer) -> list[list[int]]:
    docs = [tokenizer.encode(t) for t in TEXTS]
    docs.append(render_prompt([("user", "hello world")], tokenizer, system="be brief"))
    return docs


def test_import_logits_equal_transformers(hf_dir, our_model, tokenizer):
    hf_model = _hf_model(hf_dir)
    base = tokenizer.base_vocab_size
    docs = [d for d in _docs(tokenizer)[:3]]  # base-vocabulary ids only: the HF model's tokens
    ours = _ours_packed_logits(our_model, docs)
    for doc, got in zip(docs, ours):
        with torch.no_grad():
            want = hf_model(torch.tensor([doc])).logits[0]
        assert want.shape[-1] == base
        torch.testing.assert_close(got[:, :base], want, rtol=1e-5, atol=1e-5)


def test_import_vocabulary_rows(hf_dir, imported, tokenizer):
    sd, meta = ckpt.read_full_state_dict(imported)
    hf = _hf_tensors(hf_dir)
    base, vocab = tokenizer.base_vocab_size, tokenizer.vocab_size
    assert meta["vocab_size"] == vocab and meta["model"]["vocab_size"] == vocab
    assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    for ours, theirs in (
        ("embed.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
    ):
        w = sd[ours]
        assert w.shape[0] == vocab
        assert torch.equal(w[:base], hf[theirs])
        mean = hf[theirs].float().mean(0)
        for i in range(base, vocab):  # new tokens (Megatron specials, ChatML) = mean row
            assert torch.equal(w[i], mean), i
    # On disk the rows are padded to the TP=1 multiple with copies of row 0.
    index = ckpt.ShardIndex(ckpt.resolve_iteration_dir(imported))
    padded = index.read("embed.weight")
    assert padded.shape[0] % 128 == 0 and padded.shape[0] > vocab
    assert torch.equal(padded[vocab:], padded[:1].expand(padded.shape[0] - vocab, -1))


def test_export_loads_in_transformers_with_same_logits(exported, our_model, tokenizer):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["vocab_size"] % 128 == 0 and cfg["vocab_size"] >= tokenizer.vocab_size
    assert cfg["rope_theta"] == 5000.0 and cfg["rope_scaling"]["factor"] == 2.0
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 1 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    hf_model = _hf_model(exported)
    vocab = tokenizer.vocab_size
    docs = _docs(tokenizer)  # including Megatron-special and ChatML ids
    for doc, got in zip(docs, _ours_packed_logits(our_model, docs)):
        with torch.no_grad():
            want = hf_model(torch.tensor([doc])).logits[0]
        torch.testing.assert_close(got[:, :vocab], want[:, :vocab], rtol=1e-5, atol=1e-5)
        # Padding logits come from row-0 copies: each equals the unk logit exactly.
        assert torch.equal(want[:, vocab:], want[:, :1].expand(-1, want.shape[1] - vocab))


def test_export_padding_rows_equal_row_zero(exported, tokenizer):
    hf = _hf_tensors(exported)
    vocab = tokenizer.vocab_size
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = hf[name]
        assert w.shape[0] % 128 == 0
        assert torch.equal(w[vocab:], w[:1].expand(w.shape[0] - vocab, -1)), name


def test_hf_import_export_keeps_every_tensor_bitwise(hf_dir, exported, tokenizer):
    """HF -> ours -> HF: every HF tensor comes back bit for bit (vocabulary matrices: the rows
    the HF model had)."""
    before, after = _hf_tensors(hf_dir), _hf_tensors(exported)
    assert set(before) == set(after)
    base = tokenizer.base_vocab_size
    for name, t in before.items():
        got = after[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            got = got[:base]
        assert got.dtype == t.dtype and torch.equal(got, t), name


def test_ours_export_import_keeps_every_tensor_bitwise(tmp_path, imported, tokenizer):
    """ours -> HF -> ours with arbitrary (trained-looking) rows for the added tokens: the export
    declares them in tokenizer_config.json, so the import copies them instead of re-initialising."""
    _, meta = ckpt.read_full_state_dict(imported)
    cfg = ModelConfig.from_dict(meta["model"])
    g = torch.Generator().manual_seed(1)
    sd = {n: torch.randn(s, generator=g) for n, s in cfg.param_shapes(cfg.vocab_size).items()}
    ckpt.write_full_checkpoint(
        tmp_path / "a", 3, sd, {"model": meta["model"], "tokenizer": tokenizer.describe()}
    )
    export_hf(tmp_path / "a", tmp_path / "hf", max_shard_bytes=50_000)
    import_hf(tmp_path / "hf", tmp_path / "b")
    a, _ = ckpt.read_full_state_dict(tmp_path / "a")
    b, bmeta = ckpt.read_full_state_dict(tmp_path / "b")
    assert set(a) == set(b) == set(sd)
    for name in sd:
        assert torch.equal(a[name], b[name]), name
        assert torch.equal(b[name], sd[name]), name
    assert bmeta["hf_import"]["copied_added_token_ids"] == list(
        range(tokenizer.base_vocab_size, tokenizer.vocab_size)
    )


def test_import_writes_what_write_full_checkpoint_writes(tmp_path, imported):
    """The streaming writer must stay in step with train.checkpoint's own full writer."""
    sd, meta = ckpt.read_full_state_dict(imported)
    ref = ckpt.write_full_checkpoint(tmp_path, 0, sd, {k: meta[k] for k in ("model", "tokenizer")})
    ours = ckpt.resolve_iteration_dir(imported)
    ref_meta, our_meta = ckpt.read_meta(ref), ckpt.read_meta(ours)
    assert set(our_meta) - {"hf_import"} == set(ref_meta)
    for key in ref_meta:
        assert our_meta[key] == ref_meta[key], key
    names = ckpt.shard_dir_name(0, 0), ckpt.MODEL_FILE
    with (
        safe_open(str(ref.joinpath(*names)), "pt") as f,
        safe_open(str(ours.joinpath(*names)), "pt") as g,
    ):
        assert f.metadata() == g.metadata()
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k


def test_exported_tokenizer_reproduces_our_ids(exported, tokenizer):
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert len(hf_tok) == tokenizer.vocab_size
    for token, i in tokenizer.special_tokens.items():
        assert hf_tok.convert_tokens_to_ids(token) == i, token
    assert hf_tok.eos_token_id == tokenizer.im_end_id
    assert hf_tok.pad_token_id == tokenizer.pad_id
    texts = TEXTS + [
        " leading space and  two spaces",
        "line one\nline two\n\n",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "a<|im_end|> b<PAD>c<EOD>",
        "ünïcödé 日本",
    ]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=True) == tokenizer.encode(text), text
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is python code?"},
        {"role": "assistant", "content": "a language"},
        {"role": "user", "content": "thanks"},
    ]
    templated = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert hf_tok.encode(templated) == render_prompt(messages, tokenizer)
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokenizer.im_end_id, tokenizer.eos_id]  # im_end first
    tok_cfg = json.loads((exported / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHATML_TEMPLATE
    declared = {int(i): d["content"] for i, d in tok_cfg["added_tokens_decoder"].items()}
    for i in range(tokenizer.base_vocab_size, tokenizer.vocab_size):
        assert declared[i] == tokenizer.piece(i)
    assert (exported / "tokenizer.model").read_bytes() == open(tokenizer.model_path, "rb").read()


def test_import_refuses_a_conflicting_added_token(tmp_path, exported):
    """A HF model whose added tokens sit at other ids than our layout gives is refused."""
    import shutil

    shutil.copytree(exported, tmp_path / "hf")
    path = tmp_path / "hf" / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    ids = sorted(int(i) for i in cfg["added_tokens_decoder"])
    a, b = str(ids[-2]), str(ids[-1])  # swap <|im_start|> and <|im_end|>
    dec = cfg["added_tokens_decoder"]
    dec[a], dec[b] = dec[b], dec[a]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocab_extra_ids_list"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_safetensors_stream_and_shard_planning(tmp_path):
    shapes = {"a": (3, 5), "b": (7,), "c": (2, 2, 2)}
    tensors = {n: torch.randn(s).to(torch.bfloat16) for n, s in shapes.items()}
    stream = SafetensorsStream(tmp_path / "x.safetensors", shapes, torch.bfloat16, {"k": "v"})
    for n, t in tensors.items():
        stream.write(n, t)
    stream.close()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t)
    with open(tmp_path / "x.safetensors", "rb") as f:
        assert int.from_bytes(f.read(8), "little") % 8 == 0  # tensor data 8-byte aligned
    stream = SafetensorsStream(tmp_path / "y.safetensors", shapes, torch.float32, {})
    with pytest.raises(ValueError, match="expected a"):
        stream.write("b", torch.zeros(7))
    with pytest.raises(ValueError, match="expected a"):
        stream.write("a", torch.zeros(5, 3))  # the right name, not the right shape
    stream.write("a", torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"2 tensors never written: \['b', 'c'\]"):
        stream.close()
    stream = SafetensorsStream(tmp_path / "z.safetensors", {"a": (2,)}, torch.float16, {})
    stream.write("a", torch.tensor([1.0, float("-inf")]))  # an inf already: no overflow
    with pytest.raises(ValueError, match="unexpected extra tensor b"):
        stream.write("b", torch.zeros(2))
    stream.close()
    assert plan_shards({"a": 4, "b": 4, "c": 9, "d": 1}, 8) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards({"a": 5, "b": 5, "c": 2}, 8) == [["a"], ["b", "c"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert parse_size("1234") == 1234
    with pytest.raises(argparse.ArgumentTypeError, match="must be at least 1 byte"):
        parse_size("0")  # was accepted: one shard per tensor


def test_hf_shards_are_planned_in_bytes_of_the_dtype_and_read_back(tmp_path):
    shapes = {"a": (4, 4), "b": (4, 4), "c": (8,)}  # 32, 32 and 16 bytes in bf16
    tensors = {n: torch.randn(s).to(torch.bfloat16) for n, s in shapes.items()}
    index = write_hf_shards(tmp_path, iter(tensors.items()), shapes, torch.bfloat16, 48)
    assert index["metadata"]["total_size"] == 80
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    w = HFWeights(tmp_path)
    assert w.shape("b") == (4, 4) and w.dtype("c") == torch.bfloat16
    assert torch.equal(w.get("c"), tensors["c"])
    # One model.safetensors without an index; a dtype the model cannot take is named.
    from safetensors.torch import save_file

    single = tmp_path / "single"
    single.mkdir()
    save_file(
        {"x": torch.ones(2, 3), "y": torch.zeros(2, dtype=torch.float64)},
        single / "model.safetensors",
    )
    w = HFWeights(single)
    assert "x" in w and w.shape("x") == (2, 3) and torch.equal(w.get("x"), torch.ones(2, 3))
    with pytest.raises(ValueError, match="y has dtype F64; expected F32, BF16 or F16"):
        w.dtype("y")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"found \['pytorch_model.bin'\]: re-save them"):
        HFWeights(tmp_path / "bin")


def test_cli(tmp_path, hf_dir, imported, capsys):
    assert main(["import", str(hf_dir), str(tmp_path / "a"), "--tp", "2", "--pp", "2"]) == 0
    assert "--load" in capsys.readouterr().out
    meta = ckpt.read_meta(ckpt.resolve_iteration_dir(tmp_path / "a"))
    assert meta["hf_import"]["requested_layout"] == {"tp": 2, "pp": 2}
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 1}  # resharded when loaded
    # 4 query heads, 2 KV heads, 2 layers: TP 4 and PP 3 cannot work
    assert main(["import", str(hf_dir), str(tmp_path / "b"), "--tp", "4"]) == 1
    assert "num_key_value_heads 2" in capsys.readouterr().err
    assert main(["import", str(hf_dir), str(tmp_path / "c"), "--pp", "3"]) == 1
    assert "--pp 3" in capsys.readouterr().err
    assert main(["import", str(hf_dir), str(tmp_path / "a")]) == 1  # never overwrites
    assert "already exists" in capsys.readouterr().err
    out = tmp_path / "hf"
    args = ["export", str(imported), str(out), "--pad-multiple", "64", "--dtype", "bf16"]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] - 64 < cfg["eos_token_id"]
    assert cfg["torch_dtype"] == "bfloat16"
    with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert main(args) == 1  # never overwrites


# -- bad input: every case used to end in a traceback or in a message without the file ----------


_DELETE = object()


def _edit_config(key, value):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        if value is _DELETE:
            del cfg[key]
        else:
            cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def _truncate(name, size):
    def edit(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:size])

    return edit


def _first_shard(d):
    return sorted(d.glob("model-*.safetensors"))[0].name


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: (d / "config.json").unlink(), r"no config\.json; expected a Hugging Face Llama"),
        (lambda d: (d / "config.json").write_text("[1]"),
         r"config\.json: expected a JSON object, found list"),
        (lambda d: (d / "config.json").write_bytes(b"\xff{"), r"config\.json: not valid JSON"),
        (_edit_config("hidden_size", _DELETE), r"config\.json: no 'hidden_size'"),
        (_edit_config("hidden_size", "64"),
         r"config\.json: hidden_size must be a positive integer, found '64'"),
        (_edit_config("rope_scaling", "linear"), r"config\.json: rope_scaling must be an object"),
        (_edit_config("rope_scaling", {"rope_type": "linear"}),
         r"config\.json: rope_scaling of type 'linear' needs a numeric 'factor'"),
        (lambda d: (d / "tokenizer_config.json").write_text("[1]"),
         r"tokenizer_config\.json: expected a JSON object, found list"),
        (lambda d: (d / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"5": {}}}'),
         r"tokenizer_config\.json: 'added_tokens_decoder' must map ids to"),
        (_edit_config("model_type", "mistral"),
         r"config\.json: model_type='mistral'; only 'llama'"),
        (lambda d: (d / "model.safetensors.index.json").write_text("{}"),
         r"index\.json: expected a 'weight_map' object"),
        (lambda d: (d / _first_shard(d)).unlink(),
         r"lists shard\(s\) \['model-00001-of-.*the download is incomplete"),
        (lambda d: _truncate(_first_shard(d), 100)(d),
         r"model-00001-of-\d+\.safetensors: not a readable safetensors file .*truncated"),
    ],
)  # fmt: skip
def test_import_of_a_bad_hf_directory_names_the_file(tmp_path, hf_dir, capsys, edit, message):
    import re
    import shutil

    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    edit(bad)
    assert main(["import", str(bad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / ckpt.LATEST_FILE).exists()


def test_import_refuses_bad_targets_and_layouts(tmp_path, hf_dir, capsys):
    assert main(["import", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert (
        "nothing does not exist: expected a Hugging Face Llama directory" in capsys.readouterr().err
    )
    assert (
        main(["import", str(hf_dir), str(tmp_path / "out"), "--tp", "0"]) == 1
    )  # was ZeroDivisionError
    assert "--tp 0: must be at least 1" in capsys.readouterr().err
    assert main(["import", str(hf_dir), str(tmp_path / "out"), "--pp=-1"]) == 1
    assert "--pp -1: must be at least 1" in capsys.readouterr().err  # was "must divide"
    # The model's own sizes and the possible values, not the trainer's --ffn_hidden_size.
    assert main(["import", str(hf_dir), str(tmp_path / "out"), "--tp", "3"]) == 1
    err = capsys.readouterr().err
    assert re.search(
        r"--tp 3: must divide num_attention_heads \d+, .*config\.json; possible: 1, 2", err
    )
    assert "--ffn_hidden_size" not in err and "--tensor_model_parallel_size" not in err
    # A training run's save directory: its `latest` file must not be pointed at the import.
    run = tmp_path / "run"
    (run / "iter_0000100").mkdir(parents=True)
    (run / ckpt.LATEST_FILE).write_text("100\n")
    assert main(["import", str(hf_dir), str(run)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (run / ckpt.LATEST_FILE).read_text() == "100\n" and not (run / "iter_0000000").exists()
    (tmp_path / "afile").write_text("x")
    assert main(["import", str(hf_dir), str(tmp_path / "afile")]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err


def test_export_never_writes_into_a_used_directory_and_leaves_nothing_on_failure(
    tmp_path, imported, capsys, monkeypatch
):
    import model.hf as hf

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # someone's config, not a model shard
    assert main(["export", str(imported), str(out)]) == 1
    assert "already holds ['config.json']" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == "{}"

    original = hf.export_tensors

    def failing(get, cfg, rows):  # e.g. the disk fills up half way
        for i, item in enumerate(original(get, cfg, rows)):
            if i == 3:
                raise OSError("No space left on device")
            yield item

    monkeypatch.setattr(hf, "export_tensors", failing)
    assert main(["export", str(imported), str(tmp_path / "new")]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no half-written model left


def test_failed_import_leaves_no_partial_iteration(tmp_path, hf_dir, capsys, monkeypatch):
    import model.hf as hf

    original = hf.import_tensors

    def failing(*args, **kwargs):  # e.g. a shard whose data is damaged past its header
        for i, item in enumerate(original(*args, **kwargs)):
            if i == 3:
                raise OSError("Input/output error")
            yield item

    monkeypatch.setattr(hf, "import_tensors", failing)
    assert main(["import", str(hf_dir), str(tmp_path / "out")]) == 1
    assert "Input/output error" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_tokenizer_json_needs_neither_protobuf_nor_transformers(tmp_path, tokenizer, monkeypatch):
    """tokenizer.json is built from the SentencePiece model with `tokenizers` alone: the GPU
    image has no protobuf (transformers' converter needs it), a serving box may lack transformers.
    """
    import sys

    from tokenizers import Tokenizer as FastTokenizer

    from model.hf_tokenizer import write_tokenizer_files

    for blocked in ("google.protobuf", "transformers"):
        monkeypatch.setitem(sys.modules, blocked, None)
    assert write_tokenizer_files(tmp_path, tokenizer, 64) == "PreTrainedTokenizerFast"
    fast = FastTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "<|im_start|>user\nGrüße ☃, 42 apples<|im_end|>\n"
    assert fast.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)
    assert (tmp_path / "tokenizer.model").exists()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
