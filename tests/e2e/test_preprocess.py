"""`tunelab preprocess` end to end: outputs, Megatron's reader, scale options, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.data import ALPACA_ROWS, ids, write_jsonl
from tunelab.cli import main as cli
from tunelab.data.indexed import IndexedDataset

M = -100
SFT = ("input_ids", "attention_mask", "labels")


def run(tok_dir, inp, prefix, *extra):
    argv = [
        "preprocess",
        "--input",
        str(inp),
        "--tokenizer-name-or-path",
        str(tok_dir),
        "--output-prefix",
        str(prefix),
        *map(str, extra),
    ]
    return cli(argv)


def read(prefix, field):
    ds = IndexedDataset(f"{prefix}_packed_{field}_document")
    return [x.tolist() for x in ds]


def summary(prefix):
    return json.loads(Path(f"{prefix}_summary.json").read_text())


def megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MG
    return MG


def test_alpaca_non_pack_outputs_and_megatron_reader(tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    inp = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    prefix = tmp_path / "out" / "alpaca"
    assert (
        run(
            tiny_tokenizer_dir,
            inp,
            prefix,
            "--handler-name",
            "AlpacaStyleInstructionHandler",
            "--prompt-type",
            "qwen",
            "--tokenizer-type",
            "PretrainedFromHF",
            "--map-keys",
            '{"system": "system", "history": "history"}',
        )
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(
        [f"alpaca_packed_{f}_document.{e}" for f in SFT for e in ("bin", "idx")]
        + ["alpaca_summary.json"]
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    sys_ = ids(tok, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    u0 = ids(tok, "<|im_start|>user\nadd 2 and 3<|im_end|>\n<|im_start|>assistant\n")
    a0 = ids(tok, "5") + [im_end]
    input_ids, labels, mask = (read(prefix, f) for f in ("input_ids", "labels", "attention_mask"))
    assert input_ids[0] == sys_ + u0 + a0
    assert labels[0] == [M] * len(sys_ + u0) + a0
    assert mask[0] == [1] * len(input_ids[0])
    # row 1: instruction + "\n" + input, and its own system prompt
    assert tok.decode(input_ids[1]).startswith(
        "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nsay hi\nto bob<|im_end|>"
    )
    # row 2: two history turns, all three answers supervised
    sup = tok.decode([t for t in labels[2] if t != M])
    assert sup == "first a<|im_end|>second a<|im_end|>done<|im_end|>"
    s = summary(prefix)
    assert (s["rows_read"], s["rows_written"], s["skipped_invalid"]) == (3, 3, 0)
    assert s["supervised_tokens"] == sum(t != M for row in labels for t in row)
    assert s["dtype"]["labels"] == "int32"
    # Megatron's own reader sees the same arrays and one document per sample
    MG = megatron()
    for f in SFT:
        theirs = MG(str(prefix) + f"_packed_{f}_document")
        assert [theirs[i].tolist() for i in range(len(theirs))] == read(prefix, f)
        assert theirs.document_indices.tolist() == [0, 1, 2, 3]


def test_pack_and_neat_pack(tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    rows = [{"instruction": "q" * (i % 5 + 1), "output": "a" * (i % 7 + 1)} for i in range(40)]
    inp = write_jsonl(tmp_path / "a.jsonl", rows)
    plain, neat = tmp_path / "plain", tmp_path / "neat"
    common = ["--handler-name", "alpaca", "--prompt-type", "chatml", "--seq-length", 64, "--pack"]
    assert run(tiny_tokenizer_dir, inp, plain, *common) == 0
    assert run(tiny_tokenizer_dir, inp, neat, *common, "--neat-pack") == 0
    single = tmp_path / "single"
    assert (
        run(tiny_tokenizer_dir, inp, single, "--handler-name", "alpaca", "--prompt-type", "chatml")
        == 0
    )
    samples = read(single, "input_ids")
    pad = tiny_tokenizer.pad_token_id
    for prefix in (plain, neat):
        ids_rows = read(prefix, "input_ids")
        assert all(len(r) == 64 for r in ids_rows)
        s = summary(prefix)
        assert s["pack_rows"] == len(ids_rows) and s["rows_written"] == 40
        total = sum(map(len, samples))
        assert s["pack_fill_ratio"] == pytest.approx(total / (64 * len(ids_rows)), abs=1e-6)
    # neat-pack: masks number the samples 1..k, 0 on padding; cutting rows by the mask gives
    # back exactly the single samples (none split)
    pieces = []
    for row, m in zip(read(neat, "input_ids"), read(neat, "attention_mask")):
        m = np.array(m)
        k = int(m.max())
        assert sorted(set(m.tolist()) - {0}) == list(range(1, k + 1))
        for j in range(1, k + 1):
            pieces.append(np.array(row)[m == j].tolist())
        assert all(t == pad for t in np.array(row)[m == 0])
    assert sorted(pieces) == sorted(samples)
    assert all(all(x == 1 for x in m) for m in read(plain, "attention_mask"))


def test_pretrain_text_document(tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    inp = tmp_path / "p.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"text": "hello world"}, {"text": ""}, {"text": "the quick fox"}]),
        inp,
    )
    prefix = tmp_path / "enwiki"
    assert (
        run(
            tiny_tokenizer_dir,
            inp,
            prefix,
            "--handler-name",
            "GeneralPretrainHandler",
            "--json-keys",
            "text",
            "--append-eod",
        )
        == 0
    )
    ds = IndexedDataset(f"{prefix}_text_document")
    eos = tiny_tokenizer.eos_token_id
    assert ds.dtype == np.uint16  # vocab < 65500: Megatron's choice
    assert [x.tolist() for x in ds] == [
        ids(tiny_tokenizer, "hello world") + [eos],
        ids(tiny_tokenizer, "the quick fox") + [eos],
    ]
    theirs = megatron()(f"{prefix}_text_document")  # keep it alive: it unmaps on deletion
    assert theirs[1].tolist() == ds[1].tolist()
    # pad to a multiple (a full block when already a multiple), eod last
    p2 = tmp_path / "padded"
    assert (
        run(
            tiny_tokenizer_dir,
            inp,
            p2,
            "--append-eod",
            "--pad-to-multiple-of",
            8,
            "--dtype",
            "int32",
        )
        == 0
    )
    ds2 = IndexedDataset(f"{p2}_text_document")
    assert ds2.dtype == np.int32 and all(len(x) % 8 == 0 for x in ds2)
    assert all(int(x[-1]) == eos for x in ds2)


def test_pairwise_outputs(tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    inp = write_jsonl(
        tmp_path / "p.jsonl", [{"instruction": "q", "chosen": "good", "rejected": "bad"}]
    )
    prefix = tmp_path / "dpo"
    assert (
        run(
            tiny_tokenizer_dir,
            inp,
            prefix,
            "--handler-name",
            "AlpacaStylePairwiseHandler",
            "--prompt-type",
            "chatml",
        )
        == 0
    )
    fields = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    got = {f: read(prefix, f)[0] for f in fields}
    tok = tiny_tokenizer
    prompt = ids(tok, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert got["chosen_input_ids"] == prompt + ids(tok, "good") + [im_end]
    assert got["rejected_labels"] == [M] * len(prompt) + ids(tok, "bad") + [im_end]


def test_workers_shards_and_merge_give_identical_bytes(tiny_tokenizer_dir, tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"q{i}"},
                {"from": "gpt", "value": "a" * (i % 9 + 1)},
            ]
        }
        for i in range(1200)
    ]
    inp = write_jsonl(tmp_path / "all.jsonl", rows)
    base = ["--handler-name", "sharegpt", "--prompt-type", "qwen"]
    ref = tmp_path / "ref"
    assert run(tiny_tokenizer_dir, inp, ref, *base) == 0
    # --workers 2 and --n-subs 3: same bytes (the pool runs in a subprocess: no fork of pytest)
    w2 = tmp_path / "w2"
    cmd = [
        sys.executable,
        "-m",
        "tunelab",
        "preprocess",
        "--input",
        str(inp),
        "--tokenizer-name-or-path",
        str(tiny_tokenizer_dir),
        "--output-prefix",
        str(w2),
        *base,
        "--workers",
        "2",
        "--n-subs",
        "3",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    # two halves preprocessed apart, then --merge-group-keys
    parts = tmp_path / "parts"
    write_jsonl(tmp_path / "h1.jsonl", rows[:500])
    write_jsonl(tmp_path / "h2.jsonl", rows[500:])
    for h in ("h1", "h2"):
        assert run(tiny_tokenizer_dir, tmp_path / f"{h}.jsonl", parts / h, *base) == 0
    merged = tmp_path / "merged"
    keys = [f"packed_{f}_document" for f in SFT]
    assert (
        cli(
            [
                "preprocess",
                "--input",
                str(parts),
                "--output-prefix",
                str(merged),
                "--merge-group-keys",
                *keys,
            ]
        )
        == 0
    )
    for f in SFT:
        want = {e: Path(f"{ref}_packed_{f}_document.{e}").read_bytes() for e in ("bin", "idx")}
        for other in (f"{w2}_packed_{f}_document", f"{merged}_packed_{f}_document"):
            for e in ("bin", "idx"):
                assert Path(f"{other}.{e}").read_bytes() == want[e], (other, e)
    assert summary(w2)["rows_written"] == 1200
    assert not list(tmp_path.glob(".*cache*"))  # shard cache removed after the merge


def test_too_long_no_supervision_and_max_samples(tiny_tokenizer_dir, tmp_path):
    rows = [
        {"instruction": "hi", "output": "ok"},
        {"instruction": "x" * 200, "output": "long"},
        {"instruction": "hi", "output": "ok"},
    ]
    inp = write_jsonl(tmp_path / "a.jsonl", rows)
    p = tmp_path / "drop"
    assert (
        run(
            tiny_tokenizer_dir,
            inp,
            p,
            "--handler-name",
            "alpaca",
            "--prompt-type",
            "chatml",
            "--seq-length",
            40,
        )
        == 0
    )
    s = summary(p)
    assert (s["rows_written"], s["dropped_too_long"]) == (2, 1)
    p = tmp_path / "cut"
    assert (
        run(
            tiny_tokenizer_dir,
            inp,
            p,
            "--handler-name",
            "alpaca",
            "--prompt-type",
            "chatml",
            "--seq-length",
            40,
            "--truncate-too-long",
        )
        == 0
    )
    s = summary(p)
    # the cut sample lost its answer: counted as having no supervised token, not written
    assert (s["truncated"], s["no_supervised_tokens"], s["rows_written"]) == (1, 1, 2)
    p = tmp_path / "max"
    assert (
        run(
            tiny_tokenizer_dir,
            inp,
            p,
            "--handler-name",
            "alpaca",
            "--prompt-type",
            "chatml",
            "--max-samples",
            1,
        )
        == 0
    )
    assert summary(p)["rows_read"] == 1


BAD = [
    (
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
        "line 2: malformed JSON",
    ),
    ('{"instruction": "a"}\n', "line 1: missing required column 'output'"),
    (
        '{"instruction": ["a"], "output": "b"}\n',
        "line 1: column 'instruction' must be a string, got list",
    ),
]


@pytest.mark.parametrize("content,match", BAD)
def test_bad_input_stops_with_file_row_field(tiny_tokenizer_dir, tmp_path, capsys, content, match):
    inp = tmp_path / "bad.jsonl"
    inp.write_text(content)
    prefix = tmp_path / "o" / "x"
    rc = run(tiny_tokenizer_dir, inp, prefix, "--handler-name", "alpaca", "--prompt-type", "qwen")
    err = capsys.readouterr().err
    assert rc == 2 and f"{inp} {match}" in err
    assert not prefix.parent.exists() or list(prefix.parent.iterdir()) == []


@pytest.mark.parametrize(
    "row,match",
    [
        ({"conversations": []}, "line 1: empty conversation"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown role 'robot'"),
        ({"chat": []}, "line 1: missing required column 'conversations'"),
    ],
)
def test_bad_sharegpt_rows(tiny_tokenizer_dir, tmp_path, capsys, row, match):
    inp = write_jsonl(tmp_path / "bad.jsonl", [row])
    assert (
        run(
            tiny_tokenizer_dir,
            inp,
            tmp_path / "x",
            "--handler-name",
            "sharegpt",
            "--prompt-type",
            "qwen",
        )
        == 2
    )
    assert match in capsys.readouterr().err


def test_skip_invalid_counts_and_lists(tiny_tokenizer_dir, tmp_path):
    inp = tmp_path / "mixed.jsonl"
    inp.write_text(
        '{"instruction": "a", "output": "b"}\nnot json\n{"instruction": 1, "output": "b"}\n'
        '{"instruction": "c", "output": "d"}\n'
    )
    p = tmp_path / "skip"
    assert (
        run(
            tiny_tokenizer_dir,
            inp,
            p,
            "--handler-name",
            "alpaca",
            "--prompt-type",
            "qwen",
            "--skip-invalid",
        )
        == 0
    )
    s = summary(p)
    assert (s["rows_read"], s["rows_written"], s["skipped_invalid"]) == (4, 2, 2)
    assert "line 2: malformed JSON" in s["skipped_rows"][0]
    assert "line 3: column 'instruction' must be a string" in s["skipped_rows"][1]


def test_bad_options(tiny_tokenizer_dir, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    cases = [
        (
            ["--handler-name", "alpaca", "--prompt-type", "qwen", "--neat-pack"],
            "--neat-pack requires --pack",
        ),
        (
            ["--handler-name", "alpaca", "--prompt-type", "qwen", "--pack"],
            "--pack requires --seq-length",
        ),
        (["--handler-name", "alpaca"], "needs a template"),
        (["--prompt-type", "qwen"], "need an instruction handler"),
        (
            [
                "--handler-name",
                "alpaca",
                "--prompt-type",
                "qwen",
                "--tokenizer-type",
                "GPT2BPETokenizer",
            ],
            "not supported",
        ),
        (
            ["--handler-name", "alpaca", "--prompt-type", "qwen", "--dtype", "uint16"],
            "cannot hold labels",
        ),
    ]
    for extra, match in cases:
        assert run(tiny_tokenizer_dir, inp, tmp_path / "x", *extra) == 2
        assert match in capsys.readouterr().err


def test_failure_midway_leaves_no_partial_outputs(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """A run interrupted after some chunks were written leaves nothing under the final names."""
    from tunelab.data import preprocess

    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(2000)]
    inp = write_jsonl(tmp_path / "a.jsonl", rows)
    real = preprocess._Sink.put
    calls = {"n": 0}

    def put_then_interrupt(self, fields):
        real(self, fields)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(preprocess._Sink, "put", put_then_interrupt)
    out = tmp_path / "out"
    out.mkdir()
    assert (
        run(tiny_tokenizer_dir, inp, out / "x", "--handler-name", "alpaca", "--prompt-type", "qwen")
        == 130
    )
    assert calls["n"] == 2
    assert list(out.iterdir()) == []


def test_sigint_leaves_no_partial_outputs(tiny_tokenizer_dir, tmp_path):
    """SIGINT to a real run (2 workers) that is still reading its input from a pipe."""
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "tunelab",
        "preprocess",
        "--input",
        str(fifo),
        "--tokenizer-name-or-path",
        str(tiny_tokenizer_dir),
        "--output-prefix",
        str(out / "x"),
        "--handler-name",
        "alpaca",
        "--prompt-type",
        "qwen",
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(fifo, "w") as w:
        for i in range(3000):
            w.write(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n")
        w.flush()
        # wait (by event, not by time) until written data sits in temporary files
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tmp = [p for p in out.iterdir() if ".tmp-" in p.name and p.stat().st_size > 0]
            if tmp:
                break
            time.sleep(0.05)
        assert tmp, "the run never wrote anything"
        proc.send_signal(signal.SIGINT)
    # closing the pipe lets the row reader see the end of its input; the interrupt wins
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert list(out.iterdir()) == []


def test_n_subs_resumes_from_finished_shards(tiny_tokenizer_dir, tmp_path, monkeypatch, caplog):
    from tunelab.data import preprocess

    rows = [{"instruction": f"q{i}", "output": "a" * (i % 5 + 1)} for i in range(1200)]
    inp = write_jsonl(tmp_path / "a.jsonl", rows)
    base = ["--handler-name", "alpaca", "--prompt-type", "qwen"]
    ref = tmp_path / "ref"
    assert run(tiny_tokenizer_dir, inp, ref, *base) == 0
    real, calls = preprocess._Sink.put, {"n": 0}

    def fail_in_second_shard(self, fields):
        calls["n"] += 1
        if calls["n"] == 3:  # shard 1 of 2 = rows 0..599 = 2 chunks; then this
            raise KeyboardInterrupt
        real(self, fields)

    monkeypatch.setattr(preprocess._Sink, "put", fail_in_second_shard)
    out = tmp_path / "out" / "x"
    assert run(tiny_tokenizer_dir, inp, out, *base, "--n-subs", 2) == 130
    assert not list(out.parent.glob("x_*"))  # nothing under the final names
    monkeypatch.setattr(preprocess._Sink, "put", real)
    with caplog.at_level("INFO", logger="tunelab.data.preprocess"):
        assert run(tiny_tokenizer_dir, inp, out, *base, "--n-subs", 2) == 0
    assert "shard 1/2 reused" in caplog.text
    for f in SFT:
        for e in ("bin", "idx"):
            want = Path(f"{ref}_packed_{f}_document.{e}").read_bytes()
            assert Path(f"{out}_packed_{f}_document.{e}").read_bytes() == want
    assert summary(out)["rows_written"] == 1200
    assert not list(out.parent.glob(".*cache*"))
