"""``--dataset folder``: scanning an ImageFolder tree, decoding it once into a uint8 cache, and the cache's life.

Every image is written with Pillow at test time (PNG, JPEG, BMP, WebP; odd sizes; modes L, RGB, RGBA, P, ...).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdarts.data import image_cache, image_folder
from fastdarts.data.folder_scan import scan_image_folder
from fastdarts.data.image_cache import decode_image
from fastdarts.data.image_folder import cache_key, load_image_folder
from fastdarts.errors import FastDartsError

BILINEAR = Image.Resampling.BILINEAR


# ---------------------------------------------------------------- writing test folders

def save_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (13, 9), seed: int = 0,
               value: int | None = None) -> Path:
    """A random (or constant ``value``) image of ``mode`` and ``size`` (width, height), in the format of its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size

    def pixels(*shape, high=256, dtype=np.uint8):
        return np.full(shape, value, dtype) if value is not None else rng.integers(0, high, shape, dtype=dtype)

    if mode == "I;16":
        im = Image.fromarray(pixels(h, w, high=65536, dtype=np.uint16))
    elif mode == "1":
        im = Image.fromarray(pixels(h, w) > 127)
    elif mode == "P":
        im = Image.fromarray(pixels(h, w, 3)).quantize(16)
        im.info["transparency"] = bytes([0, 128] + [255] * 14)  # two translucent palette entries
    elif mode == "CMYK":
        im = Image.frombytes("CMYK", (w, h), pixels(h, w, 4).tobytes())
    else:
        bands = {"L": (), "LA": (2,), "RGB": (3,), "RGBA": (4,)}[mode]
        im = Image.fromarray(pixels(h, w, *bands))
    assert im.mode == mode
    options = {"lossless": True} if path.suffix.lower() == ".webp" else {}
    im.save(path, **options)
    return path


def make_folder(root: Path, train: int = 4, held_out: int = 2, classes=("ant", "bee", "cow"), split: str = "val",
                suffixes=(".png", ".bmp", ".webp", ".jpg"), mode: str = "RGB") -> Path:
    """``root/train/<class>/<i><suffix>`` and ``root/<split>/<class>/<i><suffix>``, random images of odd sizes."""
    for s, n in (("train", train), (split, held_out)):
        for c, name in enumerate(classes):
            for i in range(n):
                save_image(root / s / name / f"{i}{suffixes[i % len(suffixes)]}", mode, (13 + i, 9 + c),
                           seed=hash((s, c, i)) % 1000)
    return root


def load(root: Path, **kw):
    """``load_image_folder`` quietly, one process, with its log lines."""
    lines: list[str] = []
    kw = {"workers": 1, "progress": False, "log": lines.append, **kw}
    return load_image_folder(root, **kw), lines


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def cache_entries(root: Path) -> list[str]:
    return sorted(os.listdir(root / ".fastdarts-cache"))


def arrays(d) -> tuple[np.ndarray, ...]:
    return (d.train.images.numpy().copy(), d.train.labels.numpy().copy(), d.test.images.numpy().copy(),
            d.test.labels.numpy().copy())


def assert_same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y, strict=True)


def refuse(*args, **kw):
    raise AssertionError("nothing may be decoded or opened here")


# ---------------------------------------------------------------- decoding one image

# (file, mode, (w, h), S, channels, the reference: an independent Pillow statement, its sizes worked out by hand)
REFERENCES = [
    ("a.png", "RGBA", (13, 9), 6, 3, lambda im: im.convert("RGB").resize((8, 6), BILINEAR).crop((1, 0, 7, 6))),
    ("b.bmp", "RGB", (9, 13), 4, 3, lambda im: im.resize((4, 5), BILINEAR).crop((0, 0, 4, 4))),
    ("c.png", "P", (13, 9), 6, 3,
     lambda im: im.convert("RGBA").convert("RGB").resize((8, 6), BILINEAR).crop((1, 0, 7, 6))),
    ("d.webp", "RGB", (7, 11), 3, 3, lambda im: im.resize((3, 4), BILINEAR).crop((0, 0, 3, 3))),
    ("e.jpg", "CMYK", (13, 9), 6, 3, lambda im: im.convert("RGB").resize((8, 6), BILINEAR).crop((1, 0, 7, 6))),
    ("f.png", "LA", (13, 9), 6, 1, lambda im: im.convert("L").resize((8, 6), BILINEAR).crop((1, 0, 7, 6))),
    ("g.png", "L", (13, 9), 20, 1, lambda im: im.resize((28, 20), BILINEAR).crop((4, 0, 24, 20))),  # upsampled
    ("h.png", "RGB", (13, 9), 9, 1, lambda im: im.convert("L").crop((2, 0, 11, 9))),  # colour in a gray set
    ("i.png", "1", (13, 9), 6, 3,
     lambda im: im.convert("L").convert("RGB").resize((8, 6), BILINEAR).crop((1, 0, 7, 6))),
]


