"""Handlers and --map-keys: rows -> Conversation, as the MindSpeed guides describe them."""

from __future__ import annotations

import pytest

from tunelab.data.formats import (
    Conversation,
    Message,
    parse_map_keys,
    pretrain_texts,
    resolve_handler,
    to_sample,
)
from tunelab.errors import ConfigError, DataError


def conv(kind, row, map_keys=None, alias=None):
    return to_sample(row, parse_map_keys(kind, map_keys, alias), "f.jsonl line 1")


def test_handler_names_and_aliases():
    assert resolve_handler("") == ("GeneralPretrainHandler", "pretrain")
    assert resolve_handler("alpaca") == ("AlpacaStyleInstructionHandler", "alpaca")
    assert resolve_handler("openai") == ("SharegptStyleInstructionHandler", "sharegpt")
    assert resolve_handler("SharegptStylePairwiseHandler")[1] == "sharegpt_pairwise"
    assert resolve_handler("pairwise")[0] == "AlpacaStylePairwiseHandler"
    with pytest.raises(ConfigError, match="unknown --handler-name 'Nope'"):
        resolve_handler("Nope")


def test_alpaca_defaults_join_instruction_and_input_and_history():
    row = {
        "instruction": "I",
        "input": "X",
        "output": "O",
        "system": "S",
        "history": [["q1", "a1"], ["q2", "a2"]],
    }
    c = conv("alpaca", row, '{"system": "system", "history": "history"}')
    assert c == Conversation(
        [
            Message("user", "q1"),
            Message("assistant", "a1"),
            Message("user", "q2"),
            Message("assistant", "a2"),
            Message("user", "I\nX"),
            Message("assistant", "O"),
        ],
        system="S",
    )
    # without --map-keys, system and history columns are not read (MindSpeed defaults)
    c = conv("alpaca", row)
    assert [m.content for m in c.messages] == ["I\nX", "O"] and c.system == ""
    # empty input: the instruction alone
    c = conv("alpaca", {"instruction": "I", "input": "", "output": "O"})
    assert c.messages[0].content == "I"


def test_seed_map_keys_example_1():
    row = {
        "notice": "N",
        "question": "Q",
        "answer": "A",
        "system_test": "S",
        "histories": [["h", "ha"]],
        "instruction": "ignored",
    }
    mk = (
        '{"prompt":"notice","query":"question","response":"answer",'
        '"system":"system_test","history":"histories"}'
    )
    c = conv("alpaca", row, mk)
    assert [(m.role, m.content) for m in c.messages] == [
        ("user", "h"),
        ("assistant", "ha"),
        ("user", "N\nQ"),
        ("assistant", "A"),
    ]
    assert c.system == "S"


def test_seed_map_keys_example_2():
    row = {"instruction": "I", "input": "X", "output": "O", "histories": [["h", "ha"]]}
    c = conv("alpaca", row, '{"history":"histories"}')
    assert [m.content for m in c.messages] == ["h", "ha", "I\nX", "O"]


def test_sharegpt_roles_system_tools_and_train_flag():
    row = {
        "conversations": [
            {"from": "system", "value": "SYS"},
            {"from": "human", "value": "weather?"},
            {"from": "function_call", "value": '{"name": "w", "arguments": {}}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny", "train": False},
        ],
        "tools": [{"name": "w"}],
    }
    c = conv("sharegpt", row)
    assert c.system == "SYS" and c.tools == '[{"name": "w"}]'
    assert [m.role for m in c.messages] == ["user", "function", "observation", "assistant"]
    assert c.messages[-1].train is False and c.messages[1].train is True


def test_sharegpt_seed_map_keys_examples():
    c = conv(
        "sharegpt",
        {"chat": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        '{"messages":"chat"}',
    )
    assert [m.content for m in c.messages] == ["q", "a"]
    mk = (
        '{"messages":"messages", "tags":{"role_tag": "role","content_tag": "content",'
        '"user_tag": "user","assistant_tag": "assistant"}}'
    )
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    c = conv("sharegpt", row, mk)
    assert c.system == "S" and [m.role for m in c.messages] == ["user", "assistant"]
    # the openai alias uses those keys by default
    assert conv("sharegpt", row, None, alias="openai") == c


@pytest.mark.parametrize(
    "kind,row,match",
    [
        ("alpaca", {"input": "x", "output": "o"}, "missing required column 'instruction'"),
        ("alpaca", {"instruction": 3, "output": "o"}, "'instruction' must be a string, got int"),
        ("alpaca", {"instruction": "i", "output": ""}, "empty response"),
        ("alpaca", {"instruction": "i", "output": ["a", "b"]}, "pairwise"),
        ("sharegpt", {"conversations": []}, "empty conversation"),
        ("sharegpt", {"conversations": "hi"}, "must be a list of messages"),
        (
            "sharegpt",
            {"conversations": [{"from": "bot", "value": "x"}]},
            r"conversations\[0\].from is the unknown role 'bot'",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": 5}]},
            r"conversations\[0\].value must be a string, got int",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
            "must alternate",
        ),
        ("sharegpt", {"conversations": [{"from": "human", "value": "a"}]}, "must end with"),
        (
            "sharegpt",
            {"messages": [{"role": "user", "content": "a"}]},
            "use --handler-name openai",
        ),
    ],
)
def test_bad_rows_name_file_row_and_field(kind, row, match):
    with pytest.raises(DataError, match=match) as e:
        conv(kind, row)
    assert str(e.value).startswith("f.jsonl line 1: ")


def test_history_must_be_pairs():
    with pytest.raises(DataError, match=r"history\[0\] must be a pair"):
        conv(
            "alpaca",
            {"instruction": "i", "output": "o", "history": [["q"]]},
            '{"history": "history"}',
        )


def test_bad_map_keys():
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_map_keys("alpaca", "{prompt:")
    with pytest.raises(ConfigError, match="unknown --map-keys key 'promt'; valid keys: prompt"):
        parse_map_keys("alpaca", '{"promt": "x"}')
    with pytest.raises(ConfigError, match="unknown --map-keys tag 'speaker'"):
        parse_map_keys("sharegpt", '{"tags": {"speaker": "x"}}')


def test_pairwise_samples():
    s = conv("alpaca_pairwise", {"instruction": "q", "chosen": "good", "rejected": "bad"})
    assert s.prompt.messages == [Message("user", "q")]
    assert (s.chosen.content, s.rejected.content) == ("good", "bad")
    row = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    s = conv("sharegpt_pairwise", row)
    assert s.chosen == Message("assistant", "good")
    with pytest.raises(DataError, match="missing required column 'rejected'"):
        conv("alpaca_pairwise", {"instruction": "q", "chosen": "good"})


def test_pretrain_texts():
    assert pretrain_texts({"text": "a", "t2": "b"}, ["text", "t2"], "w") == ["a", "b"]
    with pytest.raises(DataError, match="missing required column 'text'"):
        pretrain_texts({"content": "a"}, ["text"], "w")
