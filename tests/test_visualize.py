"""Cell pictures and α-history plots: valid, non-trivial PNGs, and a layout that never overlaps."""
import random

import numpy as np
import pytest
import torch

from fastdarts.errors import FastDartsError
from fastdarts.genotype import DARTS_V1, DARTS_V2, Genotype, num_edges
from fastdarts.ops import DARTS_OPS, EXTENDED_OPS
from fastdarts.visualize import _build, _op_colour, _order, _place, plot_alpha_history, plot_cell, plot_genotype

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 600, image.shape
    rgb = image[..., :3]
    assert rgb.reshape(-1, 3).std(axis=0).max() > 0.05, "the image is (almost) a single colour"
    return rgb


def has_colour(rgb, hex_colour, tolerance=0.02, minimum=50):
    target = np.array([int(hex_colour[i: i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=-1) < tolerance).sum()) >= minimum


def history(epochs, ops, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.randn(2, num_edges(steps), len(ops), generator=gen) * 1e-3
    drift = torch.randn(alpha.shape, generator=gen) * 0.1
    out = []
    for _ in range(epochs):
        alpha = alpha + drift
        w = torch.softmax(alpha, -1)
        out.append({"normal": w[0].tolist(), "reduce": w[1].tolist()})
    return out


def test_plot_cell_draws_the_ops_of_that_cell(tmp_path):
    normal = read_png(plot_cell(DARTS_V2, "normal", tmp_path / "n.png"))
    reduce = read_png(plot_cell(DARTS_V2, "reduce", tmp_path / "r.png"))
    # Arrows take their op's colour: sep convs appear only in the normal cell, max pools only in the reduction cell.
    assert has_colour(normal, _op_colour("sep_conv_3x3")) and not has_colour(reduce, _op_colour("sep_conv_3x3"))
    assert has_colour(reduce, _op_colour("max_pool_3x3")) and not has_colour(normal, _op_colour("max_pool_3x3"))
    assert has_colour(normal, _op_colour("dil_conv_3x3"))


def test_plot_genotype_writes_both_cells(tmp_path):
    paths = plot_genotype(DARTS_V1, tmp_path / "cells")
    assert [p.name for p in paths] == ["normal.png", "reduce.png"]
    for p in paths:
        read_png(p)


def test_plot_cell_rejects_bad_input(tmp_path):
    with pytest.raises(FastDartsError, match="cell must be 'normal' or 'reduce', got 'reduction'"):
        plot_cell(DARTS_V2, "reduction", tmp_path / "x.png")
    with pytest.raises(FastDartsError, match="needs a Genotype"):
        plot_cell(DARTS_V2.to_dict(), "normal", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def random_genotype(rng, steps, multiplier):
    ops = [op for op in EXTENDED_OPS if op != "none"]
    cells = []
    for _ in range(2):
        cells.append([(rng.choice(ops), rng.randrange(2 + node)) for node in range(steps) for _ in range(2)])
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(cells[0], concat, cells[1], concat)


@pytest.mark.parametrize("seed", range(12))
def test_layout_never_overlaps_labels_or_nodes(seed):
    rng = random.Random(seed)
    steps = rng.choice([1, 2, 4, 4, 5])
    genotype = {0: DARTS_V1, 1: DARTS_V2}.get(seed) or random_genotype(rng, steps, rng.randint(1, steps))
    for edges, concat in ((genotype.normal, genotype.normal_concat), (genotype.reduce, genotype.reduce_concat)):
        items, chains = _build(edges, concat, genotype.steps)
        ranks = _order(items, chains)
        _place(items, chains, ranks)
        assert sorted(i for rank in ranks for i in rank) == list(range(len(items)))
        labels = [items[i].text for c in chains for i in c.items if items[i].kind == "label"]
        assert labels == [op for op, _ in edges]
        for rank in ranks:
            assert len({items[i].x for i in rank}) == 1
            boxes = sorted((items[i].y - items[i].height / 2, items[i].y + items[i].height / 2) for i in rank)
            assert all(below[1] <= above[0] + 1e-9 for below, above in zip(boxes, boxes[1:]))
        xs = [items[rank[0]].x for rank in ranks]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)


def test_plot_alpha_history(tmp_path):
    path = plot_alpha_history(history(6, DARTS_OPS, 4), DARTS_OPS, 4, tmp_path / "deep" / "alpha.png")
    rgb = read_png(path)
    for op in DARTS_OPS:   # every op's curve (and legend entry) is drawn in its colour
        assert has_colour(rgb, _op_colour(op), minimum=20), op


def test_plot_alpha_history_single_epoch_and_other_spaces(tmp_path):
    read_png(plot_alpha_history(history(1, EXTENDED_OPS, 4), EXTENDED_OPS, 4, tmp_path / "one.png"))
    ops = ("skip_connect", "sep_conv_3x3", "max_pool_3x3")
    read_png(plot_alpha_history(history(3, ops, 2), ops, 2, tmp_path / "small.png"))
    arrays = [{k: np.asarray(v) for k, v in h.items()} for h in history(2, DARTS_OPS, 4)]
    read_png(plot_alpha_history(arrays, "darts", 4, tmp_path / "arrays.png"))


@pytest.mark.parametrize("hist,pattern", [
    ([], "non-empty list"),
    ([{"normal": [[0.125] * 8] * 14}], "epoch 0 has no 'reduce' weights"),
    ([{"normal": [[0.125] * 8] * 14, "reduce": [[0.125] * 8] * 13}],
     r"epoch 0 'reduce' weights have shape \(13, 8\), expected \(14, 8\)"),
    ([{"normal": [[0.125] * 8] * 14, "reduce": [[0.125] * 7] * 14}], r"shape \(14, 7\), expected \(14, 8\)"),
    ([{"normal": [[0.125] * 8, [0.1]] + [[0.125] * 8] * 12, "reduce": [[0.125] * 8] * 14}], "not a rectangular"),
])
def test_plot_alpha_history_rejects_bad_history(tmp_path, hist, pattern):
    with pytest.raises(FastDartsError, match=pattern):
        plot_alpha_history(hist, DARTS_OPS, 4, tmp_path / "x.png")


def _training_history(epochs):
    return [dict(epoch=e + 1, lr=0.025 * (1 - e / epochs), train_loss=2.0 / (e + 1), test_loss=2.2 / (e + 1),
                 train_acc=30.0 + 5 * e, test_acc=25.0 + 6 * e) for e in range(epochs)]


@pytest.mark.parametrize("epochs", [1, 12])
def test_plot_learning_curves(tmp_path, epochs):
    from fastdarts.visualize import plot_learning_curves

    rgb = read_png(plot_learning_curves(_training_history(epochs), tmp_path / "curves.png"))
    assert has_colour(rgb, "#1f77b4") and has_colour(rgb, "#d62728")  # train and test lines


@pytest.mark.parametrize("hist, pattern", [
    ([], "non-empty list"),
    ([{"epoch": 1, "train_loss": 1.0}], "history entry 0 lacks test_loss, train_acc, test_acc"),
])
def test_plot_learning_curves_rejects_bad_history(tmp_path, hist, pattern):
    from fastdarts.visualize import plot_learning_curves

    with pytest.raises(FastDartsError, match=pattern):
        plot_learning_curves(hist, tmp_path / "x.png")
