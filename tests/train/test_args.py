"""Flags: the seed's lists verbatim, dry runs, bad flags, inconsistent values."""

import re
from pathlib import Path

import pytest

import train.args as args_mod
from model.config import PRESETS
from train import checkpoint as ckpt
from train.args import ArgsError, parse_args
from train.main import main
from train.resolve import resolve

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT.parent / "shared" / "seed" / "model-card.md"
SEED_FILES = {s: ROOT / "configs" / "train" / f"llama2-70b-stage{s}.args" for s in (1, 2)}


def _flag_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("--")]


@pytest.mark.skipif(not CARD.is_file(), reason="the seed model card is not beside this checkout")
def test_args_files_hold_the_seed_lists_verbatim():
    card = CARD.read_text()
    blocks = re.findall(r"Arguments for Stage (\d).*?```\n(.*?)```", card, re.S)
    assert len(blocks) == 2
    for stage, body in blocks:
        ours = _flag_lines(SEED_FILES[int(stage)].read_text())
        seed = _flag_lines(body)
        assert ours[: len(seed)] == seed
        assert ours[len(seed) :] == ["--model llama2-70b"]


@pytest.mark.parametrize("stage", [1, 2])
def test_seed_lists_parse_with_megatron_meaning(stage):
    ns, given = parse_args([f"@{SEED_FILES[stage]}"])
    assert ns.tensor_model_parallel_size == 8 and ns.pipeline_model_parallel_size == 4
    assert ns.vocab_file == "./llama2/Llama-2-7b/tokenizer.model"  # the --flag=value form
    assert ns.vocab_extra_ids_list == '"<|im_start|>,<|im_end|>"'  # one shell quoting level gone
    assert ns.tie_embed_logits is False and ns.use_rms_norm and ns.glu_activation == "swiglu"
    assert ns.bias_gelu_fusion is False and ns.bias_dropout_fusion is False
    assert ns.global_batch_size == 64 and ns.micro_batch_size == 2 and ns.seq_length == 4096
    assert (ns.adam_beta1, ns.adam_beta2, ns.adam_eps) == (0.9, 0.95, 1e-12)
    assert ns.lr == 1e-5 and ns.min_lr == 1e-6 and ns.lr_warmup_iters == 100
    assert ns.weight_decay == 1e-6 and ns.lr_decay_style == "cosine"
    assert ns.recompute_granularity == "selective" and ns.sequence_parallel
    assert ns.use_checkpoint_args and ns.wandb_logger and ns.log_timers_to_tensorboard
    assert ns.data_path[0].endswith("-train")
    if stage == 1:
        assert ns.train_iters == 12000 and ns.hidden_dropout == 0.0 and not ns.finetune
        assert not ns.lima_dropout and ns.save_interval == 500
    else:
        assert ns.train_iters == 519 and ns.hidden_dropout == 0.25 and ns.lima_dropout
        assert ns.finetune and ns.save_interval == 346
    assert "hidden_dropout" in given and "clip_grad" not in given


