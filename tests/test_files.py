"""The one atomic writer and the checkpoint reader (fastdarts.files, SPEC §14)."""
import errno
import json
import os

import matplotlib.figure
import pytest
import torch

import fastdarts.files as files
from fastdarts.errors import FastDartsError
from fastdarts.files import (WriteError, atomic_write, check_writable, finite_json, read_torch, save_figure,
                             save_torch, write_json, write_jsonl, write_text)


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing_behind(tmp_path, monkeypatch, where):
    path = tmp_path / "f.txt"
    write_text(path, "old\n")

    def write(tmp):
        tmp.write_text("new, half")
        if where == "write":
            _full()

    if where == "fsync":
        monkeypatch.setattr(files.os, "fsync", _full)
    if where == "replace":
        monkeypatch.setattr(files.os, "replace", _full)
    with pytest.raises(WriteError) as info:
        atomic_write(path, write)
    assert str(info.value) == f"cannot write {path}: the disk is full (no space left on device); " \
                              f"the previous file is kept"
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_torch_save_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch.save to a path reports a failed write as an opaque RuntimeError;
    the writer saves through a file object, whose OSError names the cause."""
    path = tmp_path / "c.pt"
    save_torch(path, {"a": torch.ones(2)})

    class FullFile:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        write = _full

    monkeypatch.setattr(files, "open", FullFile, raising=False)
    with pytest.raises(WriteError, match="c.pt: the disk is full"):
        save_torch(path, {"a": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(read_torch(path)["a"], torch.ones(2)) and not (tmp_path / "c.pt.tmp").exists()


def test_a_runtime_error_of_the_writer_is_a_write_error_too(tmp_path):
    def write(tmp):
        tmp.write_bytes(b"x")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(WriteError, match="file write failed$"):
        atomic_write(tmp_path / "x.pt", write)
    assert not list(tmp_path.iterdir())


def test_an_interrupt_is_not_swallowed_and_leaves_no_temporary(tmp_path):
    def write(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x", write)
    assert not list(tmp_path.iterdir())


def test_figures_go_through_the_writer(tmp_path, monkeypatch):
    fig = matplotlib.figure.Figure()
    fig.subplots().plot([0, 1])
    save_figure(fig, tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _full)
    with pytest.raises(WriteError, match="a.png: the disk is full"):
        save_figure(fig, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == before and before[:4] == b"\x89PNG"


def test_json_is_strict(tmp_path):
    document = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "x"}
    assert finite_json(document) == {"a": None, "b": [1.0, None, {"c": None}], "d": "x"}
    write_json(tmp_path / "d.json", document)
    write_jsonl(tmp_path / "m.jsonl", [document, {"e": 2}])

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))

    assert strict((tmp_path / "d.json").read_text())["b"] == [1.0, None, {"c": None}]
    assert [strict(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()][1] == {"e": 2}


def test_check_writable(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "deeper")  # created later, under a writable folder
    assert not (tmp_path / "new").exists() and not list(tmp_path.iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(FastDartsError, match="--out .*file is a file, not a directory"):
        check_writable(tmp_path / "file")
    with pytest.raises(FastDartsError, match="cannot be created: .*file is a file"):
        check_writable(tmp_path / "file" / "sub")

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    # Root writes into a read-only folder anyway, so the refusal is injected.
    monkeypatch.setattr(files.tempfile, "mkstemp", refused)
    with pytest.raises(FastDartsError, match=r"--out .*ro is not writable \(in .*, where it would be created\): "
                                             r"permission denied; choose another folder"):
        check_writable(tmp_path / "ro")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_on_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(FastDartsError, match="is not writable: permission denied"):
            check_writable(folder)
    finally:
        folder.chmod(0o700)