@pytest.mark.parametrize("name,mode,size,S,channels,reference", REFERENCES, ids=[r[0] for r in REFERENCES])
def test_decode_resize_crop_match_pillow(tmp_path, name, mode, size, S, channels, reference):
    path = save_image(tmp_path / name, mode, size, seed=3)
    expected = np.asarray(reference(Image.open(path)))
    expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's about a palette's transparency, which RGBA expresses
        got = decode_image(path, S, channels)
    assert got.dtype == np.uint8 and got.shape == (channels, S, S)
    np.testing.assert_array_equal(got, expected)


def test_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    path = save_image(tmp_path / "big.jpg", "RGB", (70, 50), seed=4)
    im = Image.open(path)
    im.draft(None, (11, 8))  # 70x50 -> 11x8 (= int(8 * 70 / 50) x 8): decoded at 1/4 scale, 18x13
    assert im.size == (18, 13)
    expected = np.asarray(im.convert("RGB").resize((11, 8), BILINEAR).crop((2, 0, 10, 8))).transpose(2, 0, 1)
    np.testing.assert_array_equal(decode_image(path, 8, 3), expected)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    path = save_image(tmp_path / "deep.png", "I;16", (13, 9), seed=5)
    raw = np.asarray(Image.open(path)).astype(np.float64)
    assert raw.max() > 255
    expected = np.rint(raw / 257).astype(np.uint8)[:, 2:11]  # 13x9 at S=9: no resize, centre crop
    np.testing.assert_array_equal(decode_image(path, 9, 1), expected[None])


def test_loaded_image_matches_pillow(tmp_path):
    root = tmp_path / "data"
    path = save_image(root / "train" / "a" / "x.png", "RGBA", (13, 9), seed=6)
    save_image(root / "train" / "b" / "y.png", "RGB", (9, 13), seed=7)
    save_image(root / "val" / "a" / "z.png", "RGB", (9, 13), seed=8)
    d, _ = load(root, image_size=6)
    [row] = np.flatnonzero(d.train.labels.numpy() == 0)
    expected = np.asarray(Image.open(path).convert("RGB").resize((8, 6), BILINEAR).crop((1, 0, 7, 6)))
    np.testing.assert_array_equal(d.train.images[row].numpy(), expected.transpose(2, 0, 1))


def test_unreadable_images_are_named(tmp_path):
    bad = tmp_path / "garbage.png"
    bad.write_text("not an image")
    with pytest.raises(image_cache.UnreadableImage, match="not an image Pillow can read"):
        decode_image(bad, 4, 3)
    whole = save_image(tmp_path / "whole.png", "RGB", (13, 9)).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(image_cache.UnreadableImage, match="truncated"):
        decode_image(tmp_path / "cut.png", 4, 3)


# ---------------------------------------------------------------- channels, labels, order, size, statistics

def test_grayscale_set_has_one_channel(tmp_path):
    root = tmp_path / "data"
    for i, (name, mode) in enumerate([("l.png", "L"), ("la.png", "LA"), ("one.bmp", "1"), ("deep.png", "I;16"),
                                      ("l.jpg", "L"), ("l.BMP", "L")]):  # (WebP has no grayscale mode)
        save_image(root / "train" / ("a" if i % 2 else "b") / name, mode, (13, 9), seed=i)
    colour = save_image(root / "val" / "a" / "colour.png", "RGB", (13, 9), seed=9)
    d, _ = load(root)
    assert d.in_channels == 1 and d.image_size == 9 and len(d.mean) == len(d.std) == 1
    luminance = np.asarray(Image.open(colour).convert("L").crop((2, 0, 11, 9)))
    np.testing.assert_array_equal(d.test.images[0, 0].numpy(), luminance)


