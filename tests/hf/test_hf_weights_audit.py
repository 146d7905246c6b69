"""HF export of the weights/config side: checkpoints saved at TP > 1, PP > 1 and with virtual
pipeline stages, config.json as every `transformers` since Llama-2's release reads it,
generation_config.json stop ids, the shard index, and export refusing a checkpoint whose meta.json
does not describe its tensors."""

import json
import shutil
import types

import pytest
import torch
from safetensors import safe_open

from model.config import ModelConfig
from model.hf import export_hf, import_hf, main
from model.hf_io import HFWeights
from train import checkpoint as ckpt

transformers = pytest.importorskip("transformers")


def _cfg(tokenizer, **changes) -> ModelConfig:
    return ModelConfig(
        name="hf-audit", vocab_size=tokenizer.vocab_size, hidden_size=64, ffn_hidden_size=96,
        num_layers=4, num_attention_heads=4, num_kv_heads=2, max_position_embeddings=256,
        rope_theta=5000.0, rope_scaling_factor=2.0,
    ).replace(**changes)  # fmt: skip


def _full_sd(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in cfg.param_shapes(cfg.vocab_size).items():
        t = torch.randn(shape, generator=g)
        sd[name] = 1.0 + 0.3 * t if len(shape) == 1 else t / shape[1] ** 0.5
    return sd


def _meta(cfg: ModelConfig, tokenizer) -> dict:
    return {"model": cfg.to_dict(), "tokenizer": tokenizer.describe()}


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory, tokenizer):
    """(save dir, cfg, full state dict): a TP 1 / PP 1 checkpoint of a 4-layer GQA model."""
    cfg = _cfg(tokenizer)
    sd = _full_sd(cfg, 7)
    out = tmp_path_factory.mktemp("full")
    ckpt.write_full_checkpoint(out, 5, sd, _meta(cfg, tokenizer))
    return out, cfg, sd


def _save_sharded(out, cfg, sd, tokenizer, tp, pp, v, monkeypatch):
    """The checkpoint `save_checkpoint` writes for a run at (tp, pp, v virtual stages): every
    rank's stages built as the trainer builds them (stage_spec + parallelize, whose layout
    attributes the shard metadata records), filled from `sd`, each (tp, pp) rank's parameters
    written to its mp_rank directory. One process plays every TP rank: parallelize asks the
    group for its size and rank, answered here without a process group."""
    import parallel.layers as layers
    import parallel.parallelize as par
    from model.llama import Llama
    from parallel.pipeline_schedule import stage_spec

    it = out / ckpt.iteration_dir_name(5)
    it.mkdir(parents=True)
    group = object() if tp > 1 else None
    for r in range(tp):
        for mod in (layers, par):
            monkeypatch.setattr(mod, "group_size", lambda g: tp if g is group else 1)
            monkeypatch.setattr(mod, "group_rank", lambda g, r=r: r if g is group else 0)
        dims = types.SimpleNamespace(tp=tp, tp_group=group, tp_rank=r)
        for p in range(pp):
            params = {}
            for c in range(v):
                spec = stage_spec(cfg.num_layers, pp, p, v, c)
                model = Llama(cfg, cfg.padded_vocab_size(1), spec.layers, spec.pre, spec.post)
                with torch.no_grad():
                    for name, w in model.named_parameters():
                        full = sd[name]
                        w.copy_(ckpt.pad_vocab_rows(full, w.shape[0]) if w.shape != full.shape
                                else full)  # fmt: skip
                params.update(
                    par.parallelize(model, dims, sequence_parallel=True).named_parameters()
                )
            shard = it / ckpt.shard_dir_name(r, p)
            shard.mkdir()
            layouts = {n: ckpt.tensor_layout(n, w) for n, w in params.items()}
            ckpt._save_safetensors(shard / ckpt.MODEL_FILE, params, layouts)
    meta = ckpt._base_meta(_meta(cfg, tokenizer), 5)
    meta.update(padded_vocab_size=cfg.padded_vocab_size(tp), layout={"tp": tp, "pp": pp, "dp": 1})
    (it / ckpt.META_FILE).write_text(json.dumps(meta))
    return it


@pytest.fixture(scope="module")
def full_export(tmp_path_factory, full_ckpt):
    out = tmp_path_factory.mktemp("full_hf") / "hf"
    export_hf(full_ckpt[0], out, max_shard_bytes=60_000)
    return out


