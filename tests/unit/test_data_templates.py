"""Templates and loss masking: exact ids and labels, built by hand from the reference slots.

Every expected sequence is written out piece by piece from the MindSpeed template table
(docs/data-formats.md); each piece is tokenized by the HF tokenizer on its own, as the
reference's encoding algorithm does. -100 marks unsupervised positions.
"""

from __future__ import annotations

import pytest

from tests.helpers.data import family_tokenizer, ids
from tunelab.data.encode import Encoder
from tunelab.data.formats import Conversation, Message
from tunelab.data.templates import (
    get_template,
    render_generation_prompt,
    stop_token_ids,
    template_names,
)
from tunelab.errors import ConfigError, DataError

M = -100


def ign(x):
    return [M] * len(x)


def U(c):
    return Message("user", c)


def A(c, train=True):
    return Message("assistant", c, train)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def fam(tiny_tokenizer_dir, tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp(family)
            cache[family] = family_tokenizer(tiny_tokenizer_dir, out, family)
        return cache[family]

    return get


def check(enc, conv, want_ids, want_labels):
    e = enc.encode(conv)
    assert e.input_ids == want_ids
    assert e.labels == want_labels
    return e


def test_template_table_has_the_required_names():
    for name in [
        "default",
        "empty",
        "alpaca",
        "chatml",
        "qwen",
        "qwen3",
        "llama2",
        "llama3",
        "mistral",
        "gemma",
    ]:
        assert name in template_names()
        get_template(name)
    with pytest.raises(ConfigError, match="unknown --prompt-type 'qwen9'"):
        get_template("qwen9")


def test_qwen_single_turn_default_system(tok):
    """The reference's worked example: default system, separate pieces, eos = <|im_end|>."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    sys_ = ids(tok, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    user = ids(tok, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    ans = ids(tok, "A")
    e = check(
        Encoder(tok, prompt_type="qwen"),
        Conversation([U("Q"), A("A")]),
        sys_ + user + ans + [im_end],
        ign(sys_) + ign(user) + ans + [im_end],  # end-of-turn token supervised
    )
    assert e.prompt_len == len(sys_ + user)
    assert tok.decode(e.input_ids).endswith("<|im_start|>assistant\nA<|im_end|>")


def test_qwen_multi_turn_history_and_masking_options(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    conv = Conversation([U("q1"), A("a1"), U("q2"), A("a2")], system="S")
    s = ids(tok, "<|im_start|>system\nS<|im_end|>\n")
    u1 = ids(tok, "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n")
    a1 = ids(tok, "a1") + [im_end]
    sep = ids(tok, "\n")  # separator before the second user turn
    u2 = ids(tok, "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n")
    a2 = ids(tok, "a2") + [im_end]
    full = s + u1 + a1 + sep + u2 + a2
    # every assistant turn is trained by default
    check(Encoder(tok, "qwen"), conv, full, ign(s + u1) + a1 + ign(sep + u2) + a2)
    # only the last one
    check(Encoder(tok, "qwen", mask_history=True), conv, full, ign(s + u1 + a1 + sep + u2) + a2)
    # the whole sequence
    check(Encoder(tok, "qwen", train_on_prompt=True), conv, full, full)
    # a per-message train: false
    conv_f = Conversation([U("q1"), A("a1", train=False), U("q2"), A("a2")], system="S")
    check(Encoder(tok, "qwen"), conv_f, full, ign(s + u1 + a1 + sep + u2) + a2)
    # --append-eod: the template's eos id, supervised with the last answer
    check(
        Encoder(tok, "qwen", append_eod=True),
        conv,
        full + [im_end],
        ign(s + u1) + a1 + ign(sep + u2) + a2 + [im_end],
    )


def test_sharegpt_function_call_and_observation(tok):
    """Function calls are answers (trained), observations are inputs (masked)."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    conv = Conversation(
        [
            U("w?"),
            Message("function", '{"name": "w", "arguments": {"c": 1}}'),
            Message("observation", "sunny"),
            A("ok"),
        ],
        system="S",
    )
    s = ids(tok, "<|im_start|>system\nS<|im_end|>\n")
    u = ids(tok, "<|im_start|>user\nw?<|im_end|>\n<|im_start|>assistant\n")
    call = ids(tok, '<tool_call>\n{"name": "w", "arguments": {"c": 1}}\n</tool_call>') + [im_end]
    sep = ids(tok, "\n")
    obs = ids(tok, "<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n")
    ans = ids(tok, "ok") + [im_end]
    check(
        Encoder(tok, "qwen"),
        conv,
        s + u + call + sep + obs + ans,
        ign(s + u) + call + ign(sep + obs) + ans,
    )


