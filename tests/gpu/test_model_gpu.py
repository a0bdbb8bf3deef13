"""Model core on an NVIDIA GPU (issue 3, must-show 5): bf16 parity with transformers and
agreement of the sdpa / flex / flash attention backends (forward and backward).

Run on a GPU machine: ``python -m pytest -q -s tests/gpu/test_model_gpu.py`` (prints what it
measured). Skipped without CUDA; the flash case also needs the flash-attn package.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.model import packed_position_ids
from tests.helpers.tiny_models import FAMILIES, save_tiny_hf_model, tiny_hf_model
from tunelab.model.attention import flash_available
from tunelab.model.config import ModelConfig
from tunelab.model.hf import load_model
from tunelab.model.init import build_from_scratch
from tunelab.model.loss import linear_cross_entropy

pytestmark = pytest.mark.gpu
DEV = "cuda"
# Head dim 64 and sequences of several flex blocks (128), so the GPU kernels do real work.
GPU_SHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_parity_with_transformers(family, tmp_path):
    d = save_tiny_hf_model(tmp_path / family, family, **GPU_SHAPES)
    hf32 = tiny_hf_model(family, **GPU_SHAPES).to(DEV)
    hf16 = tiny_hf_model(family, **GPU_SHAPES).to(DEV, torch.bfloat16)
    ours = load_model(d, dtype="bf16", device=DEV)
    ids = torch.randint(0, 512, (2, 256), device=DEV, generator=torch.Generator(DEV).manual_seed(0))
    with torch.no_grad():
        ref = hf32(ids, use_cache=False).logits
        theirs = hf16(ids, use_cache=False).logits.float()
        mine = ours(ids).float()
        loss_ref = hf32(ids, labels=ids, use_cache=False).loss
        loss_sum, n = ours.loss(ids, ids)
    err_ours, err_hf = (mine - ref).abs().max().item(), (theirs - ref).abs().max().item()
    diff = (mine - theirs).abs().max().item()
    print(f"{family}: bf16 max|ours-hf_bf16|={diff:.3e} |ours-fp32|={err_ours:.3e} "
          f"|hf_bf16-fp32|={err_hf:.3e} loss ours={float(loss_sum / n):.5f} fp32={loss_ref.item():.5f}")  # fmt: skip
    # Our bf16 is as close to the fp32 truth as transformers' own bf16 run.
    assert err_ours <= 2 * err_hf + 1e-2
    assert diff <= 5e-2
    torch.testing.assert_close(loss_sum / n, loss_ref, rtol=1e-2, atol=1e-2)


def _fwd_bwd(model, ids, pos):
    model.zero_grad(set_to_none=True)
    logits = model(ids, pos)
    loss, n = model.loss(ids, ids, pos)
    (loss / n).backward()
    return logits.float(), {k: p.grad.float().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("window", [None, 96])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_backends_agree(dtype, window):
    cfg = ModelConfig.from_hf(dict(model_type="qwen3", vocab_size=512, num_hidden_layers=2,
                                   tie_word_embeddings=True, **GPU_SHAPES))  # fmt: skip
    cfg = cfg.replace(sliding_window=window)
    model = build_from_scratch(cfg, seed=0, dtype=dtype, device=DEV)
    pos = packed_position_ids([[100, 300, 112], [512], [1, 255, 256], [64] * 8]).to(DEV)
    ids = torch.randint(
        0, 512, pos.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(1)
    )
    backends = ["sdpa", "flex"] + (
        ["flash"] if flash_available() and dtype != torch.float32 else []
    )
    results = {}
    for b in backends:
        model.set_attn_backend(b)
        results[b] = _fwd_bwd(model, ids, pos)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ref_logits, ref_grads = results["sdpa"]
    for b in backends[1:]:
        logits, grads = results[b]
        dl = (logits - ref_logits).abs().max().item()
        dg = max(((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp_min(1e-8)).item()
                 for k in grads)  # fmt: skip
        print(
            f"{dtype} window={window} {b} vs sdpa: max logit diff {dl:.3e}, max relative grad diff {dg:.3e}"
        )
        assert dl <= tol * 10
        assert dg <= (5e-2 if dtype == torch.bfloat16 else 1e-3)
    if not flash_available():
        print("flash-attn not installed: flash backend not checked")


def test_chunked_loss_peak_cuda_memory():
    n, h, v, chunk = 8192, 256, 32000, 512
    g = torch.Generator(DEV).manual_seed(0)
    hidden = torch.randn(n, h, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=DEV, generator=g) * 0.05).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device=DEV, generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    full_logits = n * v * 4
    print(f"chunked loss peak extra memory {peak / 2**20:.1f} MiB; fp32 logits would be "
          f"{full_logits / 2**20:.1f} MiB")  # fmt: skip
    assert peak < full_logits / 4
