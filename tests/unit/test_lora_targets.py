"""LoRA target selection (HF, MindSpeed, MindFormers names, regexes, all-linear), freezing,
dtypes and the errors a user sees. Run on the tiny transformers model: its module names are
the ones tunelab's Transformer uses."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import tiny_hf_model
from tunelab.errors import ConfigError
from tunelab.model.lora import LoraLinear, LoraSpec, apply_lora, lora_layers, resolve_targets

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model("qwen2_untied")


def _full(leaves, layers=(0, 1)):
    out = []
    for i in layers:
        for leaf in leaves:
            parent = "self_attn" if leaf in ATTN else "mlp"
            out.append(f"model.layers.{i}.{parent}.{leaf}")
    return sorted(out)


@pytest.mark.parametrize(
    "targets, leaves",
    [
        (["q_proj", "v_proj"], ("q_proj", "v_proj")),
        ("q_proj,v_proj", ("q_proj", "v_proj")),
        ("linear_qkv linear_proj", ATTN),
        (["linear_fc1", "linear_fc2"], MLP),
        (["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], ATTN + MLP),
        (".*wq|.*wk|.*wv|.*wo", ATTN),
        (".*w1|.*w2|.*w3", MLP),
        (".*linear_qkv", ("q_proj", "k_proj", "v_proj")),
        (r".*\.(q|v)_proj", ("q_proj", "v_proj")),
        ("all-linear", ATTN + MLP),
        (["self_attn.o_proj"], ("o_proj",)),
    ],
)
def test_targets_resolve(model, targets, leaves):
    assert sorted(resolve_targets(model, targets)) == _full(leaves)


def test_regex_and_full_names_select_single_layers(model):
    assert sorted(resolve_targets(model, r"model\.layers\.1\..*_proj")) == _full(ATTN + MLP, [1])
    assert resolve_targets(model, ["model.layers.0.mlp.up_proj"]) == _full(["up_proj"], [0])


def test_all_linear_excludes_lm_head(model):
    names = resolve_targets(model, "all-linear")
    assert "lm_head" not in names and len(names) == 14


@pytest.mark.parametrize("bad", [["q_proj", "qkv_proj"], ".*wqkv", "linear_qkvx"])
def test_target_matching_nothing_lists_linear_layers(model, bad):
    with pytest.raises(ConfigError) as e:
        resolve_targets(model, bad)
    msg = str(e.value)
    assert "matches no linear layer" in msg
    for leaf in ATTN + MLP + ("lm_head",):
        assert leaf in msg
    assert "model.layers.0.self_attn.q_proj" in msg


def test_lm_head_and_invalid_regex_are_errors(model):
    with pytest.raises(ConfigError, match="lm_head"):
        resolve_targets(model, ["lm_head"])
    with pytest.raises(ConfigError, match="invalid regex"):
        resolve_targets(model, ".*(q_proj")


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(r=0), "lora.r"),
        (dict(alpha=0), "lora.alpha"),
        (dict(dropout=1.0), "lora.dropout"),
        (dict(target_modules=[]), "lora.target_modules"),
    ],  # fmt: skip
)
def test_spec_validation(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LoraSpec(**kwargs)


def test_apply_freezes_base_and_keeps_names():
    model = tiny_hf_model("qwen2")
    before = {n: p for n, p in model.named_parameters()}
    names = apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    assert names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    params = dict(model.named_parameters())
    # base parameters keep their names and identity; adapters are added next to them
    for n, p in before.items():
        assert params[n] is p and not p.requires_grad
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}.weight" for n in names for ab in "AB")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LoraLinear) and layer.bias is not None  # qwen2 q bias kept
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (64, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and layer.scaling == 2.0
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(model, LoraSpec())


def test_bf16_base_fp32_adapters_and_rslora():
    model = tiny_hf_model("llama2")
    spec = LoraSpec(r=4, alpha=8, target_modules="all-linear", use_rslora=True)
    apply_lora(model, spec, base_dtype=torch.bfloat16)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in n else torch.bfloat16), n
    layer = next(iter(lora_layers(model).values()))
    assert layer.scaling == pytest.approx(8 / 2.0)
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.dtype == torch.float32
    assert layer.weight.grad is None
