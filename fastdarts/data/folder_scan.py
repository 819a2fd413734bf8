"""Finding the images and classes of an ImageFolder-style directory, without opening any image.

The layout is torchvision's ``ImageFolder`` one split per folder::

    DIR/train/<class>/<image>      trains
    DIR/val/<class>/<image>        is held out (DIR/test/... when there is no val/)

Classes are the sorted folder names of ``train/``; the held-out split's
folders map to train's labels by name. Images are found recursively below a
class folder (links followed, as ``ImageFolder`` does) by extension only, in
``ImageFolder``'s order (sorted by folder, then by name); hidden files and
folders (a leading '.') are skipped, so editor and OS droppings
(``.DS_Store``, ``.ipynb_checkpoints``) never become images or classes.

Nothing here decodes or even opens an image: the scan is shared by the
image-folder cache and the JPEG streaming route, which read the files in
their own ways. Every layout mistake is one ``FastDartsError`` line naming
the folder and what to do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FastDartsError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # matched case-insensitively
HELD_OUT_SPLITS = ("val", "test")  # the first one present is held out


@dataclass(frozen=True, eq=False)
class FolderIndex:
    """What a scan found: class names in label order and each split's files with their labels.

    Paths are relative to ``root`` (POSIX form, e.g. ``"train/cat/001.png"``), so an index
    can be hashed and stored independently of where the folder is mounted; ``path(rel)``
    gives the file itself.
    """

    root: Path
    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: tuple[int, ...]
    heldout_files: tuple[str, ...]
    heldout_labels: tuple[int, ...]
    heldout_split: str  # "val" or "test"

    def path(self, relative: str) -> Path:
        return self.root / relative


def is_image_name(name: str) -> bool:
    """Whether a file name is one the scan takes: not hidden, with an image extension."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: str | Path) -> FolderIndex:
    """Classes and files of ``root`` (see the module docstring), or a one-line error."""
    root = Path(root)
    shown = str(root)
    if not root.exists():
        raise FastDartsError(f"--data {shown} does not exist: give the folder that holds train/ and val/ (or test/)")
    if not root.is_dir():
        raise FastDartsError(f"--data {shown} is a file, not a folder: give the folder that holds train/ and val/ "
                             "(or test/)")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FastDartsError(f"no training folder {train_dir}: an image folder holds train/<class>/<image> "
                             "and val/<class>/<image> (or test/<class>/<image>)")
    split = next((s for s in HELD_OUT_SPLITS if (root / s).is_dir()), None)
    if split is None:
        raise FastDartsError(f"no held-out folder {root / 'val'} (nor {root / 'test'}): put the held-out images in "
                             f"{root / 'val'}/<class>/<image>")

    classes = _class_folders(train_dir)
    if not classes:
        raise FastDartsError(f"{train_dir} has no class folders: put each class's images in {train_dir}/<class>/")
    if len(classes) == 1:
        raise FastDartsError(f"{train_dir} has only one class folder ({classes[0]}): a classifier needs at least "
                             f"two, each in its own folder {train_dir}/<class>/")
    label_of = {name: label for label, name in enumerate(classes)}

    heldout_dir = root / split
    heldout_classes = _class_folders(heldout_dir)
    if not heldout_classes:
        raise FastDartsError(f"{heldout_dir} has no class folders: put each class's held-out images in "
                             f"{heldout_dir}/<class>/, named as in {train_dir}")
    for name in heldout_classes:
        if name not in label_of:
            raise FastDartsError(f"class folder {heldout_dir / name} has no counterpart in {train_dir}: "
                                 f"rename it to a training class or remove it")

    train_files, train_labels = _split_files(root, "train", classes, label_of)
    heldout_files, heldout_labels = _split_files(root, split, heldout_classes, label_of)
    return FolderIndex(root=root, classes=tuple(classes), train_files=train_files, train_labels=train_labels,
                       heldout_files=heldout_files, heldout_labels=heldout_labels, heldout_split=split)


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden folders (or links to folders) directly in ``split_dir``."""
    try:
        with os.scandir(split_dir) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise FastDartsError(f"cannot list {split_dir}: {exc.strerror or exc}; check its permissions") from None


def _split_files(root: Path, split: str, classes: list[str],
                 label_of: dict[str, int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    files: list[str] = []
    labels: list[int] = []
    for name in classes:
        found = _images_below(root, f"{split}/{name}")
        if not found:
            raise FastDartsError(f"class folder {root / split / name} holds no images "
                                 f"({' '.join(IMAGE_EXTENSIONS)}): add images or remove the folder")
        files += found
        labels += [label_of[name]] * len(found)
    return tuple(files), tuple(labels)


def _images_below(root: Path, relative: str) -> list[str]:
    """Image paths (relative to ``root``) below ``root/relative``, sorted by folder then name
    (``ImageFolder``'s order). Links are followed; a folder reached twice (a link loop) is
    walked once."""
    found: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root / relative, followlinks=True, onerror=errors.append):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        found += [(rel_dir, f) for f in filenames if is_image_name(f)]
    if errors:
        exc = errors[0]
        raise FastDartsError(f"cannot list {exc.filename}: {exc.strerror or exc}; check its permissions")
    return [f"{d}/{f}" for d, f in sorted(found)]
