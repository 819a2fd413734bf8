"""FairDARTS: sigmoid op weights and the zero-one loss (Chu et al., ECCV 2020; SPEC §8).

- Op weights: every op of an edge is weighted by ``σ(α_o)`` on its own
  instead of ``softmax(α)_o`` over the edge, so the ops cooperate instead of
  competing for one unit of weight (the "unfair advantage" of the skip
  connection in an exclusive competition). α starts at 0 (σ = ½ for every op),
  as the original's.
- Zero-one loss: the architecture step minimises
  ``L_val − w · mean((σ(α) − ½)²)``, the mean over every op of every edge of
  both cell types: it pushes each σ towards 0 or 1, so the discretisation
  (keep or drop) changes the supernet little.
- Derivation: the ops are ranked by σ(α) (``op_strengths``), and each node
  keeps its 2 strongest edges, each with its strongest op (``top2``, the
  DARTS rule: a cell comparable with DARTS'). ``threshold[:T]`` is the
  original's ``threshold_sparse`` rule besides: of those 2 edges, an edge
  stays only if its op's σ ≥ T (0.85). That cell can leave a node one input
  or none, which a genotype (2 inputs per node) cannot hold: it is written
  next to ``genotype.json`` as ``genotype_threshold.json`` in the original's
  ``(op, node, input)`` form and the log names the edges it drops, while
  ``genotype.json`` keeps the top-2 cell.

Source: ``xiaomi-automl/FairDARTS`` (commit 270cfc9), ``fairdarts/``:
``model_search.py:104-111`` (σ of α per cell type), ``:125-126`` (α = 0),
``separate_loss.py:14-17`` (``ConvSeparateLoss``: cross-entropy
``- weight · mse_loss(σ(α), 0.5)``), ``architect.py:20-26`` (the architecture
step on that loss, first order only, with σ of both cell types concatenated:
line 22), ``utils.py:143-189`` (``parse``: ``darts`` and the
``threshold_sparse`` rule), ``genotypes.py:8-16`` (the op set: DARTS' without
``none``), ``train_search.py:20-50`` (settings; ``--aux_loss_weight 10``).

What differs, and why:

- the op set: the original has no ``none``. A preset cannot change ``--ops``
  (a core field with a default), so the method makes ``none`` inert instead:
  its output is 0 whatever its weight, so with sigmoid weights it changes
  neither the forward nor any gradient; the zero-one loss leaves its column
  out (the mean is over the original's ops) and the derivation never keeps
  it. Its α stays 0. ``--ops`` without ``none`` gives the original's α
  shape exactly;
- the original adds the zero-one term to the weight step's loss as well
  (``train_search.py:209-212``); it does not depend on the weights, so it
  changes nothing there and is left out;
- the threshold cell is reported and written, not used as the genotype (see
  above); the original's ``threshold_edge`` variant (several ops per edge)
  is not offered, for the same reason;
- the core's per-epoch ``alpha_entropy`` and α plots are of softmax(α); the
  method adds σ(α) to each epoch's metrics (``sigmoid_alphas``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import FastDartsError
from ..files import write_json
from ..genotype import node_name, num_edges
from ..method import Option, SearchMethod, overrides, register_method, register_preset, registered_methods
from ..search_config import DARTS_PRESET

DEFAULT_THRESHOLD = 0.85  # the original's --op_threshold (train_search.py:41)
THRESHOLD_FILE = "genotype_threshold.json"
# The original's op set (fairdarts/genotypes.py:8-16): DARTS' in DARTS' order, without `none`.
FAIR_OPS = ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
            "dil_conv_5x5")


# -- the rule --------------------------------------------------------------------------------------
def sigmoid_weights(alphas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The op weights of each cell type: σ(α), element by element."""
    return [torch.sigmoid(a) for a in alphas]


