"""Decoding image files into one uint8 array, in parallel, and the cache folder that holds the result.

One image becomes ``[C, S, S]`` uint8 as torchvision's ``Resize(S)`` +
``CenterCrop(S)`` would make it: the shorter side scaled to ``S`` with
Pillow's bilinear filter (which antialiases when it shrinks), the longer side
to ``int(S * long / short)``, then the centred ``S x S`` square. Large JPEGs
are first decoded at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``, a DCT-domain
reduction) when that still leaves at least the resized size: a 12-megapixel
photo bound for 64x64 then decodes ~10x faster, for a difference of a pixel's
rounding.

Channels: 1 or 3, chosen by the caller. Alpha is dropped (RGBA/LA), palette
images go through RGBA (their transparency is expressed there), CMYK and the
other colour modes go through Pillow's conversion to RGB, and 16-bit
grayscale is scaled to 8 bits (``round(v / 257)``; Pillow's own conversion
clips it at 255). A colour image in a 1-channel set becomes its luminance.
EXIF orientation is not applied, as ``ImageFolder`` does not apply it.

Decoding runs in worker processes that write straight into the cache's
``.npy`` files through ``open_memmap`` (so a large folder never sits in
memory twice, nor travels through pipes) and send back only exact integer
per-channel sums for the mean and std. Forked on Linux: spawned workers would
each re-import torch through the package, seconds apiece.

The cache folder::

    meta.json                  format version, classes, size, channels, mean/std, counts, skipped files
    train_images.npy           uint8 [N, C, S, S]
    train_labels.npy           int64 [N]
    test_images.npy            uint8 [M, C, S, S]  (the held-out split: val/ or test/)
    test_labels.npy            int64 [M]

``meta.json`` is written last, and the folder is built under a temporary name
and renamed into place by the caller, so a folder with a valid ``meta.json``
is complete. ``read_cache`` checks everything it can without reading the
pixels, and calls anything short of that damaged.
"""
from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from numpy.lib.format import open_memmap
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import FastDartsError
from ..files import write_json

FORMAT_VERSION = 2  # 2: training images interleaved by class
META = "meta.json"
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_MAX_CHUNK = 64  # images per worker task: large enough to hide the task's overhead, small enough to balance


class UnreadableImage(Exception):
    """Pillow could not open or decode a file; ``reason`` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- one image

def _why(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"  # Pillow's own message repeats the path
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, OSError) and text:
        return text  # Pillow's "image file is truncated" and the like
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_header(path: str | Path) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the file's header; the pixels are not decoded."""
    try:
        with Image.open(path) as im:
            return im.size[0], im.size[1], im.mode
    except Exception as exc:  # Pillow's plugins fail in many ways on foreign or damaged files
        raise UnreadableImage(_why(exc)) from None


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)``: the shorter side becomes ``size``, the longer ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's ``CenterCrop(size)`` box, offsets rounded as it rounds them."""
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def _gray8(im: Image.Image) -> Image.Image:
    """A grayscale-mode image as 8-bit ``L``; 16-bit is scaled, not clipped (a 16-bit PNG opens as ``I;16``,
    or as ``I`` in older Pillow releases)."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        v = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((2 * v + 257) // 514).astype(np.uint8))  # round(v / 257), exactly
    return im.convert("L")  # LA drops alpha; 1 becomes 0/255; I and F are clipped to 0..255


def _rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in GRAY_MODES:
        return _gray8(im).convert("RGB")
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")  # a palette's transparency is only expressed in RGBA
    return im.convert("RGB")  # RGBA drops alpha; CMYK, YCbCr, HSV, LAB convert


def decode_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """One file as uint8 ``[channels, size, size]`` (see the module docstring)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            target = resized_size(width, height, size)
            if im.format == "JPEG" and width >= 2 * target[0] and height >= 2 * target[1]:
                im.draft(None, target)  # decode at the smallest 1/2^k scale still >= target
            im.load()
            im = _gray8(im) if channels == 1 and im.mode in GRAY_MODES else _rgb(im)
            if channels == 1 and im.mode != "L":
                im = im.convert("L")  # a colour image in a grayscale set: its luminance
            if im.size != target:
                im = im.resize(target, Image.Resampling.BILINEAR)
            im = im.crop(center_box(target[0], target[1], size))
            pixels = np.asarray(im)
    except Exception as exc:  # a truncated or foreign file fails in Pillow in many ways
        raise UnreadableImage(_why(exc)) from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


# ---------------------------------------------------------------- the worker pool

