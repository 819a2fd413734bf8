"""``--dataset folder --data DIR``: any ImageFolder-style directory as a ``Dataset``, decoded once.

The first load scans ``DIR`` (``folder_scan``), decodes every image in
worker processes into a uint8 cache (``image_cache``) and returns the cache's
arrays memory-mapped; every later load with the same files and options maps
the cache without decoding anything. The policy lives here:

- Image size: ``image_size`` S, or by default the median training image's
  shorter side capped at 64. A DARTS search costs about S² (every candidate op
  of every edge runs on S x S maps), so a folder of 500-pixel photos would
  otherwise make a search ~60x dearer than at 64; ``--image-size`` raises it
  for a final training. The default reads only the headers, and never
  upsamples a folder of small images.
- Channels: 1 when every training image is grayscale, else 3.
- Order: the training images are interleaved (``interleaved``): each class
  spread evenly through the array, so DARTS' search split by position (the
  first half trains the weights, the rest the architecture) gives each class
  its share as views of the memory-mapped cache, copying nothing. The
  held-out images keep ``ImageFolder``'s order.
- The cache: ``DIR/.fastdarts-cache/<key>/``; the key hashes the format
  version, the size option, the skip option and every file's (relative path,
  size, mtime_ns), so an added, removed or changed file or another size makes
  a new cache (a cached load costs a scan and a ``stat`` per file). It is
  built in a temporary folder renamed into place, so an interrupted build
  leaves nothing and a cache another process finished first is used; the
  folder's older caches are removed after a build. A read-only ``DIR`` caches
  in ``$XDG_CACHE_HOME/fastdarts/folders/<hash of DIR>/`` instead; ``cache_dir``
  overrides both. A damaged cache is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import FastDartsError
from .dataset import Dataset, ImageSet
from .folder_scan import FolderIndex, scan_image_folder
from .serving import default_workers
from .image_cache import (
    FORMAT_VERSION,
    GRAY_MODES,
    META,
    CacheContents,
    DamagedCache,
    WorkerPool,
    decode_files,
    drop_rows,
    fsync_folder,
    mean_std,
    read_cache,
    read_headers,
    write_meta,
)

MAX_DEFAULT_SIZE = 64
CACHE_FOLDER = ".fastdarts-cache"  # hidden: the scan never takes it for data
_BUILD = ".build-"  # prefix of a cache being built: .build-<pid>@<host>.<random>
_SHOWN_SKIPPED = 3  # file names a skip message lists
_POLL_S = 0.5  # how often a waiting rank looks for the cache


def load_image_folder(root: str | Path, image_size: int | None = None, skip_bad_images: bool = False,
                      workers: int | None = None, progress: bool = True, cache_dir: str | Path | None = None,
                      log: Callable[[str], None] = print, build: bool = True) -> Dataset:
    """``root``'s train/ and val/ (or test/) images as a ``Dataset``, through the cache (see the module docstring).

    ``skip_bad_images`` drops unreadable files instead of stopping at the first; ``workers``
    decoding processes (default ``min(os.cpu_count(), 8)``); ``log`` receives one line per
    notable event (cache used or built, files skipped, fallback location). ``build=False``: wait
    for another process (rank 0 of a torchrun run) to build the cache instead of building it; the wait
    is on the file system, not a collective with a timeout, however long the decoding takes."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise FastDartsError(f"--image-size {image_size!r} is not a positive whole number of pixels")
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise FastDartsError(f"workers {workers!r} is not a non-negative whole number (0: decode in this process)")
    workers = max(1, workers)  # one worker decodes in this process
    index = scan_image_folder(root)
    key = cache_key(index, image_size, skip_bad_images)
    folder = Path(root).resolve()
    places = [Path(cache_dir)] if cache_dir is not None else [folder / CACHE_FOLDER, fallback_cache_root(folder)]
    # A size given explicitly may be the one the default chose (fastdarts-eval passes the size a network was
    # trained at): that cache serves it too, rather than a second copy that would replace it.
    keys = [key] + ([cache_key(index, None, skip_bad_images)] if image_size is not None else [])
    waited = False
    contents = _find(places, keys, image_size, root, log, drop_damaged=build)
    while contents is None and not build:
        if not waited:
            log(f"waiting for rank 0 to decode the images of {root}")
            waited = True
        time.sleep(_POLL_S)
        contents = _find(places, keys, image_size, root, log, drop_damaged=False)
    if contents is not None:
        return _dataset(contents, log)
    place = _build_place(folder, cache_dir, log)
    contents = _build(index, place, key, image_size, skip_bad_images, workers, progress, log)
    _remove_old(place, key, folder, per_folder=cache_dir is None)
    return _dataset(contents, log)


