"""ParallelDims: degrees from the world size, and impossible layouts rejected by name."""

from __future__ import annotations

import pytest

from tunelab.errors import ConfigError
from tunelab.parallel.dims import ParallelDims, cfg_get, stage_layer_counts

MODEL = dict(num_layers=4, num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128)


def test_defaults_fill_dp_shard():
    dims = ParallelDims.from_config({}, world_size=8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp) == (1, 8, 1, 1)
    assert dims.dp_size == 8 and dims.fsdp_enabled and not dims.tp_enabled


def test_fill_with_tp_and_pp():
    dims = ParallelDims.from_config({"tp": 2, "pp": 2}, world_size=16)
    assert (dims.dp_shard, dims.tp, dims.pp, dims.world_size) == (4, 2, 2, 16)
    assert dims.dp_size == 4


def test_megatron_aliases_accepted():
    cfg = {"tensor_model_parallel_size": 4, "pipeline_model_parallel_size": 2}
    dims = ParallelDims.from_config(cfg, world_size=8)
    assert (dims.dp_shard, dims.tp, dims.pp) == (1, 4, 2)


def test_dataclass_config_and_other_fill_axis():
    from types import SimpleNamespace

    cfg = SimpleNamespace(dp_replicate=-1, dp_shard=2, tp=1, pp=1)
    dims = ParallelDims.from_config(cfg, world_size=6)
    assert (dims.dp_replicate, dims.dp_shard) == (3, 2)
    assert cfg_get(cfg, "missing", 7) == 7


def test_single_process():
    dims = ParallelDims.from_config(None, world_size=1)
    assert dims.world_size == 1 and not dims.distributed


@pytest.mark.parametrize(
    "cfg, world, match",
    [
        ({"tp": 3}, 8, r"parallel\.dp_shard = -1 cannot fill the world size 8"),
        ({"tp": 2, "dp_shard": 2}, 8, r"multiply to 4 but 8 processes"),
        ({"tp": 0}, 2, r"parallel\.tp = 0"),
        ({"pp": -2}, 2, r"parallel\.pp = -2"),
        ({"tp": -1, "dp_shard": -1}, 4, r"only one degree may be -1"),
    ],
)
def test_impossible_world_layouts(cfg, world, match):
    with pytest.raises(ConfigError, match=match):
        ParallelDims.from_config(cfg, world_size=world)


@pytest.mark.parametrize(
    "dims, extra, match",
    [
        (ParallelDims(tp=8), {}, r"parallel\.tp = 8 does not divide the model's num_attention"),
        (ParallelDims(tp=4), {}, r"num_key_value_heads \(2\)"),
        (ParallelDims(tp=2), {"vocab_size": 511}, r"vocab_size \(511\)"),
        (ParallelDims(pp=3), {}, r"4 layers do not split evenly over 3 .*num_layer_list"),
        (ParallelDims(pp=8), {}, r"8 pipeline stages but the model has only 4 layers"),
        (ParallelDims(pp=2), {"num_layer_list": [1, 2]}, r"sums to 3 but the model has 4"),
        (ParallelDims(pp=2), {"num_layer_list": [4]}, r"1 entries but there are 2 pipeline"),
        (ParallelDims(pp=2), {"num_layer_list": [4, 0]}, r"at least one layer"),
        (
            ParallelDims(pp=2),
            {"virtual_stages": 2, "num_layer_list": [2, 2]},
            r"2 entries but there are 4 pipeline stages \(pp = 2 x virtual_stages = 2\)",
        ),
    ],
)
def test_impossible_model_layouts(dims, extra, match):
    with pytest.raises(ConfigError, match=match):
        dims.validate_model(**MODEL, **extra)


def test_possible_model_layouts():
    ParallelDims(tp=2, pp=2, dp_shard=2).validate_model(**MODEL, vocab_size=512)
    ParallelDims(pp=2).validate_model(**MODEL, num_layer_list=[1, 3])
    ParallelDims(pp=2).validate_model(**MODEL, virtual_stages=2)


def test_stage_layer_counts():
    assert stage_layer_counts(32, 2, num_layer_list=[16, 16]) == [16, 16]
    assert stage_layer_counts(8, 2, virtual_stages=2) == [2, 2, 2, 2]
    assert stage_layer_counts(5, 2, num_layer_list=(2, 3)) == [2, 3]
