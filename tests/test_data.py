"""Data sets, download, augmentation and the device loader (SPEC §5), on a fake CIFAR-10."""
from __future__ import annotations

import copyreg
import hashlib
import io
import os
import pickle
import pickletools
import shlex
import struct
import subprocess
import tarfile
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdarts.data import (
    CIFAR10_MEAN,
    DATASETS,
    DeviceLoader,
    ImageSet,
    download_cifar10,
    load_cifar10,
    load_dataset,
    load_digits,
)
from fastdarts.cli import search_main
from fastdarts.data.augment import cutout, normalize, random_crop, random_flip, to_float
from fastdarts.data.cifar10 import ARCHIVE, FOLDER, TEST_FILES, TRAIN_FILES
from fastdarts.data.safe_pickle import RefusedPickle, safe_load
from fastdarts.errors import FastDartsError

PER_FILE = 3  # images per fake batch file


def expected_pixels(first: int, n: int) -> np.ndarray:
    """A pattern whose value depends on (image, channel, row, column) differently: [n, 3, 32, 32]."""
    i, c, y, x = np.meshgrid(np.arange(first, first + n), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((i * 31 + c * 97 + y * 7 + x) % 256).astype(np.uint8)


def batch_dict(first: int, n: int = PER_FILE) -> dict:
    """A batch in the exact CIFAR-10 python format, pixels laid out channel-major per row."""
    return {
        b"batch_label": b"fake batch",
        b"labels": [(first + k) % 10 for k in range(n)],
        b"data": expected_pixels(first, n).reshape(n, 3072),
        b"filenames": [f"img_{first + k}.png".encode() for k in range(n)],
    }


def write_folder(root: Path) -> Path:
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for k, name in enumerate(TRAIN_FILES + TEST_FILES):
        with open(folder / name, "wb") as f:
            pickle.dump(batch_dict(k * PER_FILE), f, protocol=2)
    return folder


def make_archive(tmp_path: Path) -> tuple[Path, str]:
    """A fake ``cifar-10-python.tar.gz`` in ``tmp_path/src``, and its md5."""
    write_folder(tmp_path / "staging")
    archive = tmp_path / "src" / ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "staging" / FOLDER, arcname=FOLDER)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def error_message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- CIFAR-10 parsing -------------------------------------------------------