def _find(places: Sequence[Path], keys: Sequence[str], image_size: int | None, root: str | Path,
          log: Callable[[str], None], drop_damaged: bool) -> CacheContents | None:
    """The first usable cache: ``keys[0]``'s, or the default size's (``keys[1]``) when it is ``image_size``."""
    for place in places:
        for k in keys:
            try:
                contents = _read_or_drop(place / k, log) if drop_damaged else read_cache(place / k)
            except DamagedCache:  # being replaced by the process that builds it
                contents = None
            if contents is not None and (k == keys[0] or contents.train_images.shape[-1] == image_size):
                log(f"using the images of {root} decoded in {place / k}")
                return contents
    return None


# ---------------------------------------------------------------- policy

def default_image_size(shorter_sides: Sequence[int]) -> int:
    """The median shorter side (the lower middle one of an even count: a real image's), capped at 64."""
    return min(MAX_DEFAULT_SIZE, statistics.median_low(shorter_sides))


def cache_key(index: FolderIndex, image_size: int | None, skip_bad_images: bool) -> str:
    """The options (``s64``, ``sauto-skip``) and 16 hex digits that change with the format, the options, or
    any file's path, size or mtime. A new build replaces only caches of the same options: a search at
    one size and a training at another keep one cache each."""
    options = f"s{image_size or 'auto'}" + ("-skip" if skip_bad_images else "")
    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{image_size or 'auto'}\0{bool(skip_bad_images)}\0".encode())
    for rel in sorted(index.train_files + index.heldout_files):
        try:
            st = os.stat(index.path(rel))
        except OSError as exc:
            raise FastDartsError(f"cannot read {index.path(rel)}: {exc.strerror or exc}; check the file") from None
        # A name never holds \0; one that is not UTF-8 (surrogate-escaped by os) hashes by its bytes.
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogateescape"))
    return f"{options}-{digest.hexdigest()[:16]}"


def fallback_cache_root(folder: Path) -> Path:
    """Where a read-only folder's cache goes: ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/fastdarts/folders/<hash>``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    base_path = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # the XDG spec ignores a relative one
    return base_path / "fastdarts" / "folders" / hashlib.sha256(str(folder).encode()).hexdigest()[:16]


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (or in its parent, where it would be created)."""
    probe = folder if folder.is_dir() else folder.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".fastdarts-write-test-", dir=probe)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def _build_place(folder: Path, cache_dir: str | Path | None, log: Callable[[str], None]) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if _writable(folder / CACHE_FOLDER):
        return folder / CACHE_FOLDER
    fallback = fallback_cache_root(folder)
    log(f"{folder} is not writable: caching its decoded images in {fallback}")
    return fallback


# ---------------------------------------------------------------- reading and removing caches

def _read_or_drop(final: Path, log: Callable[[str], None]) -> CacheContents | None:
    """The cache at ``final``, or None; a damaged one is removed (where it can be) so it is rebuilt."""
    try:
        return read_cache(final)
    except DamagedCache as exc:
        log(f"the image cache {final} is damaged ({exc}): decoding the images again")
        _remove(final)
        return None


def _remove(folder: Path) -> None:
    """Rename ``folder`` aside (atomic: no reader sees half of it), then delete it; errors are ignored."""
    try:
        aside = Path(tempfile.mkdtemp(prefix=".removing-", dir=folder.parent))
        os.replace(folder, aside / folder.name)
    except OSError:
        aside = folder
    shutil.rmtree(aside, ignore_errors=True)


