"""init_weights on FSDP2-sharded (DTensor) parameters equals unsharded init (2 gloo ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = """
import os, sys
import torch, torch.distributed as dist
from datetime import timedelta
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from tests.helpers.tiny_models import tiny_hf_config
from tunelab.model.config import ModelConfig
from tunelab.model.init import build_from_scratch, init_weights
from tunelab.model.transformer import Transformer

code = 1
try:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen2"))
    ref = build_from_scratch(cfg, seed=7).state_dict()
    with torch.device("meta"):
        model = Transformer(cfg)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    init_weights(model, seed=7)
    sd = model.state_dict()
    sharded = sd["model.embed_tokens.weight"].to_local().shape[0] < cfg.vocab_size
    equal = all(torch.equal(t.full_tensor(), ref[k]) for k, t in sd.items())
    print(f"rank {dist.get_rank()} sharded={sharded} equal={equal}", flush=True)
    code = 0 if (sharded and equal) else 1
    dist.destroy_process_group()
finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
"""


@pytest.mark.timeout(180)
def test_init_weights_on_fsdp_sharded_model(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("sharded=True equal=True") == 2, proc.stdout