def test_mixed_set_has_three_channels(tmp_path):
    root = tmp_path / "data"
    gray = save_image(root / "train" / "a" / "gray.png", "L", (13, 9), seed=1)
    save_image(root / "train" / "b" / "colour.png", "RGB", (13, 9), seed=2)
    save_image(root / "val" / "b" / "v.png", "L", (13, 9), seed=3)
    d, _ = load(root)
    assert d.in_channels == 3 and len(d.mean) == 3
    [row] = np.flatnonzero(d.train.labels.numpy() == 0)
    expected = np.asarray(Image.open(gray).crop((2, 0, 11, 9)))
    for c in range(3):
        np.testing.assert_array_equal(d.train.images[row, c].numpy(), expected)


def test_labels_follow_sorted_class_names_and_val_maps_to_them(tmp_path):
    root = tmp_path / "data"
    value = {"C": 30, "a": 60, "b": 90}  # sorted names: C (0), a (1), b (2); each class one constant value
    for name in ("b", "a", "C"):
        for i, suffix in enumerate((".png", ".BMP", ".WebP")):
            save_image(root / "train" / name / f"{i}{suffix}", "L", (9, 9), value=value[name])
    save_image(root / "train" / "a" / "sub" / "deeper" / "x.png", "L", (9, 9), value=60)  # found recursively
    for ignored in ("a/.hidden.png", "a/.ipynb_checkpoints/x.png", "b/x.gif", "C/x.tiff"):
        save_image(root / "train" / ignored, "L", (9, 9), value=200)
    (root / "train" / "b" / "notes.txt").write_text("x")
    (root / "train" / ".hidden_class").mkdir()
    save_image(root / "val" / "b" / "v.png", "L", (9, 9), value=90)
    save_image(root / "val" / "a" / "v.jpeg", "L", (9, 9), value=60)

    index = scan_image_folder(root)
    assert index.classes == ("C", "a", "b") and index.heldout_split == "val"
    assert index.train_files == ("train/C/0.png", "train/C/1.BMP", "train/C/2.WebP",
                                 "train/a/0.png", "train/a/1.BMP", "train/a/2.WebP", "train/a/sub/deeper/x.png",
                                 "train/b/0.png", "train/b/1.BMP", "train/b/2.WebP")
    assert index.train_labels == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2)
    assert index.heldout_files == ("val/a/v.jpeg", "val/b/v.png") and index.heldout_labels == (1, 2)

    d, _ = load(root)
    assert d.classes == ("C", "a", "b") and d.num_classes == 3 and d.name == "folder"
    label_of_value = {30: 0, 60: 1, 90: 2}
    for images, labels in ((d.train.images, d.train.labels), (d.test.images, d.test.labels)):
        values = [int(v) for v in images[:, 0, 0, 0]]
        assert all(np.all(images[i].numpy() == values[i]) for i in range(len(values)))
        assert labels.tolist() == [label_of_value[v] for v in values]  # (a constant JPEG decodes exactly)
    assert sorted(d.train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform.startswith("win"), reason="needs symbolic links")
def test_linked_folders_are_followed_once(tmp_path):
    root = make_folder(tmp_path / "data")
    outside = save_image(tmp_path / "elsewhere" / "e.png").parent
    os.symlink(outside, root / "train" / "ant" / "linked")
    os.symlink(root / "train" / "ant", root / "train" / "ant" / "loop")  # a loop: walked once
    index = scan_image_folder(root)
    ant = [f for f in index.train_files if f.startswith("train/ant/")]
    assert ant == ["train/ant/0.png", "train/ant/1.bmp", "train/ant/2.webp", "train/ant/3.jpg",
                   "train/ant/linked/e.png"]


def test_held_out_split_is_test_when_there_is_no_val(tmp_path):
    root = make_folder(tmp_path / "data", split="test")
    assert scan_image_folder(root).heldout_split == "test"
    d, _ = load(root)
    assert len(d.test) == 6