def test_load_cifar10_decodes_channel_major(tmp_path):
    write_folder(tmp_path)
    ds = load_cifar10(tmp_path)
    n_train = len(TRAIN_FILES) * PER_FILE
    assert ds.train.images.shape == (n_train, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (PER_FILE, 3, 32, 32)
    assert ds.train.images.is_contiguous()
    assert np.array_equal(ds.train.images.numpy(), expected_pixels(0, n_train))
    assert np.array_equal(ds.test.images.numpy(), expected_pixels(n_train, PER_FILE))
    assert ds.train.images[4, 2, 5, 9].item() == (4 * 31 + 2 * 97 + 5 * 7 + 9) % 256
    assert ds.train.labels.dtype == torch.int64
    assert ds.train.labels.tolist() == [k % 10 for k in range(n_train)]
    assert ds.test.labels.tolist() == [(n_train + k) % 10 for k in range(PER_FILE)]
    assert (ds.num_classes, ds.crop_padding, ds.flip, ds.in_channels, ds.image_size) == (10, 4, True, 3, 32)
    assert ds.mean == CIFAR10_MEAN


def test_missing_data_without_download_says_download(tmp_path):
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar10(tmp_path)
    message = error_message(excinfo)
    assert "--download" in message and str(tmp_path / FOLDER) in message


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot a pickle at all" * 10)


def corrupt_no_labels(path: Path) -> None:
    batch = batch_dict(0)
    del batch[b"labels"]
    path.write_bytes(pickle.dumps(batch, protocol=2))


def corrupt_shape(path: Path) -> None:
    batch = batch_dict(0)
    batch[b"data"] = batch[b"data"][:, :3000]
    path.write_bytes(pickle.dumps(batch, protocol=2))


def corrupt_dtype(path: Path) -> None:
    batch = batch_dict(0)
    batch[b"data"] = batch[b"data"].astype(np.float32)
    path.write_bytes(pickle.dumps(batch, protocol=2))


def corrupt_label(path: Path) -> None:
    batch = batch_dict(0)
    batch[b"labels"][1] = 10
    path.write_bytes(pickle.dumps(batch, protocol=2))


def corrupt_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize(
    "corrupt, name",
    [
        (corrupt_garbage, "data_batch_3"),
        (corrupt_no_labels, "data_batch_2"),
        (corrupt_shape, "test_batch"),
        (corrupt_dtype, "data_batch_1"),
        (corrupt_label, "data_batch_5"),
        (corrupt_truncated, "data_batch_4"),
        (Path.unlink, "data_batch_4"),
    ],
)
def test_bad_batch_file_is_named(tmp_path, corrupt, name):
    folder = write_folder(tmp_path)
    corrupt(folder / name)
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar10(tmp_path)
    assert str(folder / name) in error_message(excinfo)


# --- CIFAR-10 files that would run code on load -------------------------------
#
# The md5 covers the downloaded archive only: whoever can write into the
# folder can plant a batch file. Reading one must run nothing (safe_pickle).


class RunsCommand:
    """Unpickled by plain pickle, this runs ``call(*args)``: the planted batch."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def touch_command(marker: Path) -> str:
    return "touch " + shlex.quote(str(marker))


def hostile_os_system(marker: Path) -> object:
    return RunsCommand(os.system, touch_command(marker))


def hostile_eval(marker: Path) -> object:
    return RunsCommand(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()")


def hostile_popen(marker: Path) -> object:
    return RunsCommand(subprocess.Popen, ["touch", str(marker)])


def hostile_object_array(marker: Path) -> object:
    return np.array([1, "a"], dtype=object)


HOSTILE = {  # what the planted batch holds as b"data", and what the refusal names
    "os.system": (hostile_os_system, ("posix.system", "os.system", "nt.system")),
    "builtins.eval": (hostile_eval, ("builtins.eval",)),  # written as __builtin__.eval (protocol 2)
    "subprocess.Popen": (hostile_popen, ("subprocess.Popen",)),  # written as commands.Popen
    "object dtype": (hostile_object_array, ("dtype O",)),
}


def plant(folder: Path, name: str, data: object) -> Path:
    """Replace batch ``name`` by a valid-looking batch whose b"data" is ``data``."""
    batch = batch_dict(0)
    batch[b"data"] = data
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder / name


def wait_for(marker: Path) -> bool:
    """Whether ``marker`` appears within a moment (a Popen'ed touch would run in the background)."""
    deadline = time.monotonic() + 0.5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return marker.exists()


@pytest.mark.parametrize("what", list(HOSTILE))
def test_planted_batch_runs_nothing(tmp_path, what):
    make, needles = HOSTILE[what]
    marker = tmp_path / "MARKER"
    path = plant(write_folder(tmp_path / "data"), "data_batch_1", make(marker))
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar10(tmp_path / "data")
    message = error_message(excinfo)
    assert not wait_for(marker)
    assert str(path) in message and "is not a CIFAR batch" in message and "--download" in message, message
    assert any(needle in message for needle in needles), message


def test_planted_batch_os_system_message(tmp_path):
    marker = tmp_path / "MARKER"
    folder = write_folder(tmp_path / "data")
    plant(folder, "data_batch_1", hostile_os_system(marker))
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar10(tmp_path / "data")
    assert not marker.exists()
    system = f"{os.system.__module__}.system"  # posix.system here
    assert error_message(excinfo) == (
        f"CIFAR-10 file {folder / 'data_batch_1'} is not a CIFAR batch (it asks to load {system}, which the "
        f"format never holds): delete {folder} and run again with --download")


def test_planted_batch_through_the_cli(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    folder = write_folder(tmp_path / "data")
    plant(folder, "data_batch_1", hostile_os_system(marker))
    code = search_main(["--dataset", "cifar10", "--data", str(tmp_path / "data"), "--epochs", "1",
                        "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fastdarts-search: error: "), err
    assert str(folder / "data_batch_1") in err[0] and "system" in err[0], err


class PersistentPickler(pickle.Pickler):
    """Writes ``RunsCommand`` objects as persistent ids, for a ``persistent_load`` to resolve."""

    def persistent_id(self, obj):
        return ("touch", str(obj.args[0])) if isinstance(obj, RunsCommand) else None


def test_persistent_id_is_refused(tmp_path):
    folder = write_folder(tmp_path / "data")
    batch = batch_dict(0)
    batch[b"labels"] = RunsCommand(str, tmp_path / "MARKER")
    buffer = io.BytesIO()
    PersistentPickler(buffer, protocol=2).dump(batch)
    (folder / "test_batch").write_bytes(buffer.getvalue())
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar10(tmp_path / "data")
    message = error_message(excinfo)
    assert str(folder / "test_batch") in message and "external object" in message, message


class ForgedDtype:
    """Pickles as ``numpy.dtype(spec, False, copy)`` with the dtype state ``state`` (BUILD)."""

    def __init__(self, state, spec="u1", copy=True):
        self.state, self.spec, self.copy = state, spec, copy

    def __reduce__(self):
        return np.dtype, (self.spec, False, self.copy), self.state


RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, in numpy.core or numpy._core


class ForgedArray:
    """Pickles as numpy does an array, with a dtype of our making."""

    def __init__(self, dtype, raw=bytes(3072)):
        self.dtype, self.raw = dtype, raw

    def __reduce__(self):
        return RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (1, len(self.raw)), self.dtype, False, self.raw)


HAS_OBJECT = 0x3F  # the flags of an object dtype: numpy would treat the raw bytes as object pointers


@pytest.mark.parametrize(
    "dtype",
    [
        ForgedDtype((3, "|", None, None, None, -1, -1, HAS_OBJECT)),
        ForgedDtype((3, "|", None, None, None, -1, -1, HAS_OBJECT), copy=False),  # aims at numpy's own uint8
        ForgedDtype((3, "|", None, ("a",), {"a": (np.dtype("i8"), 1000)}, 1, 1, 0)),
        ForgedDtype(None, spec="O8"),
        ForgedDtype(None, spec="f4"),
        ForgedDtype(None, spec="V8"),
    ],
    ids=["object-flags", "object-flags-on-numpy's-own", "fields", "object", "float", "void"],
)
def test_forged_dtype_is_refused(tmp_path, dtype):
    folder = write_folder(tmp_path / "data")
    plant(folder, "data_batch_2", ForgedArray(dtype))
    with pytest.raises(FastDartsError) as excinfo:
        load_cifar10(tmp_path / "data")
    message = error_message(excinfo)
    assert str(folder / "data_batch_2") in message and "is not a CIFAR batch" in message and "dtype" in message
    assert np.dtype("u1").flags == 0 and np.dtype("u1").fields is None  # numpy's own dtype untouched


def test_admitted_globals_cannot_be_modified():
    # GLOBAL numpy.dtype; BUILD (None, {"__defaults__": None}) on it; STOP
    raw = b"\x80\x02cnumpy\ndtype\nN}X\x0c\x00\x00\x00__defaults__Ns\x86b."
    with pytest.raises(RefusedPickle, match="modify numpy.dtype"):
        safe_load(io.BytesIO(raw))
    raw = b"\x80\x02cnumpy\nndarray\n(K\x01tR."  # numpy.ndarray((1,)): uninitialised memory
    with pytest.raises(RefusedPickle, match="numpy.ndarray"):
        safe_load(io.BytesIO(raw))


PYTHON2_NAMES = {"__builtin__.eval": "builtins.eval", "copy_reg._reconstructor": "copyreg._reconstructor"}


def global_pickles(module: str, name: str) -> list[bytes]:
    """Pickles that only load ``module.name``: by GLOBAL (protocol 2) and STACK_GLOBAL (4)."""
    def short(text: str) -> bytes:
        data = text.encode()
        return b"\x8c" + bytes([len(data)]) + data

    raws = [b"\x80\x04" + short(module) + short(name) + b"\x93."]
    if "\n" not in module + name:
        raws.append(b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n.")
    return raws


@pytest.mark.parametrize(
    "module, name",
    [
        ("numpy", "load"),
        ("numpy", "fromfile"),
        ("numpy.testing", "assert_equal"),
        ("numpy.ctypeslib", "as_array"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct.__globals__"),
        ("numpy", "dtype.__init__"),
        ("numpy.core", "multiarray"),
        ("numpy.core.multiarray ", "_reconstruct"),
        ("numpy._core.numeric", "frombuffer"),
        ("_codecs", "decode"),
        ("codecs", "encode"),
        ("builtins", "getattr"),
        ("__builtin__", "eval"),
        ("copyreg", "_reconstructor"),
        ("copy_reg", "_reconstructor"),
        ("posix", "system"),
        ("fastdarts.data.safe_pickle", "SafeUnpickler"),
        ("numpy", "ndarray\nposix system"),
    ],
)
def test_only_the_exact_admitted_globals_load(module, name):
    for raw in global_pickles(module, name):
        with pytest.raises(RefusedPickle) as excinfo:
            safe_load(io.BytesIO(raw))
        message = str(excinfo.value)
        assert "\n" not in message and "asks to load" in message
        shown = PYTHON2_NAMES.get(f"{module}.{name}", f"{module}.{name}")  # named as pickle would load it
        assert shown in message or "\n" in name, message


def test_extension_codes_are_checked_too():
    copyreg.add_extension("posix", "system", 240)
    try:
        with pytest.raises(RefusedPickle, match="posix.system"):
            safe_load(io.BytesIO(b"\x80\x02\x82\xf0."))  # EXT1 240
    finally:
        copyreg.remove_extension("posix", "system", 240)


# --- CIFAR-10 files as Python 2 and 3, numpy 1 and 2 write them ---------------


class Python2Pickler(pickle._Pickler):
    """Writes as Python 2's cPickle wrote CIFAR-10: str and bytes as Python 2 str
    (BINSTRING), bools as ints (old numpy's dtype arguments)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def save_py2_bool(self, obj):
        self.save_long(int(obj))

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str
    dispatch[bool] = save_py2_bool


def rename_module(raw: bytes, old: str, new: str) -> bytes:
    """``raw`` with the module name ``old`` of its globals replaced by ``new``: in
    GLOBAL (newline-terminated) and SHORT_BINUNICODE (length-prefixed, inside a
    FRAME whose length is fixed) opcodes."""
    ops = list(pickletools.genops(raw))
    frames = [pos for op, _, pos in ops if op.name == "FRAME"]
    out = bytearray(raw)
    for op, arg, pos in reversed(ops):
        if op.name == "GLOBAL" and arg.split(" ")[0] == old:
            start, end, replacement = pos + 1, pos + 1 + len(old), new.encode()
        elif op.name == "SHORT_BINUNICODE" and arg == old:
            start, end, replacement = pos, pos + 2 + len(old), b"\x8c" + bytes([len(new)]) + new.encode()
        else:
            continue
        out[start:end] = replacement
        frame = max((f for f in frames if f < pos), default=None)
        if frame is not None:
            length = int.from_bytes(out[frame + 1 : frame + 9], "little") + len(replacement) - (end - start)
            out[frame + 1 : frame + 9] = length.to_bytes(8, "little")
    return bytes(out)


class RecordingUnpickler(pickle.Unpickler):
    """Plain unpickling (of our own files) that records the globals it loads."""

    def __init__(self, file):
        super().__init__(file, encoding="bytes")
        self.loaded = set()

    def find_class(self, module, name):
        self.loaded.add(f"{module}.{name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 on the numpy.core names
            return super().find_class(module, name)


def python3(protocol: int):
    return lambda batch: pickle.dumps(batch, protocol=protocol)


def python2(batch) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(batch)
    return rename_module(buffer.getvalue(), "numpy._core.multiarray", "numpy.core.multiarray")


def numpy1(protocol: int):
    def write(batch) -> bytes:
        raw = pickle.dumps(batch, protocol=protocol)
        raw = rename_module(raw, "numpy._core.multiarray", "numpy.core.multiarray")
        return rename_module(raw, "numpy._core.numeric", "numpy.core.numeric")
    return write


WRITERS = {  # how a batch file is written, and the numpy globals it then names
    "python2-cPickle": (python2, {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}),
    "protocol-0": (python3(0), {"numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}),
    "protocol-2": (python3(2), {"numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}),
    "protocol-2-numpy1": (numpy1(2), {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}),
    "protocol-4": (python3(4), {"numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}),
    "protocol-5": (python3(5), {"numpy._core.numeric._frombuffer", "numpy.dtype"}),
    "protocol-5-numpy1": (numpy1(5), {"numpy.core.numeric._frombuffer", "numpy.dtype"}),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_batch_files_of_every_writer_load(tmp_path, writer):
    write, numpy_globals = WRITERS[writer]
    folder = write_folder(tmp_path)
    plain = {}
    for k, name in enumerate(TRAIN_FILES + TEST_FILES):
        raw = write(batch_dict(k * PER_FILE))
        recorder = RecordingUnpickler(io.BytesIO(raw))
        plain[name] = recorder.load()
        assert {g for g in recorder.loaded if g.startswith("numpy")} == numpy_globals, recorder.loaded
        (folder / name).write_bytes(raw)
        safe = safe_load(io.BytesIO(raw))
        assert sorted(safe) == sorted(plain[name]) == sorted(batch_dict(0))
        assert type(safe[b"data"]) is np.ndarray and safe[b"data"].dtype == np.uint8
        assert np.array_equal(safe[b"data"], plain[name][b"data"])
        assert all(safe[key] == plain[name][key] for key in (b"labels", b"batch_label", b"filenames"))
    ds = load_cifar10(tmp_path)
    n_train = len(TRAIN_FILES) * PER_FILE
    assert np.array_equal(ds.train.images.numpy(), expected_pixels(0, n_train))
    assert np.array_equal(ds.test.images.numpy(), expected_pixels(n_train, PER_FILE))
    assert ds.train.labels.tolist() == [label for name in TRAIN_FILES for label in plain[name][b"labels"]]
    assert ds.test.labels.tolist() == plain["test_batch"][b"labels"]


def test_python2_batch_read_as_latin1_like_pickle():
    raw = python2(batch_dict(0))
    safe = safe_load(io.BytesIO(raw), encoding="latin1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plain = pickle.loads(raw, encoding="latin1")
    assert sorted(safe) == sorted(plain) == ["batch_label", "data", "filenames", "labels"]
    assert type(safe["data"]) is np.ndarray and np.array_equal(safe["data"], plain["data"])
    assert safe["data"].dtype == np.uint8 and safe["labels"] == plain["labels"] and safe["filenames"] == plain["filenames"]


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("dtype", ["u1", "i1", "<u2", ">i4", "<i8", ">u8"])
def test_integer_arrays_load_as_numpy_loads_them(protocol, dtype):
    array = np.arange(-3, 9).astype(dtype).reshape(3, 4)
    for value in (array, np.asfortranarray(array), array[:, ::2]):
        raw = pickle.dumps({b"a": value, b"b": [value, {b"c": value}]}, protocol=protocol)
        safe, plain = safe_load(io.BytesIO(raw)), pickle.loads(raw)
        for place in (lambda d: d[b"a"], lambda d: d[b"b"][0], lambda d: d[b"b"][1][b"c"]):
            got, want = place(safe), place(plain)
            assert type(got) is np.ndarray and got.dtype == want.dtype and np.array_equal(got, want)


# --- download ---------------------------------------------------------------


def test_download_from_file_url(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "data"
    folder = download_cifar10(root, url=archive.as_uri(), md5=md5)
    assert folder == root / FOLDER
    assert sorted(p.name for p in root.iterdir()) == sorted([ARCHIVE, FOLDER])
    assert sorted(p.name for p in folder.iterdir()) == sorted(TRAIN_FILES + TEST_FILES)
    assert len(load_cifar10(root).train) == len(TRAIN_FILES) * PER_FILE

    missing = (tmp_path / "nowhere" / ARCHIVE).as_uri()
    assert download_cifar10(root, url=missing, md5=md5) == folder  # extracted: no second download

    (root / ARCHIVE).write_bytes(b"")  # an existing folder is trusted, the archive is not read
    assert download_cifar10(root, url=missing, md5=md5) == folder


def test_existing_archive_is_verified_not_downloaded(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / ARCHIVE).write_bytes(archive.read_bytes())
    missing = (tmp_path / "nowhere" / ARCHIVE).as_uri()
    assert download_cifar10(root, url=missing, md5=md5) == root / FOLDER
    assert sorted(p.name for p in root.iterdir()) == sorted([ARCHIVE, FOLDER])


def test_wrong_checksum_extracts_nothing(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "data"
    wrong = "0" * 32
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar10(root, url=archive.as_uri(), md5=wrong)
    message = error_message(excinfo)
    assert ARCHIVE in message and wrong in message and md5 in message and "deleted" in message
    assert list(root.iterdir()) == []  # a bad download is not kept to fail every later run


def test_wrong_checksum_of_a_placed_archive_is_kept(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / ARCHIVE).write_bytes(archive.read_bytes())
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar10(root, url=archive.as_uri(), md5="0" * 32)
    message = error_message(excinfo)
    assert str(root / ARCHIVE) in message and md5 in message and "delete the file" in message
    assert [p.name for p in root.iterdir()] == [ARCHIVE]


def test_truncated_archive_fails_checksum(tmp_path):
    archive, md5 = make_archive(tmp_path)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    root = tmp_path / "data"
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar10(root, url=archive.as_uri(), md5=md5)
    message = error_message(excinfo)
    assert ARCHIVE in message and hashlib.md5(data[: len(data) // 2]).hexdigest() in message
    assert list(root.iterdir()) == []


def test_unreachable_url_names_it(tmp_path):
    url = (tmp_path / "nowhere" / ARCHIVE).as_uri()
    root = tmp_path / "data"
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar10(root, url=url)
    message = error_message(excinfo)
    assert url in message and str(root) in message
    assert list(root.iterdir()) == []  # no .part left behind


class BrokenStream(io.BytesIO):
    """A response that delivers some bytes, then loses the connection."""

    def read(self, size: int = -1) -> bytes:
        if self.tell() > 0:
            raise ConnectionResetError("connection reset by peer")
        return super().read(10)


def test_interrupted_download_leaves_no_part_file(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: BrokenStream(b"x" * 100))
    root = tmp_path / "data"
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar10(root, url="https://example.invalid/c.tar.gz")
    assert "https://example.invalid/c.tar.gz" in error_message(excinfo)
    assert list(root.iterdir()) == []


def test_archive_entry_outside_folder_is_rejected(tmp_path):
    write_folder(tmp_path / "staging")
    (tmp_path / "staging" / "evil.txt").write_text("outside")
    archive = tmp_path / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "staging" / FOLDER, arcname=FOLDER)
        tar.add(tmp_path / "staging" / "evil.txt", arcname=f"{FOLDER}/../evil.txt")
    root = tmp_path / "data"
    with pytest.raises(FastDartsError) as excinfo:
        download_cifar10(root, url=archive.as_uri(), md5=hashlib.md5(archive.read_bytes()).hexdigest())
    assert "evil.txt" in error_message(excinfo)
    assert [p.name for p in root.iterdir()] == [ARCHIVE]
    assert not (tmp_path / "evil.txt").exists()


# --- digits and the registry ------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits(digits):
    assert digits.train.images.shape == (1437, 1, 8, 8) and digits.test.images.shape == (360, 1, 8, 8)
    assert digits.train.images.dtype == torch.uint8 and digits.train.labels.dtype == torch.int64
    assert digits.train.images.min().item() == 0 and digits.train.images.max().item() == 255
    values = set(torch.cat([digits.train.images, digits.test.images]).unique().tolist())
    assert values <= {round(v * 255 / 16) for v in range(17)}
    assert set(digits.train.labels.tolist()) == set(range(10)) == set(digits.test.labels.tolist())
    assert (digits.num_classes, digits.crop_padding, digits.flip, digits.in_channels, digits.image_size) == (10, 1, False, 1, 8)
    pixels = digits.train.images.double() / 255
    assert digits.mean[0] == pytest.approx(pixels.mean().item()) and 0.2 < digits.mean[0] < 0.4
    assert digits.std[0] == pytest.approx(pixels.std(unbiased=False).item())


def test_digits_split_is_fixed():
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    ds = load_dataset("digits")
    assert ds.name == "digits"
    assert ds.train.labels.tolist() == raw.target[:1437].tolist()
    assert ds.test.labels.tolist() == raw.target[1437:].tolist()
    assert np.array_equal(ds.test.images[:, 0].numpy(), np.rint(raw.images[1437:] * 255 / 16))


def test_search_split_takes_first_part_for_weights(digits):
    weights, arch = digits.search_split(0.5)
    assert (len(weights), len(arch)) == (718, 719)
    assert torch.equal(weights.images, digits.train.images[:718]) and torch.equal(arch.labels, digits.train.labels[718:])
    weights, arch = digits.search_split(0.8)
    assert (len(weights), len(arch)) == (1149, 288)


@pytest.mark.parametrize("portion", [0.0, 1.0, -0.5, 1.5, 1e-4])
def test_search_split_rejects_bad_portion(digits, portion):
    with pytest.raises(FastDartsError) as excinfo:
        digits.search_split(portion)
    assert str(portion) in error_message(excinfo)


def test_load_dataset_by_name(tmp_path):
    write_folder(tmp_path)
    assert load_dataset("cifar10", root=tmp_path).train.images.shape == (len(TRAIN_FILES) * PER_FILE, 3, 32, 32)
    with pytest.raises(FastDartsError) as excinfo:
        load_dataset("mnist")
    message = error_message(excinfo)
    assert "mnist" in message and all(name in message for name in DATASETS)


# --- augmentation -----------------------------------------------------------


def seeded(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def distinct_batch(n: int = 16, c: int = 2, h: int = 5, w: int = 6) -> torch.Tensor:
    """Every pixel different and non-zero, so a crop's offset can be read back."""
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).view(n, c, h, w)


def test_to_float():
    out = to_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([0.0, 0.2, 1.0]))


def test_random_crop_shifts_by_drawn_offset():
    x, p = distinct_batch(), 2
    out = random_crop(x, p, seeded(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = []
    for b in range(len(x)):
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1) if torch.equal(out[b], padded[b, :, dy : dy + 5, dx : dx + 6])]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len({dy for dy, _ in offsets}) > 1 and len({dx for _, dx in offsets}) > 1  # drawn per sample and axis
    assert (out == 0).any()  # black padding came in


def test_random_crop_reproducible_and_identity_at_zero():
    x = distinct_batch()
    assert torch.equal(random_crop(x, 0, seeded(0)), x)
    assert torch.equal(random_crop(x, 2, seeded(5)), random_crop(x, 2, seeded(5)))
    assert not torch.equal(random_crop(x, 2, seeded(5)), random_crop(x, 2, seeded(6)))


def test_random_flip_mirrors_whole_samples():
    x = distinct_batch(n=32)
    out = random_flip(x, seeded(1))
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(len(x))]
    kept = [torch.equal(out[b], x[b]) for b in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept))  # each sample exactly one of the two
    assert 4 < sum(flipped) < 28
    assert torch.equal(random_flip(x, seeded(1)), out)
    assert not torch.equal(random_flip(x, seeded(2)), out)


def test_normalize():
    x = torch.rand(4, 3, 2, 2)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize(x, mean, std)
    for c in range(3):
        assert torch.allclose(out[:, c], (x[:, c] - mean[c]) / std[c])


def test_cutout_zeroes_one_clipped_square():
    x = torch.ones(64, 3, 10, 10)
    out = cutout(x, 4, seeded(3))
    zero = out == 0
    assert torch.equal(zero[:, :1].expand_as(zero), zero)  # all channels alike
    zero = zero[:, 0]
    rows, cols = zero.any(2), zero.any(1)
    assert torch.equal(zero, rows[:, :, None] & cols[:, None, :])  # a rectangle
    counts = zero.sum((1, 2))
    assert (counts > 0).all() and (counts <= 16).all()
    assert (counts == 16).any() and (counts < 16).any()  # whole squares and border-clipped ones
    assert torch.equal(out[~zero[:, None].expand_as(out)], x[~zero[:, None].expand_as(x)])
    assert torch.equal(cutout(x, 0, seeded(3)), x)


# --- the device loader ------------------------------------------------------


def index_set(n: int = 10) -> ImageSet:
    """Image i is filled with the value i, label i: batches reveal which images they hold."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ImageSet(images, torch.arange(n))


def loader(n: int = 10, batch_size: int = 4, **kwargs) -> DeviceLoader:
    options = dict(device="cpu", mean=(0.0,), std=(1.0,), shuffle=True)
    options.update(kwargs)
    return DeviceLoader(index_set(n), batch_size, **options)


def labels_of(batches) -> list[int]:
    return [label for _, y in batches for label in y.tolist()]


def test_loader_pass_covers_every_image_once():
    data = loader(crop_padding=1, flip=True)
    batches = list(data.epoch(0))
    assert len(data) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    assert sorted(labels_of(batches)) == list(range(10))
    assert labels_of(batches) != list(range(10))  # shuffled
    for x, y in batches:
        assert x.dtype == torch.float32 and x.device == torch.device("cpu") and y.dtype == torch.int64
        assert x.shape == (len(y), 1, 4, 4)
        centre = x[:, 0, 1:3, 1:3]  # a 1-pixel crop never reaches the centre with padding
        assert torch.allclose(centre, (y.float() / 255).view(-1, 1, 1).expand_as(centre))


def test_loader_without_shuffle_keeps_order_and_normalizes():
    data = loader(batch_size=3, shuffle=False, mean=(0.01,), std=(0.5,))
    batches = list(data.epoch(7))
    assert labels_of(batches) == list(range(10))
    x, y = batches[1]
    assert torch.allclose(x[:, 0, 0, 0], (y.float() / 255 - 0.01) / 0.5)


def test_loader_drop_last():
    data = loader(drop_last=True)
    batches = list(data.epoch(0))
    assert len(data) == 2 and [len(y) for _, y in batches] == [4, 4]
    assert len(set(labels_of(batches))) == 8


def test_loader_epoch_replays_exactly():
    data = loader(n=20, crop_padding=1, flip=True, cutout=2)
    first, again = list(data.epoch(3)), list(data.epoch(3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert labels_of(data.epoch(4)) != labels_of(first)
    assert labels_of(loader(n=20, seed=1).epoch(3)) != labels_of(first)


def test_loader_cycle_continues_with_new_passes():
    data = loader()
    stream = data.cycle(2)
    batches = [next(stream) for _ in range(3 * len(data))]
    passes = [labels_of(batches[i * 3 : (i + 1) * 3]) for i in range(3)]
    assert passes[0] == labels_of(data.epoch(2))
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3


@pytest.mark.parametrize("batch_size", [0, -4])
def test_loader_rejects_bad_batch_size(batch_size):
    with pytest.raises(FastDartsError) as excinfo:
        loader(batch_size=batch_size)
    assert str(batch_size) in error_message(excinfo)


def test_loader_rejects_mean_of_wrong_length():
    with pytest.raises(FastDartsError):
        loader(mean=CIFAR10_MEAN)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda_replays():
    data = loader(n=20, device="cuda", crop_padding=1, flip=True, cutout=2)
    first, again = list(data.epoch(1)), list(data.epoch(1))
    assert first[0][0].device.type == "cuda" and first[0][1].device.type == "cuda"
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert sorted(labels_of(first)) == list(range(20))
