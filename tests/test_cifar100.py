"""CIFAR-100 (python format): parsing, class names and the verified download, on small files
written at test time in the exact format of ``cifar-100-python.tar.gz``."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdarts.data import cifar100
from fastdarts.data.cifar100 import (
    ARCHIVE,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FOLDER,
    download_cifar100,
    load_cifar100,
)
from fastdarts.errors import FastDartsError

# Fine labels with both ends of 0..99; the coarse label of each is its fine label // 5, as a
# reader that took the coarse ones (or CIFAR-10's b'labels', absent here) would show.
TRAIN_FINE = [99, 0, 57, 13, 86]
TEST_FINE = [3, 99, 50]
CLASS_NAMES = [f"class_{k:02d}" for k in range(100)]


def expected_pixels(first: int, n: int) -> np.ndarray:
    """A pattern whose value depends on (image, channel, row, column) differently: [n, 3, 32, 32]."""
    i, c, y, x = np.meshgrid(np.arange(first, first + n), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((i * 31 + c * 97 + y * 7 + x) % 256).astype(np.uint8)


def batch_dict(first: int, fine: list[int], label: bytes) -> dict:
    """A file in the exact CIFAR-100 python format: pixels channel-major per row, fine and coarse labels."""
    n = len(fine)
    return {
        b"filenames": [f"img_{first + k}.png".encode() for k in range(n)],
        b"batch_label": label,
        b"fine_labels": list(fine),
        b"coarse_labels": [f // 5 for f in fine],
        b"data": expected_pixels(first, n).reshape(n, 3072),
    }


def train_batch_dict() -> dict:
    return batch_dict(0, TRAIN_FINE, b"training batch 1 of 1")


def held_out_batch_dict() -> dict:
    return batch_dict(len(TRAIN_FINE), TEST_FINE, b"testing batch 1 of 1")


def meta_dict() -> dict:
    return {b"fine_label_names": [name.encode() for name in CLASS_NAMES],
            b"coarse_label_names": [f"superclass_{k:02d}".encode() for k in range(20)]}


class Python2Pickler(pickle._Pickler):
    """Writes as Python 2's cPickle wrote CIFAR-100: bytes and str as Python 2 str, bools as ints."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    def save_py2_bool(self, obj):
        self.save_long(int(obj))

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str
    dispatch[bool] = save_py2_bool


def python2_dumps(obj: object) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    # numpy 1's module name, as the file on the site has it (protocol 2 has no frames to fix up)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def dumps(obj: object, writer: int | str = 2) -> bytes:
    return python2_dumps(obj) if writer == "python2" else pickle.dumps(obj, protocol=writer)


def write_folder(root: Path, writer: int | str = 2) -> Path:
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for name, content in (("train", train_batch_dict()), ("test", held_out_batch_dict()), ("meta", meta_dict())):
        (folder / name).write_bytes(dumps(content, writer))
    return folder


def make_archive(tmp_path: Path) -> tuple[Path, str]:
    """A small ``cifar-100-python.tar.gz`` in ``tmp_path/src``, with the real one's stray ``file.txt~``,
    and its md5."""
    folder = write_folder(tmp_path / "staging")
    (folder / "file.txt~").write_text("")
    archive = tmp_path / "src" / ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=FOLDER)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def error_message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def refusal(path: Path, problem: str) -> str:
    return f"CIFAR-100 file {path} {problem}: delete {path.parent} and run again with --download"


# --- parsing -----------------------------------------------------------------