def test_alpaca_default_and_empty_templates(tok):
    eos = tok.eos_token_id
    conv = Conversation([U("I"), A("O")])
    sys_ = ids(
        tok,
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n",
    )
    u = ids(tok, "### Instruction:\nI\n\n### Response:\n")
    check(
        Encoder(tok, "alpaca"),
        conv,
        sys_ + u + ids(tok, "O") + [eos],
        ign(sys_ + u) + ids(tok, "O") + [eos],
    )
    # default: system "{c}\n", user "Human: {c}\nAssistant:", separator "\n"
    conv2 = Conversation([U("a"), A("b"), U("c"), A("d")], system="S")
    s = ids(tok, "S\n")
    u1, u2 = ids(tok, "Human: a\nAssistant:"), ids(tok, "Human: c\nAssistant:")
    b, d, sep = ids(tok, "b") + [eos], ids(tok, "d") + [eos], ids(tok, "\n")
    check(
        Encoder(tok, "default"),
        conv2,
        s + u1 + b + sep + u2 + d,
        ign(s + u1) + b + ign(sep + u2) + d,
    )
    # empty: content only, no eos at all
    check(
        Encoder(tok, "empty"),
        conv,
        ids(tok, "I") + ids(tok, "O"),
        ign(ids(tok, "I")) + ids(tok, "O"),
    )


def test_llama2_system_inside_first_user_and_bos_per_turn(fam):
    tok = fam("llama2")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    conv = Conversation([U("q1"), A("a1"), U("q2"), A("a2")], system="S")
    u1 = [bos] + ids(tok, "[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST]")
    u2 = [bos] + ids(tok, "[INST] q2 [/INST]")
    a1, a2 = ids(tok, "a1") + [eos], ids(tok, "a2") + [eos]
    check(Encoder(tok, "llama2"), conv, u1 + a1 + u2 + a2, ign(u1) + a1 + ign(u2) + a2)
    assert stop_token_ids(tok, "llama2") == [eos]


