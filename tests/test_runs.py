"""Run records (runs.py) and the data folder's rows (rows.py), on files written by hand: no model, no corpus."""

from __future__ import annotations

import json

import numpy as np

from pipeline import runs
from pipeline.rows import SPLITS, load_tokens, num_rows, read_meta, row_tokens, token_file_bytes


def test_up_to_date_needs_the_record_the_same_inputs_and_the_outputs(tmp_path):
    (tmp_path / "record.json").write_text(json.dumps({"inputs": {"a": 1}, "mode": "topk", "bytes": 3}))
    (tmp_path / "out.bin").write_bytes(b"abc")
    sizes = lambda record: {"out.bin": record["bytes"]}  # noqa: E731
    assert runs.up_to_date(tmp_path, "record.json", {"inputs": {"a": 1}}, sizes)["mode"] == "topk"
    assert runs.up_to_date(tmp_path, "record.json", {"inputs": {"a": 2}}, sizes) is None  # other inputs
    assert runs.up_to_date(tmp_path, "record.json", {"inputs": {"a": 1}, "mode": "sampled"}, sizes) is None
    assert runs.up_to_date(tmp_path, "record.json", {"mode": "sampled"}, ignore=("mode",)) is not None
    assert runs.up_to_date(tmp_path, "record.json", {"absent": None}) is not None  # a missing key matches None only
    assert runs.up_to_date(tmp_path, "other.json", {}) is None  # no record: nothing is finished
    assert runs.up_to_date(tmp_path, "record.json", {}, {"out.bin": None, "gone.bin": None}) is None
    (tmp_path / "out.bin").write_bytes(b"ab")  # cut short
    assert runs.up_to_date(tmp_path, "record.json", {"inputs": {"a": 1}}, sizes) is None
    assert runs.up_to_date(tmp_path, "record.json", {}, read=lambda path: None) is None  # unreadable record


def test_metrics_append_read_and_truncate_at_a_resume(tmp_path):
    for step in (1, 2, 3):
        runs.append_metrics(tmp_path, {"step": step, "total": float(step)})
    with open(tmp_path / runs.METRICS_FILE, "a") as f:
        f.write('{"step": 4, "tot')  # a line cut short by a kill mid-write
    assert [r["step"] for r in runs.read_metrics(tmp_path)] == [1, 2, 3]
    runs.truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in runs.read_metrics(tmp_path)] == [1, 2]
    runs.clear_metrics(tmp_path)
    assert runs.read_metrics(tmp_path) == []


def test_resolved_and_run_config(tmp_path):
    resolved = {"kind": "distill", "train": {"lr": 0.001}}
    assert not runs.same_resolved(tmp_path, resolved)
    runs.save_resolved(tmp_path, resolved)
    assert runs.same_resolved(tmp_path, resolved) and not runs.same_resolved(tmp_path, {**resolved, "kind": "x"})
    assert runs.read_run_config(tmp_path) is None and runs.finished_run(tmp_path) is None
    runs.write_run_config(tmp_path, {"resolved": resolved, "parameters": 10})
    assert runs.has_run_config(tmp_path) and runs.read_run_config(tmp_path)["parameters"] == 10
    assert runs.finished_run(tmp_path) is None  # no weights beside it
    (tmp_path / runs.MODEL_FILE).write_bytes(b"weights")
    assert runs.finished_run(tmp_path, resolved)["parameters"] == 10
    assert runs.finished_run(tmp_path, {**resolved, "kind": "baseline"}) is None
    runs.clear_run_config(tmp_path)
    assert runs.finished_run(tmp_path) is None


def test_rows_of_a_data_folder(tmp_path):
    ids = {"train": np.arange(21, dtype=np.uint16), "val": np.arange(9, dtype=np.uint16)}
    for split in SPLITS:
        ids[split].tofile(tmp_path / f"{split}.bin")
    meta = {"dtype": "uint16", "train_tokens": 21, "val_tokens": 9}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert read_meta(tmp_path) == meta
    assert token_file_bytes(meta) == {"train.bin": 42, "val.bin": 18}
    tokens = load_tokens(tmp_path, "train")
    assert num_rows(len(tokens), 4) == 5 and num_rows(len(tokens), 4, max_rows=2) == 2
    assert row_tokens(tokens, 1, 4).tolist() == [4, 5, 6, 7, 8]  # shares token 4 with row 0
    assert row_tokens(tokens, 1, 4).dtype == np.int64
