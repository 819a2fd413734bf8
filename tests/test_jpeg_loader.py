"""The streaming image loader (ImageNet's route): transforms against independent statements of
torchvision's, colour jitter against formulas, determinism across workers, shards and passes."""
from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from fastdarts.data.jpeg_loader import JpegLoader, image_rng
from fastdarts.data.jpeg_transforms import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    check_jitter,
    color_jitter,
    draft_scale,
    draw_jitter,
    draw_train,
    eval_image,
    random_resized_crop_box,
    resized_size,
    train_image,
)
from fastdarts.data.loader import mix_seed
from fastdarts.errors import FastDartsError

JITTER = (0.4, 0.4, 0.4, 0.2)
PLAIN = dict(device="cpu", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # x is the uint8 pixels / 255


def pattern(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus a little noise: JPEG keeps them, and every pixel differs."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 24, (height, width, 3))
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y + 40 * seed) % 256], axis=2)
    return ((base * 0.85 + noise) % 256).astype(np.uint8)


def write_images(folder, n: int, size=(50, 40), mode="RGB", ext="jpg") -> list[str]:
    """``n`` small images ``size`` = (width, height) of varying shape; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        width, height = size[0] + (k % 3) * 7, size[1] + (k % 2) * 5
        img = Image.fromarray(pattern(width, height, k)).convert(mode)
        path = folder / f"img_{k}.{ext}"
        img.save(path, **({"quality": 92} if ext == "jpg" else {}))
        paths.append(str(path))
    return paths


def as_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [b, 3, S, S] as the loader's float (``PLAIN`` normalisation) shows them."""
    return x.to(torch.float32) / 255.0


def collect(loader, batches=None, epoch=0):
    out = loader.epoch(epoch) if batches is None else loader.cycle(epoch)
    got = []
    for x, y in out:
        got.append((x.clone(), y.clone()))
        if batches is not None and len(got) == batches:
            break
    return got


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------- independent statements of torchvision


