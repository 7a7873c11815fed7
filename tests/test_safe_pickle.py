"""Pickled data files (RefCOCO refs, the `info` of bottom-up-attention.pytorch (MILVLG) npz files) never run the code a
crafted file names: the readers refuse it with the file's name, and the payload is shown to be live."""

import json
import os
import pickle

import numpy as np
import pytest

from cmal.training.convert_features import convert_npz
from cmal.training.data import downstream


class Payload:
    """Unpickling this creates `marker`: what a crafted data file could do with any command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_payload_runs_under_plain_pickle(tmp_path):
    pickle.loads(pickle.dumps([Payload(tmp_path / "ran")]))
    assert (tmp_path / "ran").exists()  # so the tests below would see it run


def write_instances(tmp_path) -> str:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [{"id": 1, "width": 10, "height": 10}],
                                "annotations": [{"id": 7, "image_id": 1, "bbox": [0, 0, 5, 5]}]}))  # fmt: skip
    return str(path)


def test_refcoco_refs_with_a_payload_are_refused(tmp_path):
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{"split": "train", "payload": Payload(tmp_path / "ran")}], protocol=2))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: refusing to unpickle `posix\.system`"):
        downstream.read_refcoco(str(refs), write_instances(tmp_path), "train")
    assert not (tmp_path / "ran").exists()


def test_refcoco_refs_of_plain_data_still_load(tmp_path):
    refs = tmp_path / "refs(unc).p"
    sentences = [{"sent": "the dog", "sent_id": 0, "tokens": ["the", "dog"]}]
    refs.write_bytes(pickle.dumps([{"split": "train", "ref_id": 0, "image_id": 1, "ann_id": 7, "sentences": sentences}], protocol=2))
    table = downstream.read_refcoco(str(refs), write_instances(tmp_path), "train")
    assert table["expression"] == ["the dog"]


def write_bottom_up_npz(path, info):
    np.savez(path, x=np.ones((2, 4), np.float32), bbox=np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32),
             num_bbox=2, image_h=10, image_w=10, info=info)  # fmt: skip


def test_npz_info_with_a_payload_is_refused(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    write_bottom_up_npz(folder / "a.npz", {"objects_id": Payload(tmp_path / "ran"), "objects_conf": [0.5, 0.5]})
    with pytest.raises(ValueError, match=r"a\.npz \(info\): refusing to unpickle `posix\.system`"):
        convert_npz(str(folder), str(tmp_path / "store"))
    assert not (tmp_path / "ran").exists()


def test_npz_info_of_arrays_still_loads_without_allow_pickle(tmp_path, monkeypatch):
    folder = tmp_path / "npz"
    folder.mkdir()
    write_bottom_up_npz(folder / "a.npz", {"objects_id": np.array([3, 1]), "objects_conf": np.array([0.9, 0.4], np.float32)})
    load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **kw: load(*a, **{**kw, "allow_pickle": False}))
    assert convert_npz(str(folder), str(tmp_path / "store")) == (1, 0)
