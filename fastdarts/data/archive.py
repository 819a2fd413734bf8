"""A data set's archive: verified download and safe, all-or-nothing extraction.

Shared by the data sets shipped as one ``.tar.gz`` that unpacks to one folder
(CIFAR-10, CIFAR-100). The archive is checked against its md5 before anything
is extracted (while it streams in, so a large file is read once); a download
that fails the check is deleted, but a file someone placed by hand is only
reported. Extraction admits plain files and folders inside the expected
folder only, happens in a temporary folder, and moves that folder into place
whole, so a half-written folder can never be read as data.
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

from ..errors import FastDartsError

_CHUNK = 1 << 20


def download_archive(root: str | Path, *, url: str, archive: str, md5: str, folder: str, name: str) -> Path:
    """Return ``root/folder``, downloading ``url`` to ``root/archive``, verifying and extracting it if absent.

    An archive already in ``root`` is verified instead of downloaded, so a
    machine without internet can be given the file by hand. ``name`` is the
    data set's name for messages ("CIFAR-100").
    """
    root = Path(root)
    target = root / folder
    if target.is_dir():
        return target
    if root.exists() and not root.is_dir():
        raise FastDartsError(f"--data {root} is a file, not a folder: give the folder that holds (or receives) "
                             f"{folder}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FastDartsError(f"cannot create the data folder {root} ({exc.strerror or exc})") from None
    path = root / archive
    if not path.exists():
        _fetch(url, path, md5, name)  # verified while it streams in: no second read of the file
    elif (actual := md5_of(path)) != md5:
        # A file someone placed here: theirs to delete, not ours.
        raise FastDartsError(f"checksum mismatch for {path}: expected md5 {md5}, got {actual}; "
                             "delete the file and retry")
    _extract(path, root, folder, name)
    return target


def md5_of(path: Path) -> str:
    """The md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, path: Path, md5: str, name: str) -> None:
    """Stream ``url`` to ``path`` via a ``.part`` file, kept only if its md5 is right."""
    part = path.with_name(path.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        part.unlink(missing_ok=True)
        raise FastDartsError(
            f"could not download {name} from {url} ({exc}); place {path.name} in {path.parent} by hand and run again"
        ) from exc
    if digest.hexdigest() != md5:
        part.unlink()
        raise FastDartsError(
            f"checksum mismatch for {path.name} downloaded from {url}: expected md5 {md5}, "
            f"got {digest.hexdigest()}; the download was deleted, retry")
    os.replace(part, path)


def _extract(archive: Path, root: Path, folder: str, name: str) -> None:
    """Extract ``folder`` from ``archive`` into a temporary folder, then move it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-extract-", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive, folder)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)
        if not (tmp / folder).is_dir():
            raise FastDartsError(f"{archive} has no folder {folder}, so it is not the {name} archive: "
                                 "delete the file and retry")
        try:
            os.replace(tmp / folder, root / folder)
        except OSError:
            if not (root / folder).is_dir():  # otherwise another process extracted it first
                raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FastDartsError(f"could not extract {archive} ({exc}): delete the file and retry") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_member(member: tarfile.TarInfo, archive: Path, folder: str) -> None:
    """Accept only plain files and folders inside ``folder``."""
    parts = Path(member.name).parts
    inside = parts[:1] == (folder,) and ".." not in parts
    if not inside or not (member.isfile() or member.isdir()):
        raise FastDartsError(f"{archive} holds an unexpected entry {member.name!r}: delete the file and retry")