class WorkerPool:
    """``workers`` processes (none for 1: tasks run here) running chunks of a file list."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        if self.workers > 1:
            context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def chunks(self, count: int) -> list[tuple[int, int]]:
        """``(start, stop)`` ranges covering ``range(count)``, about 8 per worker, at most ``_MAX_CHUNK`` long."""
        step = max(1, min(_MAX_CHUNK, math.ceil(count / (8 * self.workers))))
        return [(i, min(i + step, count)) for i in range(0, count, step)]

    def run(self, task: Callable, args: Sequence[tuple], local: Callable | None = None) -> Iterator[Any]:
        """``task(*a)`` for each ``a`` in ``args``, results as they finish (in order without a pool).
        Without a pool ``local(*a)`` runs instead when given (it may use this process's state)."""
        if self._pool is None:
            for a in args:
                yield (local or task)(*a)
            return
        pending: set[Future] = {self._pool.submit(task, *a) for a in args}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        except BrokenProcessPool:
            raise FastDartsError("a worker process decoding images died (out of memory?): "
                                 "run again with fewer workers") from None
        finally:
            for future in pending:
                future.cancel()


def _headers_task(root: str, files: Sequence[str], start: int) -> list[tuple[int, tuple | str]]:
    out: list[tuple[int, tuple | str]] = []
    for i, rel in enumerate(files):
        try:
            out.append((start + i, read_header(os.path.join(root, rel))))
        except UnreadableImage as exc:
            out.append((start + i, exc.reason))
    return out


def read_headers(pool: WorkerPool, root: Path, files: Sequence[str], progress: bool) -> list[tuple | str]:
    """Each file's ``(width, height, mode)``, or why its header is unreadable."""
    results: list[tuple | str] = [""] * len(files)
    args = [(str(root), files[a:b], a) for a, b in pool.chunks(len(files))]
    with tqdm(total=len(files), desc="reading image headers", unit="img", disable=not progress) as bar:
        for chunk in pool.run(_headers_task, args):
            for i, header in chunk:
                results[i] = header
            bar.update(len(chunk))
    return results


@dataclass
class Decoded:
    """What a decoding pass found: how many files it went through, exact per-channel sums
    of the pixels it wrote (0..255 units) and the rows it could not decode, with why."""

    count: int
    pixel_sum: list[int]
    square_sum: list[int]
    bad: dict[int, str]

    def add(self, other: Decoded) -> None:
        self.count += other.count
        self.pixel_sum = [x + y for x, y in zip(self.pixel_sum, other.pixel_sum)]
        self.square_sum = [x + y for x, y in zip(self.square_sum, other.square_sum)]
        self.bad.update(other.bad)


_OPEN: dict[str, np.ndarray] = {}  # a worker's memory maps, one per output file


def _decode_task(out_path: str, root: str, files: Sequence[str], start: int, size: int, channels: int,
                 out: np.ndarray | None = None) -> Decoded:
    if out is None:  # in a worker: map the output file once per process
        out = _OPEN.get(out_path)
        if out is None:
            out = _OPEN[out_path] = np.load(out_path, mmap_mode="r+")
    pixel_sum = np.zeros(channels, np.int64)
    square_sum = np.zeros(channels, np.int64)
    bad: dict[int, str] = {}
    for i, rel in enumerate(files):
        try:
            pixels = decode_image(os.path.join(root, rel), size, channels)
        except UnreadableImage as exc:
            bad[start + i] = exc.reason
            continue
        out[start + i] = pixels
        flat = pixels.reshape(channels, -1).astype(np.int64)
        pixel_sum += flat.sum(axis=1)
        square_sum += np.einsum("ij,ij->i", flat, flat)  # integers: the same total in any order
    return Decoded(len(files), pixel_sum.tolist(), square_sum.tolist(), bad)


def create_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A zero-filled uint8 ``.npy`` of ``shape``, memory-mapped for writing. Its space is
    reserved now where the system can, so a full disk is an OSError here, not a SIGBUS
    when a worker writes into a hole of a sparse file."""
    array = open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate") and array.size:
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve
                    raise
    return array


def decode_files(pool: WorkerPool, out_path: Path, root: Path, files: Sequence[str], size: int, channels: int,
                 bar: tqdm, stop_at_bad: bool) -> Decoded:
    """Decode ``root/files`` into a new ``[len(files), channels, size, size]`` array at ``out_path``.
    An unreadable file's row is left zero and listed in ``bad``; with ``stop_at_bad`` the first
    one ends the pass early (the caller reports it)."""
    out = create_array(out_path, (len(files), channels, size, size))
    total = Decoded(0, [0] * channels, [0] * channels, {})
    args = [(str(out_path), str(root), files[a:b], a, size, channels) for a, b in pool.chunks(len(files))]
    try:
        for part in pool.run(_decode_task, args, local=lambda *a: _decode_task(*a, out=out)):
            total.add(part)
            bar.update(part.count)
            if stop_at_bad and total.bad:
                break
        out.flush()
    finally:
        del out  # unmapped before the caller moves or removes the file
    return total


def drop_rows(path: Path, rows: Sequence[int]) -> None:
    """Rewrite the image array at ``path`` without ``rows``, through a new file (never two copies in memory)."""
    source = np.load(path, mmap_mode="r")
    keep = np.setdiff1d(np.arange(len(source)), np.asarray(rows, dtype=np.int64))
    compact = path.with_name(path.stem + ".compact.npy")
    out = create_array(compact, (len(keep),) + source.shape[1:])
    for a in range(0, len(keep), 1024):
        out[a:a + 1024] = source[keep[a:a + 1024]]
    out.flush()
    del out, source
    os.replace(compact, path)


def mean_std(pixel_sum: Sequence[int], square_sum: Sequence[int],
             pixels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std in [0, 1] units from exact integer sums over
    ``pixels`` values per channel: each is the float64 nearest to the exact value, up to
    the square root's rounding."""
    scale = pixels * 255
    mean = tuple(s / scale for s in pixel_sum)  # int / int: correctly rounded
    std = tuple(math.sqrt(Fraction(pixels * q - s * s, scale * scale)) for s, q in zip(pixel_sum, square_sum))
    return mean, std


def fsync_folder(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, so the folder renamed into place after a crash is whole."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


# ---------------------------------------------------------------- the cache folder

@dataclass(frozen=True, eq=False)
class CacheContents:
    """A cache folder, checked: its meta.json and its arrays (images memory-mapped)."""

    meta: dict
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class DamagedCache(Exception):
    """A cache folder that is not what ``build`` writes; ``str()`` says what is wrong."""


def write_meta(folder: Path, meta: dict) -> None:
    """meta.json, written last: its presence marks the folder complete."""
    write_json(folder / META, {"format": FORMAT_VERSION, **meta})


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict):
        raise DamagedCache("meta.json is not an object")
    if meta.get("format") != FORMAT_VERSION:
        raise DamagedCache(f"meta.json has format {meta.get('format')!r}, not {FORMAT_VERSION}")
    classes, size, channels = meta.get("classes"), meta.get("image_size"), meta.get("channels")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise DamagedCache("meta.json lacks a list of at least two class names")
    if not (_is_int(size, 1) and channels in (1, 3) and _is_int(channels)):
        raise DamagedCache(f"meta.json has image size {size!r} and channels {channels!r}")
    for key in ("mean", "std"):
        values = meta.get(key)
        if not (isinstance(values, list) and len(values) == channels
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            raise DamagedCache(f"meta.json has no {channels} finite {key} values")
    counts = meta.get("counts")
    if not (isinstance(counts, dict) and _is_int(counts.get("train"), 1) and _is_int(counts.get("test"), 1)):
        raise DamagedCache("meta.json lacks the train and test counts")
    if not (isinstance(meta.get("skipped"), list) and isinstance(meta.get("heldout_split"), str)):
        raise DamagedCache("meta.json lacks the skipped files or the held-out split")


def read_cache(folder: Path) -> CacheContents | None:
    """The cache in ``folder`` (images memory-mapped copy-on-write), None when there is none,
    or ``DamagedCache`` when it is not whole."""
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCache(f"meta.json is unreadable ({_why(exc)})") from None
    _check_meta(meta)
    size, channels, classes = meta["image_size"], meta["channels"], len(meta["classes"])
    arrays = {}
    for split in ("train", "test"):
        count = meta["counts"][split]
        try:
            # copy-on-write ("c"), not read-only: a stray in-place write then changes a private
            # copy of a page instead of crashing the process on a read-only mapping
            images = np.load(folder / f"{split}_images.npy", mmap_mode="c")
            labels = np.load(folder / f"{split}_labels.npy")  # small: read, checked
        except Exception as exc:  # a missing, truncated or foreign file fails in np.load in many ways
            raise DamagedCache(f"{split} arrays are unreadable ({_why(exc)})") from None
        if images.dtype != np.uint8 or images.shape != (count, channels, size, size):
            raise DamagedCache(f"{split}_images.npy is {images.dtype} {images.shape}, "
                               f"expected uint8 {(count, channels, size, size)}")
        if labels.dtype != np.int64 or labels.shape != (count,) or labels.min() < 0 or labels.max() >= classes:
            raise DamagedCache(f"{split}_labels.npy is not {count} int64 labels in 0..{classes - 1}")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return CacheContents(meta=meta, **arrays)
