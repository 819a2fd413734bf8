"""Every file the package writes goes through ``atomic_write``; every
checkpoint it reads goes through ``read_torch`` (SPEC §14).

Writing: a temporary file beside the target, flushed to disk, renamed over
the target. A full disk, a read-only folder or an interrupt leaves the
previous file whole and no temporary behind, and is one ``WriteError`` line
naming the file (the CLIs print it and exit 2).

Reading: ``torch.load(weights_only=True)`` only (nothing but tensors and
plain values is unpickled), with one line that says what is wrong with the
file: missing, a folder, empty, truncated or foreign.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import FastDartsError


class WriteError(FastDartsError):
    """A file could not be written; its previous version (if any) is whole."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        super().__init__(f"cannot write {path}: {reason}")


# Free space below which a failed write is put down to a full disk: torch's writer reports a short
# write as "unexpected pos" (a RuntimeError without an errno), even through a Python file object.
_NEARLY_FULL = 1 << 20


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL
    except OSError:
        return False


def _reason(exc: BaseException, folder: Path | None = None) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or (
            not isinstance(exc, OSError) and folder is not None and _disk_full(folder)):
        return "the disk is full (no space left on device)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write with ``write(temporary path)``, flush it to disk, then rename it
    over ``path``: a crash leaves the old file or the new one, never half of
    one. An OSError (or torch's RuntimeError for a failed write) becomes a
    ``WriteError``; the temporary file is removed whatever happens."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # an error or an interrupt mid-write leaves no half file behind
        reason = _reason(exc, path.parent)  # before the temporary file's space is freed
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, FastDartsError):
            kept = "; the previous file is kept" if path.is_file() else ""
            raise WriteError(path, reason + kept) from exc
        raise


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` through ``atomic_write``. Saved through a Python file
    object, so a full disk is the OSError it is (torch's own writer reports a
    failed write as an opaque RuntimeError)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: strict JSON
    has no NaN or Infinity, and strict parsers reject them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str | Path, document: Any, indent: int | None = 1) -> None:
    """Strict JSON (non-finite floats as null), written atomically."""
    write_text(path, json.dumps(finite_json(document), indent=indent, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, entries: Iterable[dict]) -> None:
    """One strict JSON object per line, written atomically (the whole history each time)."""
    lines = "".join(json.dumps(finite_json(entry), allow_nan=False) + "\n" for entry in entries)
    write_text(path, lines)


def save_figure(fig: Any, path: str | Path) -> Path:
    """A matplotlib figure as a PNG, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format="png", facecolor="white"))
    return path


def check_writable(folder: str | Path, what: str = "--out") -> None:
    """Write (and remove) a file in ``folder``, or in its nearest existing
    parent when it is not there yet (it is created later), so that an
    unwritable output folder is found before the first step, not after an epoch."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FastDartsError(f"{what} {folder} is a file, not a directory")
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FastDartsError(f"{what} {folder} cannot be created: {probe} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".fastdarts-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        where = "" if probe == folder.absolute() else f" (in {probe}, where it would be created)"
        raise FastDartsError(f"{what} {folder} is not writable{where}: {_reason(exc)}; choose another folder") from None


def read_torch(path: str | Path, map_location: torch.device | str = "cpu", what: str = "checkpoint"):
    """``torch.load(weights_only=True)`` with a one-line error naming the file:
    a missing, empty, truncated or foreign file says which, not where in
    torch it broke.

    ``map_location`` (default the CPU) is where every tensor lands, so a file
    saved from CUDA tensors loads on a machine without a GPU. Files in the
    legacy (pre-1.6, non-zip) format, such as the original DARTS release
    written by PyTorch 0.3/0.4, load too: ``weights_only=True`` reads both
    formats, and a plain dict of tensors needs nothing outside its allow-list."""
    path = Path(path)
    if path.is_dir():
        raise FastDartsError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise FastDartsError(f"no {what} at {path}")
    try:
        if path.stat().st_size == 0:
            raise FastDartsError(f"{what} {path} is empty (0 bytes): it was never written whole")
        return torch.load(path, map_location=map_location, weights_only=True)
    except FastDartsError:
        raise
    except OSError as exc:
        raise FastDartsError(f"cannot read {what} {path}: {_reason(exc)}") from None
    except Exception as exc:  # torch.load fails in many ways on foreign or cut files
        raise FastDartsError(f"cannot read {what} {path}: {_load_failure(exc)}") from None


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in words that
    do not steer anyone to the unsafe ``weights_only=False``."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in str(exc):
        return ("it holds Python objects other than tensors and plain values, which fastdarts never writes; "
                "it was not loaded, because loading such objects can run code")
    if "central directory" in str(exc) or isinstance(exc, EOFError):
        return "the file is truncated"
    return f"it is not a PyTorch file, or it is damaged ({type(exc).__name__})"
