"""CIFAR-100, python version: 100 fine classes of 32x32 colour images.

The archive comes from the same site and in the same format as CIFAR-10's
(``cifar-100-python.tar.gz``, one folder holding the pickled ``train``,
``test`` and ``meta``), so the verified download is ``archive.download_archive``
and the files are read by CIFAR-10's safe, validated reader with the fine
labels (``b'fine_labels'``, 0..99). The 20 coarse labels are not used: DARTS'
CIFAR-100 results are on the fine ones. Class names come from ``meta``.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import FastDartsError
from .archive import download_archive
from .cifar10 import read_cifar_batches
from .dataset import Dataset
from .safe_pickle import RefusedPickle, safe_load

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
TRAIN_FILES = ("train",)
TEST_FILES = ("test",)
META_FILE = "meta"
# Per channel (R, G, B), in [0, 1] units (pixel / 255): the commonly used train-set statistics, the mean
# and standard deviation over every pixel of the 50 000 training images (0.50708, 0.48655, 0.44092 and
# 0.26733, 0.25644, 0.27615), rounded to 4 places as the DARTS successors' CIFAR-100 code
# (``_data_transforms_cifar100`` in their ``utils.py``) has them.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_NAME = "CIFAR-100"
_LABEL_KEY = b"fine_labels"
_CLASSES = 100


def download_cifar100(root: str | Path, url: str = URL, md5: str = MD5) -> Path:
    """Return ``root/FOLDER``, downloading, verifying and extracting it if absent.

    An archive already in ``root`` is verified instead of downloaded, so a
    machine without internet can be given the file by hand.
    """
    return download_archive(root, url=url, archive=ARCHIVE, md5=md5, folder=FOLDER, name=_NAME)


def load_cifar100(root: str | Path = "./data", download: bool = False) -> Dataset:
    """CIFAR-100 (fine labels) from ``root/FOLDER`` (fetched first when ``download``)."""
    root = Path(root)
    folder = root / FOLDER
    if not folder.is_dir():
        if not download:
            raise FastDartsError(f"CIFAR-100 not found: no folder {folder}; pass --download to fetch it into {root}")
        download_cifar100(root, url=URL, md5=MD5)  # the module's values at call time, not at definition
    return Dataset(
        name="cifar100",
        train=read_cifar_batches(folder, TRAIN_FILES, name=_NAME, label_key=_LABEL_KEY, num_classes=_CLASSES),
        test=read_cifar_batches(folder, TEST_FILES, name=_NAME, label_key=_LABEL_KEY, num_classes=_CLASSES),
        num_classes=_CLASSES,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        crop_padding=4,
        flip=True,
        classes=_read_class_names(folder / META_FILE),
    )


def _read_class_names(path: Path) -> tuple[str, ...]:
    """The 100 fine class names in label order from ``meta``, or () when it is missing or not as expected.

    The names only label reports, so a damaged ``meta`` costs nothing but them.
    A ``meta`` that would run code is another matter: someone planted it, and
    that is reported as for a batch file.
    """
    try:
        with open(path, "rb") as f:
            meta = safe_load(f)
    except RefusedPickle as exc:
        raise FastDartsError(f"{_NAME} file {path} is not a CIFAR meta file ({exc}): "
                             f"delete {path.parent} and run again with --download") from None
    except Exception:  # missing, unreadable or garbage: the names are optional
        return ()
    names = meta.get(b"fine_label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != _CLASSES:
        return ()
    decoded = []
    for name in names:
        if isinstance(name, bytes):
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                return ()
        if not isinstance(name, str) or not name or not name.isprintable():
            return ()
        decoded.append(name)
    if len(set(decoded)) != len(decoded):  # a name must say which class it is
        return ()
    return tuple(decoded)
