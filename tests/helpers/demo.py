"""Shapes of the real models the example configs target (public HF config.json values) and
a parser for the launch line at the top of each example config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

_QWEN25 = dict(
    model_type="qwen2",
    vocab_size=152064,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151643,
    torch_dtype="bfloat16",
)

# model directory name used in configs/*.yaml -> HF config.json values
REAL_MODELS: dict[str, dict] = {
    "qwen2.5-7b": dict(_QWEN25, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
    "qwen2.5-32b": dict(_QWEN25, hidden_size=5120, intermediate_size=27648,
                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8),
}  # fmt: skip


def header_lines(path: Path) -> list[str]:
    """The leading comment block of a YAML file, without the '#' marks."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        out.append(line[1:].strip())
    return out


def launch_command(path: Path) -> list[str] | None:
    """The argv of the ``# launch: ...`` line, or None when the file has none."""
    for line in header_lines(path):
        if line.startswith("launch:"):
            return shlex.split(line.removeprefix("launch:"))
    return None


def world_size(argv: list[str]) -> int:
    """Processes a launch command starts: torchrun's nnodes x nproc_per_node, else 1."""
    if Path(argv[0]).name != "torchrun":
        return 1
    text = " ".join(argv)

    def opt(name: str) -> int:
        m = re.search(rf"--{name}[= ](\d+)", text)
        return int(m.group(1)) if m else 1

    return opt("nnodes") * opt("nproc_per_node")


def config_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(config path, overrides) of a ``... tunelab train CONFIG [overrides]`` command."""
    i = argv.index("train")
    return argv[i + 1], argv[i + 2 :]
