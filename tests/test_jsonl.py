"""storage/jsonl.py: the torn-line-tolerant JSON-lines log metrics.jsonl is written as."""

from __future__ import annotations

from storage import jsonl


def test_append_then_read_round_trips(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert jsonl.read(path) == []
    records = [{"step": 0, "total_steps": 3}, {"step": 1, "loss": 2.5}, {"step": 2, "val": 0.1, "val_metric": "loss"}]
    for r in records:
        jsonl.append(path, r)
    assert jsonl.read(path) == records
    assert path.read_text() == "".join(
        f"{line}\n" for line in ('{"step": 0, "total_steps": 3}', '{"step": 1, "loss": 2.5}',
                                 '{"step": 2, "val": 0.1, "val_metric": "loss"}'))


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    jsonl.append(path, {"step": 1, "loss": 2.0})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a kill mid-write
    assert jsonl.read(path) == [{"step": 1, "loss": 2.0}]


def test_truncate_keeps_the_lines_up_to_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for r in [{"total_steps": 9}, {"step": 0}, {"step": 4, "loss": 1.0}, {"step": 5, "val": 0.2}, {"step": 8}]:
        jsonl.append(path, r)
    with open(path, "a") as f:
        f.write('{"step": 9')
    jsonl.truncate(path, 5)
    # A line without a step counts as step 0; the torn line goes too.
    assert path.read_text() == '{"total_steps": 9}\n{"step": 0}\n{"step": 4, "loss": 1.0}\n{"step": 5, "val": 0.2}\n'
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temporary left


def test_truncate_of_no_log_writes_nothing(tmp_path):
    jsonl.truncate(tmp_path / "metrics.jsonl", 3)
    assert not (tmp_path / "metrics.jsonl").exists()
