"""Sampling filters against `transformers`' own logits processors, and seeded sampling."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tunelab.errors import ConfigError
from tunelab.infer.sampling import (
    GenerationConfig,
    Sampler,
    apply_repetition_penalty,
    filter_logits,
)


def _hf_filtered(logits, prev_ids, temperature, top_k, top_p, penalty):
    out = logits.clone()
    if penalty != 1.0:
        out = RepetitionPenaltyLogitsProcessor(penalty)(prev_ids, out)
    out = TemperatureLogitsWarper(temperature)(prev_ids, out)
    if top_k:
        out = TopKLogitsWarper(top_k)(prev_ids, out)
    if top_p < 1.0:
        out = TopPLogitsWarper(top_p)(prev_ids, out)
    return out


@pytest.mark.parametrize(
    "temperature,top_k,top_p,penalty",
    [
        (0.7, 0, 1.0, 1.0),
        (1.3, 5, 1.0, 1.0),
        (0.8, 0, 0.9, 1.0),
        (0.6, 20, 0.5, 1.3),
        (1.0, 3, 0.3, 0.7),
    ],
)
def test_filters_match_transformers(temperature, top_k, top_p, penalty):
    torch.manual_seed(0)
    batch, vocab = 3, 50
    logits = torch.randn(batch, vocab) * 3
    prev = torch.randint(0, vocab, (batch, 7))
    seen = torch.zeros(batch, vocab, dtype=torch.bool)
    seen.scatter_(1, prev, True)
    ours = apply_repetition_penalty(logits, seen, torch.full((batch,), penalty))
    ours = filter_logits(
        ours,
        torch.full((batch,), temperature),
        torch.full((batch,), top_k, dtype=torch.long),
        torch.full((batch,), top_p),
    )
    theirs = _hf_filtered(logits, prev, temperature, top_k, top_p, penalty)
    keep_ours = ours > torch.finfo(ours.dtype).min
    keep_theirs = theirs > float("-inf")
    assert torch.equal(keep_ours, keep_theirs)
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1))


def test_rows_keep_their_own_settings():
    torch.manual_seed(1)
    logits = torch.randn(2, 30)
    out = filter_logits(
        logits, torch.tensor([1.0, 1.0]), torch.tensor([2, 0]), torch.tensor([1.0, 1.0])
    )
    kept = out > torch.finfo(out.dtype).min
    assert kept[0].sum() == 2 and kept[1].all()


def test_greedy_and_seeded_sampling():
    torch.manual_seed(2)
    logits = torch.randn(3, 40)
    cfgs = [
        GenerationConfig(temperature=0.0),
        GenerationConfig(temperature=1.0, seed=7),
        GenerationConfig(temperature=1.0, seed=7, top_k=4),
    ]
    a = [Sampler(cfgs, 40, torch.device("cpu"))(logits) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    assert a[0][0] == logits[0].argmax()
    # A seeded row gives the same token whatever it is batched with.
    alone = Sampler([cfgs[1]], 40, torch.device("cpu"))(logits[1:2])
    assert alone[0] == a[0][1]
    # top-k=4 only ever picks one of the 4 best tokens.
    s = Sampler([GenerationConfig(temperature=5.0, top_k=4, seed=3)], 40, torch.device("cpu"))
    best4 = set(logits[2].topk(4).indices.tolist())
    assert {int(s(logits[2:3])[0]) for _ in range(50)} <= best4


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 1e-9]]))
    s = Sampler([GenerationConfig(temperature=1.0, seed=0)], 4, torch.device("cpu"))
    counts = torch.bincount(torch.cat([s(logits) for _ in range(3000)]), minlength=4).float()
    freq = counts / counts.sum()
    assert torch.allclose(freq[:3], torch.tensor([0.6, 0.3, 0.1]), atol=0.04)
    assert counts[3] == 0


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5]])
    s = Sampler([GenerationConfig(repetition_penalty=2.0)], 4, torch.device("cpu"))
    s.observe([[0]])
    assert int(s(logits)[0]) == 2  # token 0 (2.0 -> 1.0) now loses to token 2
    assert int(s(logits)[0]) == 0  # 2 was generated too: 1.5 -> 0.75 now loses to 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(repetition_penalty=0.0),
        dict(stop=[""]),
    ],
)
def test_bad_configs_are_user_errors(kwargs):
    with pytest.raises(ConfigError):
        GenerationConfig(**kwargs)


def test_single_stop_string_is_a_list():
    assert tuple(GenerationConfig(stop="###").stop) == ("###",)
