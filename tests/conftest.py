"""Shared fixtures. Nothing here downloads: tokenizers and models are built locally."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """An HF tokenizer directory: byte-level BPE, vocab 512, ChatML chat template."""
    from tunelab.demo.tokenizer import build_bpe_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_bpe_tokenizer(out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random Qwen2 HF directory (fp32 weights + the tiny tokenizer)."""
    from tests.helpers.tiny_models import save_tiny_hf_model

    return save_tiny_hf_model(
        tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", tokenizer_dir=tiny_tokenizer_dir
    )