def zero_one_mean(alphas: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean((σ(α) − ½)²) over the ops of every edge of the cell types (``mask``: 1 for the
    entries counted, rows of the α stacked; None: all)."""
    d = (torch.sigmoid(torch.cat(list(alphas))) - 0.5) ** 2
    return d.mean() if mask is None else (d * mask).sum() / mask.sum()


def none_mask(edge_ops: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1 for every (edge, op) of both cell types (rows normal then reduce) that is not ``none``."""
    return torch.tensor([[float(op != "none") for op in ops] for cell in ("normal", "reduce")
                         for ops in edge_ops[cell]], dtype=dtype)


def threshold_cell(strengths: Sequence[Sequence[float]], sigma: Sequence[Sequence[float]],
                   edge_ops: Sequence[Sequence[str]], steps: int, threshold: float
                   ) -> tuple[tuple[str, int, int], ...]:
    """The original's ``threshold_sparse`` cell: per node its 2 strongest
    edges by their strongest op (strongest first; ties: the earlier edge), each
    with that op, kept only if the op's σ ≥ ``threshold``. ``(op, node, input)``
    per kept edge, nodes numbered as a genotype's (2+j). ``none`` never counts."""
    out = []
    start = 0
    for node in range(steps):
        rows = range(start, start + 2 + node)
        best = {}
        for e in rows:
            ks = [k for k, op in enumerate(edge_ops[e]) if op != "none"]
            if not ks:
                raise FastDartsError("the op list has only 'none'; a cell needs at least one other op")
            b = ks[0]
            for k in ks:
                if strengths[e][k] > strengths[e][b]:
                    b = k
            best[e] = b
        for e in sorted(rows, key=lambda e: -strengths[e][best[e]])[:2]:
            if sigma[e][best[e]] >= threshold:
                out.append((edge_ops[e][best[e]], node + 2, e - start))
        start += 2 + node
    return tuple(out)


def parse_derivation(value) -> str | None:
    """``top2``, ``threshold`` or ``threshold:T`` (0 < T < 1) -> ``top2`` or ``threshold:T``."""
    if value is None:
        return None
    text = str(value).strip()
    if text == "top2":
        return text
    name, sep, number = text.partition(":")
    if name == "threshold":
        try:
            t = float(number) if sep else DEFAULT_THRESHOLD
        except ValueError:
            t = math.nan
        if 0 < t < 1:
            return f"threshold:{t!r}"
    raise FastDartsError(f"fair-derivation must be top2 or threshold[:T] with 0 < T < 1 (a σ threshold), "
                         f"got {value!r}")


def check_zero_one_loss(value) -> float:
    try:
        w = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w) or w < 0:
        raise FastDartsError(f"zero-one-loss must be a finite non-negative number (its weight w), got {value!r}")
    return w


def _threshold(rule: str | None) -> float | None:
    return float(rule.partition(":")[2]) if rule and rule.startswith("threshold") else None


