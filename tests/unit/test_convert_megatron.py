"""A converted checkpoint loads into Megatron-core's own GPTModel (local spec, strict
load_state_dict) and gives the logits transformers gives on the HF original (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.convert import megatron_logits, run_megatron
from tests.helpers.tiny_models import save_tiny_hf_model, tiny_hf_model
from tunelab.convert.megatron import ConvertOptions, convert

pytest.importorskip("megatron.core")

# mcore's llama3 rope scaling hard-codes original_max_position_embeddings=8192
# A large init so that attention is far from uniform: with the default 0.02 a k/v mix-up
# changes the logits by less than the tolerance.
INIT = dict(initializer_range=0.3)
CASES = {
    "llama2": {},
    "llama3": dict(
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    ),
    "qwen2": {},
    "qwen2_untied": {},
    "qwen3": {},
}


@pytest.mark.slow
def test_megatron_core_gptmodel_matches_transformers(tmp_path):
    """TP1: every family, one stage and two pipeline stages (stage models run in sequence)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 12))
    jobs, expected = [], {}
    for family, overrides in CASES.items():
        overrides = {**INIT, **overrides, "num_hidden_layers": 4}
        hf_dir = save_tiny_hf_model(tmp_path / family / "hf", family, seed=1, **overrides)
        for pp in (1, 2):
            name = f"{family}_pp{pp}"
            mg = convert(ConvertOptions("hf", "mg", hf_dir, tmp_path / name, pp=pp, progress=False))
            jobs.append((str(mg), str(tmp_path / f"{name}.pt")))
        with torch.no_grad():
            expected[family] = tiny_hf_model(family, seed=1, **overrides)(ids).logits
    # the re-sharding path too: HF -> TP2 PP2 -> TP1 PP1 -> Megatron
    convert(ConvertOptions("hf", "mg", tmp_path / "qwen2" / "hf", tmp_path / "mg22", tp=2, pp=2,
                           progress=False))  # fmt: skip
    convert(ConvertOptions("mg", "mg", tmp_path / "mg22", tmp_path / "resharded", progress=False))
    jobs.append((str(tmp_path / "resharded"), str(tmp_path / "resharded.pt")))
    torch.save({"input_ids": ids, "jobs": jobs}, tmp_path / "jobs.pt")
    run_megatron(tmp_path / "jobs.pt", world_size=1)
    for family, want in expected.items():
        for name in (f"{family}_pp1", f"{family}_pp2"):
            got = megatron_logits(tmp_path / f"{name}.pt", tp=1)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
    got = megatron_logits(tmp_path / "resharded.pt", tp=1)
    torch.testing.assert_close(got, expected["qwen2"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_megatron_core_tensor_parallel_tp2(tmp_path):
    """On two gloo processes, Megatron's tensor-parallel GPTModel (1) loads our TP2 PP2 files
    strictly, each rank its two stage files, and the vocab shards of its logits concatenate to
    transformers' logits; (2) writes a TP2 checkpoint of its own (random init) that
    `tunelab convert` turns into an HF model with Megatron's logits in transformers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 12))
    jobs, produce, expected = [], [], {}
    # qwen2_gqa: 12 heads in 4 groups of 3, two groups per TP rank
    gqa = dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=4)
    cases = {"qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}), "llama2": ("llama2", {}),
             "qwen2_gqa": ("qwen2_untied", gqa)}  # fmt: skip
    for name, (family, extra) in cases.items():
        overrides = {**INIT, "num_hidden_layers": 4, **extra}
        hf_dir = save_tiny_hf_model(tmp_path / name / "hf", family, seed=1, **overrides)
        mg = convert(ConvertOptions("hf", "mg", hf_dir, tmp_path / name / "mg", tp=2, pp=2,
                                    progress=False))  # fmt: skip
        jobs.append((str(mg), str(tmp_path / f"{name}.pt")))
        with torch.no_grad():
            expected[name] = tiny_hf_model(family, seed=1, **overrides)(ids).logits
        template = convert(ConvertOptions("hf", "mg", hf_dir, tmp_path / name / "tp2", tp=2,
                                          progress=False))  # fmt: skip
        produce.append((str(template), str(tmp_path / name / "by_megatron"),
                        str(tmp_path / f"{name}_megatron.pt")))  # fmt: skip
    torch.save({"input_ids": ids, "jobs": jobs, "produce": produce}, tmp_path / "jobs.pt")
    run_megatron(tmp_path / "jobs.pt", world_size=2)
    for name, want in expected.items():
        got = megatron_logits(tmp_path / f"{name}.pt", tp=2)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
        # Megatron's own checkpoint -> HF -> transformers
        out = convert(ConvertOptions("mg", "hf", tmp_path / name / "by_megatron",
                                     save_hf_dir=tmp_path / name / "from_megatron",
                                     progress=False))  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
        with torch.no_grad():
            hf_logits = model.eval()(ids).logits
        mg_logits = megatron_logits(tmp_path / f"{name}_megatron.pt", tp=2)
        assert mg_logits.std() > 0.5  # a real model, not near-zero outputs
        torch.testing.assert_close(hf_logits, mg_logits, rtol=1e-4, atol=1e-4, msg=name)