def test_training_images_are_interleaved_and_split_by_position_without_a_copy(tmp_path):
    root = make_folder(tmp_path / "data", train=6)
    (root / "train" / "cow" / "5.bmp").unlink()  # classes of 6, 6 and 5 images
    d, _ = load(root)
    # The j-th of a class's n images at (2j + 1) / 2n, classes in order on ties: 1/12 ant, 1/12 bee,
    # 1/10 cow, 3/12 ant, 3/12 bee, 3/10 cow, ... 9/10 cow, 11/12 ant, 11/12 bee.
    assert not d.ordered_by_class and d.train.labels.tolist() == [0, 1, 2] * 5 + [0, 1]
    # Within a class the scan's order is kept: ant's images are 0.png ... 5.png in that order.
    ants = d.train.images[d.train.labels == 0]
    expected = np.stack([decode_image(root / "train" / "ant" / name, d.image_size, d.in_channels)
                         for name in sorted(os.listdir(root / "train" / "ant"))])
    np.testing.assert_array_equal(ants.numpy(), expected)
    weights, alphas = d.search_split(0.5)
    assert np.bincount(weights.labels.numpy()).tolist() == [3, 3, 2]
    assert np.bincount(alphas.labels.numpy()).tolist() == [3, 3, 3]
    # DARTS' split by position: views of the memory-mapped cache, nothing copied.
    assert weights.images.untyped_storage().data_ptr() == d.train.images.untyped_storage().data_ptr()


def test_default_size_is_the_median_shorter_side(tmp_path):
    root = tmp_path / "small"
    for i, (w, h) in enumerate([(5, 30), (20, 7), (9, 9), (11, 12)]):  # shorter sides 5, 7, 9, 11
        save_image(root / "train" / "ab"[i % 2] / f"{i}.png", "RGB", (w, h), seed=i)
    save_image(root / "val" / "a" / "v.png", "RGB", (40, 40))  # held-out sizes do not count
    d, lines = load(root)
    assert d.image_size == 7 and d.crop_padding == 1  # the lower middle of an even count: a real image's
    assert any("7x7" in line and "median shorter side" in line for line in lines)
    assert load(root, image_size=10)[0].image_size == 10

    root = tmp_path / "large"
    for i in range(3):
        save_image(root / "train" / "ab"[i % 2] / f"{i}.jpg", "RGB", (100, 80), seed=i)
    save_image(root / "val" / "b" / "v.png", "RGB", (100, 80))
    d, _ = load(root)
    assert d.image_size == 64 and d.crop_padding == 8 and d.flip


def test_default_size_comes_from_the_headers_before_any_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    decoded, seen = [], []
    real = image_cache.decode_image
    monkeypatch.setattr(image_cache, "decode_image", lambda *a: decoded.append(a) or real(*a))
    monkeypatch.setattr(image_folder, "default_image_size", lambda s: seen.append((sorted(s), len(decoded))) or 9)
    assert load(root)[0].image_size == 9
    assert seen == [(sorted(min(13 + i, 9 + c) for c in range(3) for i in range(4)), 0)]
    assert len(decoded) == 18


