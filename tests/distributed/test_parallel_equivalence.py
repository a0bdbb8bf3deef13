"""FSDP2, TP, PP and 2-D layouts on gloo reproduce the single-process training run.

Each layout trains the tiny model for a few SGD steps on packed multi-document batches with
the loss normalized by the global supervised-token count; losses must match the plain
single-process run within 1e-5 (relative), and the final weights closely. One torchrun
launch runs many layouts to keep the CPU time low.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.parallel_worker import CHECKS, build_model
from tests.helpers.distributed import full_params, held_out_loss, torchrun, train_losses

WORKER = "tests/distributed/parallel_worker.py"
STEPS = 3
TWO_RANKS = [
    "fsdp",
    "fsdp_ac",
    "fsdp_tied",
    "fsdp_bf16",
    "tp",
    "tp_nosp",
    "tp_ac",
    "tp_tied_qknorm",
    "pp_1f1b",
    "pp_gpipe",
    "pp_uneven",
    "pp_interleaved",
    "pp_tied",
    "lora_fsdp",
    "lora_tp",
    "reshard_fsdp_to_tp",
    "reshard_pp_to_fsdp",
]
FOUR_RANKS = [
    "fsdp_tp",
    "fsdp_tp_qknorm",
    "hsdp",
    "pp_fsdp",
    "pp_fsdp_tied",
    "pp_tp",
    "lora_fsdp_tp",
]


@functools.cache
def reference(family: str) -> tuple[list[float], list[float], dict[str, torch.Tensor], float]:
    model = build_model(family)
    norms: list[float] = []
    losses = train_losses([model], STEPS, grad_norms=norms)
    return losses, norms, full_params([model]), held_out_loss(model)


def _check(out, name: str, nproc: int) -> None:
    if name == "fsdp_bf16":
        return _check_bf16(out, nproc)
    ref_losses, ref_norms, ref_params, ref_eval = reference(CHECKS[name][0])
    # Clipping must act (norm above max_grad_norm) for the test to cover it.
    assert max(ref_norms) > 0.5
    params: dict[str, torch.Tensor] = {}
    for rank in range(nproc):
        result = torch.load(out / f"{name}.rank{rank}.pt")
        # Every rank reports the same (all-reduced) loss.
        assert result["losses"] == pytest.approx(ref_losses, rel=1e-5), (name, rank)
        assert result["grad_norms"] == pytest.approx(ref_norms, rel=1e-5), (name, rank)
        assert result["eval_loss"] == pytest.approx(ref_eval, rel=1e-5), (name, rank)
        params.update(result["params"])
    if "lm_head.weight" in params and "lm_head.weight" not in ref_params:
        # Tied embeddings under PP: the last stage's copy must have stayed equal.
        torch.testing.assert_close(
            params.pop("lm_head.weight"), params["model.embed_tokens.weight"]
        )
    assert params.keys() == ref_params.keys(), name
    for key, ref in ref_params.items():
        torch.testing.assert_close(params[key], ref, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def _check_bf16(out, nproc: int) -> None:
    ref_losses, _, ref_params, _ = reference(CHECKS["fsdp_bf16"][0])
    for rank in range(nproc):
        result = torch.load(out / f"fsdp_bf16.rank{rank}.pt")
        # bf16 compute: close, not equal (8 bits of mantissa)
        assert result["losses"] == pytest.approx(ref_losses, rel=2e-2)
        assert result["losses"] != ref_losses
        for key, value in result["params"].items():
            assert value.dtype == torch.float32, key  # master weights stay fp32
            torch.testing.assert_close(value, ref_params[key], rtol=0.1, atol=2e-2)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel2")
    torchrun(WORKER, "--out", str(out), "--checks", ",".join(TWO_RANKS), "--steps", str(STEPS))
    return out


@pytest.mark.parametrize("name", [n for n in TWO_RANKS if n in CHECKS])
def test_two_ranks_match_single_process(two_rank_results, name):
    _check(two_rank_results, name, 2)


@pytest.mark.parametrize("name", ["reshard_fsdp_to_tp", "reshard_pp_to_fsdp"])
def test_checkpoint_resumes_under_another_layout_and_one_process(two_rank_results, name):
    """DCP resharding: FSDP 2 -> TP 2, PP 2 -> FSDP 2, and either -> 1 process continue the
    uninterrupted losses (model and AdamW state)."""
    import torch.distributed.checkpoint as dcp

    from tests.helpers.distributed import adamw, tiny_model
    from tunelab.parallel import state as st

    model = tiny_model()
    uninterrupted = train_losses([model], 2 * STEPS, optimizer=adamw([model]))

    for rank in range(2):
        result = torch.load(two_rank_results / f"{name}.rank{rank}.pt")
        assert result["losses"] == pytest.approx(uninterrupted, rel=1e-5), rank

    model = tiny_model(seed=7)
    opt = adamw([model])
    state = {
        "model": st.model_state_dict([model]),
        "optim": st.optimizer_state_dict([model], [opt]),
    }
    dcp.load(state, checkpoint_id=str(two_rank_results / f"{name}_ckpt"))
    st.load_model_state_dict([model], state["model"])
    st.load_optimizer_state_dict([model], [opt], state["optim"])
    resumed = train_losses([model], STEPS, optimizer=opt, first_step=STEPS)
    assert resumed == pytest.approx(uninterrupted[STEPS:], rel=1e-5)


@pytest.mark.slow
def test_four_ranks_2d_match_single_process(tmp_path):
    torchrun(
        WORKER,
        "--out",
        str(tmp_path),
        "--checks",
        ",".join(FOUR_RANKS),
        "--steps",
        str(STEPS),
        nproc=4,
        timeout=400,
    )
    for name in FOUR_RANKS:
        _check(tmp_path, name, 4)
