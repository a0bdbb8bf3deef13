"""Run config: YAML sections, aliases, overrides, type and combination errors."""

from __future__ import annotations

import pytest

from tunelab.config import load_config, parse_blend, parse_split
from tunelab.errors import ConfigError

BASE = {"model": {"path": "m"}, "data": {"path": "d"}}


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_sections_aliases_and_overrides(tmp_path):
    p = _write(
        tmp_path,
        """
model: {path: /m}
data: {mode: pretrain, data_path: "0.3 a 0.7 b", seq_length: 64}
micro_batch_size: 2
global_batch_size: 8
train_iters: 20
lr: 1e-4
min_lr: 1.0e-5
lr_warmup_fraction: 0.1
lr_decay_style: linear
tensor_model_parallel_size: 1
lora: {lora_r: 8, target_modules: "q_proj,v_proj"}
save_interval: 5
load: never
bf16: true
""",
    )
    cfg = load_config(p, ["--optim.lr=2e-4", "--train.seed", "7", "--micro-batch-size", "4"])
    cfg.validate()
    assert cfg.data.path == ["0.3", "a", "0.7", "b"]
    assert cfg.train.micro_batch_size == 4 and cfg.train.global_batch_size == 8
    assert cfg.train.steps == 20 and cfg.train.seed == 7
    assert cfg.optim.lr == 2e-4 and cfg.optim.min_lr == 1e-5
    assert cfg.optim.schedule == "linear" and cfg.warmup_steps() == 2
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.checkpoint.interval == 5 and cfg.checkpoint.resume == "never"
    assert cfg.train.precision == "bf16"
    assert cfg.grad_accum_steps() == 2
    assert not cfg.export_hf()  # LoRA runs export the adapter, hf/ only when asked
    assert parse_blend(cfg.data.path) == [(0.3, "a"), (0.7, "b")]


def test_negated_alias_and_flags():
    cfg = load_config(base=BASE, overrides=["--no-shuffle", "--is_instruction_dataset=false"])
    assert cfg.data.shuffle is False and cfg.data.mode == "pretrain"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--optim.lrr=1"], r"optim\.lrr.*did you mean 'optim\.lr'"),
        (["--trian.steps=1"], r"unknown section 'trian'.*did you mean 'train'"),
        (["--micro_batch_sise=1"], r"micro_batch_sise.*did you mean 'train.micro_batch_size'"),
        (["--optim.micro_batch_size=2"], r"belongs to section 'train'"),
        (["--train.steps=ten"], r"train\.steps: expected an integer, got 'ten'"),
        (["--optim.lr=fast"], r"optim\.lr: expected a number"),
        (["--data.shuffle=maybe"], r"data\.shuffle: expected true or false"),
        (["--optim.schedule=cosin"], r"optim\.schedule must be one of.*did you mean 'cosine'"),
        (["--train.steps"], r"train\.steps: expected an integer"),
        (["positional"], r"unexpected argument 'positional'"),
    ],
)
def test_bad_keys_and_types(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(base=BASE, overrides=overrides)


def test_unknown_key_in_yaml_names_file(tmp_path):
    p = _write(tmp_path, "model: {path: m}\ndata: {path: d, seq_lenght: 8}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*data\.seq_lenght.*data\.seq_length"):
        load_config(p)


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        (["--train.global_batch_size=6", "--train.micro_batch_size=4"], 1, "global_batch_size"),
        (["--train.global_batch_size=4", "--train.micro_batch_size=1"], 8, "global_batch_size"),
        (["--parallel.tp=3"], 4, "parallel.tp"),
        (["--optim.min_lr=1", "--optim.lr=0.1"], 1, "optim.min_lr"),
        (["--optim.warmup_steps=2", "--optim.warmup_fraction=0.1"], 1, "warmup_steps"),
        (["--train.eval_interval=5"], 1, "eval_interval"),
        (["--lora.load=x"], 1, "lora.r"),
        (["--data.path=0.5 a b"], 1, "data.path"),
        (["--data.split=a,b"], 1, "data.split"),
        (["--model.config=c"], 1, "model.config"),
        (["--train.steps=0"], 1, "train.steps"),
        (["--parallel.pp=2", "--parallel.num_layer_list=[1,2,3]"], 2, "num_layer_list"),
        (["--data.mode=pretrain", "--data.variable_seq_lengths=true"], 1, "variable_seq"),
    ],
)
def test_impossible_combinations(overrides, world, match):
    cfg = load_config(base=BASE, overrides=overrides)
    with pytest.raises(ConfigError, match=match):
        cfg.validate(world_size=world)


def test_missing_model_and_data():
    with pytest.raises(ConfigError, match="model.path"):
        load_config().validate()
    with pytest.raises(ConfigError, match="data.path"):
        load_config(base={"model": {"path": "m"}}).validate()


def test_split_and_blend_parsing():
    assert parse_split("969,30,1") == pytest.approx((0.969, 0.03, 0.001))
    assert parse_split("90,10") == pytest.approx((0.9, 0.1, 0.0))
    assert parse_blend(["a", "b"]) == [(0.5, "a"), (0.5, "b")]
    with pytest.raises(ConfigError, match="positive"):
        parse_blend(["-1", "a", "1", "b"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(base=BASE, overrides=["--optim.lr=3e-4", "--parallel.num_layer_list=1,1"])
    p = _write(tmp_path, cfg.to_yaml())
    again = load_config(p)
    assert again == cfg


def test_docs_list_every_key_and_alias():
    from pathlib import Path

    from tunelab.config import ALIASES, SECTIONS, _fields

    text = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    for section in SECTIONS:
        assert f"### `{section}`" in text
        for key in _fields(section):
            assert f"| `{key}` |" in text, f"{section}.{key} missing from docs/config.md"
    for alias in ALIASES:
        assert f"`{alias}`" in text, alias