def _remove_old(place: Path, key: str, folder: Path, per_folder: bool) -> None:
    """Remove the folder's other caches in ``place`` (in a shared ``cache_dir``, only those whose
    meta.json names this folder), and builds left by processes of this host that died."""
    host = socket.gethostname()
    try:
        entries = list(place.iterdir())
    except OSError:  # removed meanwhile: nothing to tidy
        return
    for entry in entries:
        name = entry.name
        if name.startswith(_BUILD):
            pid, _, rest = name[len(_BUILD):].partition("@")
            if rest.rpartition(".")[0] == host and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
        elif name.startswith(".removing-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif (name != key and not name.startswith(".") and entry.is_dir()
              and name.rpartition("-")[0] == key.rpartition("-")[0]):  # same options, older files
            if per_folder or _cache_of(entry) == str(folder):
                _remove(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _cache_of(entry: Path) -> str | None:
    try:
        return json.loads((entry / META).read_text(encoding="utf-8")).get("root")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- building

def _build(index: FolderIndex, place: Path, key: str, image_size: int | None, skip: bool, workers: int,
           progress: bool, log: Callable[[str], None]) -> CacheContents:
    """Build the cache in a temporary folder of ``place`` and rename it to ``place/key``;
    whatever happens before the rename, the temporary folder is removed."""
    created = not place.exists()
    try:
        place.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_BUILD}{os.getpid()}@{socket.gethostname()}.", dir=place))
    except OSError as exc:
        raise FastDartsError(f"cannot create the image cache in {place}: {exc.strerror or exc}; "
                             "make that folder writable") from None
    final = place / key
    try:
        try:
            _decode_into(tmp, index, image_size, skip, workers, progress, log)
            fsync_folder(tmp)
        except OSError as exc:  # image errors are handled per file: this is the cache's disk
            raise FastDartsError(f"cannot write the image cache in {place}: {exc.strerror or exc}; "
                                 f"free space there (or make it writable) and run again") from None
        try:
            os.replace(tmp, final)
        except OSError as exc:
            try:
                theirs = read_cache(final)
            except DamagedCache:
                theirs = None
            if theirs is None:  # otherwise another process finished the same cache first
                raise FastDartsError(f"cannot move the new image cache to {final}: {exc.strerror or exc}; "
                                     "remove that folder and run again") from None
            log(f"another process cached the same images in {final} first: using its cache")
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            try:
                place.rmdir()  # only when empty: a failed first build leaves nothing in DIR
            except OSError:
                pass
        raise
    contents = read_cache(final)
    assert contents is not None
    return contents


def _unreadable(root: Path, rel: str, why: str) -> FastDartsError:
    return FastDartsError(f"cannot read image {root / rel} ({why}): replace or delete it, "
                          "or pass --skip-bad-images to drop unreadable images")


def _check_classes_left(index: FolderIndex, split: str, scanned: Sequence[int], kept: Sequence[int]) -> None:
    """Every class folder of ``split`` held images (the scan saw to it): skipping may not empty one."""
    emptied = sorted(set(scanned) - set(kept))
    if emptied:
        name = index.classes[emptied[0]]
        raise FastDartsError(f"every image of class {name} in {index.root / split / name} is unreadable: "
                             "replace them or remove the class folder")


