"""CIFAR-10, python version: verified download, atomic extraction, strict parsing.

No torchvision: the batches are pickled dicts of a uint8 ``N x 3072`` array
(channel-major 32x32) and a label list, read by an unpickler that admits only
such data (``safe_pickle``), so a planted batch file cannot run code. The
archive is checked against its md5 before anything is extracted, and
extraction happens in a temporary folder that is moved into place whole, so a
half-written folder can never be read as data.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ..errors import FastDartsError
from .dataset import Dataset, ImageSet
from .safe_pickle import RefusedPickle, safe_load

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_CHUNK = 1 << 20
_SIDE = 32
_CLASSES = 10


def download_cifar10(root: str | Path, url: str = URL, md5: str = MD5) -> Path:
    """Return ``root/FOLDER``, downloading, verifying and extracting it if absent.

    An archive already in ``root`` is verified instead of downloaded, so a
    machine without internet can be given the file by hand.
    """
    root = Path(root)
    folder = root / FOLDER
    if folder.is_dir():
        return folder
    if root.exists() and not root.is_dir():
        raise FastDartsError(f"--data {root} is a file, not a folder: give the folder that holds (or receives) "
                             f"{FOLDER}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FastDartsError(f"cannot create the data folder {root} ({exc.strerror or exc})") from None
    archive = root / ARCHIVE
    if not archive.exists():
        _fetch(url, archive, md5)  # verified while it streams in: no second read of 170 MB
    elif (actual := _md5_of(archive)) != md5:
        # A file someone placed here: theirs to delete, not ours.
        raise FastDartsError(f"checksum mismatch for {archive}: expected md5 {md5}, got {actual}; delete the file and retry")
    _extract(archive, root)
    return folder


def _fetch(url: str, archive: Path, md5: str) -> None:
    """Stream ``url`` to ``archive`` via a ``.part`` file, kept only if its md5 is right."""
    part = archive.with_name(archive.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        part.unlink(missing_ok=True)
        raise FastDartsError(
            f"could not download {url} ({exc}); place {ARCHIVE} in {archive.parent} by hand and run again"
        ) from exc
    if digest.hexdigest() != md5:
        part.unlink()
        raise FastDartsError(
            f"checksum mismatch for {archive.name} downloaded from {url}: expected md5 {md5}, "
            f"got {digest.hexdigest()}; the download was deleted, retry")
    os.replace(part, archive)


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(archive: Path, root: Path) -> None:
    """Extract ``FOLDER`` from ``archive`` into a temporary folder, then move it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)
        if not (tmp / FOLDER).is_dir():
            raise FastDartsError(f"{archive} has no folder {FOLDER}: delete the file and retry")
        try:
            os.replace(tmp / FOLDER, root / FOLDER)
        except OSError:
            if not (root / FOLDER).is_dir():  # otherwise another process extracted it first
                raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FastDartsError(f"could not extract {archive} ({exc}): delete the file and retry") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Accept only plain files and folders inside ``FOLDER``."""
    parts = Path(member.name).parts
    inside = parts[:1] == (FOLDER,) and ".." not in parts
    if not inside or not (member.isfile() or member.isdir()):
        raise FastDartsError(f"{archive} holds an unexpected entry {member.name!r}: delete the file and retry")


def load_cifar10(root: str | Path = "./data", download: bool = False) -> Dataset:
    """CIFAR-10 from ``root/FOLDER`` (fetched first when ``download``)."""
    root = Path(root)
    folder = root / FOLDER
    if not folder.is_dir():
        if not download:
            raise FastDartsError(f"CIFAR-10 not found: no folder {folder}; pass --download to fetch it into {root}")
        download_cifar10(root)
    return Dataset(
        name="cifar10",
        train=_read_batches(folder, TRAIN_FILES),
        test=_read_batches(folder, TEST_FILES),
        num_classes=_CLASSES,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        crop_padding=4,
        flip=True,
    )


def _read_batches(folder: Path, names: tuple[str, ...]) -> ImageSet:
    batches = [_read_batch(folder / name) for name in names]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as uint8 ``[N, 3, 32, 32]`` images and int64 labels, validated."""

    def bad(problem: str) -> FastDartsError:
        return FastDartsError(f"CIFAR-10 file {path} {problem}: delete {path.parent} and run again with --download")

    try:
        with open(path, "rb") as f:
            batch = safe_load(f)  # never pickle.load: the md5 covers the archive, not the files in the folder
    except FileNotFoundError:
        raise bad("is missing") from None
    except RefusedPickle as exc:  # a planted file that would run code (os.system, eval, ...) on load
        raise bad(f"is not a CIFAR batch ({exc})") from None
    except Exception as exc:  # garbage bytes can make unpickling fail in any way
        raise bad(f"is corrupt ({type(exc).__name__})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise bad("lacks the b'data' or b'labels' entry")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray):
        raise bad(f"has data of type {type(data).__name__}, expected a numpy array")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _SIDE * _SIDE:
        raise bad(f"has data of dtype {data.dtype} and shape {data.shape}, expected uint8 N x {3 * _SIDE * _SIDE}")
    labels = np.asarray(batch[b"labels"])
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise bad(f"has labels of shape {labels.shape} and dtype {labels.dtype}, expected {len(data)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= _CLASSES):
        raise bad(f"has labels outside 0..{_CLASSES - 1}")
    images = np.ascontiguousarray(data.reshape(len(data), 3, _SIDE, _SIDE))
    return images, labels.astype(np.int64)
