"""configs/: every example parses, its layout fits its launch command and its model, its data
commands agree with it, and configs/demo/ is what `tunelab demo` runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.helpers.demo import REAL_MODELS, config_argv, header_lines, launch_command, world_size
from tunelab.config import load_config
from tunelab.model.config import ModelConfig
from tunelab.parallel.dims import ParallelDims

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
REFERENCE = [p for p in CONFIGS if p.name.startswith("qwen2.5-")]


def test_the_reference_setups_exist():
    names = {p.name for p in REFERENCE}
    assert {
        "qwen2.5-7b-full-pack.yaml",
        "qwen2.5-7b-lora.yaml",
        "qwen2.5-32b-full-2x8.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_parses_and_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = launch_command(ROOT / path)
    world = world_size(argv) if argv else 1
    cfg = load_config(path)
    cfg.validate(world)
    assert cfg.global_batch_size(world) % (cfg.train.micro_batch_size * cfg.dp_size(world)) == 0


@pytest.mark.parametrize("path", REFERENCE, ids=str)
def test_reference_layout_fits_launch_and_model(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = launch_command(ROOT / path)
    assert argv, f"{path}: needs a '# launch: ...' line"
    cfg_path, overrides = config_argv(argv)
    assert Path(cfg_path) == path, f"{path}: its launch line runs {cfg_path}"
    world = world_size(argv)
    cfg = load_config(cfg_path, overrides).validate(world)
    name = Path(cfg.model.path).name
    assert name in REAL_MODELS, f"{path}: model.path {cfg.model.path} is not a known model"
    model = ModelConfig.from_hf(REAL_MODELS[name])
    dims = ParallelDims.from_config(cfg.parallel, world)
    assert dims.world_size == world
    dims.check_model(model, cfg.parallel)  # heads, FFN, vocab divisible by tp; layers by stage
    if cfg.parallel.num_layer_list:
        assert sum(cfg.parallel.num_layer_list) == model.num_hidden_layers
    assert cfg.data.seq_length <= model.max_position_embeddings
    if cfg.lora.r:
        assert not cfg.export_hf() and cfg.train.output_dir
    if world > 1 and cfg.parallel.tp > 1:
        per_node = int(re.search(r"--nproc_per_node[= ](\d+)", " ".join(argv)).group(1))
        assert cfg.parallel.tp <= per_node, "keep tensor parallelism inside a node"


def _packed_data_command(path: Path) -> re.Match | None:
    text = " ".join(header_lines(ROOT / path))
    return re.search(r"--seq-length (\d+)", text) if "--pack" in text else None


WITH_DATA_COMMAND = [p for p in CONFIGS if _packed_data_command(p)]


def test_reference_full_sft_documents_its_data_command():
    assert Path("configs/qwen2.5-7b-full-pack.yaml") in WITH_DATA_COMMAND


@pytest.mark.parametrize("path", WITH_DATA_COMMAND, ids=str)
def test_documented_preprocess_matches_config(path):
    """The `--seq-length N` of the packed data command in the header equals data.seq_length."""
    m = _packed_data_command(path)
    cfg = yaml.safe_load((ROOT / path).read_text())
    data = cfg.get("data", {})
    assert int(m.group(1)) == int(data.get("seq_length", data.get("seq-length", 0)))


def test_demo_configs_are_what_the_demo_runs():
    from tunelab.demo.settings import FULL, train_configs

    for stage, expected in train_configs(FULL).items():
        path = ROOT / "configs" / "demo" / f"{stage}.yaml"
        assert yaml.safe_load(path.read_text()) == expected, (
            f"{path} differs from tunelab.demo.settings; regenerate it with "
            "python -m tunelab.demo.settings"
        )
