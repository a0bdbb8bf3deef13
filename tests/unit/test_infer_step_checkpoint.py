"""A DCP step checkpoint loads into the engine and generates like the HF model it holds."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.helpers.infer import lively_model_dir
from tunelab.errors import CheckpointError
from tunelab.infer.engine import Engine
from tunelab.infer.sampling import GenerationConfig
from tunelab.model.hf import load_model

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]
CFG = GenerationConfig(max_new_tokens=8, stop_token_ids=[])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_tokenizer_dir):
    return lively_model_dir(tmp_path_factory.mktemp("step"), "qwen2_untied", tiny_tokenizer_dir)


def test_step_dir_generates_like_the_hf_dir(hf_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_dir, run / "hf")
    step = run / "checkpoints" / "step-5"
    model = load_model(hf_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict(), "step": 5}, checkpoint_id=str(step))
    got = Engine.from_pretrained(step, device="cpu").generate(PROMPTS, CFG)
    assert got == Engine.from_pretrained(hf_dir, device="cpu").generate(PROMPTS, CFG)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a readable DCP checkpoint"):
        Engine.from_pretrained(tmp_path, device="cpu")
