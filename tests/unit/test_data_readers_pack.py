"""Input readers (every format, directories) and best-fit packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.data import write_jsonl
from tunelab.data.pack import best_fit, pack_samples
from tunelab.data.readers import count_rows, iter_rows, list_input_files, materialize
from tunelab.errors import DataError

ROWS = [{"text": "a", "n": 1}, {"text": "b", "n": 2}, {"text": "c", "n": 3}]


def rows_of(path):
    files = list_input_files(path)
    return [materialize(p, w) for w, p in iter_rows(files)], count_rows(files)


def _write(path, fmt):
    import pyarrow as pa

    table = pa.Table.from_pylist(ROWS)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif fmt == "arrow":  # what datasets.save_to_disk writes: the IPC stream format
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table)
    elif fmt == "arrowfile":
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "csv":
        path.write_text("text,n\na,1\nb,2\nc,3\n")


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "arrowfile", "json", "jsonl", "csv"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    ext = "arrow" if fmt == "arrowfile" else fmt
    path = tmp_path / f"d.{ext}"
    _write(path, fmt)
    rows, n = rows_of(path)
    want = [{"text": r["text"], "n": str(r["n"]) if fmt == "csv" else r["n"]} for r in ROWS]
    assert rows == want
    assert n in (3, None)


def test_json_file_holding_json_lines_and_txt(tmp_path):
    write_jsonl(tmp_path / "lines.json", ROWS)
    assert rows_of(tmp_path / "lines.json") == (ROWS, 3)
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    assert rows_of(tmp_path / "t.txt") == ([{"text": "one"}, {"text": "two"}], 2)


def test_directory_one_format_sorted_and_mixed_is_an_error(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    (tmp_path / "README.md").write_text("ignored")
    rows, n = rows_of(tmp_path)
    assert rows == ROWS and n == 3
    (tmp_path / "c.csv").write_text("text\nx\n")
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"mixes formats \(1 \.csv, 2 \.jsonl, 1 \.parquet\)"):
        list_input_files(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        list_input_files(tmp_path / "nope")
    with pytest.raises(DataError, match="unsupported extension '.md'"):
        list_input_files(tmp_path / "README.md")


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [ROWS[0], '{"text": "b",', ROWS[2]])
    items = list(iter_rows(list_input_files(p)))
    assert str(items[1][0]) == f"{p} line 2"
    with pytest.raises(DataError, match=rf"{p} line 2: malformed JSON"):
        materialize(items[1][1], items[1][0])


def test_max_rows(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", ROWS)
    assert len(list(iter_rows([p], max_rows=2))) == 2


def test_best_fit_hand_checked():
    # capacity 10; longest first: 7 -> row0 (3 free), 6 -> row1 (4 free), 4 -> row1 (tightest
    # that fits: 4 free), 3 -> row0, 2 -> row2
    rows = best_fit([3, 7, 2, 6, 4], 10)
    assert rows == [[1, 0], [3, 4], [2]]


def test_best_fit_properties():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    rows = best_fit(lengths, 64)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))  # every sample exactly once, never split
    assert all(sum(int(lengths[i]) for i in r) <= 64 for r in rows)
    assert len(rows) <= int(np.ceil(lengths.sum() / 64 * 1.25))
    with pytest.raises(ValueError):
        best_fit([65], 64)


def test_pack_rows_padding_and_neat_masks():
    ids = np.array([1, 2, 3, 4, 5, 6])
    labels = np.array([-100, 2, 3, -100, 5, 6])
    lengths = np.array([3, 1, 2])  # samples [1,2,3], [4], [5,6]
    plain = pack_samples(ids, labels, lengths, 4, pad_id=0, neat=False)
    # rows: [s0 (3), s1 (1)] and [s2 (2) + 2 pad]
    assert plain.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert plain.labels.tolist() == [[-100, 2, 3, -100], [5, 6, -100, -100]]
    assert plain.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    neat = pack_samples(ids, labels, lengths, 4, pad_id=0, neat=True)
    assert neat.attention_mask.tolist() == [[1, 1, 1, 2], [1, 1, 0, 0]]
    assert neat.fill_ratio == 6 / 8


def test_tokenizer_loader_matches_autotokenizer(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers.data import family_tokenizer
    from tunelab.data.preprocess import _named_tokenizer_class, load_tokenizer

    llama = family_tokenizer(tiny_tokenizer_dir, tmp_path / "llama3", "llama3")
    del llama
    for d in (tiny_tokenizer_dir, tmp_path / "llama3"):
        assert _named_tokenizer_class(d) is not None  # the fast path is taken
        ours, auto = load_tokenizer(str(d)), AutoTokenizer.from_pretrained(str(d))
        assert type(ours) is type(auto)
        text = "Hello <|im_end|> world 你好 <|eot_id|>\n  x"
        for special in (True, False):
            assert ours(text, add_special_tokens=special) == auto(text, add_special_tokens=special)
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
            assert getattr(ours, attr) == getattr(auto, attr)
        assert len(ours) == len(auto)
