"""The tensor-parallel plan for tunelab's Transformer (Megatron-style, with DTensor).

Per block: q/k/v and gate/up are column-parallel (each rank holds a slice of heads / of the
MLP width), o and down are row-parallel (partial sums reduced across ranks). Heads are
inferred in the attention (``view(b, s, -1, head_dim)``), so sharded projections just yield
fewer local heads. Qwen3's per-head q/k norms see only local heads; their weights become
replicated DTensors so the partial weight gradients are summed across ranks.

With sequence parallel (default), activations between the matmul regions (norms, residual
stream) are split along the sequence across the tp ranks inside each stage's run of blocks,
and gathered just before each column-parallel region; this cuts activation memory by ``tp``
and turns all-reduces into reduce-scatter + all-gather of the same total volume. Norms
outside that region run whole, with replicated DTensor weights, so every parameter of a
tp-parallel model is a DTensor (foreach / fused optimizers refuse a mix).

The embedding and ``lm_head`` (tied or not) are vocabulary-parallel: each rank holds
``V / tp`` rows, and the chunked loss completes log-sum-exp and target logits with
all-reduces (see vocab_parallel.py) instead of gathering logits. The final norm runs on the
whole sequence (replicated), since the loss needs every position's hidden state.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def _lora_styles():
    """Column / row styles that also place a LoRA layer's adapters (see tunelab.model.lora).

    Colwise base (weight Shard(0)): ``lora_A`` replicated, ``lora_B`` Shard(0) on the out dim,
    so the update comes out sharded like the base output. Rowwise base (weight Shard(1)):
    ``lora_A`` Shard(1) on the in dim, ``lora_B`` replicated; the update stays a partial sum
    and is reduced with the base output in the layer's one collective.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def place(module: nn.Module, mesh, placements: dict[str, object]) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            dist_param = nn.Parameter(
                distribute_tensor(param, mesh, [placements[pname]]),
                requires_grad=param.requires_grad,
            )
            module.register_parameter(pname, dist_param)

    class LoraColwiseParallel(ColwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            if name == "":
                place(module, device_mesh, {"weight": Shard(0), "bias": Shard(0)})
            elif name == "lora_A":
                place(module, device_mesh, {"weight": Replicate()})
            elif name == "lora_B":
                place(module, device_mesh, {"weight": Shard(0)})

    class LoraRowwiseParallel(RowwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            if name == "":
                place(module, device_mesh, {"weight": Shard(1), "bias": Replicate()})
            elif name == "lora_A":
                place(module, device_mesh, {"weight": Shard(1)})
            elif name == "lora_B":
                place(module, device_mesh, {"weight": Replicate()})

    return LoraColwiseParallel, LoraRowwiseParallel


def _replicated_style():
    """A style for a module that runs whole on every tp rank (a norm outside the sequence-
    parallel region): its parameters become replicated DTensors, so that every parameter of
    a tp-parallel model is a DTensor (foreach / fused optimizers refuse a mix), and its
    plain full-tensor input and output stay plain."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    class ReplicateParallel(ParallelStyle):
        def _apply(self, module: nn.Module, mesh) -> nn.Module:
            def partition(name, mod, mesh):
                for pname, p in list(mod.named_parameters(recurse=False)):
                    dp = DTensor.from_local(p, mesh, [Replicate()], run_check=False)
                    mod.register_parameter(pname, nn.Parameter(dp, requires_grad=p.requires_grad))

            def inputs(mod, args, mesh):
                x, *rest = args
                if not isinstance(x, DTensor):
                    x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                return (x, *rest)

            def outputs(mod, out, mesh):
                return out.to_local() if isinstance(out, DTensor) else out

            return distribute_module(module, mesh, partition, inputs, outputs)

    return ReplicateParallel


def apply_tensor_parallel(model: nn.Module, tp_mesh, *, sequence_parallel: bool = True) -> None:
    """Shard ``model`` (a Transformer or a pipeline stage of one) over the 1-D ``tp_mesh``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from tunelab.model.lora import LoraLinear
    from tunelab.parallel.vocab_parallel import shard_lm_head

    lora_col, lora_row = _lora_styles()

    def colwise(module: nn.Module):
        return lora_col() if isinstance(module, LoraLinear) else ColwiseParallel()

    def rowwise(module: nn.Module, **kwargs):
        return lora_row(**kwargs) if isinstance(module, LoraLinear) else RowwiseParallel(**kwargs)

    # Replicating styles (SequenceParallel) make every parameter trainable; frozen ones
    # (a LoRA run's base) must stay frozen.
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    body = model.model
    seq = Shard(1)
    between = seq if sequence_parallel else Replicate()

    if body.embed_tokens is not None:
        parallelize_module(
            body.embed_tokens,
            tp_mesh,
            RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        )
    if model.lm_head is not None:
        if getattr(model.config, "tie_word_embeddings", False) and body.embed_tokens is not None:
            # Re-tie: the embedding's weight is now a vocabulary-sharded DTensor, lm_head's too.
            model.lm_head.weight = body.embed_tokens.weight
        shard_lm_head(model.lm_head, tp_mesh)

    replicated = _replicated_style()
    if body.norm is not None:
        # Whole sequence (the last block gathers it): the loss needs every position.
        parallelize_module(body.norm, tp_mesh, replicated())

    blocks = list(body.layers.values())
    if sequence_parallel and blocks:
        # The residual stream enters and leaves each stage whole: the model derives the
        # sequence length (masks, rotary tables) from it, and pipeline stages pass it on.
        # Replicate -> Shard(1) is a local slice; the gather back happens once per stage.
        parallelize_module(
            blocks[0],
            tp_mesh,
            PrepareModuleInput(
                input_layouts=(Replicate(), None, None, None, None),
                desired_input_layouts=(seq, None, None, None, None),
                use_local_output=True,
            ),
        )
        parallelize_module(
            blocks[-1],
            tp_mesh,
            PrepareModuleOutput(
                output_layouts=seq, desired_output_layouts=Replicate(), use_local_output=True
            ),
        )

    for block in blocks:
        attn, mlp = block.self_attn, block.mlp
        plan: dict[str, object] = {
            "self_attn": PrepareModuleInput(
                # (x, cos, sin, mask, cache): only the hidden states are laid out.
                input_layouts=(between, None, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None, None),
                use_local_output=True,
            ),
            "self_attn.q_proj": colwise(attn.q_proj),
            "self_attn.k_proj": colwise(attn.k_proj),
            "self_attn.v_proj": colwise(attn.v_proj),
            "self_attn.o_proj": rowwise(attn.o_proj, output_layouts=between),
            "mlp": PrepareModuleInput(
                input_layouts=(between,),
                desired_input_layouts=(Replicate(),),
                use_local_output=True,
            ),
            "mlp.gate_proj": colwise(mlp.gate_proj),
            "mlp.up_proj": colwise(mlp.up_proj),
            "mlp.down_proj": rowwise(mlp.down_proj, output_layouts=between),
        }
        if sequence_parallel:
            plan["input_layernorm"] = SequenceParallel(use_local_output=True)
            plan["post_attention_layernorm"] = SequenceParallel(use_local_output=True)
        else:
            plan["input_layernorm"] = replicated()
            plan["post_attention_layernorm"] = replicated()
        if block.self_attn.q_norm is not None:
            # [b, s, local heads, head_dim]: sharded along heads (dim 2).
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad[name])
    logger.info(
        "tensor parallel over %d ranks (sequence parallel %s)",
        tp_mesh.size(),
        "on" if sequence_parallel else "off",
    )
