"""The demo's sizes and the run configs of its three training stages.

The configs are plain `tunelab train` YAML (see docs/config.md) with paths relative to the
demo directory; ``configs/demo/*.yaml`` in the repository are these configs at the full size
(a test keeps them equal), so a user can rerun any stage by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Tasks trained by full SFT, and the one learned afterwards by a LoRA adapter.
SFT_TASKS = ["echo", "add", "count"]
LORA_TASKS = ["reverse"]
ALL_TASKS = SFT_TASKS + LORA_TASKS

PROMPT_TYPE = "chatml"  # the demo tokenizer's chat template, by its preprocess name
SEQ_LENGTH = 256


@dataclass(frozen=True)
class DemoSize:
    """Everything that scales the demo's run time (tuned on a 2-core CPU)."""

    num_train: int  # training examples per task
    num_heldout: int  # held-out questions per task
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    pretrain_steps: int
    sft_steps: int
    lora_steps: int
    micro_batch_size: int
    pretrain_lr: float
    sft_lr: float
    lora_lr: float
    lora_r: int


FULL = DemoSize(
    num_train=300,
    num_heldout=40,
    vocab_size=512,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=384,
    pretrain_steps=150,
    sft_steps=450,
    lora_steps=600,
    micro_batch_size=4,
    pretrain_lr=5e-3,
    sft_lr=3e-3,
    lora_lr=5e-3,
    lora_r=16,
)

# CI's size: the same model and training, fewer held-out questions and LoRA steps.
QUICK = replace(FULL, num_heldout=16, lora_steps=400)

SIZES: dict[str, DemoSize] = {"full": FULL, "quick": QUICK}


def model_config(size: DemoSize, eos_id: int, pad_id: int) -> dict[str, Any]:
    """The HF config.json of the demo model: Qwen2 architecture (qkv bias, tied embeddings)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_kv_heads,
        "max_position_embeddings": SEQ_LENGTH,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def _common(size: DemoSize, steps: int, lr: float, output_dir: str) -> dict[str, Any]:
    return {
        "train": {
            "output_dir": output_dir,
            "steps": steps,
            "micro_batch_size": size.micro_batch_size,
            "global_batch_size": size.micro_batch_size,
            "seed": 1234,
            "device": "cpu",
        },
        "optim": {
            "lr": lr,
            "min_lr": lr * 0.3,
            "weight_decay": 0.0,
            "schedule": "cosine",
            "warmup_fraction": 0.1,
        },
        "checkpoint": {"interval": 0, "keep_last": 1, "resume": "never"},
        "logging": {"interval": 1, "tensorboard": False, "plot": True, "log_sample": False},
    }


def train_configs(size: DemoSize) -> dict[str, dict[str, Any]]:
    """``{stage: config mapping}`` for the pretrain, sft and lora stages."""
    pre = _common(size, size.pretrain_steps, size.pretrain_lr, "runs/pretrain")
    # No data.reset_position_ids here and --neat-pack for SFT: the demo's eos, <|im_end|>,
    # also closes every user turn, so splitting documents at eos would cut each answer off
    # from its question.
    pre = {
        "model": {"path": "models/init"},
        "data": {"mode": "pretrain", "path": ["datasets/pretrain"], "seq_length": SEQ_LENGTH,
                 "tokenizer": "tokenizer"},
        **pre,
    }  # fmt: skip
    sft = _common(size, size.sft_steps, size.sft_lr, "runs/sft")
    sft = {
        "model": {"path": "runs/pretrain/hf"},
        "data": {"mode": "sft", "path": ["datasets/sft"], "seq_length": SEQ_LENGTH},
        **sft,
    }
    lora = _common(size, size.lora_steps, size.lora_lr, "runs/lora")
    lora = {
        "model": {"path": "runs/sft/hf"},
        "data": {"mode": "sft", "path": ["datasets/lora"], "seq_length": SEQ_LENGTH},
        **lora,
        "lora": {
            "r": size.lora_r,
            "alpha": 2.0 * size.lora_r,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj"],
        },
    }  # fmt: skip
    return {"pretrain": pre, "sft": sft, "lora": lora}


def write_reference_configs(out_dir: Path) -> list[Path]:
    """Write the full-size stage configs as ``out_dir/{stage}.yaml`` (configs/demo/)."""
    import yaml

    paths = []
    for stage, cfg in train_configs(FULL).items():
        p = Path(out_dir) / f"{stage}.yaml"
        header = (
            f"# `tunelab demo` stage {stage!r} (generated by `python -m tunelab.demo.settings`).\n"
            "# Paths are relative to the demo directory; rerun this stage by hand with\n"
            f"#   cd tunelab-demo && tunelab train ../configs/demo/{stage}.yaml\n"
        )
        p.write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        paths.append(p)
    return paths


if __name__ == "__main__":
    for p in write_reference_configs(Path(__file__).resolve().parents[2] / "configs" / "demo"):
        print(p)