def test_constant_channel_is_normalised_by_one(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b"):
        save_image(root / "train" / name / "x.png", "L", (9, 9), value=77)
        save_image(root / "val" / name / "x.png", "L", (9, 9), value=77)
    d, _ = load(root)
    assert d.mean == (77 / 255,) and d.std == (1.0,)  # its std is 0: dividing by it would make NaNs


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_mean_and_std_are_the_training_images(tmp_path, mode):
    root = make_folder(tmp_path / "data", mode=mode, suffixes=(".png", ".webp"))
    d, _ = load(root)
    x = d.train.images.numpy()
    count = x.shape[0] * x.shape[2] * x.shape[3]
    assert d.mean == tuple(int(s) / (count * 255) for s in x.sum(axis=(0, 2, 3), dtype=np.int64))
    as_float = x.astype(np.float64) / 255
    np.testing.assert_allclose(d.mean, as_float.mean(axis=(0, 2, 3)), rtol=1e-12, atol=0)
    np.testing.assert_allclose(d.std, as_float.std(axis=(0, 2, 3)), rtol=1e-12, atol=0)
    [cache] = cache_entries(root)
    meta = json.loads((root / ".fastdarts-cache" / cache / "meta.json").read_text())
    assert tuple(meta["mean"]) == d.mean and tuple(meta["std"]) == d.std
    assert meta["counts"] == {"train": 12, "test": 6} and meta["channels"] == len(d.mean)


# ---------------------------------------------------------------- the cache

def test_cache_is_memory_mapped_and_reused_without_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    first, lines = load(root)
    assert any(line.startswith("decoding 18 images") for line in lines)
    expected = arrays(first)
    monkeypatch.setattr(image_cache, "decode_image", refuse)
    monkeypatch.setattr(image_cache, "read_header", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable arrays
        again, lines = load(root)
    assert_same(arrays(again), expected)
    assert again.mean == first.mean and again.std == first.std and again.classes == first.classes
    assert len(lines) == 1 and lines[0].startswith("using the images")
    [cache] = cache_entries(root)
    assert sorted(os.listdir(root / ".fastdarts-cache" / cache)) == [
        "meta.json", "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]
    if sys.platform.startswith("linux"):  # mapped, not read
        maps = Path("/proc/self/maps").read_text()
        assert str(root.resolve() / ".fastdarts-cache" / cache / "train_images.npy") in maps


def _change_mtime(root):
    path = root / "train" / "bee" / "1.bmp"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _rewrite(root):
    save_image(root / "train" / "bee" / "1.bmp", "RGB", (13, 10), seed=99)


def _add(root):
    save_image(root / "train" / "cow" / "new" / "n.png", "RGB", (15, 9), seed=98)


def _remove(root):
    (root / "val" / "ant" / "1.bmp").unlink()


@pytest.mark.parametrize("change", [_change_mtime, _rewrite, _add, _remove])
def test_cache_is_rebuilt_when_a_file_changes(tmp_path, change):
    root = make_folder(tmp_path / "data")
    first, _ = load(root)
    [old] = cache_entries(root)
    before = arrays(first)
    change(root)
    second, lines = load(root)
    [new] = cache_entries(root)
    assert new != old and any(line.startswith("decoding") for line in lines)
    counts = (len(second.train), len(second.test))
    assert counts == {_add: (13, 6), _remove: (12, 5)}.get(change, (12, 6))
    if change is _rewrite:
        assert not np.array_equal(arrays(second)[0], before[0])
    if change is _change_mtime:
        assert_same(arrays(second), before)


def test_cache_is_rebuilt_for_another_size(tmp_path):
    root = make_folder(tmp_path / "data")
    assert load(root)[0].image_size == 10  # shorter sides 9, 10, 11, four each
    [old] = cache_entries(root)
    assert load(root, image_size=5)[0].image_size == 5
    # Another size is another cache; the default size's is kept (a search at one size, a training at another).
    new = cache_key(scan_image_folder(root), 5, False)
    assert cache_entries(root) == sorted([old, new])
    assert load(root, image_size=5, skip_bad_images=True)[0].image_size == 5  # the skip option is in the key too
    assert len(cache_entries(root)) == 3
    # An explicit size equal to the default's is served by the default's cache: no decode, no new cache.
    assert load(root, image_size=10)[0].image_size == 10 and len(cache_entries(root)) == 3


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["decoder", "parent"])
def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch, workers, interrupt, where):
    """An error or Ctrl-C in the middle of decoding: in the decoder (in a worker when there are
    workers) or in the process collecting the workers' results."""
    if workers > 1 and where == "decoder" and not sys.platform.startswith("linux"):
        pytest.skip("the patched decoder reaches the workers only through fork")
    root = make_folder(tmp_path / "data")
    before = tree(root)
    if where == "decoder":
        real = image_cache.decode_image

        def decode(path, *args):
            if str(path).endswith(os.path.join("train", "bee", "2.webp")):
                raise interrupt("mid-build")
            return real(path, *args)

        monkeypatch.setattr(image_cache, "decode_image", decode)
    else:
        calls = []
        real_add = image_cache.Decoded.add

        def add(self, other):
            calls.append(other)
            if len(calls) == 2:
                raise interrupt("mid-build")
            real_add(self, other)

        monkeypatch.setattr(image_cache.Decoded, "add", add)
    with pytest.raises(interrupt, match="mid-build"):
        load(root, workers=workers)
    assert tree(root) == before


def test_failed_rebuild_keeps_the_old_cache_and_leaves_nothing(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    load(root)
    _change_mtime(root)
    before = tree(root)
    monkeypatch.setattr(image_folder, "write_meta", refuse)  # fails at the very end of the build
    with pytest.raises(AssertionError):
        load(root)
    assert tree(root) == before


def _damage_meta(cache):
    (cache / "meta.json").write_text("{not json")


def _damage_format(cache):
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "format": 999}))


