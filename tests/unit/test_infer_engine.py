"""The engine against `transformers` / `peft` generate: greedy token for token, batched."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers.infer import hf_greedy, lively_model_dir, make_peft_adapter
from tunelab.errors import TunelabError
from tunelab.infer.engine import ContextLengthError, Engine, GenRequest
from tunelab.infer.sampling import GenerationConfig

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 40, 41], [20, 21], [30, 31, 32, 33, 34], [100]]
NEW = 12
NO_STOP = GenerationConfig(max_new_tokens=NEW, stop_token_ids=[])


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tiny_tokenizer_dir):
    return lively_model_dir(tmp_path_factory.mktemp("q2u"), "qwen2_untied", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def engine(qwen_dir):
    return Engine.from_pretrained(qwen_dir, device="cpu")


@pytest.mark.parametrize("family", ["qwen2_untied", "llama3"])
def test_greedy_batch_equals_transformers(family, tmp_path, tiny_tokenizer_dir):
    d = lively_model_dir(tmp_path / family, family, tiny_tokenizer_dir)
    ours = Engine.from_pretrained(d, device="cpu").generate(PROMPTS, NO_STOP)
    hf = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    assert ours == hf_greedy(hf, PROMPTS, NEW)
    assert len({t for row in ours for t in row}) > 8  # a varied continuation, not one token


def test_greedy_with_peft_lora_equals_peft(qwen_dir, tmp_path):
    peft_model = make_peft_adapter(qwen_dir, tmp_path / "adapter")
    eng = Engine.from_pretrained(qwen_dir, adapter=tmp_path / "adapter", device="cpu")
    ours = eng.generate(PROMPTS, NO_STOP)
    assert ours == hf_greedy(peft_model, PROMPTS, NEW)
    base = AutoModelForCausalLM.from_pretrained(str(qwen_dir)).eval()
    assert ours != hf_greedy(base, PROMPTS, NEW)  # the adapter really changed the model


def test_seeded_sampling_equals_transformers(engine, qwen_dir):
    hf = AutoModelForCausalLM.from_pretrained(str(qwen_dir)).eval()
    cfg = GenerationConfig(
        max_new_tokens=NEW, temperature=0.8, top_k=50, top_p=0.9, seed=123, stop_token_ids=[]
    )
    ours = engine.generate([PROMPTS[0]], cfg)[0]
    torch.manual_seed(123)
    theirs = hf.generate(
        torch.tensor([PROMPTS[0]]), do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
        max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
    )[0, len(PROMPTS[0]):].tolist()  # fmt: skip
    assert ours == theirs
    assert engine.generate([PROMPTS[0]], cfg)[0] == ours  # reproducible


def test_rows_with_own_lengths_and_stops_match_single_runs(engine):
    full = engine.generate(PROMPTS, NO_STOP)
    stop_tok = full[2][4]
    configs = [
        NO_STOP.replace(max_new_tokens=3),
        NO_STOP,
        NO_STOP.replace(stop_token_ids=[stop_tok]),
        NO_STOP.replace(max_new_tokens=7),
    ]
    done = engine.complete(PROMPTS, configs)
    assert [c.token_ids for c in done] == [
        full[0][:3],
        full[1],
        full[2][: full[2].index(stop_tok)],
        full[3][:7],
    ]
    assert [c.finish_reason for c in done] == ["length", "length", "stop", "length"]
    # Each row alone gives the same tokens as inside the batch.
    for p, c, cfg in zip(PROMPTS, done, configs):
        assert engine.generate([p], cfg)[0] == c.token_ids


def test_stream_yields_the_generated_tokens(engine):
    assert list(engine.stream(PROMPTS[1], NO_STOP)) == engine.generate([PROMPTS[1]], NO_STOP)[0]


def test_stop_strings_cut_text(engine):
    full = engine.complete([PROMPTS[0]], NO_STOP)[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = engine.complete([PROMPTS[0]], NO_STOP.replace(stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert "".join(engine.stream_text(PROMPTS[0], NO_STOP.replace(stop=[stop]))) == cut.text


def test_eos_from_the_model_ends_generation(engine):
    full = engine.generate([PROMPTS[3]], NO_STOP)[0]
    engine_eos = engine.eos_token_ids
    try:
        engine.eos_token_ids = frozenset({full[5]})
        c = engine.complete([PROMPTS[3]], NO_STOP.replace(stop_token_ids=None))[0]
        assert c.token_ids == full[: full.index(full[5])] and c.finish_reason == "stop"
        ign = engine.complete([PROMPTS[3]], NO_STOP.replace(stop_token_ids=None, ignore_eos=True))
        assert ign[0].token_ids == full
    finally:
        engine.eos_token_ids = engine_eos


def test_cancel_stops_a_row(engine):
    flag = {"n": 0}

    def cancelled():
        flag["n"] += 1
        return flag["n"] > 3

    reqs = [GenRequest(PROMPTS[0], NO_STOP, cancelled), GenRequest(PROMPTS[1], NO_STOP)]
    finals = {}
    for events in engine.iterate(reqs):
        for ev in events:
            if ev.finish_reason:
                finals[ev.index] = ev.finish_reason
    assert finals == {0: "cancelled", 1: "length"}


def test_prompt_errors(engine):
    with pytest.raises(ContextLengthError, match="context is 256"):
        engine.generate([[5] * 300], NO_STOP)
    with pytest.raises(ContextLengthError, match="requested"):
        engine.check_prompt([5] * 200, max_new_tokens=100)
    with pytest.raises(TunelabError, match="empty"):
        engine.generate([[]], NO_STOP)
    with pytest.raises(TunelabError, match="vocabulary"):
        engine.generate([[5, 9999]], NO_STOP)


def test_generation_is_clamped_to_the_context(engine):
    out = engine.complete([[7] * 250], NO_STOP.replace(max_new_tokens=100))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_static_cache_decode_equals_dynamic(qwen_dir, engine):
    static = Engine.from_pretrained(qwen_dir, device="cpu", static_cache=True)
    configs = [NO_STOP.replace(max_new_tokens=n) for n in (3, NEW, 5, NEW)]
    want = engine.complete(PROMPTS, configs)
    got = static.complete(PROMPTS, configs)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]


@pytest.mark.gpu
def test_compiled_decode_on_gpu_equals_transformers(qwen_dir):
    eng = Engine.from_pretrained(qwen_dir, device="cuda", dtype="float32", compile=True)
    hf = AutoModelForCausalLM.from_pretrained(str(qwen_dir)).eval().cuda()
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS]).cuda()
    mask = torch.arange(width)[None] >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]
    out = hf.generate(ids, attention_mask=mask.long().cuda(), max_new_tokens=NEW,
                      min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert eng.generate(PROMPTS, NO_STOP) == out[:, width:].tolist()
    assert eng.generate(PROMPTS, NO_STOP) == out[:, width:].tolist()  # reuses the graph


@pytest.mark.parametrize("initial_slots", [256, 2], ids=["preallocated", "growing"])
def test_requests_joining_a_running_batch_match_single_runs(engine, monkeypatch, initial_slots):
    from tunelab.infer import batch as batch_mod
    from tunelab.infer.batch import RunningBatch

    monkeypatch.setattr(batch_mod, "INITIAL_DECODE_SLOTS", initial_slots)

    long_prompt = list(range(50, 70))  # longer than the tokens decoded so far: shifts the batch
    configs = [NO_STOP.replace(max_new_tokens=n) for n in (4, NEW, NEW, 20)]
    prompts = [PROMPTS[0], PROMPTS[1], long_prompt, PROMPTS[3]]
    want = [engine.generate([p], c)[0] for p, c in zip(prompts, configs)]
    got: dict[int, list[int]] = {}
    batch = RunningBatch(engine, [GenRequest(p, c) for p, c in zip(prompts[:2], configs[:2])])
    step = 0
    while True:
        for ev in batch.sample():
            if ev.token_id is not None:
                got.setdefault(ev.index, []).append(ev.token_id)
        if batch.done:
            break
        batch.forward()
        step += 1
        joins = {2: 2, 6: 3}  # a long prompt (front shift) at step 2, a short one at step 6
        if step in joins:
            req = GenRequest(prompts[joins[step]], configs[joins[step]])
            assert batch.can_join(req, max_batch_size=8)
            batch.join(req)
    assert [got[i] for i in range(4)] == want
    # The cache grew on demand instead of reserving every row's maximum up front.
    assert batch.cache.max_seq_len <= 20 + NEW + 20


def test_growing_cache_equals_transformers(qwen_dir, monkeypatch):
    from tunelab.infer import batch as batch_mod

    monkeypatch.setattr(batch_mod, "INITIAL_DECODE_SLOTS", 1)
    eng = Engine.from_pretrained(qwen_dir, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(qwen_dir)).eval()
    assert eng.generate(PROMPTS, NO_STOP) == hf_greedy(hf, PROMPTS, NEW)


def test_static_cache_respects_sliding_window(tmp_path, tiny_tokenizer_dir):
    """A Mistral-style window shorter than prompt + reply: static decode equals transformers."""
    from tests.helpers.tiny_models import save_tiny_hf_model

    d = save_tiny_hf_model(
        tmp_path / "mistral", "mistral", tokenizer_dir=tiny_tokenizer_dir, sliding_window=6
    )
    static = Engine.from_pretrained(d, device="cpu", static_cache=True)
    got = static.generate(PROMPTS, NO_STOP)
    hf = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    assert got == hf_greedy(hf, PROMPTS, NEW)
