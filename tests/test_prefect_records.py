"""Prefect cache records are kept off the shared run root, so a record planted there never runs code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import Payload
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, PickleSerializer

from flows.records import results_dir
from pcm.stages.ingest import IngestConfig

CAPTIONS = "a dog on the grass\na cat on a sofa\na red car in the street\n"


@pytest.fixture
def sentinel(tmp_path: Path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a planted record ran code"


def pickled_record(path: Path, target: Path) -> bytes:
    """A real Prefect pickle record whose payload creates `target` when unpickled."""
    record = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(), storage_key=str(path)),
                          result=Payload(target))
    return record.serialize()


def class_record(path: Path, qualified: str) -> bytes:
    record = {"metadata": {"storage_key": str(path), "expiration": None,
                           "serializer": JSONSerializer().model_dump(mode="json"), "prefect_version": "3.9.1",
                           "storage_block_id": None},
              "result": json.dumps({"__class__": qualified, "data": {}})}
    return json.dumps(record).encode()


def test_records_live_outside_the_run_root_one_directory_per_root(tmp_path):
    a, b = results_dir(tmp_path / "a"), results_dir(tmp_path / "b")
    assert a != b and a == results_dir(tmp_path / "a" / ".." / "a")
    assert not a.is_relative_to(tmp_path)


def test_a_prefect_home_inside_the_run_root_is_warned_about(tmp_path, monkeypatch, caplog):
    import flows.records as records

    monkeypatch.setattr(records, "prefect_home", lambda: tmp_path / "runs" / ".prefect")
    with caplog.at_level("WARNING", logger="flows.records"):
        results_dir(tmp_path / "runs")
    assert "lies inside the run root" in caplog.text


def test_records_planted_in_the_run_root_are_never_read(tmp_path, monkeypatch, sentinel, prefect_api):
    from flows.ingest import ingest_flow

    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "evil_mod.py").write_text(f"open({str(sentinel)!r}, 'w')\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(planted))
    src = tmp_path / "caps.txt"
    src.write_text(CAPTIONS)
    root = tmp_path / "runs"
    first = ingest_flow(IngestConfig(source=str(src)), root=str(root))
    key = f"ingest-{first.fingerprint}"
    assert (results_dir(root) / key).is_file() and not (root / ".prefect-results").exists()
    # What a writer of the shared root could plant where the records used to be, and beside the stage.
    for where in (root / ".prefect-results", root / "ingest"):
        where.mkdir(parents=True, exist_ok=True)
        (where / key).write_bytes(pickled_record(where / key, sentinel))
        (where / f"{key}-class").write_bytes(class_record(where / key, "evil_mod.Thing"))
    second = ingest_flow(IngestConfig(source=str(src)), root=str(root))
    assert second.path == first.path and second.counts == first.counts
