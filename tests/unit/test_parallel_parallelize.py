"""parallelize() on one device: activation checkpointing and compile keep numbers and names."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers.distributed import packed_batch, tiny_model
from tunelab.errors import ConfigError
from tunelab.parallel.parallelize import parallelize, parse_dtype


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss_sum, num_tokens = model.loss(**batch)
    (loss_sum / num_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss_sum / num_tokens), grads


def test_activation_checkpointing_same_loss_grads_and_state_dict_keys():
    ref = tiny_model()
    model = copy.deepcopy(ref)
    out = parallelize(model, {"activation_checkpointing": True})
    assert out is model
    assert "checkpoint" in type(model.model.layers["0"]).__name__.lower()
    assert list(model.state_dict()) == list(ref.state_dict())
    batch = packed_batch()
    ref_loss, ref_grads = _loss_and_grads(ref, batch)
    loss, grads = _loss_and_grads(model, batch)
    assert loss == ref_loss
    clean = {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in grads.items()}
    assert clean.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(clean[name], g, rtol=0, atol=0)


def test_nothing_requested_changes_nothing():
    model = tiny_model()
    before = {n: id(m) for n, m in model.named_modules()}
    parallelize(model, {"activation_checkpointing": False, "compile": False})
    assert {n: id(m) for n, m in model.named_modules()} == before


def test_parse_dtype():
    assert parse_dtype("bf16", "param_dtype") is torch.bfloat16
    assert parse_dtype("torch.float32", "reduce_dtype") is torch.float32
    with pytest.raises(ConfigError, match=r"parallel\.param_dtype = 'int8'"):
        parse_dtype("int8", "param_dtype")


@pytest.mark.slow
def test_compile_per_block_same_loss():
    ref = tiny_model()
    model = copy.deepcopy(ref)
    parallelize(model, {"compile": True, "activation_checkpointing": True})
    assert list(model.state_dict()) == list(ref.state_dict())
    batch = packed_batch()
    ref_loss, ref_grads = _loss_and_grads(ref, batch)
    loss, grads = _loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    clean = {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in grads.items()}
    for name, g in ref_grads.items():
        torch.testing.assert_close(clean[name], g, rtol=1e-4, atol=1e-6)


def test_mixed_precision_follows_train_precision():
    from tunelab.parallel.parallelize import mixed_precision

    assert mixed_precision(None, "fp32").param_dtype is None
    assert mixed_precision(None, "bf16-mixed").param_dtype is torch.bfloat16
    assert mixed_precision(None, "bf16").reduce_dtype is torch.float32
    assert mixed_precision({"param_dtype": "fp32"}, "bf16-mixed").param_dtype is torch.float32


def test_pipeline_schedule_names():
    from tunelab.parallel.pipeline import resolve_schedule

    assert resolve_schedule("1f1b", 1).__name__ == "Schedule1F1B"
    assert resolve_schedule("gpipe", 1).__name__ == "ScheduleGPipe"
    # A one-stage-per-rank name with virtual stages runs its looped counterpart.
    assert resolve_schedule("1f1b", 2).__name__ == "ScheduleInterleaved1F1B"
    assert resolve_schedule("interleaved1f1b", 2).__name__ == "ScheduleInterleaved1F1B"
    with pytest.raises(ConfigError, match=r"parallel\.pp_schedule = 'zigzag'"):
        resolve_schedule("zigzag", 1)
    with pytest.raises(ConfigError, match="needs several stages per rank"):
        resolve_schedule("interleaved1f1b", 1)


def test_split_stage_keeps_global_names():
    from tunelab.parallel.pipeline import split_stage

    model = tiny_model()
    first = split_stage(model, 0, [1, 3])
    last = split_stage(model, 1, [1, 3])
    assert list(first.model.layers) == ["0"] and list(last.model.layers) == ["1", "2", "3"]
    assert first.lm_head is None and first.model.norm is None
    assert last.model.embed_tokens is None and last.lm_head is not None
    full = model.state_dict()
    for part in (first, last):
        for key, value in part.state_dict().items():
            assert torch.equal(value, full[key]), key
    assert len(model.model.layers) == 4  # the source model is untouched


def test_forward_backward_accumulates_like_one_batch():
    from tests.helpers.distributed import global_num_tokens
    from tunelab.parallel.step import forward_backward, global_count, global_loss

    batch = packed_batch()
    n = global_num_tokens(batch)
    ref = tiny_model()
    ref_loss, ref_grads = _loss_and_grads(ref, batch)
    model = tiny_model()
    micro = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
    local = forward_backward(model, micro, global_count(n, None))
    assert global_loss(local, None).item() == pytest.approx(ref_loss, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-7)


def test_compile_with_tensor_parallel_is_refused_by_name():
    from tunelab.parallel.parallelize import check_options

    check_options({"compile": True}, 1)
    check_options({"compile": False}, 2)
    with pytest.raises(ConfigError, match=r"parallel\.compile = true with parallel\.tp > 1"):
        check_options({"compile": True}, 2)