@pytest.mark.parametrize("stage", [1, 2])
def test_dry_run_of_the_70b_lists(stage, capsys):
    assert main([f"@{SEED_FILES[stage]}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "68,989,231,104" in out  # Llama-2-70B with the vocabulary padded to 32768 (TP 8)
    assert "num_kv_heads ............................ 8" in out
    assert "cannot run yet" not in out  # pipeline parallelism runs now
    assert "not checked here" in out and "tokenizer.model" in out and "does not exist" in out
    assert "num_microbatches ........................ 32" in out
    if stage == 2:
        assert "lima_dropout ............................ True" in out


def test_real_run_without_enough_ranks_fails_before_any_work(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([f"@{SEED_FILES[1]}"]) == 2
    err = capsys.readouterr().err
    assert "launch a multiple of 32 processes" in err


def _tiny(*extra):
    return ["--model", "tiny", "--micro_batch_size", "2", "--global_batch_size", "8",
            "--seq_length", "128", "--train_iters", "10", "--lr", "1e-3",
            "--data_path", "nowhere-train", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--micro_batch_sise", "2"],
            "unknown flag --micro_batch_sise; did you mean --micro_batch_size?",
        ),
        (["--tensor-model-parallel-size", "2"], "did you mean --tensor_model_parallel_size?"),
        (["--lr_warmup_iter=5"], "did you mean --lr_warmup_iters?"),
        # other trainers' names get ours, not a look-alike (difflib said --clip_grad)
        (
            ["--learning_rate", "1e-4"],
            "unknown flag --learning_rate; this trainer's flag for it is --lr",
        ),
        (["--gradient-accumulation-steps=4"], "flag for it is --global_batch_size (= --micro"),
        (["--lr_decay_style", "exponential"], "invalid choice: 'exponential'"),
    ],
)
def test_bad_flags_name_the_nearest_valid_one(argv, message):
    with pytest.raises(ArgsError) as e:
        parse_args(_tiny(*argv))
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("extra", "world", "message"),
    [
        (
            ["--global_batch_size", "7", "--global_batch_unit", "rows"],
            1,
            "--global_batch_size 7 is not divisible by --micro_batch_size 2",
        ),
        (
            ["--global_batch_unit", "rows"],
            3,
            "--global_batch_size 8 is not divisible by --micro_batch_size 2 x data parallel size 3",
        ),
        (
            ["--no-packing"],
            3,
            "--global_batch_size 8 is not divisible by --micro_batch_size 2 x data parallel size 3",
        ),
        ([], 3, "--global_batch_size 8 samples is not divisible by data parallel size 3"),
        (
            ["--tensor_model_parallel_size", "4"],
            4,
            "must divide num_attention_heads (8) and num_kv_heads (2)",
        ),
        (["--seq_length", "2048"], 1, "--seq_length 2048 exceeds max_position_embeddings 1024"),
        (["--min_lr", "1"], 1, "--min_lr 1.0 exceeds --lr 0.001: the schedule decays from --lr"),
        (["--micro_batch_size", "0"], 1, "--micro_batch_size (>= 1) is required (got 0)"),
        (["--train_iters", "0"], 1, "--train_iters (>= 1) is required (got 0)"),
        (["--attention_dropout", "0.1"], 1, "attention_dropout=0.1"),
        (["--finetune"], 1, "--finetune needs --load"),
        (["--recompute_granularity", "selective", "--recompute_method", "block"], 1, "full only"),
        (["--glu_activation", "geglu"], 1, "Llama uses swiglu"),
        (["--fp16"], 1, "use --bf16"),
        (["--train_samples", "100"], 1, "sample-based training"),
        (["--data_path", "a-train", "b-train"], 1, "one pretokenized prefix"),
        (["--model_name", "llama2"], 1, "--use_rms_norm, --glu_activation swiglu"),
        (["--pipeline_model_parallel_size", "3"], 3, "num_layers 4 is not divisible by pipeline"),
        (["--num_layers_per_virtual_pipeline_stage", "1"], 1, "--pipeline_model_parallel_size > 1"),
        (
            ["--pipeline_model_parallel_size", "2", "--num_layers_per_virtual_pipeline_stage", "3"],
            2,
            "x pipeline size 2 must divide num_layers 4",
        ),
        (
            [
                "--tensor_model_parallel_size",
                "2",
                "--sequence_parallel",
                "--micro_batch_size",
                "1",
                "--seq_length",
                "127",
            ],
            2,
            "make micro_batch_size x seq_length divisible by 2",
        ),  # fmt: skip
        (
            [
                "--pipeline_model_parallel_size",
                "2",
                "--num_layers_per_virtual_pipeline_stage",
                "1",
                "--global_batch_size",
                "2",
                "--global_batch_unit",
                "rows",
            ],
            2,
            "to be a multiple of pipeline size 2",
        ),  # fmt: skip
        (
            [
                "--tensor_model_parallel_size",
                "32",
                "--sequence_parallel",
                "--micro_batch_size",
                "1",
                "--variable_seq_lengths",
                "--no-packing",
            ],
            32,
            "make micro_batch_size x 16 divisible by 32",
        ),  # fmt: skip
        (
            ["--pipeline_model_parallel_size", "2", "--variable_seq_lengths"],
            2,
            "--variable_seq_lengths with pipeline parallelism",
        ),
        (
            ["--pipeline_model_parallel_size", "2"],
            3,
            "world size 3 is not divisible by tensor (1) x pipeline (2)",
        ),
        (["--exit_duration_in_mins", "0"], 1, "--exit_duration_in_mins 0: must be > 0"),
        (
            ["--profile", "--profile_step_start", "3", "--profile_step_end", "3"],
            1,
            "want 1 <= start < end",
        ),
        (  # 4 layers per virtual stage x 2 stages: 8, more than the 4 layers
            ["--pipeline_model_parallel_size", "2", "--num_layers_per_virtual_pipeline_stage", "4"],
            2,
            "x pipeline size 2 must divide num_layers 4",
        ),
        (  # 12 rows / (2 rows x DP 2) = 3 micro-batches per step, not a multiple of PP 2
            [
                "--pipeline_model_parallel_size",
                "2",
                "--num_layers_per_virtual_pipeline_stage",
                "1",
                "--global_batch_size",
                "12",
                "--global_batch_unit",
                "rows",
            ],
            4,
            "per step (3 = global_batch_size 12",
        ),  # fmt: skip
    ],
)
def test_inconsistent_values_fail_before_any_work(extra, world, message):
    ns, given = parse_args(_tiny(*extra))
    with pytest.raises(ArgsError) as e:
        resolve(ns, given, world_size=world)
    assert message in str(e.value)


