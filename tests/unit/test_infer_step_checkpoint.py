"""Step checkpoints written by the real trainer load into the engine (full and LoRA runs)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers.infer import lively_model_dir
from tests.helpers.train import random_sft_rows, run_config, write_sft
from tunelab.errors import CheckpointError
from tunelab.infer.engine import Engine
from tunelab.infer.sampling import GenerationConfig
from tunelab.train.trainer import Trainer

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]
CFG = GenerationConfig(max_new_tokens=8, stop_token_ids=[])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer_dir):
    return lively_model_dir(tmp_path_factory.mktemp("stepbase"), "qwen2_untied", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sft(tmp_path_factory.mktemp("stepdata") / "d", random_sft_rows(8, seed=2))


def test_full_run_step_equals_its_export(base_dir, data, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(run_config(out, base_dir, data, "--train.steps=2", "--optim.lr=0.05"))
    trainer.train()
    step = out / "checkpoints" / "step-2"
    eng = Engine.from_pretrained(step, device="cpu")
    trained = {k: v for k, v in trainer.model.state_dict().items()}
    for name, p in eng.model.state_dict().items():
        assert torch.equal(p, trained[name].float()), name
    exported = Engine.from_pretrained(out / "hf", device="cpu")
    assert eng.generate(PROMPTS, CFG) == exported.generate(PROMPTS, CFG)
    assert eng.generate(PROMPTS, CFG) != Engine.from_pretrained(base_dir).generate(PROMPTS, CFG)
    # The run's config is all it needs: the export is not used.
    shutil.rmtree(out / "hf")
    assert Engine.from_pretrained(step, device="cpu").generate(PROMPTS, CFG) == eng.generate(
        PROMPTS, CFG
    )


def test_lora_run_step_equals_base_plus_adapter(base_dir, data, tmp_path):
    out = tmp_path / "lora"
    cfg = run_config(out, base_dir, data, "--train.steps=2", "--optim.lr=0.05", "--lora.r=4")
    Trainer(cfg).train()
    from_step = Engine.from_pretrained(out / "checkpoints" / "step-2", device="cpu")
    adapter = Engine.from_pretrained(base_dir, adapter=out / "adapter", device="cpu")
    assert from_step.generate(PROMPTS, CFG) == adapter.generate(PROMPTS, CFG)
    for name, p in from_step.model.state_dict().items():
        torch.testing.assert_close(p, adapter.model.state_dict()[name], msg=name)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a readable DCP checkpoint"):
        Engine.from_pretrained(tmp_path, device="cpu")