@pytest.mark.parametrize(("tp", "pp", "v"), [(2, 1, 1), (1, 2, 1), (2, 2, 2)])
def test_export_of_a_sharded_checkpoint_equals_the_tp1_export(
    tmp_path, full_ckpt, full_export, tokenizer, monkeypatch, tp, pp, v
):
    """QKV / gate-up pieces, GQA KV groups split over TP ranks, row-parallel wo / w2, vocab rows
    padded (with zeros) to the TP multiple, layers spread over stages and virtual chunks: the
    export must give the same HF tensors, bit for bit, as the same weights saved at TP 1."""
    _, cfg, sd = full_ckpt
    it = _save_sharded(tmp_path / "ckpt", cfg, sd, tokenizer, tp, pp, v, monkeypatch)
    monkeypatch.undo()
    index = ckpt.ShardIndex(it)
    if tp > 1:  # the shards really are pieces, and the vocab rows carry the TP padding
        assert index.entries[("model", "layers.0.attention.wqkv.weight")][0].tp_dim == 0
        assert index.global_shape("embed.weight")[0] == cfg.padded_vocab_size(tp)
        assert cfg.padded_vocab_size(tp) != cfg.padded_vocab_size(1)
    export_hf(it, tmp_path / "hf", max_shard_bytes=60_000)
    want, got = HFWeights(full_export), HFWeights(tmp_path / "hf")
    assert set(got.weight_map) == set(want.weight_map)
    for name in want.weight_map:
        assert torch.equal(got.get(name), want.get(name)), name
    # and the export's q/k/v and gate/up are the model's own rows in HF's order
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    wqkv = sd["layers.3.attention.wqkv.weight"]
    assert torch.equal(got.get("model.layers.3.self_attn.k_proj.weight"), wqkv[q : q + kv])
    w13 = sd["layers.2.mlp.w13.weight"]
    assert torch.equal(got.get("model.layers.2.mlp.up_proj.weight"), w13[cfg.ffn_hidden_size :])


def test_export_logits_equal_ours_with_gqa_and_rope_scaling(full_ckpt, full_export, tokenizer):
    from model.sampling import load_model

    ours, _, _ = load_model(full_ckpt[0], torch.device("cpu"), torch.float32)
    # .float(), not dtype=: transformers < 4.56 calls it torch_dtype, later ones deprecate that.
    hf = transformers.AutoModelForCausalLM.from_pretrained(full_export).float()
    ids = torch.tensor(
        tokenizer.encode("the quick brown fox jumps over a lazy dog") + [tokenizer.im_end_id] * 3
    )
    positions = torch.arange(len(ids))
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    with torch.no_grad():
        got = ours(ids, positions, cu, len(ids))
        want = hf.eval()(ids[None]).logits[0]
    vocab = tokenizer.vocab_size
    torch.testing.assert_close(got[:, :vocab], want[:, :vocab], rtol=1e-5, atol=1e-5)


def test_rope_scaling_is_written_in_the_two_key_form(tmp_path, tokenizer):
    """transformers 4.31-4.42 (Llama-2's era, and the TGI / vLLM builds on it) refuse a
    rope_scaling dict that has any key besides `type` and `factor`, or a factor that is not a
    float; newer versions read `type` as `rope_type`. A meta.json may hold the factor as an int."""
    cfg = _cfg(tokenizer)
    meta = _meta(cfg, tokenizer)
    meta["model"]["rope_scaling_factor"] = 2
    ckpt.write_full_checkpoint(tmp_path / "c", 1, _full_sd(cfg, 1), meta)
    export_hf(tmp_path / "c", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    scaling = config["rope_scaling"]
    assert set(scaling) == {"type", "factor"} and scaling["type"] == "linear"
    assert isinstance(scaling["factor"], float) and scaling["factor"] == 2.0
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    rope = getattr(loaded, "rope_parameters", None) or loaded.rope_scaling
    # transformers 4.31-4.42 keep the dict as written; later ones add `rope_type`.
    assert rope.get("rope_type", rope.get("type")) == "linear" and rope["factor"] == 2.0


def test_generation_config_stops_where_our_sampler_stops(full_export, tokenizer):
    """model.generate stops at <|im_end|> (the end of a ChatML reply) and at </s>; `generate`,
    TGI and vLLM read their stop ids from generation_config.json, so it lists both."""
    gen = transformers.GenerationConfig.from_pretrained(full_export)
    assert set(gen.eos_token_id) == {tokenizer.im_end_id, tokenizer.eos_id}
    model = transformers.AutoModelForCausalLM.from_pretrained(full_export).float()

    class Force(transformers.LogitsProcessor):
        def __init__(self, token: int):
            self.token = token

        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, self.token] = 0.0
            return forced

    prompt = torch.tensor([tokenizer.encode("poems about cats")])
    for stop in (tokenizer.eos_id, tokenizer.im_end_id):
        out = model.eval().generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
            logits_processor=transformers.LogitsProcessorList([Force(stop)]),
        )  # fmt: skip
        assert out[0, prompt.shape[1] :].tolist() == [stop]