def test_missing_architecture_is_explained():
    ns, given = parse_args(_tiny()[2:])
    with pytest.raises(ArgsError, match="architecture is not known"):
        resolve(ns, given, world_size=1)


def test_args_file_quoting_comments_and_override(tmp_path):
    f = tmp_path / "x.args"
    f.write_text('# comment\n--model tiny  # trailing\n--vocab_extra_ids_list "\\"<a>,<b>\\""\n'
                 "--lr 1e-3\n")  # fmt: skip
    ns, given = parse_args([f"@{f}", "--lr", "5e-4"])
    assert ns.model == "tiny" and ns.lr == 5e-4 and ns.vocab_extra_ids_list == '"<a>,<b>"'
    with pytest.raises(ArgsError, match="does not exist"):
        parse_args(["@/nonexistent.args"])


def test_use_checkpoint_args_fills_unset_architecture(tmp_path):
    cfg = PRESETS["tiny"].replace(num_layers=2, hidden_size=128, num_attention_heads=4,
                                  num_kv_heads=1, ffn_hidden_size=256, vocab_size=1031)  # fmt: skip
    sd = {n: __import__("torch").zeros(s) for n, s in cfg.param_shapes().items()}
    ckpt.write_full_checkpoint(tmp_path, 0, sd, {"model": cfg.to_dict()})
    ns, given = parse_args(
        _tiny("--load", str(tmp_path), "--use_checkpoint_args", "--num_layers", "4")
    )
    rc = resolve(ns, given, world_size=1)
    m = rc.model
    assert (m.hidden_size, m.num_attention_heads, m.num_kv_heads, m.ffn_hidden_size) == (
        128,
        4,
        1,
        256,
    )
    assert m.num_layers == 4  # given explicitly: kept
    assert m.vocab_size == 1031  # no tokenizer file here: the checkpoint's vocabulary
    # without --use_checkpoint_args the preset stands
    ns, given = parse_args(_tiny("--load", str(tmp_path)))
    assert resolve(ns, given, world_size=1).model.hidden_size == PRESETS["tiny"].hidden_size


def test_hf_config_as_model(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688,
        "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu",
    }))  # fmt: skip
    ns, given = parse_args(_tiny()[2:] + ["--model", str(tmp_path / "config.json")])
    rc = resolve(ns, given, world_size=1)
    assert rc.model.num_layers == 3 and rc.model.num_kv_heads == 2 and rc.model.norm_eps == 1e-6