def _damage_shape(cache):
    np.save(cache / "train_images.npy", np.zeros((12, 3, 4, 4), np.uint8))


def _damage_truncate(cache):
    path = cache / "test_images.npy"
    os.truncate(path, path.stat().st_size - 7)


def _damage_labels(cache):
    np.save(cache / "train_labels.npy", np.full(12, 3, np.int64))  # 3 classes: labels 0..2


def _damage_missing(cache):
    (cache / "test_labels.npy").unlink()


@pytest.mark.parametrize("damage", [_damage_meta, _damage_format, _damage_shape, _damage_truncate, _damage_labels,
                                    _damage_missing])
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    root = make_folder(tmp_path / "data")
    d, _ = load(root)
    expected = arrays(d)
    del d
    [cache] = cache_entries(root)
    damage(root / ".fastdarts-cache" / cache)
    again, lines = load(root)
    assert any("is damaged" in line and cache in line for line in lines)
    assert any(line.startswith("decoding") for line in lines)
    assert_same(arrays(again), expected)
    assert cache_entries(root) == [cache]


def test_a_cache_another_process_finished_first_is_used(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    key = cache_key(scan_image_folder(root), None, False)
    real = image_folder.fsync_folder

    def finish_elsewhere_first(tmp):  # another process renames the same cache into place just before we do
        real(tmp)
        shutil.copytree(tmp, tmp.parent / key)

    monkeypatch.setattr(image_folder, "fsync_folder", finish_elsewhere_first)
    d, lines = load(root)
    assert any("another process" in line for line in lines)
    assert cache_entries(root) == [key] and len(d.train) == 12


def test_builds_of_dead_processes_are_removed(tmp_path):
    root = make_folder(tmp_path / "data")
    host = socket.gethostname()
    dead = root / ".fastdarts-cache" / f".build-999999999@{host}.x1"
    alive = root / ".fastdarts-cache" / f".build-{os.getpid()}@{host}.x2"
    other_host = root / ".fastdarts-cache" / ".build-999999999@elsewhere.x3"
    for folder in (dead, alive, other_host):
        folder.mkdir(parents=True)
        (folder / "train_images.npy").write_bytes(b"half")
    load(root)
    assert not dead.exists() and alive.exists() and other_host.exists()


def test_read_only_folder_caches_elsewhere(tmp_path, monkeypatch):
    """The fallback's logic, with the write test answered "no" (it runs as root too)."""
    root = make_folder(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(image_folder, "_writable", lambda folder: False)
    before = tree(root)
    d, lines = load(root)
    fallback = image_folder.fallback_cache_root(root.resolve())
    assert fallback.parent == tmp_path / "xdg" / "fastdarts" / "folders"
    assert any("is not writable" in line and str(fallback) in line for line in lines)
    assert tree(root) == before
    assert os.listdir(fallback) == [cache_key(scan_image_folder(root), None, False)]
    monkeypatch.setattr(image_cache, "decode_image", refuse)
    assert_same(arrays(load(root)[0]), arrays(d))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="chmod does not bite as root")
def test_read_only_folder_caches_elsewhere_for_real(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root.chmod(0o555)
    try:
        d, lines = load(root)
    finally:
        root.chmod(0o755)
    assert any("is not writable" in line for line in lines)
    assert not (root / ".fastdarts-cache").exists() and len(d.train) == 12


def test_cache_dir_overrides_and_keeps_other_folders_caches(tmp_path):
    shared = tmp_path / "shared"
    a = make_folder(tmp_path / "a")
    b = make_folder(tmp_path / "b", classes=("x", "y"))
    load(a, cache_dir=shared)
    load(b, cache_dir=shared)
    assert not (a / ".fastdarts-cache").exists() and len(os.listdir(shared)) == 2
    b_key = cache_key(scan_image_folder(b), None, False)
    load(a, cache_dir=shared, image_size=5)  # another size: a cache beside the others
    a5_key = cache_key(scan_image_folder(a), 5, False)
    assert len(os.listdir(shared)) == 3 and {b_key, a5_key} <= set(os.listdir(shared))
    save_image(a / "train" / "ant" / "extra.png", "RGB", (12, 12), seed=9)
    load(a, cache_dir=shared)  # a's files changed: its old default-size cache is replaced, b's is kept
    assert sorted(os.listdir(shared)) == sorted([b_key, a5_key, cache_key(scan_image_folder(a), None, False)])


def test_workers_give_identical_arrays(tmp_path):
    root = make_folder(tmp_path / "data", train=6)
    one, _ = load(root, workers=1, cache_dir=tmp_path / "one")
    two, _ = load(root, workers=2, cache_dir=tmp_path / "two")
    assert_same(arrays(one), arrays(two))
    assert one.mean == two.mean and one.std == two.std


# ---------------------------------------------------------------- errors

def _tree_missing(root):
    return root / "nowhere", "does not exist"


def _tree_file(root):
    (root / "f").write_text("x")
    return root / "f", "is a file, not a folder"


def _tree_no_train(root):
    save_image(root / "val" / "a" / "x.png")
    return root, f"no training folder {root / 'train'}"


def _tree_no_val(root):
    save_image(root / "train" / "a" / "x.png")
    save_image(root / "train" / "b" / "x.png")
    return root, f"no held-out folder {root / 'val'} (nor {root / 'test'})"


def _tree_empty_class(root):
    make_folder(root)
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "readme.txt").write_text("x")
    return root, f"class folder {root / 'train' / 'dog'} holds no images"


def _tree_empty_val_class(root):
    make_folder(root)
    (root / "val" / "bee" / "0.png").unlink()
    (root / "val" / "bee" / "1.bmp").unlink()
    return root, f"class folder {root / 'val' / 'bee'} holds no images"


def _tree_one_class(root):
    make_folder(root, classes=("solo",))
    return root, "only one class folder (solo)"


def _tree_no_classes(root):
    save_image(root / "train" / "loose.png")
    save_image(root / "val" / "a" / "x.png")
    return root, "has no class folders"


def _tree_unknown_val_class(root):
    make_folder(root)
    save_image(root / "val" / "emu" / "x.png")
    return root, f"class folder {root / 'val' / 'emu'} has no counterpart in {root / 'train'}"


@pytest.mark.parametrize("make", [_tree_missing, _tree_file, _tree_no_train, _tree_no_val, _tree_empty_class,
                                  _tree_empty_val_class, _tree_one_class, _tree_no_classes, _tree_unknown_val_class])
def test_layout_errors_name_the_folder(tmp_path, make):
    root, message = make(tmp_path)
    with pytest.raises(FastDartsError) as info:
        load(root)
    text = str(info.value)
    assert message in text and str(root) in text and "\n" not in text
    assert not (tmp_path / ".fastdarts-cache").exists() and not (root / ".fastdarts-cache").exists()


def _bad_images(root):
    """A truncated BMP in train/ and a text file called .png in val/."""
    whole = (root / "train" / "ant" / "1.bmp").read_bytes()  # early in the stored order
    (root / "train" / "ant" / "1.bmp").write_bytes(whole[:len(whole) // 2])
    (root / "val" / "cow" / "0.png").write_text("not an image")


def test_unreadable_image_is_an_error_naming_it(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    _bad_images(root)
    calls = []
    real = image_cache.decode_image
    monkeypatch.setattr(image_cache, "decode_image", lambda *a: calls.append(a) or real(*a))
    with pytest.raises(FastDartsError) as info:
        load(root)
    assert len(calls) < 12  # it stopped at the bad file, before the last training image
    monkeypatch.undo()
    assert str(root / "train" / "ant" / "1.bmp") in str(info.value) and "--skip-bad-images" in str(info.value)
    assert "truncated" in str(info.value)
    (root / "train" / "ant" / "1.bmp").unlink()
    with pytest.raises(FastDartsError, match="--skip-bad-images") as info:
        load(root, workers=2)
    assert str(root / "val" / "cow" / "0.png") in str(info.value) and "not an image" in str(info.value)
    assert not (root / ".fastdarts-cache").exists()


def test_header_errors_stop_before_decoding(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "train" / "ant" / "2.webp").write_bytes(b"RIFF")
    with pytest.raises(FastDartsError, match="--skip-bad-images") as info:
        load(root)
    assert str(root / "train" / "ant" / "2.webp") in str(info.value)


@pytest.mark.parametrize("workers", [1, 2])
def test_skip_bad_images_drops_them(tmp_path, workers):
    root = make_folder(tmp_path / "data")
    _bad_images(root)
    (root / "train" / "cow" / "3.jpg").write_text("not a jpeg either")  # fails at the header
    d, lines = load(root, skip_bad_images=True, workers=workers)
    assert (len(d.train), len(d.test)) == (10, 5)
    assert np.bincount(d.train.labels.numpy()).tolist() == [3, 4, 3]
    assert np.bincount(d.test.labels.numpy()).tolist() == [2, 2, 1]
    assert "skipped 3 unreadable images: train/ant/1.bmp, train/cow/3.jpg, val/cow/0.png" in lines
    # no zero rows were left where the bad images were
    assert all(d.train.images[i].any() for i in range(len(d.train)))
    assert all(d.test.images[i].any() for i in range(len(d.test)))
    [cache] = cache_entries(root)
    meta = json.loads((root / ".fastdarts-cache" / cache / "meta.json").read_text())
    assert meta["skipped"] == ["train/ant/1.bmp", "train/cow/3.jpg", "val/cow/0.png"]
    # the good images are those of a folder without the bad ones
    for rel in meta["skipped"]:
        (root / rel).unlink()
    clean, _ = load(root)
    for split in ("train", "test"):
        a, b = getattr(d, split), getattr(clean, split)
        key = lambda s: sorted(range(len(s)), key=lambda i: (int(s.labels[i]), s.images[i].numpy().tobytes()))
        np.testing.assert_array_equal(a.images.numpy()[key(a)], b.images.numpy()[key(b)])


def test_skip_message_lists_the_first_names(tmp_path):
    root = make_folder(tmp_path / "data", train=6)
    for i in range(5):
        (root / "train" / "ant" / f"bad{i}.png").write_text("x")
    d, lines = load(root, skip_bad_images=True)
    assert ("skipped 5 unreadable images: train/ant/bad0.png, train/ant/bad1.png, train/ant/bad2.png, "
            "... (2 more, listed in the cache's meta.json)") in lines
    assert len(d.train) == 18
    _, lines = load(root, skip_bad_images=True)  # cached: said again
    assert any(line.startswith("skipped 5 unreadable images") for line in lines)


@pytest.mark.parametrize("split", ["train", "val"])
def test_class_left_empty_by_skipping_is_an_error(tmp_path, split):
    root = make_folder(tmp_path / "data")
    for path in (root / split / "cow").iterdir():
        path.write_text("x")
    with pytest.raises(FastDartsError) as info:
        load(root, skip_bad_images=True)
    assert f"every image of class cow in {root / split / 'cow'} is unreadable" in str(info.value)
    assert not (root / ".fastdarts-cache").exists()


@pytest.mark.parametrize("kw", [{"image_size": 0}, {"image_size": -3}, {"image_size": 2.5}, {"image_size": True},
                                {"workers": -1}, {"workers": True}])
def test_bad_arguments(tmp_path, kw):
    root = make_folder(tmp_path / "data")
    with pytest.raises(FastDartsError, match="positive whole number|non-negative whole number"):
        load(root, **kw)


def test_no_workers_decodes_in_this_process(tmp_path):
    root = make_folder(tmp_path / "data")
    assert_same(arrays(load(root, workers=0, cache_dir=tmp_path / "zero")[0]),
                arrays(load(root, workers=2, cache_dir=tmp_path / "two")[0]))


def test_a_16_bit_png_opened_as_mode_i_is_scaled_not_clipped(tmp_path):
    """Pillow releases before I;16 opened 16-bit grayscale PNGs as mode I: scaled by 1/257 all the same."""
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257, 30000, 65535]], dtype=np.uint16)).save(path)
    with Image.open(path) as im:
        older = im.convert("I")
    older.format = "PNG"  # what an older Pillow's PngImagePlugin gives
    assert np.asarray(image_cache._gray8(older)).tolist() == [[0, 1, round(30000 / 257), 255]]
