"""Gaps found by mutation testing of model/llama.py: which regions a recompute setting actually
checkpoints (the gradients are the same either way, so the numeric tests cannot tell), the
method names it accepts, and the stage layer-id bound."""

import pytest
import torch

import model.llama as llama
from model.config import PRESETS
from model.llama import Llama

CFG = PRESETS["tiny"].replace(num_layers=6, hidden_size=64, ffn_hidden_size=96,
                              num_attention_heads=4, num_kv_heads=2, vocab_size=61)  # fmt: skip
T = 12


def _checkpointed(model: Llama, monkeypatch, grad: bool = True) -> list:
    """What one forward of `model` (a middle stage: hidden in, hidden out) hands to
    torch.utils.checkpoint, in call order: a Block as ("block", global id), anything else by the
    callable's name (norm modules as "RMSNorm", the attention core as "core", "swiglu")."""
    calls = []
    real = llama.checkpoint

    def spy(fn, *args, **kwargs):
        if isinstance(fn, llama.Block):
            calls.append(("block", fn.layer_id))
        else:
            calls.append(type(fn).__name__ if isinstance(fn, torch.nn.Module) else fn.__name__)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(llama, "checkpoint", spy)
    h = torch.randn(T, CFG.hidden_size, requires_grad=grad)
    cu = torch.tensor([0, T], dtype=torch.int32)
    with torch.set_grad_enabled(grad):
        model(h, torch.arange(T), cu, T)
    return calls


def _stage(layers=range(1, 5)) -> Llama:
    m = Llama(CFG, layer_ids=layers, pre=False, post=False)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.train()


def test_full_block_recomputes_the_first_layers_of_the_stage(monkeypatch):
    """--recompute_method block with --recompute_num_layers 2 checkpoints this stage's first two
    layers (global ids 1 and 2 of a stage owning 1..4), whole, and nothing inside them. The
    gradients would be the same with any choice of layers; the memory is what differs."""
    m = _stage()
    m.set_recompute("full", "block", num_layers=2)
    assert m.recompute_full_layers == {1, 2}
    assert _checkpointed(m, monkeypatch) == [("block", 1), ("block", 2)]


def test_full_uniform_checkpoints_every_layer_whole_and_nothing_inside(monkeypatch):
    """Full recompute is one checkpoint per layer; the selective pieces are not checkpointed
    again inside it (that would recompute them twice in the backward)."""
    m = _stage()
    m.set_recompute("full", "uniform")
    assert _checkpointed(m, monkeypatch) == [("block", i) for i in range(1, 5)]
    for b in m.layers.values():
        assert not (b.recompute_norms or b.attention.recompute_core or b.mlp.recompute_act)


def test_selective_checkpoints_norms_attention_core_and_swiglu(monkeypatch):
    m = _stage(range(2, 4))
    m.set_recompute("selective")
    per_layer = ["RMSNorm", "core", "RMSNorm", "swiglu"]
    assert _checkpointed(m, monkeypatch) == per_layer * 2


def test_switching_back_to_none_checkpoints_nothing(monkeypatch):
    """A later set_recompute('none') (or 'selective') drops an earlier full setting."""
    m = _stage()
    m.set_recompute("full", "uniform")
    m.set_recompute("none")
    assert m.recompute_full_layers == set()
    assert _checkpointed(m, monkeypatch) == []
    m.set_recompute("full", "block", num_layers=1)
    m.set_recompute("selective")
    assert ("block", 1) not in _checkpointed(m, monkeypatch)


def test_no_checkpoint_without_grad(monkeypatch):
    """Evaluation and generation run under no_grad: recompute is pointless there, and the
    forward runs the layers directly."""
    m = _stage()
    m.set_recompute("full", "uniform")
    assert _checkpointed(m, monkeypatch, grad=False) == []


def test_unknown_recompute_names_are_refused():
    """A misspelt --recompute_method is an error, not silently 'block' (or 'uniform')."""
    m = _stage()
    with pytest.raises(ValueError, match="recompute method 'blocks'"):
        m.set_recompute("full", "blocks", num_layers=1)
    with pytest.raises(ValueError, match="recompute granularity 'ful'"):
        m.set_recompute("ful")


def test_layer_id_equal_to_num_layers_is_refused():
    """Global ids run 0..num_layers-1: a stage whose last id is num_layers (one past the end)
    is refused too, not only ids further out."""
    with pytest.raises(ValueError, match=r"include \[6\]"):
        Llama(CFG, layer_ids=range(4, 7), pre=False, post=False)
    Llama(CFG, layer_ids=range(4, 6), pre=False, post=True)  # the last two layers: fine