def tv_rrc_params(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params as torchvision writes it, drawing from ``rng`` in the same order."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def tv_train_pixels(path, rng, size):
    """RandomResizedCrop(size) + RandomHorizontalFlip() on ImageFolder's RGB image: uint8 [3, S, S]
    and the flip (before the flip, the unflipped crop is returned too)."""
    img = Image.open(path).convert("RGB")
    i, j, h, w = tv_rrc_params(img.size[0], img.size[1], rng)
    crop = img.crop((j, i, j + w, i + h)).resize((size, size), Image.BILINEAR)
    flip = rng.random() < 0.5
    plain = np.array(crop)
    out = plain[:, ::-1] if flip else plain
    return torch.from_numpy(out.copy()).permute(2, 0, 1), torch.from_numpy(plain).permute(2, 0, 1), flip


def tv_eval_pixels(path, size, resize):
    """Resize(resize) + CenterCrop(size) on ImageFolder's RGB image: uint8 [3, S, S]."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return torch.from_numpy(np.array(img.crop((left, top, left + size, top + size)))).permute(2, 0, 1)


# ---------------------------------------------------------------- eval transform


def test_eval_matches_pillow_statement_exactly(tmp_path):
    paths = write_images(tmp_path, 6, size=(50, 40))
    # a tall one, and one whose shorter side already is the resize (torchvision then keeps it as is)
    Image.fromarray(pattern(21, 60, 7)).save(tmp_path / "tall.jpg", quality=92)
    Image.fromarray(pattern(33, 20, 8)).save(tmp_path / "exact.jpg", quality=92)
    paths += [str(tmp_path / "tall.jpg"), str(tmp_path / "exact.jpg")]
    loader = JpegLoader(paths, list(range(8)), 3, train=False, image_size=16, resize=20, shuffle=False,
                        workers=0, draft=False, **PLAIN)
    got = collect(loader)
    x = torch.cat([b[0] for b in got])
    assert [b[1].tolist() for b in got] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    for k, path in enumerate(paths):
        assert torch.equal(x[k], as_pixels(tv_eval_pixels(path, 16, 20))), path


def test_eval_centre_crop_rounds_half_to_even(tmp_path):
    # resize 21 of a 42x63 image -> 21x31; a 16 crop leaves 5 and 15 spare pixels:
    # offsets round(2.5) = 2, round(7.5) = 8
    Image.fromarray(pattern(42, 63, 1)).save(tmp_path / "a.png")
    assert resized_size(42, 63, 21) == (21, 31)
    img = Image.open(tmp_path / "a.png").convert("RGB").resize((21, 31), Image.BILINEAR)
    expect = np.array(img)[8:24, 2:18]
    assert np.array_equal(eval_image(tmp_path / "a.png", 16, 21, draft=False), expect)


def test_normalisation_uses_mean_and_std(tmp_path):
    paths = write_images(tmp_path, 2)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    loader = JpegLoader(paths, [0, 1], 2, device="cpu", mean=mean, std=std, train=False, image_size=16, resize=20,
                        shuffle=False, workers=0)
    plain = JpegLoader(paths, [0, 1], 2, train=False, image_size=16, resize=20, shuffle=False, workers=0, **PLAIN)
    (x, _), = collect(loader)
    (p, _), = collect(plain)
    expect = (p - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.equal(x, expect)


# ---------------------------------------------------------------- train geometry


@pytest.mark.parametrize("width, height", [(50, 40), (40, 50), (224, 224), (13, 7), (3, 90), (90, 3), (1, 1)])
def test_random_resized_crop_matches_torchvision_given_same_draws(width, height):
    for seed in range(200):
        box = random_resized_crop_box(width, height, np.random.default_rng(seed))
        assert box == tv_rrc_params(width, height, np.random.default_rng(seed))
        top, left, h, w = box
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0


class FailingDraws:
    """Draws that never fit: scale 1 and the widest ratio (the crop is wider than the image)."""

    def uniform(self, lo, hi):
        return hi

    def integers(self, lo, hi):
        raise AssertionError("no try should fit")


@pytest.mark.parametrize("width, height, expect", [
    (10, 200, (93, 0, 13, 10)),   # too tall for 3/4: full width, height round(10 / 0.75) = 13, centred
    (200, 10, (0, 93, 10, 13)),   # too wide for 4/3: full height, width round(10 * 4 / 3) = 13
    (30, 30, (0, 0, 30, 30)),     # ratio in range: the whole image
])
def test_random_resized_crop_fallback(width, height, expect):
    assert random_resized_crop_box(width, height, FailingDraws()) == expect
    assert tv_rrc_params(width, height, FailingDraws()) == expect


def test_train_geometry_matches_pillow_statement_exactly(tmp_path):
    """Crop + resize + flip, with the draws of the generator seeded by (pass seed, position)."""
    paths = write_images(tmp_path, 12)
    seed, epoch = 5, 3
    loader = JpegLoader(paths, list(range(12)), 5, train=True, image_size=16, shuffle=True, seed=seed, workers=0,
                        jitter=None, draft=False, **PLAIN)
    got = collect(loader, epoch=epoch)
    x, y = torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])
    assert sorted(y.tolist()) == list(range(12)) and y.tolist() != list(range(12))
    pass_seed = mix_seed(seed, epoch, 0)
    flips = []
    for position, index in enumerate(y.tolist()):
        expect, unflipped, flip = tv_train_pixels(paths[index], np.random.default_rng((pass_seed, position)), 16)
        assert torch.equal(x[position], as_pixels(expect)), position
        if flip:
            assert torch.equal(x[position], as_pixels(unflipped).flip(2))
        flips.append(flip)
    assert any(flips) and not all(flips)


def test_train_image_flip_mirrors_the_same_crop(tmp_path):
    path = write_images(tmp_path, 1)[0]
    seeds = {}
    for seed in range(50):
        _, draws = train_image(path, np.random.default_rng(seed), 16, draft=False)
        seeds.setdefault(draws.flip, seed)
    flipped, draws = train_image(path, np.random.default_rng(seeds[True]), 16, draft=False)
    assert draws.flip
    top, left, h, w = draws.box
    crop = Image.open(path).convert("RGB").crop((left, top, left + w, top + h)).resize((16, 16), Image.BILINEAR)
    assert np.array_equal(flipped, np.array(crop)[:, ::-1])
    assert not np.array_equal(flipped, np.array(crop))


# ---------------------------------------------------------------- colour jitter


def tiny_batch() -> torch.Tensor:
    """3 float64 images [3, 3, 4, 5] in [0, 1], with gray pixels, saturated ones and ties of channels."""
    x = torch.rand(3, 3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[0, :, 0, 0] = 0.5          # gray
    x[1, :, 1, 1] = torch.tensor([1.0, 0.0, 0.0])
    x[2, :, 2, 2] = torch.tensor([0.3, 0.7, 0.7])  # g == b maximum
    x[2, :, 3, 3] = torch.tensor([0.6, 0.6, 0.1])  # r == g maximum
    x[0, :, 3, 4] = 0.0          # black
    return x


FACTORS = torch.tensor([0.6, 1.0, 1.4], dtype=torch.float64)


def np_gray(x: np.ndarray) -> np.ndarray:
    return 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def test_brightness_formula():
    x = tiny_batch()
    expect = np.clip(FACTORS.numpy()[:, None, None, None] * x.numpy(), 0.0, 1.0)
    assert np.array_equal(adjust_brightness(x, FACTORS).numpy(), expect)
    assert adjust_brightness(x, FACTORS)[2].max() == 1.0  # 1.4 clips


def test_contrast_formula():
    x, f = tiny_batch().numpy(), FACTORS.numpy()
    expect = np.stack([np.clip(f[i] * x[i] + (1 - f[i]) * np_gray(x)[i].mean(), 0.0, 1.0) for i in range(3)])
    np.testing.assert_allclose(adjust_contrast(tiny_batch(), FACTORS).numpy(), expect, rtol=0, atol=1e-15)
    assert np.array_equal(adjust_contrast(tiny_batch(), FACTORS)[1].numpy(), x[1])  # factor 1: unchanged


def test_saturation_formula():
    x, f = tiny_batch().numpy(), FACTORS.numpy()
    expect = np.clip(f[:, None, None, None] * x + (1 - f[:, None, None, None]) * np_gray(x)[:, None], 0.0, 1.0)
    assert np.array_equal(adjust_saturation(tiny_batch(), FACTORS).numpy(), expect)


@pytest.mark.parametrize("shift", [0.2, -0.2, 0.5, -0.5, 0.0, 0.137])
def test_hue_formula_against_colorsys(shift):
    x = tiny_batch()
    got = adjust_hue(x, torch.full((3,), shift, dtype=torch.float64)).numpy()
    expect = np.empty_like(got)
    for i in range(3):
        for r in range(4):
            for c in range(5):
                h, s, v = colorsys.rgb_to_hsv(*x[i, :, r, c].tolist())
                expect[i, :, r, c] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-12)
    if shift != 0.0:
        assert not np.allclose(got, x.numpy())
    assert np.array_equal(got[0, :, 0, 0], [0.5, 0.5, 0.5])  # gray stays gray


def test_color_jitter_applies_each_images_ops_in_its_order():
    x = tiny_batch()
    factors = torch.tensor([[0.7, 1.3, 0.6, 0.1], [1.2, 0.8, 1.4, -0.15], [0.9, 0.65, 1.1, 0.05]], dtype=torch.float64)
    order = torch.tensor([[3, 0, 2, 1], [1, 2, 0, 3], [0, 1, 2, 3]])
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    got = color_jitter(x, factors, order, JITTER)
    for i in range(3):
        expect = x[i:i + 1]
        for op in order[i].tolist():
            expect = ops[op](expect, factors[i:i + 1, op])
        assert torch.equal(got[i], expect[0]), i
    # the order matters (the ops do not commute), and an op whose setting is 0 is left out
    assert not torch.equal(got, color_jitter(x, factors, order.flip(1), JITTER))
    only_brightness = color_jitter(x, factors, order, (0.4, 0.0, 0.0, 0.0))
    assert torch.equal(only_brightness, adjust_brightness(x, factors[:, 0]))


def test_jitter_draws_follow_torchvision_ranges():
    jitter = check_jitter(JITTER)
    orders, values = set(), []
    for seed in range(300):
        order, factors = draw_jitter(np.random.default_rng(seed), jitter)
        assert sorted(order) == [0, 1, 2, 3]
        orders.add(order)
        values.append(factors)
    values = np.array(values)
    assert len(orders) == 24
    assert (values[:, :3] >= 0.6).all() and (values[:, :3] <= 1.4).all() and values[:, :3].std() > 0.2
    assert (np.abs(values[:, 3]) <= 0.2).all() and values[:, 3].min() < -0.15 and values[:, 3].max() > 0.15
    # brightness above 1: the lower end is max(0, 1 - b)
    low = np.array([draw_jitter(np.random.default_rng(s), (1.5, 0, 0, 0))[1][0] for s in range(200)])
    assert low.min() >= 0.0 and low.min() < 0.1 and low.max() > 2.3
    # off ops draw nothing: hue alone draws the permutation then one number
    hue_only = draw_jitter(np.random.default_rng(3), (0, 0, 0, 0.2))
    rng = np.random.default_rng(3)
    rng.permutation(4)
    assert hue_only[1] == (1.0, 1.0, 1.0, rng.uniform(-0.2, 0.2))


@pytest.mark.parametrize("jitter, words", [((0.4, 0.4, 0.4), "4 values"), ((-0.1, 0, 0, 0), "brightness"),
                                           ((0, 0, 0, 0.6), "hue")])
def test_bad_jitter_is_refused(jitter, words):
    with pytest.raises(FastDartsError, match=words):
        check_jitter(jitter)
    assert check_jitter((0, 0, 0, 0)) is None and check_jitter(None) is None


def test_loader_jitter_is_color_jitter_of_the_drawn_factors(tmp_path):
    paths = write_images(tmp_path, 6)
    common = dict(train=True, image_size=16, shuffle=True, seed=2, workers=0, draft=False, **PLAIN)
    jittered = collect(JpegLoader(paths, list(range(6)), 4, jitter=JITTER, **common))
    plain = collect(JpegLoader(paths, list(range(6)), 4, jitter=None, **common))  # same geometry: jitter draws last
    pass_seed = mix_seed(2, 0, 0)
    position = 0
    for (xj, yj), (xp, yp) in zip(jittered, plain):
        assert torch.equal(yj, yp)
        draws = []
        for k in range(len(yj)):
            with Image.open(paths[yj[k]]) as img:
                draws.append(draw_train(*img.size, image_rng(pass_seed, position + k), JITTER))
        factors = torch.tensor([d.factors for d in draws], dtype=torch.float64)
        order = torch.tensor([d.order for d in draws])
        assert torch.equal(xj, color_jitter(xp, factors, order, JITTER))
        assert not torch.equal(xj, xp)
        position += len(yj)


# ---------------------------------------------------------------- draft (DCT-scaled decoding)


def test_draft_scale():
    assert draft_scale(448, 448, 224, 224) == 2
    assert draft_scale(447, 900, 224, 224) == 1
    assert draft_scale(1800, 1792, 224, 224) == 8
    assert draft_scale(1000, 900, 224, 224) == 4
    assert draft_scale(500, 500, 4, 4) == 4  # at most the target size (Image.draft then picks exactly that)


@pytest.fixture
def draft_calls(monkeypatch):
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((self.size, result))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


@pytest.mark.parametrize("train", [False, True])
def test_draft_decodes_large_jpegs_reduced_and_close(tmp_path, draft_calls, train):
    paths = write_images(tmp_path, 4, size=(200, 160))
    common = dict(train=train, image_size=16, resize=20, shuffle=False, workers=0, jitter=None, **PLAIN)
    (fast, _), = collect(JpegLoader(paths, list(range(4)), 4, draft=True, **common))
    assert draft_calls and all(size[0] < 200 for size, _ in draft_calls)  # decoded at 1/2 .. 1/8
    calls = len(draft_calls)
    (exact, _), = collect(JpegLoader(paths, list(range(4)), 4, draft=False, **common))
    assert len(draft_calls) == calls  # draft=False never asks for it
    assert not torch.equal(fast, exact)
    assert (fast - exact).abs().mean() < 0.03  # a few grey levels on average
    if not train:
        for k, path in enumerate(paths):
            assert torch.equal(exact[k], as_pixels(tv_eval_pixels(path, 16, 20)))


def test_draft_leaves_small_and_non_jpeg_images_exact(tmp_path, draft_calls):
    small = write_images(tmp_path / "jpg", 3, size=(30, 25))  # resized to 20 on the shorter side: more than half
    png = write_images(tmp_path / "png", 3, size=(200, 160), ext="png")
    for paths in (small, png):
        common = dict(train=False, image_size=16, resize=20, shuffle=False, workers=0, **PLAIN)
        (a, _), = collect(JpegLoader(paths, [0, 1, 2], 3, draft=True, **common))
        (b, _), = collect(JpegLoader(paths, [0, 1, 2], 3, draft=False, **common))
        assert torch.equal(a, b)
    assert draft_calls == []


# ---------------------------------------------------------------- workers, shards, passes


def test_workers_give_identical_batches(tmp_path):
    paths = write_images(tmp_path, 7)
    runs = []
    for workers in (0, 1, 2):
        loader = JpegLoader(paths, [k % 3 for k in range(7)], 3, train=True, image_size=12, shuffle=True, seed=4,
                            workers=workers, device="cpu", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
        runs.append(collect(loader, epoch=1) + collect(loader, epoch=2))  # two passes: persistent workers reset
        loader.close()
    assert_same_batches(runs[0], runs[1])
    assert_same_batches(runs[0], runs[2])


@pytest.mark.parametrize("train", [True, False])
def test_shards_concatenate_to_the_single_process_batch(tmp_path, train):
    paths = write_images(tmp_path, 10)
    common = dict(train=train, image_size=12, resize=14, shuffle=True, seed=9, workers=0, **PLAIN)
    single = collect(JpegLoader(paths, list(range(10)), 4, **common))  # batches of 4, 4, 2
    world = 3
    parts = [collect(JpegLoader(paths, list(range(10)), 4, shard=(rank, world), **common)) for rank in range(world)]
    assert [len(p[2][1]) for p in parts] == [1, 1, 0]  # a short last batch leaves a rank empty
    for i, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    assert parts[2][2][0].shape == (0, 3, 12, 12)


def test_epoch_replays_and_epochs_differ(tmp_path):
    paths = write_images(tmp_path, 6)
    loader = JpegLoader(paths, list(range(6)), 4, train=True, image_size=12, shuffle=True, workers=0, **PLAIN)
    first = collect(loader, epoch=3)
    collect(loader, epoch=4)
    assert_same_batches(first, collect(loader, epoch=3))
    assert not torch.equal(torch.cat([b[1] for b in first]), torch.cat([b[1] for b in collect(loader, epoch=4)]))
    other = JpegLoader(paths, list(range(6)), 4, train=True, image_size=12, shuffle=True, seed=1, workers=0, **PLAIN)
    assert not torch.equal(first[0][0], collect(other, epoch=3)[0][0])


def test_cycle_continues_with_new_permutations(tmp_path):
    paths = write_images(tmp_path, 8)
    loader = JpegLoader(paths, list(range(8)), 3, train=True, image_size=12, shuffle=True, workers=0, **PLAIN)
    got = collect(loader, batches=9, epoch=2)  # 3 passes of 3 batches (3, 3, 2)
    assert_same_batches(got[:3], collect(loader, epoch=2))
    passes = [torch.cat([b[1] for b in got[3 * p:3 * p + 3]]).tolist() for p in range(3)]
    assert all(sorted(p) == list(range(8)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3
    # pass k of a cycle is the permutation of mix_seed(seed, epoch, k)
    generator = torch.Generator().manual_seed(mix_seed(0, 2, 1))
    assert passes[1] == torch.randperm(8, generator=generator).tolist()


def test_unshuffled_order_and_eval_ignores_seed(tmp_path):
    paths = write_images(tmp_path, 5)
    a = JpegLoader(paths, [4, 3, 2, 1, 0], 2, train=False, image_size=12, resize=14, shuffle=False, seed=0,
                   workers=0, **PLAIN)
    b = JpegLoader(paths, [4, 3, 2, 1, 0], 2, train=False, image_size=12, resize=14, shuffle=False, seed=7,
                   workers=0, **PLAIN)
    got = collect(a, epoch=0)
    assert [y.tolist() for _, y in got] == [[4, 3], [2, 1], [0]]
    assert_same_batches(got, collect(b, epoch=5))


def test_a_newer_pass_ends_the_older(tmp_path):
    paths = write_images(tmp_path, 6)
    loader = JpegLoader(paths, list(range(6)), 2, train=False, image_size=12, resize=14, shuffle=False,
                        workers=1, **PLAIN)
    old = loader.epoch(0)
    next(old)
    new = collect(loader, epoch=0)  # the workers drop the old pass's prefetched batches
    assert [y.tolist() for _, y in new] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(RuntimeError, match="one pass at a time"):
        next(old)
    loader.close()


def test_close_stops_the_workers_and_a_later_pass_restarts_them(tmp_path):
    import multiprocessing
    before = set(multiprocessing.active_children())  # another test's processes, if any
    paths = write_images(tmp_path, 4)
    loader = JpegLoader(paths, list(range(4)), 2, train=False, image_size=12, resize=14, shuffle=False,
                        workers=2, **PLAIN)
    first = collect(loader)
    assert len(set(multiprocessing.active_children()) - before) == 2  # persistent: alive between passes
    loader.close()
    assert set(multiprocessing.active_children()) <= before
    assert_same_batches(first, collect(loader))
    loader.close()
    assert set(multiprocessing.active_children()) <= before


@pytest.mark.parametrize("drop_last, sizes", [(False, [4, 4, 2]), (True, [4, 4])])
def test_len_and_drop_last(tmp_path, drop_last, sizes):
    paths = write_images(tmp_path, 10)
    loader = JpegLoader(paths, list(range(10)), 4, train=True, image_size=12, shuffle=True, workers=0,
                        drop_last=drop_last, **PLAIN)
    got = collect(loader)
    assert len(loader) == len(sizes) and [len(y) for _, y in got] == sizes
    assert [loader.batch_images(i) for i in range(len(loader))] == sizes
    assert all(x.shape == (n, 3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
               for (x, y), n in zip(got, sizes))
    with pytest.raises(FastDartsError, match="lower the batch size"):
        JpegLoader(paths, list(range(10)), 11, train=True, shuffle=True, drop_last=True, **PLAIN)


# ---------------------------------------------------------------- file kinds and errors


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_become_rgb(tmp_path, mode):
    paths = write_images(tmp_path, 2, mode=mode)
    assert all(Image.open(p).mode == mode for p in paths)
    for train in (False, True):
        loader = JpegLoader(paths, [0, 1], 2, train=train, image_size=16, resize=20, shuffle=False, workers=0,
                            jitter=None, draft=False, **PLAIN)
        (x, _), = collect(loader)
        assert x.shape == (2, 3, 16, 16)
        if mode == "L":
            assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
        if not train:
            for k, path in enumerate(paths):
                assert torch.equal(x[k], as_pixels(tv_eval_pixels(path, 16, 20)))
    assert not torch.equal(x[:, 0], x[:, 2]) or mode == "L"


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def not_an_image(path):
    open(path, "wb").write(b"this is not a jpeg\n" * 20)


def remove(path):
    import os
    os.remove(path)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("spoil", [truncate, not_an_image, remove])
def test_unreadable_file_is_named(tmp_path, workers, spoil):
    paths = write_images(tmp_path, 5)
    spoil(paths[3])
    loader = JpegLoader(paths, list(range(5)), 2, train=True, image_size=12, shuffle=False, workers=workers,
                        **PLAIN)
    batches = loader.epoch(0)
    next(batches)  # images 0, 1 are fine
    with pytest.raises(FastDartsError) as excinfo:
        next(batches)
    message = str(excinfo.value)
    assert "\n" not in message and paths[3] in message and "cannot read image" in message
    loader.close()


@pytest.mark.parametrize("kwargs, words", [
    (dict(labels=[0, 1]), "labels of shape"),
    (dict(labels=[0, 1, -1]), "negative"),
    (dict(batch_size=0), "batch size"),
    (dict(train=False, resize=10), "resize 10"),
    (dict(mean=(0.5,)), "mean/std"),
    (dict(workers=-1), "workers"),
    (dict(shard=(2, 2)), "shard"),
    (dict(jitter=(0, 0, 0, 0.7)), "hue"),
])
def test_bad_settings_are_refused(tmp_path, kwargs, words):
    paths = write_images(tmp_path, 3)
    args = dict(labels=[0, 1, 2], batch_size=2, train=True, image_size=16, shuffle=True, **PLAIN)
    args.update(kwargs)
    with pytest.raises(FastDartsError, match=words):
        JpegLoader(paths, args.pop("labels"), args.pop("batch_size"), **args)
    with pytest.raises(FastDartsError, match="no image files"):
        JpegLoader([], [], 2, train=True, shuffle=True, **PLAIN)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu(tmp_path):
    paths = write_images(tmp_path, 6)
    common = dict(train=True, image_size=16, shuffle=True, seed=3, workers=1, mean=(0.5, 0.4, 0.3),
                  std=(0.2, 0.25, 0.3))
    cpu = collect(JpegLoader(paths, list(range(6)), 4, device="cpu", **common))
    gpu = collect(JpegLoader(paths, list(range(6)), 4, device="cuda", **common))
    plain_cpu = collect(JpegLoader(paths, list(range(6)), 4, device="cpu", jitter=None, **common))
    plain_gpu = collect(JpegLoader(paths, list(range(6)), 4, device="cuda", jitter=None, **common))
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and yg.is_cuda and torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-5)
    for (xc, _), (xg, _) in zip(plain_cpu, plain_gpu):
        assert torch.equal(xg.cpu(), xc)  # uint8 -> /255 -> normalise is exact on both
