"""Gradient accumulation: 4 micro-batches of 1 give the update of one micro-batch of 4,
with different numbers of supervised tokens per micro-batch."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.train import random_sft_rows, run_config, write_sft
from tunelab.train.trainer import Trainer


@pytest.fixture
def one_thread():
    """Multi-threaded CPU matmuls split their sums by batch shape, so a micro-batch of 4 and
    four of 1 differ in the last bits, which Adam lifts to ~1e-6 on elements whose gradient is
    near zero. One thread makes the comparison about the accumulation, not the BLAS."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_accumulation_equals_big_batch(tmp_path, tiny_hf_dir, one_thread):
    data = write_sft(tmp_path / "d", random_sft_rows(8, seed=5, lo=6, hi=30))
    seen = []

    def run(mbs: int, name: str):
        cfg = run_config(
            tmp_path / name,
            tiny_hf_dir,
            data,
            "--train.steps=2",
            f"--train.micro_batch_size={mbs}",
            "--train.global_batch_size=4",
            "--optim.max_grad_norm=0.5",  # clipping active: the grad norm must match too
            "--checkpoint.save_final=false",
            "--checkpoint.export_hf=false",
        )
        t = Trainer(cfg)
        if mbs == 1:  # the supervised-token count of each micro-batch of the first step
            seen.extend(t._supervised(mb) for mb in t.loader.next_batch())
            t.loader.consumed_samples = 0
        return t.train(), t

    small, t_small = run(1, "mb1")
    big, t_big = run(4, "mb4")
    assert len(set(seen)) > 1, f"supervised counts per micro-batch should differ: {seen}"
    for step in small.losses:
        assert abs(small.losses[step] - big.losses[step]) < 1e-5 * abs(big.losses[step])
    a, b = t_small.model.state_dict(), t_big.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