def test_llama3_eot_is_the_supervised_end_of_turn(fam):
    tok = fam("llama3")
    bos, eot = tok.bos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    conv = Conversation([U("q"), A("a")], system="S")
    s = ids(tok, "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>")
    u = ids(
        tok,
        "<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    a = ids(tok, "a") + [eot]
    check(Encoder(tok, "llama3"), conv, [bos] + s + u + a, [M] + ign(s + u) + a)
    assert stop_token_ids(tok, "llama3") == [eot, tok.eos_token_id]


def test_mistral(fam):
    tok = fam("mistral")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    conv = Conversation([U("q1"), A("a1"), U("q2"), A("a2")])
    u1, u2 = ids(tok, "[INST] q1 [/INST]"), ids(tok, "[INST] q2 [/INST]")
    a1, a2 = ids(tok, "a1") + [eos], ids(tok, "a2") + [eos]
    check(
        Encoder(tok, "mistral"), conv, [bos] + u1 + a1 + u2 + a2, [M] + ign(u1) + a1 + ign(u2) + a2
    )


def test_gemma_efficient_eos(fam):
    """efficient_eos: no eos after answers; the previous answer's eos is learned at the first
    token of the next turn's source, and one eos closes the conversation."""
    tok = fam("gemma")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    conv = Conversation([U("q1"), A("a1"), U("q2"), A("a2")])
    u1 = ids(tok, "<start_of_turn>user\nq1<end_of_turn>\n<start_of_turn>model\n")
    src2 = ids(tok, "<end_of_turn>\n") + ids(
        tok, "<start_of_turn>user\nq2<end_of_turn>\n<start_of_turn>model\n"
    )
    a1, a2 = ids(tok, "a1"), ids(tok, "a2")
    check(
        Encoder(tok, "gemma"),
        conv,
        [bos] + u1 + a1 + src2 + a2 + [eos],
        [M] + ign(u1) + a1 + [eos] + ign(src2[1:]) + a2 + [eos],
    )
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert stop_token_ids(tok, "gemma") == [eos, eot]


def test_qwen3_thinking_modes(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    conv = Conversation([U("q1"), A("<think>r1</think>a1"), U("q2"), A("a2")])
    u1 = ids(tok, "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n")
    u2 = ids(tok, "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n")
    think = ids(tok, "<think>\n\n</think>\n\n")
    a1_kept = ids(tok, "<think>r1</think>a1<|im_end|>\n")
    a2 = ids(tok, "a2<|im_end|>\n")
    # none (MindSpeed default): history keeps its thought; an answer without one gets the
    # empty thought on the prompt side
    check(
        Encoder(tok, "qwen3"),
        conv,
        u1 + a1_kept + u2 + think + a2,
        ign(u1) + a1_kept + ign(u2 + think) + a2,
    )
    # false: thoughts are stripped from history, which then gets the empty thought too
    a1_plain = ids(tok, "a1<|im_end|>\n")
    check(
        Encoder(tok, "qwen3", enable_thinking=False),
        conv,
        u1 + think + a1_plain + u2 + think + a2,
        ign(u1 + think) + a1_plain + ign(u2 + think) + a2,
    )
    # true: the empty thought is part of the (trained) answer
    check(
        Encoder(tok, "qwen3", enable_thinking=True),
        conv,
        u1 + a1_kept + u2 + think + a2,
        ign(u1) + a1_kept + ign(u2) + think + a2,
    )
    assert im_end in a2


def test_hf_chat_template_masks_from_message_boundaries(tok):
    msgs = [U("q1"), A("a1"), U("q2"), A("a2")]
    conv = Conversation(msgs, system="S")
    e = Encoder(tok, hf_chat_template=True).encode(conv)
    hf_msgs = [{"role": "system", "content": "S"}] + [
        {"role": m.role, "content": m.content} for m in msgs
    ]
    text = tok.apply_chat_template(hf_msgs, tokenize=False)
    assert e.input_ids == ids(tok, text)
    # supervised: exactly each answer + its "<|im_end|>\n" as rendered by the template
    sup = [i for i, label in zip(e.input_ids, e.labels) if label != M]
    assert sup == ids(tok, "a1<|im_end|>\n") + ids(tok, "a2<|im_end|>\n")
    assert all(label in (M, i) for i, label in zip(e.input_ids, e.labels))
    prompt = tok.apply_chat_template(hf_msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert e.input_ids[: e.prompt_len] == ids(tok, prompt)
    # an answer whose content looks like template text is still masked by position
    tricky = Conversation([U("<|im_start|>assistant\n"), A("x")])
    e2 = Encoder(tok, hf_chat_template=True).encode(tricky)
    assert [i for i, label in zip(e2.input_ids, e2.labels) if label != M] == ids(
        tok, "x<|im_end|>\n"
    )


def test_hf_chat_template_that_rewrites_history_trains_only_the_last_turn(
    tiny_tokenizer_dir, tmp_path
):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    # drops the content of every assistant turn but the last, like Qwen3 drops old thoughts
    tok.chat_template = (
        "{%- for m in messages -%}"
        "{%- if m.role == 'assistant' and not loop.last -%}{{- '<|im_start|>assistant\n<|im_end|>\n' -}}"
        "{%- else -%}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    )
    enc = Encoder(tok, hf_chat_template=True)
    e = enc.encode(Conversation([U("q1"), A("a1"), U("q2"), A("a2")]))
    assert [i for i, label in zip(e.input_ids, e.labels) if label != M] == ids(
        tok, "a2<|im_end|>\n"
    )
    assert enc.num_history_unsupervised == 1
    p = render_generation_prompt(
        tok,
        [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
        ],
        hf_chat_template=True,
    )
    assert p == e.input_ids[: e.prompt_len]


@pytest.mark.parametrize(
    "prompt_type",
    ["default", "alpaca", "chatml", "qwen", "qwen3", "llama2", "llama3", "mistral", "gemma", None],
)
def test_render_generation_prompt_equals_training_prompt(tok, fam, prompt_type):
    family = {"llama2": "llama2", "mistral": "mistral", "llama3": "llama3", "gemma": "gemma"}
    t = fam(family[prompt_type]) if prompt_type in family else tok
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    hf = prompt_type is None
    for thinking in (False, True):
        e = Encoder(t, prompt_type=prompt_type, hf_chat_template=hf, enable_thinking=thinking)
        conv = Conversation([U("q1"), A("a1"), U("q2"), A("the answer")], system="S")
        enc = e.encode(conv)
        got = render_generation_prompt(
            t, msgs, prompt_type=prompt_type, hf_chat_template=hf, enable_thinking=thinking
        )
        assert got == enc.input_ids[: enc.prompt_len]
        assert enc.labels[enc.prompt_len] != M or prompt_type == "qwen3" and thinking


def test_template_errors(tok, fam):
    with pytest.raises(ConfigError, match="needs the token '<|eot_id|>'"):
        Encoder(tok, "llama3")
    with pytest.raises(ConfigError, match="exclude each other"):
        Encoder(tok, "qwen", hf_chat_template=True)
    with pytest.raises(ConfigError, match="needs a template"):
        Encoder(tok)
    with pytest.raises(ConfigError, match="ending with a user"):
        render_generation_prompt(tok, [{"role": "assistant", "content": "x"}], prompt_type="qwen")
    assert stop_token_ids(tok, hf_chat_template=True) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert isinstance(DataError("x"), ValueError)
