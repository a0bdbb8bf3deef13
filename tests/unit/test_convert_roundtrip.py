"""HF -> Megatron mcore -> HF is bit-identical, through re-sharding too; CLI, safety, errors."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.tiny_models import FAMILIES, save_tiny_hf_model
from tunelab.cli import main as cli_main
from tunelab.convert.megatron import ConvertOptions, convert
from tunelab.errors import CheckpointError, ConfigError
from tunelab.model.hf import load_hf_state_dict


class NotAllowlisted:
    """A class weights_only unpickling refuses (stands in for Megatron enums in `args`)."""

    def __init__(self, value=1):
        self.value = value


def _file(mg: Path, name: str) -> Path:
    return mg / "iter_0000001" / name / "model_optim_rng.pt"


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a_dir: Path, b_dir: Path, dtype: torch.dtype | None = None) -> None:
    a, b = load_hf_state_dict(a_dir), load_hf_state_dict(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        want = a[k] if dtype is None else a[k].to(dtype)
        assert b[k].dtype == want.dtype and torch.equal(b[k], want), k


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_roundtrip_bit_identical(family, tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", family, num_hidden_layers=4)
    convert(ConvertOptions("hf", "mg", hf, tmp_path / "tp2pp2", tp=2, pp=2, progress=False))
    back = convert(
        ConvertOptions("mg", "hf", tmp_path / "tp2pp2", save_hf_dir=tmp_path / "b1", progress=False)
    )
    _assert_same(hf, back)
    convert(
        ConvertOptions("mg", "mg", tmp_path / "tp2pp2", tmp_path / "tp1pp4", pp=4, progress=False)
    )
    assert sorted(p.name for p in (tmp_path / "tp1pp4" / "iter_0000001").iterdir()) == [
        f"mp_rank_00_{p:03d}" for p in range(4)
    ]
    back2 = convert(
        ConvertOptions("mg", "hf", tmp_path / "tp1pp4", save_hf_dir=tmp_path / "b2", progress=False)
    )
    _assert_same(hf, back2)
    cfg_in = json.loads((hf / "config.json").read_text())
    cfg_out = json.loads((back2 / "config.json").read_text())
    for key in ("model_type", "num_hidden_layers", "num_key_value_heads", "tie_word_embeddings"):
        assert cfg_out[key] == cfg_in[key]


def test_vpp_and_layer_list_reshard_bf16(tmp_path):
    hf = save_tiny_hf_model(
        tmp_path / "hf", "qwen2_untied", num_hidden_layers=8, dtype=torch.bfloat16
    )
    convert(ConvertOptions("hf", "mg", hf, tmp_path / "vpp", tp=2, pp=2, layers_per_vpp_stage=2,
                           progress=False))  # fmt: skip
    convert(ConvertOptions("mg", "mg", tmp_path / "vpp", tmp_path / "list", pp=3,
                           num_layer_list=[2, 4, 2], progress=False))  # fmt: skip
    back = convert(ConvertOptions("mg", "hf", tmp_path / "list", save_hf_dir=tmp_path / "b",
                                  progress=False))  # fmt: skip
    _assert_same(hf, back)


def test_params_dtype(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", "llama3")
    mg = convert(
        ConvertOptions("hf", "mg", hf, tmp_path / "mg", params_dtype="bf16", progress=False)
    )
    obj = _load(_file(mg, "mp_rank_00"))
    assert obj["args"].params_dtype == torch.bfloat16 and obj["args"].bf16
    assert all(v.dtype == torch.bfloat16 for v in obj["model"].values() if v is not None)
    back = convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b", progress=False))
    _assert_same(hf, back, dtype=torch.bfloat16)
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cli_seed_commands_mg2hf_dir(tmp_path, tiny_tokenizer_dir):
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2", tokenizer_dir=tiny_tokenizer_dir)
    rc = cli_main(["convert", "--model-type", "GPT", "--use-mcore-models", "--load-model-type",
                   "hf", "--save-model-type", "mg", "--target-tensor-parallel-size", "2",
                   "--target-pipeline-parallel-size", "2", "--add-qkv-bias", "--model-type-hf",
                   "qwen25", "--load-dir", str(hf), "--save-dir", str(tmp_path / "mg"),
                   "--params-dtype", "fp32", "--no-progress"])  # fmt: skip
    assert rc == 0
    # the seeds: mg -> hf with --save-dir = the original HF dir; output in {save-dir}/mg2hf
    rc = cli_main(["convert", "--load-model-type", "mg", "--save-model-type", "hf",
                   "--load-dir", str(tmp_path / "mg"), "--save-dir", str(hf), "--no-progress"])  # fmt: skip
    assert rc == 0
    _assert_same(hf, hf / "mg2hf")
    assert (hf / "mg2hf" / "tokenizer.json").is_file()
    assert (hf / "mg2hf" / "tokenizer_config.json").read_text() == (
        hf / "tokenizer_config.json"
    ).read_text()
    # errors a user causes exit 2 with a message, no traceback
    rc = cli_main(["convert", "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir",
                   str(hf), "--save-dir", str(tmp_path / "bad"), "--target-pipeline-parallel-size",
                   "2", "--num-layer-list", "1,2"])  # fmt: skip
    assert rc == 2


def test_config_from_megatron_args_only(tmp_path):
    """A checkpoint whose args hold only Megatron's names (as MindSpeed writes) converts back
    with --model-type-hf, and a Megatron-padded vocab is cut to the true size."""
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2_untied")
    mg = convert(ConvertOptions("hf", "mg", hf, tmp_path / "mg", progress=False))
    path = _file(mg, "mp_rank_00")
    obj = _load(path)
    del obj["args"].hf_config
    # padded vocab: the HF config keeps the true size, Megatron's args the padded one
    emb = obj["model"]["embedding.word_embeddings.weight"]
    obj["model"]["embedding.word_embeddings.weight"] = torch.cat([emb, emb[-1:].repeat(8, 1)])
    head = obj["model"]["output_layer.weight"]
    obj["model"]["output_layer.weight"] = torch.cat([head, torch.zeros(8, head.shape[1])])
    torch.save(obj, path)
    back = convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b", hf_config_dir=hf,
                                  progress=False))  # fmt: skip
    _assert_same(hf, back)
    obj["args"].padded_vocab_size = 520
    torch.save(obj, path)
    back2 = convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b2",
                                   model_type_hf="qwen25", progress=False))  # fmt: skip
    sd = load_hf_state_dict(back2)
    assert sd["model.embed_tokens.weight"].shape[0] == 520
    ref = load_hf_state_dict(hf)
    assert torch.equal(
        sd["model.layers.1.self_attn.k_proj.bias"], ref["model.layers.1.self_attn.k_proj.bias"]
    )


def test_unknown_globals_read_as_placeholders_or_refused(tmp_path, caplog):
    from tunelab.convert.mcore_io import Opaque, load_file

    hf = save_tiny_hf_model(tmp_path / "hf", "llama2")
    mg = convert(ConvertOptions("hf", "mg", hf, tmp_path / "mg", progress=False))
    path = _file(mg, "mp_rank_00")
    obj = _load(path)
    # Megatron training checkpoints pickle enums / functions in args: read as inert placeholders
    obj["args"].attention_backend = NotAllowlisted(3)
    obj["args"].activation_func = torch.nn.functional.silu
    torch.save(obj, path)
    opts = dict(hf_config_dir=hf, progress=False)
    convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b", **opts))
    _assert_same(hf, tmp_path / "b")
    assert "NotAllowlisted" in caplog.text and "opaque placeholders" in caplog.text
    args = load_file(path)["args"]
    assert isinstance(args.attention_backend, Opaque) and args.num_layers == 2
    assert isinstance(
        load_file(path, allow_unsafe_pickle=True)["args"].attention_backend, NotAllowlisted
    )
    # an unknown object where a tensor belongs is refused, naming the file and the flag
    obj["model"]["decoder.layers.0.input_layernorm.weight"] = NotAllowlisted(4)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="--allow-unsafe-pickle") as e:
        convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "c", **opts))
    assert "NotAllowlisted" in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "c").exists()


def test_broken_inputs_leave_no_output(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen3")
    # an HF tensor with no mcore place -> error, and no iteration dir or tracker written
    bad = tmp_path / "bad_hf"
    shutil.copytree(hf, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="extra.weight"):
        convert(ConvertOptions("hf", "mg", bad, tmp_path / "out", progress=False))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # a missing rank file
    mg = convert(ConvertOptions("hf", "mg", hf, tmp_path / "mg", tp=2, progress=False))
    _file(mg, "mp_rank_01").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_01.*missing"):
        convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b", progress=False))
    # a tracker naming an iteration that is not there
    (mg / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="iter_0000007"):
        convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b", progress=False))
    (mg / "latest_checkpointed_iteration.txt").write_text("3")
    (mg / "iter_0000003").mkdir()
    (mg / "iter_0000003" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match="torch_dist"):
        convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b", progress=False))
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        convert(ConvertOptions("mg", "hf", hf, save_hf_dir=tmp_path / "b", progress=False))


def test_hf_to_mcore_holds_about_one_stage(tmp_path):
    """Stages are written as soon as complete: with 4 stages, far less than the model is held."""
    from tunelab.convert import layout as L
    from tunelab.convert.megatron import McoreWriter, dims_from_config, iter_hf_source
    from tunelab.model.config import ModelConfig

    hf = save_tiny_hf_model(tmp_path / "hf", "llama2", num_hidden_layers=8)
    cfg = ModelConfig.from_hf(hf)
    dims = dims_from_config(cfg)
    lay = L.ParallelLayout.build(8, tp=2, pp=4)
    total = sum(t.numel() * t.element_size() for t in load_hf_state_dict(hf).values())
    writer = McoreWriter(tmp_path / "it", cfg, dims, lay, False, None, argparse.Namespace(), 1)
    for name, t in iter_hf_source(hf, cfg):
        writer.add(name, t)
    writer.finish()
    assert writer.files_written == 8
    assert 0 < writer.peak_buffered_bytes < 0.4 * total


def test_config_that_does_not_match_the_weights(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2")
    mg = convert(ConvertOptions("hf", "mg", hf, tmp_path / "mg", tp=2, progress=False))
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((hf / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(
        CheckpointError,
        match=r"gate_proj.weight has shape \(128, 64\) but the config implies \(96, 64\)",
    ):
        convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b", hf_config_dir=other,
                               progress=False))  # fmt: skip
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="holds 2 layers but the config says 3"):
        convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b", hf_config_dir=other,
                               progress=False))  # fmt: skip
    shutil.copy(hf / "model.safetensors", other / "model.safetensors")
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128, "head_dim": 16}))
    with pytest.raises(CheckpointError, match="config implies"):
        convert(ConvertOptions("hf", "mg", other, tmp_path / "x", progress=False))
    assert not (tmp_path / "b").exists()


def test_vocab_padding_for_tp(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2_untied", vocab_size=511)
    with pytest.raises(ConfigError, match="vocab_size=511"):
        convert(ConvertOptions("hf", "mg", hf, tmp_path / "x", tp=2, progress=False))
    mg = convert(ConvertOptions("hf", "mg", hf, tmp_path / "mg", tp=2,
                                make_vocab_size_divisible_by=1, progress=False))  # fmt: skip
    ref = load_hf_state_dict(hf)
    for r in range(2):
        obj = _load(_file(mg, f"mp_rank_{r:02d}"))
        assert obj["args"].padded_vocab_size == 512
        emb = obj["model"]["embedding.word_embeddings.weight"]
        assert emb.shape == (256, 64)
        want = ref["model.embed_tokens.weight"][256 * r : 256 * r + 256]
        assert torch.equal(emb[: want.shape[0]], want)
    last = _load(_file(mg, "mp_rank_01"))["model"]["output_layer.weight"]
    assert torch.equal(last[-2:], ref["lm_head.weight"][-1:].expand(2, -1))  # repeated last row
    back = convert(ConvertOptions("mg", "hf", mg, save_hf_dir=tmp_path / "b", progress=False))
    _assert_same(hf, back)