# -- the plug-in -------------------------------------------------------------------------------------
@register_method
class FairDarts(SearchMethod):
    """σ(α) op weights, the zero-one loss on the architecture step, σ-ranked derivation."""

    name = "fair-darts"
    options = (
        Option("sigmoid_ops", False, "FairDARTS: each op weighted by σ(α) on its own instead of the softmax "
               "over its edge (α starts at 0; 'none' is inert)", kind="bool"),
        Option("zero_one_loss", 0.0, "FairDARTS: add -W·mean((σ(α)-0.5)²) to the architecture loss "
               "(needs --sigmoid-ops)", metavar="W"),
        Option("fair_derivation", None, "FairDARTS: top2 (each node's 2 strongest edges by σ(α)) or "
               "threshold[:T] (also write the original's cell, those edges kept only if σ ≥ T, "
               f"default {DEFAULT_THRESHOLD}, to {THRESHOLD_FILE})", metavar="RULE"),
    )

    @classmethod
    def check(cls, config, from_preset):
        sigmoid = config.sigmoid_ops
        if not isinstance(sigmoid, bool):
            raise FastDartsError(f"sigmoid-ops must be true or false, got {sigmoid!r}")
        w = check_zero_one_loss(config.zero_one_loss)
        rule = parse_derivation(config.fair_derivation)
        if not sigmoid:
            # --no-sigmoid-ops under the preset: its loss and derivation go with it.
            if "zero_one_loss" in from_preset:
                w = 0.0
            if "fair_derivation" in from_preset:
                rule = None
            if w:
                raise FastDartsError("zero-one-loss pushes σ(α), the sigmoid op weights, to 0 or 1: it needs "
                                     "--sigmoid-ops")
            if rule is not None:
                raise FastDartsError("fair-derivation ranks ops by σ(α): it needs --sigmoid-ops")
        elif rule is None:
            rule = "top2"
        return dict(sigmoid_ops=sigmoid, zero_one_loss=w, fair_derivation=rule)

    @classmethod
    def incompatible(cls, config) -> str | None:
        # Only one method can set the op weights (the first one's are used).
        others = [c.name for c in registered_methods()
                  if c is not cls and c.active(config) and getattr(c, "op_weights") is not SearchMethod.op_weights]
        if others:
            return (f"FairDARTS' sigmoid op weights (--sigmoid-ops) cannot run with {', '.join(others)}, which "
                    f"sets the op weights too")
        return None

    # -- the supernet --------------------------------------------------------------------
    def setup_network(self, model) -> list:
        with torch.no_grad():  # the original's α starts at 0 (model_search.py:125-126): σ = ½ for every op
            model.alpha_normal.zero_()
            model.alpha_reduce.zero_()
        # The entries the zero-one loss averages: not `none`, which the original's op set lacks.
        model.register_buffer("zero_one_mask", none_mask(model.edge_ops), persistent=False)
        return []

    def op_weights(self, model, alphas) -> list[tuple]:
        return [(w, None) for w in sigmoid_weights(alphas)]

    # -- the loop ------------------------------------------------------------------------
    def arch_loss_term(self, model) -> torch.Tensor | None:
        w = check_zero_one_loss(self.config.zero_one_loss)
        if w == 0:
            return None
        mask = model.zero_one_mask.to(model.alpha_normal.dtype)
        return -w * zero_one_mean([model.alpha_normal, model.alpha_reduce], mask)

    def epoch_figures(self, run, entry: dict) -> dict:
        model = run.model
        alphas = [a.detach().double().cpu() for a in (model.alpha_normal, model.alpha_reduce)]
        sigma = sigmoid_weights(alphas)
        mask = model.zero_one_mask.detach().double().cpu()
        out = {"sigmoid_alphas": {"normal": sigma[0].tolist(), "reduce": sigma[1].tolist()},
               "zero_one_mean": float(zero_one_mean(alphas, mask))}
        t = _threshold(self.config.fair_derivation)
        if t is not None:
            k = len(model.edge_ops["normal"])
            above = ((torch.cat(sigma) >= t) & (mask > 0))
            out["sigmoid_above_threshold"] = {"normal": int(above[:k].sum()), "reduce": int(above[k:].sum())}
        return out

    def epoch_log(self, run, entry: dict) -> str:
        line = f"σ(α): mean (σ-½)² {entry['zero_one_mean']:.4g}"
        if "sigmoid_above_threshold" in entry:
            n = int(run.model.zero_one_mask.sum().item()) // 2
            above = entry["sigmoid_above_threshold"]
            line += (f", ops with σ ≥ {_threshold(self.config.fair_derivation):g}: normal {above['normal']}/{n}, "
                     f"reduce {above['reduce']}/{n}")
        return line

    # -- derivation ----------------------------------------------------------------------
    def op_strengths(self, model, cell: str, weights: torch.Tensor) -> torch.Tensor:
        # The core passes softmax(α): the ranking is σ(α) instead, computed here in the same precision.
        alpha = (model.alpha_normal if cell == "normal" else model.alpha_reduce).detach().cpu()
        sigma = torch.sigmoid(alpha.to(weights.dtype))
        before = []
        for m in model.methods:
            if m is self:
                break
            before.append(m)
        if any(overrides(m, "op_strengths") for m in before):
            # An earlier method scaled each edge (edge normalisation: softmax(α)·s_edge); softmax rows sum to 1,
            # so a row's sum is that edge's factor: kept on σ(α).
            sigma = sigma * weights.sum(-1, keepdim=True)
        return sigma

    def _strengths(self, model, cell: str) -> torch.Tensor:
        """What ranks the ops of ``cell`` in the derivation (every method's ``op_strengths``, as the core's)."""
        alpha = (model.alpha_normal if cell == "normal" else model.alpha_reduce).detach().cpu()
        alpha = alpha if alpha.dtype == torch.float64 else alpha.float()
        weights = torch.softmax(alpha, dim=-1)
        for m in model.methods:
            weights = m.op_strengths(model, cell, weights)
        return weights

    def threshold_cells(self, model) -> dict | None:
        """The original's threshold cell of each cell type (None under ``top2``)."""
        t = _threshold(self.config.fair_derivation)
        if t is None:
            return None
        cells = {}
        for cell, alpha in (("normal", model.alpha_normal), ("reduce", model.alpha_reduce)):
            sigma = torch.sigmoid(alpha.detach().cpu().double()).tolist()
            cells[cell] = threshold_cell(self._strengths(model, cell).tolist(), sigma, model.edge_ops[cell],
                                         model.steps, t)
        return cells

    def select_after_search(self, run, genotype):
        self._dropped = None
        cells = self.threshold_cells(run.model)
        if cells is None:
            return genotype
        concat = list(genotype.normal_concat)
        if run.dist.is_main:
            write_json(run.out / THRESHOLD_FILE, {
                "threshold": _threshold(self.config.fair_derivation),
                "normal": [list(e) for e in cells["normal"]], "normal_concat": concat,
                "reduce": [list(e) for e in cells["reduce"]], "reduce_concat": list(genotype.reduce_concat)})
        # The edges of the genotype that the threshold drops, with their op's σ.
        self._dropped = []
        for cell in ("normal", "reduce"):
            alpha = getattr(run.model, f"alpha_{cell}").detach().cpu().double()
            ops = run.model.edge_ops[cell]
            for i, (op, src) in enumerate(getattr(genotype, cell)):
                if (op, i // 2 + 2, src) not in cells[cell]:
                    edge = num_edges(i // 2) + src
                    sigma = float(torch.sigmoid(alpha[edge, list(ops[edge]).index(op)]))
                    self._dropped.append(f"{cell} node {i // 2} <- {node_name(src)} {op} σ {sigma:.2f}")
        return genotype

    def describe_final(self, genotype, unlimited) -> str | None:
        dropped = getattr(self, "_dropped", None)
        if dropped is None:
            return None
        t = _threshold(self.config.fair_derivation)
        if not dropped:
            return f"every kept edge has σ ≥ {t:g}: the original's threshold cell is this one"
        return (f"the original's threshold rule (σ ≥ {t:g}) drops {len(dropped)} of these edges "
                f"({'; '.join(dropped)}); a genotype keeps 2 inputs per node, so they stay here; its cell is "
                f"in {THRESHOLD_FILE}")


# Chu et al., ECCV 2020 (xiaomi-automl/FairDARTS, fairdarts/train_search.py and the README's search command):
# batch 128 (:23), SGD lr 0.005 (:24, README) cosine to 0.001 (:25), momentum 0.9, weight decay 3e-4, 50
# epochs, grad clip 5 (:26-31, :44: DARTS' values); Adam on α lr 3e-3 (:46), betas (0.9, 0.999) (:47 with
# architect.py:15-16), weight decay 1e-3 (:48); first order (architect.py:20-26 has no unrolled step);
# zero-one loss weight 10 (:29, README); threshold_sparse derivation at σ 0.85 (:40-41).
register_preset("fair-darts", dict(DARTS_PRESET, batch_size=128, lr=0.005, lr_min=0.001, arch_lr=3e-3,
                                   arch_beta1=0.9, arch_weight_decay=1e-3, order="first", sigmoid_ops=True,
                                   zero_one_loss=10.0, fair_derivation=f"threshold:{DEFAULT_THRESHOLD!r}"))
