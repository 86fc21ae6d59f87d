"""The restricted unpickler: the release's annotation data loads; a pickle that would run code never runs it."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from pcm import safe_pickle


class RunsShell:
    """Unpickling this would call os.system(<touch a sentinel>)."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class OpensFile:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def annotation_rows() -> list[dict]:
    """Rows shaped like the release's mscoco_caption_anno_train.pkl (image_id, token ids, target ids, clipscore)."""
    return [{"image_id": "391895", "tokens_ids": np.array([[0, 5, 9, 2, 0]], dtype=np.int64),
             "target_ids": np.array([[5, 9, 2, 0, -1]], dtype=np.int64), "clipscore": np.float32(0.31),
             "split_id": 3},
            {"image_id": "522418", "tokens_ids": np.zeros((2, 4), np.int32), "target_ids": np.zeros((2, 4), np.int32),
             "clipscore": 0.27, "extra": (1, 2.5, None, True, {"a", "b"}, frozenset({1}), b"raw", 3 + 1j)}]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_data_round_trips(tmp_path, protocol):
    rows = annotation_rows()
    path = tmp_path / "anno.pkl"
    path.write_bytes(pickle.dumps(rows, protocol=protocol))
    got = safe_pickle.load(path)
    assert len(got) == 2 and got[0]["image_id"] == "391895"
    np.testing.assert_array_equal(got[0]["tokens_ids"], rows[0]["tokens_ids"])
    assert got[0]["tokens_ids"].dtype == np.int64 and got[1]["tokens_ids"].dtype == np.int32
    assert got[0]["clipscore"] == np.float32(0.31) and isinstance(got[0]["clipscore"], np.float32)
    assert got[1]["extra"] == rows[1]["extra"]


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_pickle_calling_os_system_is_refused_and_never_runs(tmp_path, protocol):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([{"image_id": "1", "x": RunsShell(str(sentinel))}], protocol=protocol))
    with pytest.raises(safe_pickle.UnsafePickleError) as e:
        safe_pickle.load(path)
    assert "system" in str(e.value) and str(path) in str(e.value)  # names the callable and the file
    assert not sentinel.exists()
    pickle.loads(path.read_bytes())  # control: the plain unpickler does run it
    assert sentinel.exists()


def test_builtins_that_run_code_are_refused(tmp_path):
    sentinel = tmp_path / "opened"
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"io\.open"):
        safe_pickle.loads(pickle.dumps(OpensFile(str(sentinel))))
    assert not sentinel.exists()
    eval_payload = b"cbuiltins\neval\n(S'1+1'\ntR."
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"builtins\.eval"):
        safe_pickle.loads(eval_payload)


def test_a_class_outside_the_list_is_named(tmp_path):
    import collections

    data = pickle.dumps(collections.Counter("ab"))
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"collections\.Counter"):
        safe_pickle.loads(data, "anno.pkl")


def test_torch_tensors_only_when_asked_and_through_weights_only_load():
    import torch

    payload = (["dog", "cat"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    data = pickle.dumps(payload)
    with pytest.raises(safe_pickle.UnsafePickleError, match="torch"):
        safe_pickle.loads(data, "concepts.pickle")
    words, emb = safe_pickle.loads(data, "concepts.pickle", allow_torch=True)
    assert words == ["dog", "cat"]
    torch.testing.assert_close(emb, payload[1])


def test_garbage_is_a_clear_error_naming_the_source():
    with pytest.raises(ValueError, match="anno.pkl: not a readable pickle"):
        safe_pickle.loads(b"\x80\x04garbage", "anno.pkl")


def test_python2_bytes_fields_decode():
    legacy = {b"image_id": b"42", b"clipscore": 0.5}
    assert safe_pickle.decode_keys(legacy) == {"image_id": b"42", "clipscore": 0.5}
    assert safe_pickle.text(b"42") == "42"
