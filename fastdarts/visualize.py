"""Pictures of a search: the derived cells and how the op weights moved.

Users judge a search by its pictures more than by its numbers, so the cell
drawing is a small layered (Sugiyama / graphviz-dot style) layout: nodes in
columns by depth, every op label in a column of its own just before the node
it feeds, and arrows that span several columns routed through placeholder
points. Ordering each column to cut crossings and spacing it so nothing
overlaps keeps every label readable and on its own arrow. Ops keep one colour
in every picture (cells and weight curves), taken from their position in
``ops.PRIMITIVES``. matplotlib is imported lazily and every figure is a
standalone ``Figure`` on an Agg canvas: drawing never needs a display and
never switches the backend of a caller's pyplot session (a notebook, say).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .edge_ops import check_edge_ops
from .errors import FastDartsError
from .genotype import Genotype, node_name, num_edges, select_edges
from .ops import PRIMITIVES, resolve_ops

Point = tuple[float, float]

_CELLS = {"normal": "normal cell", "reduce": "reduction cell"}
_FILL = {"input": "#c1e1c1", "intermediate": "#add8e6", "output": "#eee8aa"}
_RADIUS = 0.3       # node radius in inches; the drawing uses 1 data unit = 1 inch
_LABEL_PT = 9
_NODE_PT = 11
_DPI = 150


def _math_name(index: int) -> str:
    """``genotype.node_name`` with matplotlib mathtext subscripts."""
    return f"${node_name(index)}$" if index < 2 else node_name(index)


def _figure(size: tuple[float, float]) -> Any:
    """A figure rendered by Agg, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _op_colour(op: str) -> str:
    """One colour per op in every picture; `none` is grey as it never decides."""
    palette = ("#9a9a9a", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
               "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
    return palette[PRIMITIVES.index(op) % len(palette)]


# ---------------------------------------------------------------- cell layout

@dataclass
class _Item:
    """Something that takes room in a column: a node, an op label, or a
    placeholder point an arrow passes through."""

    rank: int
    kind: str           # input | intermediate | output | label | point
    text: str = ""
    width: float = 0.0
    height: float = 0.0
    x: float = 0.0
    y: float = 0.0

    @property
    def is_node(self) -> bool:
        return self.kind in _FILL


@dataclass
class _Chain:
    items: list[int]
    op: str | None      # None: a dashed concat arrow into the output


def _label_size(text: str) -> tuple[float, float]:
    """Width and height in inches of an op label with its box."""
    from matplotlib.textpath import TextPath

    pad = 2 * 0.3 * _LABEL_PT / 72
    return TextPath((0, 0), text, size=_LABEL_PT).get_extents().width / 72 + pad, 1.25 * _LABEL_PT / 72 + pad


def _build(edges: Sequence[tuple[str, int]], concat: Sequence[int], steps: int) -> tuple[list[_Item], list[_Chain]]:
    """Items and arrows. Node ranks are 2·depth; an edge's label sits in the
    rank just before its target, points fill the ranks in between."""
    output = steps + 2
    depth = {0: 0, 1: 0}
    for node in range(steps):
        depth[2 + node] = 1 + max(depth[src] for _, src in edges[2 * node: 2 * node + 2])
    depth[output] = max(depth.values()) + 1
    items = [_Item(0, "input", _math_name(0)), _Item(0, "input", _math_name(1))]
    items += [_Item(2 * depth[2 + j], "intermediate", str(j)) for j in range(steps)]
    items.append(_Item(2 * depth[output], "output", "$c_{k}$"))
    for item in items:
        item.width = item.height = 2 * _RADIUS

    def path(src: int, dst: int, label: str | None) -> list[int]:
        ids = [src]
        for rank in range(items[src].rank + 1, items[dst].rank):
            if label is not None and rank == items[dst].rank - 1:
                width, height = _label_size(label)
                items.append(_Item(rank, "label", label, width, height))
            else:
                items.append(_Item(rank, "point", height=0.1))
            ids.append(len(items) - 1)
        return ids + [dst]

    chains = [_Chain(path(src, 2 + i // 2, op), op) for i, (op, src) in enumerate(edges)]
    chains += [_Chain(path(i, output, None), None) for i in concat]
    return items, chains


def _crossings(ranks: list[list[int]], links: list[tuple[int, int]], rank_of: list[int]) -> int:
    where = {i: k for rank in ranks for k, i in enumerate(rank)}
    total = 0
    for r in range(len(ranks) - 1):
        span = [(where[a], where[b]) for a, b in links if rank_of[a] == r]
        total += sum((a1 - a2) * (b1 - b2) < 0 for k, (a1, b1) in enumerate(span) for a2, b2 in span[:k])
    return total


def _order(items: list[_Item], chains: list[_Chain]) -> list[list[int]]:
    """Top-to-bottom order of each rank by barycentre sweeps (inputs stay
    c_{k-2} above c_{k-1}); the order with the fewest crossings wins."""
    links = [(c.items[k], c.items[k + 1]) for c in chains for k in range(len(c.items) - 1)]
    before: dict[int, list[int]] = {i: [] for i in range(len(items))}
    after: dict[int, list[int]] = {i: [] for i in range(len(items))}
    for a, b in links:
        before[b].append(a)
        after[a].append(b)
    ranks: list[list[int]] = [[] for _ in range(max(item.rank for item in items) + 1)]
    for i, item in enumerate(items):
        ranks[item.rank].append(i)
    rank_of = [item.rank for item in items]
    best, best_cost = [list(r) for r in ranks], _crossings(ranks, links, rank_of)
    for sweep in range(8):
        down = sweep % 2 == 0
        for r in range(1, len(ranks)) if down else range(len(ranks) - 2, 0, -1):
            ref = {i: k for k, i in enumerate(ranks[r - 1 if down else r + 1])}
            own = {i: k for k, i in enumerate(ranks[r])}

            def key(i: int) -> tuple[float, int]:
                near = [ref[n] for n in (before if down else after)[i]]
                return (sum(near) / len(near) if near else own[i] * len(ref) / len(own), own[i])

            ranks[r].sort(key=key)
        cost = _crossings(ranks, links, rank_of)
        if cost < best_cost:
            best, best_cost = [list(r) for r in ranks], cost
    return best


def _pack(desired: list[float], gaps: list[float]) -> list[float]:
    """Closest heights (least squares) to ``desired`` that keep the order top
    to bottom with at least ``gaps[k]`` between items k and k+1: an isotonic
    regression (pool adjacent violators) on the gap-shifted positions."""
    offsets = [0.0]
    for gap in gaps:
        offsets.append(offsets[-1] + gap)
    blocks: list[list[float]] = []          # [sum, count]
    for d, off in zip(desired, offsets):
        blocks.append([-d - off, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    fitted = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
    return [-(q + off) for q, off in zip(fitted, offsets)]


def _place(items: list[_Item], chains: list[_Chain], ranks: list[list[int]]) -> None:
    """Heights: each item pulled towards the mean of its neighbours, columns
    packed without overlap. Then columns spaced so arrows stay gentle."""
    near: dict[int, list[int]] = {i: [] for i in range(len(items))}
    for chain in chains:
        for a, b in zip(chain.items, chain.items[1:]):
            near[a].append(b)
            near[b].append(a)

    def gap(a: _Item, b: _Item) -> float:
        extra = 0.5 if a.is_node and b.is_node else 0.12 if a.kind == b.kind == "point" else 0.2
        return (a.height + b.height) / 2 + extra

    for rank in ranks:
        ys = _pack([0.0] * len(rank), [gap(items[a], items[b]) for a, b in zip(rank, rank[1:])])
        shift = (ys[0] + ys[-1]) / 2
        for i, y in zip(rank, ys):
            items[i].y = y - shift
    for sweep in range(24):
        for rank in ranks if sweep % 2 == 0 else ranks[::-1]:
            desired = [sum(items[n].y for n in near[i]) / len(near[i]) if near[i] else items[i].y for i in rank]
            for i, y in zip(rank, _pack(desired, [gap(items[a], items[b]) for a, b in zip(rank, rank[1:])])):
                items[i].y = y
    x = 0.0
    for r, rank in enumerate(ranks):
        if r:
            steep = max((abs(items[a].y - items[b].y) for c in chains for a, b in zip(c.items, c.items[1:])
                         if items[b].rank == r), default=0.0)
            x += max(items[i].width for i in ranks[r - 1]) / 2 + min(1.4, 0.45 + 0.3 * steep)
            x += max(items[i].width for i in rank) / 2
        for i in rank:
            items[i].x = x


# ---------------------------------------------------------------- cell drawing

def _cubic(p: Sequence[Point], t: float) -> Point:
    u = 1 - t
    return (u ** 3 * p[0][0] + 3 * u * u * t * p[1][0] + 3 * u * t * t * p[2][0] + t ** 3 * p[3][0],
            u ** 3 * p[0][1] + 3 * u * u * t * p[1][1] + 3 * u * t * t * p[2][1] + t ** 3 * p[3][1])


def _cut(p: Sequence[Point], centre: Point, radius: float) -> list[Point]:
    """The part of cubic Bézier ``p`` before it enters the circle at its end."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.dist(_cubic(p, mid), centre) > radius else (lo, mid)
    t = lo

    def lerp(a: Point, b: Point) -> Point:
        return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t

    ab, bc, cd = lerp(p[0], p[1]), lerp(p[1], p[2]), lerp(p[2], p[3])
    abc, bcd = lerp(ab, bc), lerp(bc, cd)
    return [p[0], ab, abc, lerp(abc, bcd)]


def _chain_path(items: list[_Item], chain: _Chain) -> Any:
    """Cubic pieces through the chain's items (Catmull-Rom tangents, level
    through labels so they sit on their arrow), cut at the target's rim."""
    from matplotlib.path import Path as MplPath

    pts = [(items[i].x, items[i].y) for i in chain.items]
    last = len(pts) - 1

    def tangent(k: int) -> Point:
        prev, nxt = pts[max(k - 1, 0)], pts[min(k + 1, last)]
        scale = 1.0 if k in (0, last) else 0.5
        dy = 0.0 if items[chain.items[k]].kind == "label" else nxt[1] - prev[1]
        return (nxt[0] - prev[0]) * scale, dy * scale

    verts: list[Point] = [pts[0]]
    for k in range(last):
        (ax, ay), (bx, by) = pts[k], pts[k + 1]
        (tax, tay), (tbx, tby) = tangent(k), tangent(k + 1)
        piece = [(ax, ay), (ax + tax / 3, ay + tay / 3), (bx - tbx / 3, by - tby / 3), (bx, by)]
        if k == last - 1:
            piece = _cut(piece, (bx, by), _RADIUS + 0.02)
        verts += piece[1:]
    return MplPath(verts, [MplPath.MOVETO] + [MplPath.CURVE4] * (len(verts) - 1))


def _cell_figure(genotype: Genotype, cell: str) -> Any:
    from matplotlib.patches import Circle, FancyArrowPatch

    edges = genotype.normal if cell == "normal" else genotype.reduce
    concat = genotype.normal_concat if cell == "normal" else genotype.reduce_concat
    items, chains = _build(edges, concat, genotype.steps)
    _place(items, chains, _order(items, chains))

    margin, title = 0.3, 0.55
    x0 = min(i.x - i.width / 2 for i in items) - margin
    x1 = max(i.x + i.width / 2 for i in items) + margin
    y0 = min(i.y - i.height / 2 for i in items) - margin
    y1 = max(i.y + i.height / 2 for i in items) + margin
    fig = _figure((x1 - x0, y1 - y0 + title))
    ax = fig.add_axes((0, 0, 1, (y1 - y0) / (y1 - y0 + title)))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.text(0.5, 1 - 0.12 / (y1 - y0 + title), _CELLS[cell], ha="center", va="top",
             fontsize=13, fontweight="bold")

    for item in items:
        if item.is_node:
            ax.add_patch(Circle((item.x, item.y), _RADIUS, fc=_FILL[item.kind], ec="#333333", lw=1.2, zorder=3))
            ax.text(item.x, item.y, item.text, ha="center", va="center", fontsize=_NODE_PT, zorder=4)
    for chain in chains:
        colour = _op_colour(chain.op) if chain.op else "#808080"
        ax.add_patch(FancyArrowPatch(
            path=_chain_path(items, chain), arrowstyle="-|>,head_length=7,head_width=3.5", lw=1.5,
            color=colour, linestyle="-" if chain.op else (0, (4, 3)), zorder=2 if chain.op else 1))
        for i in chain.items:
            if items[i].kind == "label":
                ax.text(items[i].x, items[i].y, items[i].text, ha="center", va="center", fontsize=_LABEL_PT,
                        color="#222222", zorder=5, bbox=dict(boxstyle="round,pad=0.3", fc="white", ec=colour))
    return fig


def plot_cell(genotype: Genotype, cell: str, path: str | Path) -> Path:
    """Draw one cell ("normal" or "reduce") of ``genotype`` as a PNG."""
    if cell not in _CELLS:
        raise FastDartsError(f"cell must be 'normal' or 'reduce', got {cell!r}")
    if not isinstance(genotype, Genotype):
        raise FastDartsError(f"plot_cell needs a Genotype, got {type(genotype).__name__}")
    return _save(_cell_figure(genotype, cell), path)


def plot_genotype(genotype: Genotype, out_dir: str | Path) -> list[Path]:
    """Both cells of ``genotype`` as ``normal.png`` and ``reduce.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    return [plot_cell(genotype, cell, out_dir / f"{cell}.png") for cell in _CELLS]


def _save(fig: Any, path: str | Path) -> Path:
    """``fig`` as a PNG through the package's one atomic writer."""
    from .files import save_figure

    return save_figure(fig, path)


# ---------------------------------------------------------------- α history

def _history_array(history: Sequence[dict[str, Any]], width: int, steps: int) -> Any:
    """``history`` as an array [cell, epoch, edge, op], checked against the
    search space (``width`` ops per edge)."""
    import numpy as np

    if isinstance(history, (str, bytes, dict)) or not isinstance(history, Sequence) or not history:
        raise FastDartsError("history must be a non-empty list with one {'normal', 'reduce'} entry per epoch")
    expected = (num_edges(steps), width)
    cells = []
    for cell in _CELLS:
        epochs = []
        for epoch, entry in enumerate(history):
            if not isinstance(entry, dict) or cell not in entry:
                raise FastDartsError(f"history epoch {epoch} has no {cell!r} weights")
            try:
                weights = np.asarray(entry[cell], dtype=float)
            except (TypeError, ValueError):
                raise FastDartsError(
                    f"history epoch {epoch} {cell!r} weights are not a rectangular list of numbers") from None
            if weights.shape != expected:
                raise FastDartsError(
                    f"history epoch {epoch} {cell!r} weights have shape {weights.shape}, expected {expected} "
                    f"({expected[0]} edges for steps={steps}, {expected[1]} ops)")
            epochs.append(weights)
        cells.append(np.stack(epochs))
    return np.stack(cells)


def plot_alpha_history(history: Sequence[dict[str, Any]], op_names: Sequence[str], steps: int,
                       path: str | Path, betas: Sequence[dict[str, Any]] | None = None,
                       edge_ops: dict[str, Sequence[Sequence[str]]] | None = None) -> Path:
    """Op weights (softmax(α)) of every edge over the epochs: one small plot
    per edge, row = target node, column = input node, one panel per cell
    type. A thick frame in an op's colour marks the edges the last epoch's
    weights keep, so a reader sees why the genotype came out as it did.
    ``betas`` (a method's edge weights: per epoch, softmax(β) per edge
    of each cell type) adds each edge's weight as a black line, and the kept
    edges are ranked by op weight times edge weight, as the derivation does.
    ``edge_ops`` (edges holding different ops): the ops each edge holds, α's columns in
    their order; each line keeps its op's colour."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    op_names = resolve_ops(op_names)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FastDartsError(f"steps must be a positive integer, got {steps!r}")
    edge_ops = check_edge_ops(edge_ops, op_names, num_edges(steps))
    weights = _history_array(history, len(edge_ops["normal"][0]), steps)
    shown = [op for op in op_names if any(op in ops for cell in _CELLS for ops in edge_ops[cell])]
    edge_w = None
    if betas is not None:
        import numpy as np

        if len(betas) != weights.shape[1]:
            raise FastDartsError(f"betas has {len(betas)} epochs, the α history {weights.shape[1]}")
        try:
            edge_w = np.asarray([[entry[cell] for entry in betas] for cell in _CELLS], dtype=float)
        except (TypeError, ValueError, KeyError):
            raise FastDartsError("betas must hold one {'normal', 'reduce'} list of edge weights per epoch") from None
        if edge_w.shape != weights.shape[:3]:
            raise FastDartsError(f"betas have shape {edge_w.shape[1:]} per cell type, expected "
                                 f"{weights.shape[1:3]} (epochs, edges)")
    epochs = list(range(1, weights.shape[1] + 1))
    marker = "o" if len(epochs) == 1 else None
    top = min(1.0, float(max(weights.max(), 0 if edge_w is None else edge_w.max())) * 1.08 + 0.02)

    width = max(9.0, 3.1 * (steps + 1) + 0.4)
    entries = len(shown) + (betas is not None)
    legend_rows = -(-entries // int(width // 1.6))
    columns = -(-entries // legend_rows)
    height = 1.15 * steps + 1.65 + 0.25 * legend_rows
    fig = _figure((width, height))
    panels = fig.subfigures(1, 2, wspace=0.02)
    for panel, (c, cell) in zip(panels, enumerate(_CELLS)):
        last = weights[c, -1] if edge_w is None else weights[c, -1] * edge_w[c, -1][:, None]
        kept = select_edges(last.tolist(), edge_ops[cell], steps)
        axes = panel.subplots(steps, steps + 1, sharex=True, sharey=True, squeeze=False)
        panel.subplots_adjust(left=0.1, right=0.98, top=1 - 0.75 / height,
                              bottom=(0.9 + 0.25 * legend_rows) / height, wspace=0.12, hspace=0.2)
        panel.suptitle(_CELLS[cell], y=1 - 0.1 / height, va="top", fontsize=12, fontweight="bold")
        for node in range(steps):
            for src in range(steps + 1):
                ax = axes[node][src]
                if src > node + 1:
                    ax.set_visible(False)
                    continue
                edge = num_edges(node) + src
                for k, op in enumerate(edge_ops[cell][edge]):
                    ax.plot(epochs, weights[c, :, edge, k], color=_op_colour(op), lw=1.3, marker=marker, ms=4,
                            linestyle=(0, (3, 2)) if op == "none" else "-")
                if edge_w is not None:
                    ax.plot(epochs, edge_w[c, :, edge], color="black", lw=1.6, marker=marker, ms=4)
                ax.set_ylim(0, top)
                if len(epochs) <= 5:
                    ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
                    ax.set_xticks(epochs)
                else:
                    ax.set_xlim(epochs[0], epochs[-1])
                    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
                ax.yaxis.set_major_locator(MaxNLocator(nbins=3))
                ax.tick_params(labelsize=7, length=2)
                ax.grid(alpha=0.3, lw=0.5)
                for op, _ in (e for e in kept[2 * node: 2 * node + 2] if e[1] == src):
                    for spine in ax.spines.values():
                        spine.set(color=_op_colour(op), linewidth=2.2)
                if src == node + 1 or node == 0:
                    ax.set_title(f"from {_math_name(src)}", fontsize=8)
                if src == 0:
                    ax.set_ylabel(f"into node {node}", fontsize=8)
                if node == steps - 1:
                    ax.set_xlabel("epoch", fontsize=8)
    handles = [Line2D([], [], color=_op_colour(op), lw=2, marker=marker,
                      linestyle=(0, (3, 2)) if op == "none" else "-") for op in shown]
    labels = list(shown)
    if edge_w is not None:
        handles.append(Line2D([], [], color="black", lw=2, marker=marker))
        labels.append("edge weight softmax(β)")
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.3 / height), ncol=columns,
               fontsize=8, frameon=False)
    fig.text(0.5, 0.1 / height, "op weight softmax(α) per edge; a thick frame marks an edge the last epoch keeps, "
             "in the colour of the op it keeps", ha="center", va="bottom", fontsize=8, color="#444444")
    return _save(fig, path)


# ---------------------------------------------------------------- training curves

def plot_learning_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss and top-1 accuracy per epoch, train and test, of a training run
    (``metrics.jsonl`` entries of ``fastdarts-train``), with the learning rate
    on a second axis of the loss panel. The train figures are over the
    augmented, drop-path batches in training mode, so they sit below the test
    ones early on; a gap that widens late is overfitting."""
    if isinstance(history, (str, bytes, dict)) or not isinstance(history, Sequence) or not history:
        raise FastDartsError("history must be a non-empty list with one metrics entry per epoch")
    keys = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")
    for k, entry in enumerate(history):
        missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise FastDartsError(f"history entry {k} lacks {', '.join(missing)}")
    epochs = [h["epoch"] for h in history]
    marker = "o" if len(epochs) == 1 else None
    fig = _figure((10.0, 3.8))
    loss_ax, acc_ax = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.93, bottom=0.14, top=0.88, wspace=0.32)
    for ax, metric, label in ((loss_ax, "loss", "cross-entropy"), (acc_ax, "acc", "top-1 accuracy (%)")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], color="#1f77b4", marker=marker, label="train (augmented)")
        ax.plot(epochs, [h[f"test_{metric}"] for h in history], color="#d62728", marker=marker, label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize=8, loc="best")
    if all("lr" in h for h in history):
        lr_ax = loss_ax.twinx()
        lr_ax.plot(epochs, [h["lr"] for h in history], color="#7f7f7f", lw=1, linestyle=(0, (3, 2)),
                   marker=marker)
        lr_ax.set_ylabel("learning rate (dashed)", color="#555555", fontsize=8)
        lr_ax.tick_params(labelsize=7, colors="#555555")
    last = history[-1]
    best = max(history, key=lambda h: h["test_acc"])
    acc_ax.set_title(f"last {last['test_acc']:.2f}%  (best {best['test_acc']:.2f}% at epoch {best['epoch']})",
                     fontsize=9)
    loss_ax.set_title("loss (learning rate dashed)", fontsize=9)
    fig.suptitle("training from scratch", fontsize=12, fontweight="bold")
    return _save(fig, path)