@pytest.mark.parametrize(
    ("fraction", "warmup", "note"),
    [
        ("0.2", 2, None),  # 0.2 x 10 is whole: nothing to say
        ("0.25", 2, "is 2.5: warm-up over 2 whole iteration(s)"),
        ("0.05", 0, "is 0.5: warm-up over 0 whole iteration(s) (none: give --lr_warmup_iters"),
    ],
)
def test_warmup_fraction_is_whole_iterations_and_a_rounding_is_named(fraction, warmup, note):
    ns, given = parse_args(_tiny("--lr_warmup_fraction", fraction))
    rc = resolve(ns, given, world_size=1)
    assert rc.schedule.warmup_iters == warmup and rc.schedule.decay_iters == 10
    said = [n for n in rc.notes if "--lr_warmup_fraction" in n]
    assert said == ([] if note is None else [said[0]]) and (note is None or note in said[0])


def test_resolved_layout_and_defaults():
    def run(argv, world=1):
        ns, given = parse_args(argv)
        return resolve(ns, given, world_size=world)

    rc = run(_tiny("--sequence_parallel"))
    assert not rc.parallel.sequence_parallel  # nothing to shard at TP 1
    # 2 x 127 tokens split over TP 2 (seq_length 127 alone would not)
    rc = run(_tiny("--tensor_model_parallel_size", "2", "--sequence_parallel", "--seq_length",
                   "127"), world=2)  # fmt: skip
    assert rc.parallel.sequence_parallel and rc.data.seq_length == 127
    # no --global_batch_size: one micro-batch per DP rank (world 3 / TP 1 x PP 1)
    rc = run([a for a in _tiny() if a not in ("--global_batch_size", "8")], world=3)
    assert (rc.parallel.dp, rc.data.global_batch_size, rc.loop.num_microbatches) == (3, 6, 1)
    # one layer chunk per stage (4 layers / (PP 2 x 2)) is no interleaving: no filler rounding
    interleave = ["--pipeline_model_parallel_size", "2", "--num_layers_per_virtual_pipeline_stage"]
    rc = run(
        _tiny(*interleave, "2", "--global_batch_size", "3", "--micro_batch_size", "1"), world=2
    )
    assert rc.loop.num_microbatches == 3
    # a warm-up as long as the decay is allowed
    rc = run(_tiny("--lr_warmup_iters", "10", "--exit_duration_in_mins", "5"))
    assert rc.schedule.warmup_iters == rc.schedule.decay_iters == 10
    assert rc.loop.exit_duration_in_mins == 5 and rc.loop.exit_signal_handler is False
    # explicit architecture: MHA and a 4 x hidden MLP unless told otherwise; without a tokenizer
    # file, Llama-2's 32000 pieces + 5 Megatron specials + the extra ids
    rc = run(_tiny("--vocab_extra_ids_list", "<a>,<b>")[2:] + ["--num_layers", "2",
             "--hidden_size", "64", "--num_attention_heads", "4"])  # fmt: skip
    m = rc.model
    assert (m.num_kv_heads, m.ffn_hidden_size, m.vocab_size) == (4, 256, 32000 + 5 + 2)


def test_resolved_recompute_profile_and_run_dir(tmp_path):
    def run(*extra):
        ns, given = parse_args(_tiny(*extra))
        return resolve(ns, given, world_size=1)

    rc = run("--recompute_granularity", "full")
    assert (rc.loop.recompute_granularity, rc.loop.recompute_method) == ("full", "uniform")
    assert run("--recompute_activations").loop.recompute_granularity == "selective"
    save = str(tmp_path / "ckpt")
    rc = run("--save", save, "--profile", "--profile_step_start", "10", "--profile_step_end", "11")
    assert rc.log.run_dir == save and rc.log.profile == (10, 11)  # the last iteration traced
    # with packing a row is seq_length tokens: no multiple-of-16 padding to split over TP
    ns, given = parse_args(_tiny("--tensor_model_parallel_size", "32", "--sequence_parallel",
                                 "--micro_batch_size", "1", "--variable_seq_lengths"))  # fmt: skip
    with pytest.raises(ArgsError) as e:
        resolve(ns, given, world_size=32)  # TP 32 does not divide the heads
    assert "num_attention_heads" in str(e.value) and "x 16" not in str(e.value)


def test_other_trainers_names_point_at_real_flags():
    """Every flag the hints for other trainers' names offer exists."""
    known = set(args_mod._option_strings(args_mod.build_parser()))
    for hint in args_mod._OTHER_NAMES.values():
        named = {w for w in hint.replace("(", " ").split() if w.startswith("--")}
        assert named and named <= known, hint