def test_index_describes_the_shards(full_export):
    """Every tensor in exactly one shard, the one the index names; total_size the bytes of all
    tensors; no shard past max_shard_bytes unless it holds a single larger tensor."""
    index = json.loads((full_export / "model.safetensors.index.json").read_text())
    seen, total = {}, 0
    for path in sorted(full_export.glob("model-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
            for k in f.keys():
                assert k not in seen
                seen[k] = path.name
        assert sum(sizes) <= 60_000 or len(sizes) == 1, path.name
        total += sum(sizes)
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total


def test_bf16_export_import_export_is_bit_exact(tmp_path, full_ckpt):
    export_hf(full_ckpt[0], tmp_path / "a", dtype="bf16")
    import_hf(tmp_path / "a", tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "b")  # auto: the bf16 the import stored
    a, b = HFWeights(tmp_path / "a"), HFWeights(tmp_path / "b")
    assert set(a.weight_map) == set(b.weight_map)
    for name in a.weight_map:
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype == torch.bfloat16 and torch.equal(x, y), name
    ca = json.loads((tmp_path / "a" / "config.json").read_text())
    cb = json.loads((tmp_path / "b" / "config.json").read_text())
    assert ca == cb and ca["torch_dtype"] == "bfloat16"


def _edit_meta(**changes):
    def edit(it):
        meta = json.loads((it / ckpt.META_FILE).read_text())
        meta["model"].update(changes)
        (it / ckpt.META_FILE).write_text(json.dumps(meta))

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_edit_meta(num_kv_heads=4),  # was a RuntimeError traceback from torch.split
         r"mp_rank_00_000/model\.safetensors: layers\.0\.attention\.wqkv\.weight has shape "
         r"\(128, 64\) but .*meta\.json.* implies \(192, 64\)"),
        (_edit_meta(ffn_hidden_size=80),  # was "too many values to unpack (expected 2)"
         r"layers\.0\.mlp\.w13\.weight has shape \(192, 64\) but .* implies \(160, 64\)"),
        (_edit_meta(hidden_size=32),  # named the export's temporary output file
         r"embed\.weight has shape \(\d+, 64\) but .* implies \(.*, 32\)"),
        (_edit_meta(num_layers=2),  # was a "successful" export without layers 2 and 3
         r"holds tensors that its meta\.json's model config \(num_layers 2\) has no place for: "
         r"\['layers\.2\."),
        (lambda it: shutil.rmtree(it / "mp_rank_00_001"),
         r"saved at TP 2 / PP 2 .* \['mp_rank_00_001'\] (is|are) missing"),
    ],
    ids=["kv_heads", "ffn", "hidden", "fewer_layers", "missing_shard_dir"],
)  # fmt: skip
def test_export_refuses_a_checkpoint_its_meta_does_not_describe(
    tmp_path, full_ckpt, tokenizer, monkeypatch, capsys, edit, message
):
    import re

    _, cfg, sd = full_ckpt
    it = _save_sharded(tmp_path / "ckpt", cfg, sd, tokenizer, 2, 2, 1, monkeypatch)
    monkeypatch.undo()
    edit(it)
    assert main(["export", str(it), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left


def test_fp16_export_refuses_values_fp16_cannot_hold(tmp_path, tokenizer, capsys):
    """bf16 and fp32 reach 3e38, fp16 65504: a cast would write inf into the model silently."""
    cfg = _cfg(tokenizer)
    sd = _full_sd(cfg, 2)
    sd["layers.1.mlp.w2.weight"][3, 5] = 1e5
    ckpt.write_full_checkpoint(tmp_path / "c", 1, sd, _meta(cfg, tokenizer))
    assert main(["export", str(tmp_path / "c"), str(tmp_path / "hf"), "--dtype", "fp16"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.down_proj.weight holds values up to 1e+05, past float16's" in err
    assert "--dtype bf16 or fp32" in err
    assert not (tmp_path / "hf").exists()
    export_hf(tmp_path / "c", tmp_path / "hf", dtype="bf16")  # bf16 holds it
    got = HFWeights(tmp_path / "hf").get("model.layers.1.mlp.down_proj.weight")
    assert got[3, 5] == torch.tensor(1e5).to(torch.bfloat16)


def test_import_holds_no_shard_open(tmp_path, hf_dir, monkeypatch):
    """A safetensors handle left open keeps every page read through its memory map in the
    process's RSS: a 70B import would end at 140 GB RSS. At most one shard is open at a time."""
    import model.hf_io as hf_io

    live, most = set(), [0]
    real = hf_io.safe_open

    class Tracked:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)
            live.add(id(self))
            most[0] = max(most[0], len(live))

        def __enter__(self):
            self.f.__enter__()
            return self.f

        def __exit__(self, *exc):
            live.discard(id(self))
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

    assert len(set(HFWeights(hf_dir).weight_map.values())) > 1  # several shards to keep open
    monkeypatch.setattr(hf_io, "safe_open", Tracked)
    import_hf(hf_dir, tmp_path / "out")
    assert most[0] == 1 and not live


def test_import_names_a_shard_that_lacks_what_the_index_places_there(tmp_path, hf_dir, capsys):
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = "model.layers.1.mlp.up_proj.weight"
    wrong = next(s for s in shards if s != index["weight_map"][name])
    index["weight_map"][name] = wrong
    path.write_text(json.dumps(index))
    assert main(["import", str(d), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{wrong}: no tensor '{name}', though model.safetensors.index.json places it" in err, err