@pytest.mark.parametrize("writer", ["python2", 2, 3, 4, 5])
def test_load_cifar100_decodes_channel_major_with_fine_labels(tmp_path, writer):
    write_folder(tmp_path, writer)
    ds = load_cifar100(tmp_path)
    n_train, n_test = len(TRAIN_FINE), len(TEST_FINE)
    assert ds.train.images.shape == (n_train, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (n_test, 3, 32, 32) and ds.train.images.is_contiguous()
    assert np.array_equal(ds.train.images.numpy(), expected_pixels(0, n_train))
    assert np.array_equal(ds.test.images.numpy(), expected_pixels(n_train, n_test))
    assert ds.train.images[4, 2, 5, 9].item() == (4 * 31 + 2 * 97 + 5 * 7 + 9) % 256
    assert ds.train.labels.dtype == torch.int64
    assert ds.train.labels.tolist() == TRAIN_FINE and ds.test.labels.tolist() == TEST_FINE
    assert ds.classes == tuple(CLASS_NAMES)
    assert (ds.name, ds.num_classes, ds.crop_padding, ds.flip, ds.in_channels, ds.image_size) == (
        "cifar100", 100, 4, True, 3, 32)
    assert ds.mean == CIFAR100_MEAN == (0.5071, 0.4865, 0.4409)
    assert ds.std == CIFAR100_STD == (0.2673, 0.2564, 0.2762)


def test_coarse_labels_alone_are_refused(tmp_path):
    folder = write_folder(tmp_path)
    batch = train_batch_dict()
    batch[b"labels"] = batch.pop(b"fine_labels")  # CIFAR-10's key is not CIFAR-100's
    (folder / "train").write_bytes(dumps(batch))
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar100(tmp_path)
    assert error_message(excinfo) == refusal(folder / "train", "lacks the b'data' or b'fine_labels' entry")


@pytest.mark.parametrize("label", [100, -1, 255])
def test_labels_outside_0_99_are_refused(tmp_path, label):
    folder = write_folder(tmp_path)
    batch = held_out_batch_dict()
    batch[b"fine_labels"][1] = label
    (folder / "test").write_bytes(dumps(batch))
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar100(tmp_path)
    assert error_message(excinfo) == refusal(folder / "test", "has labels outside 0..99")


def test_corrupt_file_is_named(tmp_path):
    folder = write_folder(tmp_path)
    (folder / "train").write_bytes(b"\x00\xffnot a pickle at all" * 10)
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar100(tmp_path)
    message = error_message(excinfo)
    start, end = refusal(folder / "train", "is corrupt (").split("(")
    assert message.startswith(start + "(") and message.endswith(end), message


def test_missing_file_is_named(tmp_path):
    folder = write_folder(tmp_path)
    (folder / "test").unlink()
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar100(tmp_path)
    assert error_message(excinfo) == refusal(folder / "test", "is missing")


def test_missing_data_without_download_says_download(tmp_path):
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar100(tmp_path)
    assert error_message(excinfo) == (
        f"CIFAR-100 not found: no folder {tmp_path / FOLDER}; pass --download to fetch it into {tmp_path}")


# --- files that would run code on load ---------------------------------------


class RunsCommand:
    """Unpickled by plain pickle, this runs ``call(*args)``: the planted file."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def touch(marker: Path) -> RunsCommand:
    return RunsCommand(os.system, "touch " + shlex.quote(str(marker)))


@pytest.mark.parametrize("name", ["train", "test"])
def test_planted_batch_runs_nothing_and_is_named(tmp_path, name):
    marker = tmp_path / "MARKER"
    folder = write_folder(tmp_path / "data")
    batch = train_batch_dict()
    batch[b"data"] = touch(marker)
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    assert pickle.loads((folder / name).read_bytes()) is not None and marker.exists()  # it would run code
    marker.unlink()
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar100(tmp_path / "data")
    assert not marker.exists()
    system = f"{os.system.__module__}.system"  # posix.system here
    assert error_message(excinfo) == refusal(
        folder / name, f"is not a CIFAR batch (it asks to load {system}, which the format never holds)")


def test_planted_meta_runs_nothing_and_is_named(tmp_path):
    marker = tmp_path / "MARKER"
    folder = write_folder(tmp_path / "data")
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": touch(marker)}, protocol=2))
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar100(tmp_path / "data")
    assert not marker.exists()
    system = f"{os.system.__module__}.system"
    assert error_message(excinfo) == refusal(
        folder / "meta", f"is not a CIFAR meta file (it asks to load {system}, which the format never holds)")


# --- class names ---------------------------------------------------------------


def names_as_str(meta: dict) -> None:  # as a Python 3 pickle of str names holds them
    meta[b"fine_label_names"] = list(CLASS_NAMES)


@pytest.mark.parametrize("change", [lambda meta: None, names_as_str], ids=["bytes", "str"])
def test_class_names_come_from_meta(tmp_path, change):
    folder = write_folder(tmp_path)
    meta = meta_dict()
    change(meta)
    (folder / "meta").write_bytes(dumps(meta))
    assert load_cifar100(tmp_path).classes == tuple(CLASS_NAMES)


def meta_with(key: bytes, value: object, writer: int | str = 2) -> bytes:
    meta = meta_dict()
    meta[key] = value
    return dumps(meta, writer)


BAD_META = {  # what ``meta`` holds: the data still loads, without names
    "missing": None,
    "garbage": b"\x00\xffnot a pickle",
    "not-a-dict": dumps([name.encode() for name in CLASS_NAMES]),
    "no-fine-names": dumps({b"coarse_label_names": meta_dict()[b"coarse_label_names"]}),
    "99-names": meta_with(b"fine_label_names", [name.encode() for name in CLASS_NAMES[:99]]),
    "101-names": meta_with(b"fine_label_names", [name.encode() for name in CLASS_NAMES + ["extra"]]),
    "an-int-name": meta_with(b"fine_label_names", [name.encode() for name in CLASS_NAMES[:99]] + [7]),
    # protocol 4: Python 3 writes b"" as a call of builtins.bytes at protocol 2, which safe_pickle refuses
    "an-empty-name": meta_with(b"fine_label_names", [name.encode() for name in CLASS_NAMES[:99]] + [b""], 4),
    "not-utf8": meta_with(b"fine_label_names", [name.encode() for name in CLASS_NAMES[:99]] + [b"\xff\xfe"]),
    "a-newline": meta_with(b"fine_label_names", [name.encode() for name in CLASS_NAMES[:99]] + [b"a\nb"]),
    "a-duplicate": meta_with(b"fine_label_names", [name.encode() for name in CLASS_NAMES[:99] + CLASS_NAMES[:1]]),
}


@pytest.mark.parametrize("what", list(BAD_META))
def test_bad_meta_gives_no_class_names(tmp_path, what):
    folder = write_folder(tmp_path)
    if BAD_META[what] is None:
        (folder / "meta").unlink()
    else:
        (folder / "meta").write_bytes(BAD_META[what])
    ds = load_cifar100(tmp_path)
    assert ds.classes == ()
    assert ds.train.labels.tolist() == TRAIN_FINE


# --- download ------------------------------------------------------------------


def test_download_from_file_url_then_reuse(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "data"
    folder = download_cifar100(root, url=archive.as_uri(), md5=md5)
    assert folder == root / FOLDER
    assert sorted(p.name for p in root.iterdir()) == sorted([ARCHIVE, FOLDER])
    assert sorted(p.name for p in folder.iterdir()) == ["file.txt~", "meta", "test", "train"]
    ds = load_cifar100(root)
    assert ds.train.labels.tolist() == TRAIN_FINE and ds.classes == tuple(CLASS_NAMES)

    missing = (tmp_path / "nowhere" / ARCHIVE).as_uri()
    assert download_cifar100(root, url=missing, md5=md5) == folder  # extracted: no second download
    (root / ARCHIVE).unlink()  # the folder is what is read: the archive may go
    assert download_cifar100(root, url=missing, md5=md5) == folder
    assert load_cifar100(root, download=True).test.labels.tolist() == TEST_FINE


def test_load_with_download_fetches_the_archive(tmp_path, monkeypatch):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(FastDartsError):
        load_cifar100(root)
    monkeypatch.setattr(cifar100, "URL", archive.as_uri())
    monkeypatch.setattr(cifar100, "MD5", md5)
    ds = load_cifar100(root, download=True)
    assert ds.train.labels.tolist() == TRAIN_FINE and (root / ARCHIVE).read_bytes() == archive.read_bytes()


def test_wrong_md5_extracts_nothing(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "data"
    wrong = "0" * 32
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar100(root, url=archive.as_uri(), md5=wrong)
    assert error_message(excinfo) == (
        f"checksum mismatch for {ARCHIVE} downloaded from {archive.as_uri()}: expected md5 {wrong}, "
        f"got {md5}; the download was deleted, retry")
    assert list(root.iterdir()) == []


def test_unreachable_url_names_the_data_set(tmp_path):
    url = (tmp_path / "nowhere" / ARCHIVE).as_uri()
    root = tmp_path / "data"
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar100(root, url=url)
    message = error_message(excinfo)
    assert message.startswith(f"could not download CIFAR-100 from {url} (")
    assert message.endswith(f"); place {ARCHIVE} in {root} by hand and run again"), message
    assert list(root.iterdir()) == []


def test_another_archive_is_refused(tmp_path):
    (tmp_path / "staging" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "staging" / "cifar-10-batches-py" / "data_batch_1").write_bytes(dumps(train_batch_dict()))
    archive = tmp_path / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    root = tmp_path / "data"
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar100(root, url=archive.as_uri(), md5=hashlib.md5(archive.read_bytes()).hexdigest())
    assert error_message(excinfo) == (
        f"{root / ARCHIVE} holds an unexpected entry 'cifar-10-batches-py': delete the file and retry")
    assert [p.name for p in root.iterdir()] == [ARCHIVE]


def test_an_archive_without_the_folder_is_named(tmp_path):
    archive = tmp_path / ARCHIVE
    with tarfile.open(archive, "w:gz"):
        pass
    root = tmp_path / "data"
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar100(root, url=archive.as_uri(), md5=hashlib.md5(archive.read_bytes()).hexdigest())
    assert error_message(excinfo) == (f"{root / ARCHIVE} has no folder {FOLDER}, so it is not the CIFAR-100 "
                                      f"archive: delete the file and retry")
    assert [p.name for p in root.iterdir()] == [ARCHIVE]