def _decode_into(tmp: Path, index: FolderIndex, image_size: int | None, skip: bool, workers: int,
                 progress: bool, log: Callable[[str], None]) -> None:
    root = index.root
    train_files = list(index.train_files)
    skipped: list[str] = []
    with WorkerPool(min(workers, len(train_files) + len(index.heldout_files))) as pool:  # no idle forks
        headers = read_headers(pool, root, train_files, progress)
        bad = [(rel, h) for rel, h in zip(train_files, headers) if isinstance(h, str)]
        if bad and not skip:
            raise _unreadable(root, *bad[0])
        skipped += [rel for rel, _ in bad]
        kept = [i for i, h in enumerate(headers) if not isinstance(h, str)]
        _check_classes_left(index, "train", index.train_labels, [index.train_labels[i] for i in kept])
        channels = 1 if all(headers[i][2] in GRAY_MODES for i in kept) else 3
        size = image_size or default_image_size([min(headers[i][0], headers[i][1]) for i in kept])
        kept = [kept[i] for i in interleaved([index.train_labels[i] for i in kept])]
        train_files = [train_files[i] for i in kept]
        train_labels = np.asarray(index.train_labels, dtype=np.int64)[kept]
        test_files, test_labels = list(index.heldout_files), np.asarray(index.heldout_labels, dtype=np.int64)
        shown = f"{size}x{size}, {channels} channel{'s' if channels > 1 else ''}"
        if image_size is None:
            shown += f"; the median shorter side, capped at {MAX_DEFAULT_SIZE}: --image-size sets it"
        log(f"decoding {len(train_files) + len(test_files)} images of {root} once ({shown}) into {tmp.parent}")
        with tqdm(total=len(train_files) + len(test_files), desc="decoding images", unit="img",
                  disable=not progress) as bar:
            train = decode_files(pool, tmp / "train_images.npy", root, train_files, size, channels, bar, not skip)
            if train.bad and not skip:
                row = min(train.bad)
                raise _unreadable(root, train_files[row], train.bad[row])
            test = decode_files(pool, tmp / "test_images.npy", root, test_files, size, channels, bar, not skip)
            if test.bad and not skip:
                row = min(test.bad)
                raise _unreadable(root, test_files[row], test.bad[row])

    counts = {}
    for split, result, files, split_labels, scanned in (
            ("train", train, train_files, train_labels, index.train_labels),
            ("test", test, test_files, test_labels, index.heldout_labels)):
        rows = sorted(result.bad)
        skipped += [files[r] for r in rows]
        kept_labels = np.delete(split_labels, rows)
        _check_classes_left(index, split if split == "train" else index.heldout_split, scanned, kept_labels.tolist())
        if rows:
            drop_rows(tmp / f"{split}_images.npy", rows)
        np.save(tmp / f"{split}_labels.npy", kept_labels)
        counts[split] = len(kept_labels)
    mean, std = mean_std(train.pixel_sum, train.square_sum, counts["train"] * size * size)
    write_meta(tmp, {
        "root": str(root.resolve()), "classes": list(index.classes), "image_size": size, "channels": channels,
        "mean": list(mean), "std": list(std), "counts": counts,
        "heldout_split": index.heldout_split, "skipped": sorted(skipped),
    })


def interleaved(labels: Sequence[int]) -> list[int]:
    """Positions of ``labels`` reordered so that every prefix holds each class in proportion: the j-th of
    a class's n images goes to (j + 1/2) / n of the way, classes in order on ties. DARTS' search split
    (the first part trains w, the rest α) then gives each class its share, as views of the memory-mapped
    cache: nothing is copied."""
    counts = Counter(labels)
    seen: Counter = Counter()
    keys = []
    for i, c in enumerate(labels):
        keys.append((Fraction(2 * seen[c] + 1, 2 * counts[c]), c, i))
        seen[c] += 1
    return [i for _, _, i in sorted(keys)]


# ---------------------------------------------------------------- the data set

def _dataset(contents: CacheContents, log: Callable[[str], None]) -> Dataset:
    meta = contents.meta
    skipped = meta["skipped"]
    if skipped:
        more = f", ... ({len(skipped) - _SHOWN_SKIPPED} more, listed in the cache's {META})" \
            if len(skipped) > _SHOWN_SKIPPED else ""
        log(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''}: "
            f"{', '.join(skipped[:_SHOWN_SKIPPED])}{more}")
    size = meta["image_size"]
    return Dataset(
        name="folder",
        train=ImageSet(torch.from_numpy(contents.train_images), torch.from_numpy(contents.train_labels)),
        test=ImageSet(torch.from_numpy(contents.test_images), torch.from_numpy(contents.test_labels)),
        num_classes=len(meta["classes"]),
        mean=tuple(float(m) for m in meta["mean"]),
        # a channel constant over the whole set has std 0: normalise it by 1, not into NaNs
        std=tuple(float(s) if s > 0 else 1.0 for s in meta["std"]),
        crop_padding=max(1, size // 8),
        flip=True,
        classes=tuple(meta["classes"]),
    )
