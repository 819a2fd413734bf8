"""DARTS-PT: perturbation-based architecture selection (Wang et al., ICLR 2021; SPEC §8).

After the search (of any method), ``--selection pt`` replaces the choice by
α's magnitude with the choice by each op's effect on the trained supernet
(``ruocwang/darts-pt`` at 4ec3149, ``sota/cnn/projection.py`` and
``sota/cnn/model_search_darts_proj.py``; references below are to those files):

- edges in a random order drawn with the run's seed: at each decision point
  one undecided edge of the normal cell, then one of the reduction cell, each
  ``np.random.choice`` of the remaining edges (projection.py:22-27 and
  161-181; NumPy's global generator, seeded with ``--seed`` at
  train_search.py:181), reproduced draw for draw;
- on that edge, each op in turn is removed (its weight set to 0, the others'
  left as they are: no renormalisation, projection.py:39-48) and the
  supernet's top-1 accuracy measured on the architecture half of the
  training set, in train mode (BatchNorm on batch statistics, ``infer(...,
  _eval=False)``, train_search.py:400-429), without gradients. The edge keeps
  the op whose removal leaves the lowest accuracy (the first of equals;
  projection.py:30-56, ``proj_crit`` acc) and from then on computes that op
  alone, weight 1 (``proj_weights`` one-hot, model_search_darts_proj.py:53-81);
- once every edge has its op, the topology: per intermediate node with more
  than two inputs (random order, projection.py:62-104), the edge whose
  removal (its whole row of weights 0) leaves the highest accuracy is dropped
  (the later of equals) until two remain; dropped edges have weight 0;
- between two decision points the supernet is fine-tuned for
  ``--selection-interval`` epochs (``proj_intv``; 5 in exp_scripts/
  darts-proj-sota.sh:35): the search's own step (α and weights, with every
  method's hooks: e.g. SDARTS' perturbation, as sdarts-rs-proj-sota.sh runs
  it), SGD restarted (momentum cleared) at a tenth of ``--lr``, constant: the
  original builds a cosine schedule but never steps it (projection.py:133-136;
  no ``scheduler.step()`` in its loop, 157-239); Adam on α goes on from the
  search's state.

Every decision is a line of ``selection.jsonl`` (the edge or node, each
candidate's accuracy without it, the choice) and is followed by
``selection.pt`` (supernet, optimisers, decisions): ``--resume`` continues
after the last decision and ends with the same genotype as an uninterrupted
run (measurements and fine-tuning draw from generators seeded by (seed,
decision) and (seed, epoch)). Under torchrun the ranks measure their shards
of each batch and add the counts; rank 0 alone writes.

What differs from the original, and why:

- accuracy is measured on the architecture half in a fixed order without
  augmentation (the original's validation queue is that half shuffled and
  augmented afresh for every candidate, so BatchNorm's batches and the crops
  differ between candidates): every candidate is judged on the same batches,
  so a rerun or a resume decides the same;
  ``--selection-batches`` caps the batches (the original uses them all, or
  one under its debugging ``--fast``, which sdarts-rs-proj-sota.sh:34
  passes); ``--max-steps`` caps them too;
- the topology phase measures each edge of a node once: the original
  re-measures the remaining edges after each drop (on newly shuffled and
  augmented batches); on fixed batches the numbers repeat, and dropping the
  least harmful until two remain is keeping the two whose removal hurts
  most (``keep_edges`` states the original's loop);
- ``none`` is never a candidate: removing it leaves the supernet's output as
  it is (it adds zero), and a cell cannot keep it (the DARTS-PT space, s5,
  has no ``none``; ``--ops`` without it is that space exactly);
- the original fine-tunes one more epoch after the last decision; it cannot
  change the genotype, so it is left out;
- the methods' epoch schedules (e.g. DARTS-' skip weight, P-DARTS' skip
  dropout) stay where the search ended (the original only ever fine-tunes
  with constant settings; its SDARTS passes ε's maximum, 0.3);
- a layout without reduction (or normal) cells decides only the cells it has;
  the other keeps α's choice.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..checkpoints import damaged, load_model_state, load_optimizer_state
from ..cuda_graph import adam_capturable, hold_lr_on_device
from ..data.loader import mix_seed
from ..distributed import all_reduce_sum_, barrier, broadcast_
from ..errors import FastDartsError
from ..files import read_torch, save_torch, write_jsonl
from ..genotype import Genotype, node_name, num_edges
from ..method import Option, SearchMethod, register_method, register_preset
from ..run_utils import EpochProgress, set_lr, steps_per_epoch
from ..search_config import DARTS_PRESET
from ..search_loop import search_step

SELECTIONS = ("alpha", "pt")
# Fine-tuning epochs between two decisions: exp_scripts/darts-proj-sota.sh:35 and
# sdarts-rs-proj-sota.sh:33 (--proj_intv 5; train_search.py:84's default is 10).
DEFAULT_INTERVAL = 5
# The fine-tuning's SGD rate: the search's initial rate / 10 (projection.py:134).
LR_FACTOR = 0.1
CELLS = ("normal", "reduce")
SELECTION_JSONL = "selection.jsonl"
SELECTION_CHECKPOINT = "selection.pt"
SELECTION_FORMAT = "fastdarts-pt-selection/1"
# Pass numbers of mix_seed for the selection's draws (apart from the loaders' 0, 1, ... and the loop's).
TUNE_PASS = 1 << 22
MEASURE_PASS = TUNE_PASS + 1


# ---------------------------------------------------------------- the decision rules

def keep_op(accuracies: Sequence[float]) -> int:
    """The candidate an edge keeps: the one whose removal leaves the lowest
    accuracy; of equals, the first (projection.py:33-53: ``x < y``, strict)."""
    best = 0
    for k, acc in enumerate(accuracies):
        if acc < accuracies[best]:
            best = k
    return best


def keep_edges(accuracies: Sequence[float], keep: int = 2) -> list[int]:
    """The positions of the edges a node keeps: the edge whose removal leaves
    the highest accuracy is dropped (of equals, the later: ``not x < y``)
    until ``keep`` remain (projection.py:74-100), in position order."""
    left = list(range(len(accuracies)))
    while len(left) > keep:
        drop = None
        for i in left:
            if drop is None or not accuracies[i] < accuracies[drop]:
                drop = i
        left.remove(drop)
    return left


def node_edges(steps: int) -> list[list[int]]:
    """The edge indices entering each intermediate node (node i has 2+i inputs)."""
    out, start = [], 0
    for node in range(steps):
        out.append(list(range(start, start + 2 + node)))
        start += 2 + node
    return out


def decision_plan(seed: int, steps: int, cells: Sequence[str] = CELLS) -> list[tuple[int, str, str, int]]:
    """Every decision in order as (decision point, cell, kind, index): kind
    ``op`` (index: the edge) or ``edges`` (index: the intermediate node).
    Each point decides one edge (then one node) per cell type, in ``cells``'
    order; which is drawn from the remaining ones with ``np.random.choice``
    of the NumPy generator seeded with ``seed``, as the original's
    ``edge_decision random`` (projection.py:24-26, 69-71)."""
    rng = np.random.RandomState(seed)
    plan: list[tuple[int, str, str, int]] = []
    edges = {c: list(range(num_edges(steps))) for c in cells}
    for point in range(num_edges(steps)):
        for cell in cells:
            chosen = int(rng.choice(np.array(edges[cell]), size=1)[0])
            edges[cell].remove(chosen)
            plan.append((point, cell, "op", chosen))
    # Node 0 has two inputs: nothing to choose (the original's nid2eids starts at node 1).
    nodes = {c: list(range(1, steps)) for c in cells}
    for point in range(num_edges(steps), num_edges(steps) + steps - 1):
        for cell in cells:
            chosen = int(rng.choice(np.array(nodes[cell]), size=1)[0])
            nodes[cell].remove(chosen)
            plan.append((point, cell, "edges", chosen))
    return plan


# ---------------------------------------------------------------- the state on the supernet

class Projection:
    """DARTS-PT's state on one supernet: per cell type each edge's chosen op
    column (-1: undecided) and whether the topology phase kept it; while a
    candidate is measured, ``probe`` = (cell, edge, op column, or None for the
    whole edge). Inactive (the op weights untouched) until the selection starts."""

    def __init__(self, edges: int):
        self.edges = edges
        self.active = False
        self.reset()

    def reset(self) -> None:
        self.choice = {c: [-1] * self.edges for c in CELLS}
        self.kept = {c: [True] * self.edges for c in CELLS}
        self.probe: tuple[str, int, int | None] | None = None
        self._tensors: dict = {}

    def changed(self) -> None:
        self._tensors.clear()

    def set_probe(self, probe: tuple[str, int, int | None] | None) -> None:
        self.probe = probe
        self.changed()

    def decide_op(self, cell: str, edge: int, column: int) -> None:
        self.choice[cell][edge] = column
        self.changed()

    def keep_node_edges(self, cell: str, edges: Sequence[int], kept: Sequence[int]) -> None:
        for e in edges:
            self.kept[cell][e] = e in kept
        self.changed()

    def _matrices(self, cell: str, ops: int) -> tuple[list, list] | None:
        """(scale, fill): the op weights become ``w * scale + fill``; None: left as they are."""
        choice, kept = self.choice[cell], self.kept[cell]
        probe = self.probe if self.probe is not None and self.probe[0] == cell else None
        if all(c < 0 for c in choice) and all(kept) and probe is None:
            return None
        scale = [[1.0] * ops for _ in range(self.edges)]
        fill = [[0.0] * ops for _ in range(self.edges)]
        for e in range(self.edges):
            if not kept[e] or choice[e] >= 0:  # a decided edge computes its op alone, a dropped one nothing
                scale[e] = [0.0] * ops
                if kept[e]:
                    fill[e][choice[e]] = 1.0
        if probe is not None:
            _, e, k = probe
            if k is None:  # the whole edge removed
                scale[e], fill[e] = [0.0] * ops, [0.0] * ops
            else:
                scale[e][k], fill[e][k] = 0.0, 0.0
        return scale, fill

    def adjust(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.active:
            return weights
        out = []
        for cell, w in zip(CELLS, weights):
            if w.dim() != 2 or w.shape[0] != self.edges:
                raise FastDartsError(f"DARTS-PT needs every edge's op weights in each forward, got shape "
                                     f"{tuple(w.shape)} for the {cell} cell")
            key = (cell, w.shape[1], w.device, w.dtype)
            if key not in self._tensors:
                m = self._matrices(cell, w.shape[1])
                self._tensors[key] = None if m is None else tuple(
                    torch.tensor(t, dtype=w.dtype, device=w.device) for t in m)
            m = self._tensors[key]
            out.append(w if m is None else w * m[0] + m[1])
        return out


# ---------------------------------------------------------------- the method

@register_method
class PerturbationSelection(SearchMethod):
    """Selection by perturbation after the search (``select_after_search``);
    the op weights of every forward go through the decisions (``adjust_op_weights``)."""

    name = "darts-pt"
    options = (
        Option("selection", "alpha", "how the final cells are chosen: alpha (α's magnitude, DARTS) or pt "
               "(DARTS-PT: edge by edge, the op whose removal lowers the supernet's accuracy most, then per "
               "node the two edges whose removal hurts most, fine-tuning between decisions; writes "
               "selection.jsonl)", metavar="alpha|pt"),
        Option("selection_interval", None, "DARTS-PT: fine-tuning epochs between two decision points (each "
               "decides one edge or node of each cell type); 5 unless given, the original's proj_intv; 0: none",
               kind="non_negative_int", metavar="E"),
        Option("selection_batches", None, "DARTS-PT: batches of the architecture half each accuracy is measured "
               "on (default: all of them, as the original)", kind="positive_int", metavar="N"),
    )

    @classmethod
    def active(cls, config) -> bool:
        return config.selection == "pt"

    @classmethod
    def check(cls, config, from_preset):
        selection = config.selection
        if selection not in SELECTIONS:
            raise FastDartsError(f"selection must be 'alpha' (α's magnitude) or 'pt' (DARTS-PT's perturbation), "
                                 f"got {selection!r}")
        values = {}
        for name, least in (("selection_interval", 0), ("selection_batches", 1)):
            value, flag = getattr(config, name), name.replace("_", "-")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                kind = "a non-negative" if least == 0 else "a positive"
                raise FastDartsError(f"{flag} must be {kind} integer, got {value!r}")
            if value is not None and selection != "pt":
                if name not in from_preset:
                    raise FastDartsError(f"{flag} sets DARTS-PT's selection: it needs --selection pt")
                value = None  # the preset's, for a selection the user turned off
            values[name] = value
        if selection == "pt" and values["selection_interval"] is None:
            values["selection_interval"] = DEFAULT_INTERVAL
        return dict(selection=selection, **values)

    @classmethod
    def incompatible(cls, config) -> str | None:
        if getattr(config, "sample_paths", None):
            return ("--selection pt removes one op at a time from every op's weighted sum; path sampling "
                    "(--sample-paths) computes a few sampled ops per edge: use one of the two")
        return None

    # -- the supernet ------------------------------------------------------------
    def setup_network(self, model) -> list:
        model.pt_projection = Projection(num_edges(model.steps))
        return []

    def adjust_op_weights(self, model, weights, weight_step):
        return model.pt_projection.adjust(weights)

    def describe_final(self, genotype, unlimited) -> str | None:
        return f"chosen by DARTS-PT's perturbation; the decisions are in {SELECTION_JSONL}"

    # -- the selection -------------------------------------------------------------
    def select_after_search(self, run, genotype: Genotype) -> Genotype:
        return _Selection(run, self).select(genotype)


class _Selection:
    """One selection run on ``run``'s final supernet."""

    def __init__(self, run: Any, method: PerturbationSelection):
        self.run, self.method = run, method
        self.cfg, self.model = run.config, run.model
        self.projection: Projection = run.model.pt_projection
        self.cells = [c for c in CELLS if any(cell.reduction == (c == "reduce") for cell in run.model.cells)]
        self.plan = decision_plan(self.cfg.seed, self.model.steps, self.cells)
        self.nodes = node_edges(self.model.steps)
        self.edge_ops = self.model.edge_ops
        self.interval = self.cfg.selection_interval
        # Run-wide epoch numbers continue after the search's (they seed the fine-tuning's batches).
        self.base = len(run.history)
        last = run.history[-1]
        self.schedule_epoch = last.get("stage_epoch", last["epoch"]) - 1  # where the methods' schedules ended
        self.checkpoint = run.out / SELECTION_CHECKPOINT
        self.records: list[dict] = []

    # -- the loop ----------------------------------------------------------------
    def select(self, genotype: Genotype) -> Genotype:
        run, cfg = self.run, self.cfg
        self.projection.reset()
        self.projection.active = True
        if cfg.resume and self.checkpoint.exists():
            self._load()
        else:  # projection.py:134: the weights' SGD starts afresh at a tenth of the rate
            run.weight_optimizer.state.clear()
        set_lr(run.weight_optimizer, cfg.lr * LR_FACTOR)
        total = len(self.plan)
        batches = self._measure_batches()
        if self.records:
            run.log(f"DARTS-PT: resumed after decision {len(self.records)}/{total} ({self.checkpoint})")
        else:
            run.log(f"DARTS-PT selection: {total} decisions ({', '.join(self.cells)} cell), {self.interval} "
                    f"epoch(s) of fine-tuning between decision points at lr {cfg.lr * LR_FACTOR:g}, accuracy "
                    f"on {batches} batch(es) of the architecture half")
        for i in range(len(self.records), total):
            point = self.plan[i][0]
            if i > 0 and self.plan[i - 1][0] != point:
                for j in range(self.interval):
                    self._tune_epoch((point - 1) * self.interval + j)
            record = self._decide(i, batches)
            self.records.append(record)
            self._apply(record)
            self._save()
            run.log(_describe(record, total))
        return self._genotype(genotype)

    # -- the methods' epoch state ----------------------------------------------
    def _epoch_state(self, epoch: int) -> None:
        """The methods' per-epoch state for run epoch ``epoch``, their schedules where the search ended."""
        self.model.start_epoch(self.cfg.seed, epoch, self.cfg.epochs, self.schedule_epoch)
        for m in self.run.methods:
            m.start_epoch(self.run, epoch, self.schedule_epoch)

    # -- fine-tuning -------------------------------------------------------------
    def _tune_epoch(self, t: int) -> None:
        """Fine-tuning epoch ``t`` (0-based over the selection): the search's step, α and weights."""
        run, cfg, model = self.run, self.cfg, self.model
        epoch = self.base + t
        torch.manual_seed(mix_seed(cfg.seed, epoch, TUNE_PASS))  # a method drawing from the global generator
        self._epoch_state(epoch)
        model.train()
        n_steps = steps_per_epoch(len(run.train_loader), cfg.max_steps)
        arch_stream = run.arch_loader.cycle(epoch)
        progress = EpochProgress(run.device, n_steps, f"DARTS-PT fine-tuning {t + 1}",
                                 cfg.progress and run.dist.is_main)
        try:
            for index, (x, y) in enumerate(run.train_loader.epoch(epoch)):
                if index >= n_steps:
                    break
                arch_step = (index + 1) % cfg.arch_every == 0
                val = next(arch_stream) if arch_step else (None, None)
                logits, loss, _ = search_step(model, run.architect, run.weight_optimizer, (x, y), val, cfg.grad_clip,
                                              arch_step=arch_step, arch_after_weights=cfg.arch_after_weights)
                progress.update(logits, y, loss)
        finally:
            progress.close()

    # -- measuring ---------------------------------------------------------------
    def _measure_batches(self) -> int:
        n = steps_per_epoch(len(self.run.eval_loader), self.cfg.max_steps)
        return n if self.cfg.selection_batches is None else min(n, self.cfg.selection_batches)

    @torch.no_grad()
    def _accuracy(self, batches: int) -> tuple[float, int]:
        """Top-1 accuracy (percent) and images of the supernet as it stands, in train
        mode (batch statistics, as the original's ``infer(_eval=False)``), summed over the ranks."""
        model, device = self.model, self.run.device
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = torch.zeros((), dtype=torch.long, device=device)
        model.train()
        for step, (x, y) in enumerate(self.run.eval_loader.epoch(0)):
            if step >= batches:
                break
            if len(y) == 0:  # this rank's part of a last batch smaller than the number of ranks
                continue
            correct += (model(x).argmax(1) == y).sum()
            seen += len(y)
        if self.run.dist.distributed:
            all_reduce_sum_([correct, seen])
        images = int(seen.item())
        if images == 0:
            raise FastDartsError("DARTS-PT has no images to measure the supernet on")
        return 100.0 * int(correct.item()) / images, images

    def _decide(self, i: int, batches: int) -> dict:
        point, cell, kind, index = self.plan[i]
        # The state the epoch just ended ran with (the search's last, or the last fine-tuning epoch's).
        self._epoch_state(self.base - 1 + point * self.interval)
        seed = mix_seed(self.cfg.seed, i, MEASURE_PASS)
        if kind == "op":
            ops = self.edge_ops[cell][index]
            candidates = [k for k, name in enumerate(ops) if name != "none"]
            if not candidates:
                raise FastDartsError(f"DARTS-PT: {cell} edge {index} holds only 'none'")
            probes = [(cell, index, k) for k in candidates]
        else:
            candidates = self.nodes[index]
            probes = [(cell, e, None) for e in candidates]
        accuracies, images = [], 0
        try:
            for probe in probes:
                self.projection.set_probe(probe)
                torch.manual_seed(seed)  # every candidate sees the same draws (a method's dropout, say)
                acc, images = self._accuracy(batches)
                accuracies.append(acc)
        finally:
            self.projection.set_probe(None)
        record = dict(decision=i + 1, point=point + 1, cell=cell, kind=kind, images=images)
        if kind == "op":
            node = next(n for n, edges in enumerate(self.nodes) if index in edges)
            chosen = candidates[keep_op(accuracies)]
            record.update(edge=index, node=node, input=index - self.nodes[node][0],
                          candidates=[ops[k] for k in candidates], accuracy_without=accuracies,
                          choice=ops[chosen], choice_column=chosen)
        else:
            kept = [candidates[p] for p in keep_edges(accuracies)]
            record.update(node=index, candidates=candidates,
                          inputs=[e - self.nodes[index][0] for e in candidates], accuracy_without=accuracies,
                          choice=kept, choice_inputs=[e - self.nodes[index][0] for e in kept])
        return record

    def _apply(self, record: dict) -> None:
        if record["kind"] == "op":
            self.projection.decide_op(record["cell"], record["edge"], record["choice_column"])
        else:
            self.projection.keep_node_edges(record["cell"], self.nodes[record["node"]], record["choice"])

    # -- files -------------------------------------------------------------------
    def _config(self) -> dict:
        return dict(self.cfg.result_defining(), world_size=self.run.dist.world_size)

    def _save(self) -> None:
        run = self.run
        if run.dist.distributed:  # every rank goes on with rank 0's buffers, the ones saved
            broadcast_(list(self.model.buffers()))
        if run.dist.is_main:
            # Decisions first: a crash between the two never leaves a checkpoint ahead of them.
            write_jsonl(run.out / SELECTION_JSONL, self.records)
            save_torch(self.checkpoint, dict(
                format=SELECTION_FORMAT, config=self._config(), search_epochs=self.base, records=self.records,
                model=self.model.state_dict(), weight_optimizer=run.weight_optimizer.state_dict(),
                arch_optimizer=run.architect.optimizer.state_dict()))
        barrier(run.dist)

    def _load(self) -> None:
        run, path = self.run, self.checkpoint
        state = read_torch(path, run.device, what="DARTS-PT selection checkpoint")
        if not isinstance(state, dict) or state.get("format") != SELECTION_FORMAT:
            raise FastDartsError(f"{path} is not a DARTS-PT selection checkpoint")
        for key in ("config", "search_epochs", "records", "model", "weight_optimizer", "arch_optimizer"):
            if key not in state:
                raise damaged(path, f"its {key!r} entry is missing")
        if state["config"] != self._config():
            diff = [f"{k}: {state['config'].get(k)!r} vs now {v!r}" for k, v in self._config().items()
                    if state["config"].get(k) != v]
            raise FastDartsError(f"{path} was written by a different configuration ({'; '.join(diff) or 'fields'})")
        if state["search_epochs"] != self.base:
            raise damaged(path, f"it follows a search of {state['search_epochs']!r} epochs, this one ran {self.base}")
        records = state["records"]
        if not isinstance(records, list) or len(records) > len(self.plan):
            raise damaged(path, "its 'records' entry is not a list of decisions")
        for i, record in enumerate(records):
            self._check_record(path, i, record)
            self._apply(record)
        load_model_state(self.model, state["model"], path, "the supernet of this search")
        load_optimizer_state(run.weight_optimizer, state["weight_optimizer"], path, "weight_optimizer")
        load_optimizer_state(run.architect.optimizer, state["arch_optimizer"], path, "arch_optimizer")
        hold_lr_on_device(run.weight_optimizer, self.cfg.cuda_graph)
        adam_capturable(run.architect.optimizer, self.cfg.cuda_graph)
        self.records = list(records)
        if run.dist.is_main:  # the decisions the checkpoint holds, should a crash have left one more line
            write_jsonl(run.out / SELECTION_JSONL, self.records)

    def _check_record(self, path, i: int, record: Any) -> None:
        point, cell, kind, index = self.plan[i]
        where = "edge" if kind == "op" else "node"
        if (not isinstance(record, dict) or record.get("cell") != cell or record.get("kind") != kind
                or record.get(where) != index):
            raise damaged(path, f"its decision {i + 1} is not the {cell} {where} {index} this run decides then")
        if kind == "op":
            column = record.get("choice_column")
            ops = self.edge_ops[cell][index]
            if isinstance(column, bool) or not isinstance(column, int) or not 0 <= column < len(ops) \
                    or ops[column] == "none" or record.get("choice") != ops[column]:
                raise damaged(path, f"its decision {i + 1} chooses no op of {cell} edge {index}")
        else:
            kept = record.get("choice")
            if not isinstance(kept, list) or len(kept) != 2 or len(set(kept)) != 2 \
                    or not all(e in self.nodes[index] for e in kept):
                raise damaged(path, f"its decision {i + 1} keeps no two edges of {cell} node {index}")

    # -- the result --------------------------------------------------------------
    def _genotype(self, fallback: Genotype) -> Genotype:
        """Each node's kept edges in input order (the original's ``genotype()`` sorts them by their
        one-hot weights, all 1: a stable sort keeps that order), each with its chosen op."""
        cells = {"normal": fallback.normal, "reduce": fallback.reduce}
        for cell in self.cells:
            gene = []
            for edges in self.nodes:
                for e in edges:
                    if self.projection.kept[cell][e]:
                        gene.append((self.edge_ops[cell][e][self.projection.choice[cell][e]], e - edges[0]))
            cells[cell] = tuple(gene)
        return Genotype(normal=cells["normal"], normal_concat=fallback.normal_concat, reduce=cells["reduce"],
                        reduce_concat=fallback.reduce_concat)


def _describe(record: dict, total: int) -> str:
    """One log line per decision."""
    head = f"DARTS-PT {record['decision']}/{total} {record['cell']}"
    accs = record["accuracy_without"]
    if record["kind"] == "op":
        without = ", ".join(f"{op} {a:.2f}" for op, a in zip(record["candidates"], accs))
        return (f"{head} edge {record['edge']} (node {record['node']} <- {node_name(record['input'])}): keeps "
                f"{record['choice']} (accuracy without each op: {without})")
    without = ", ".join(f"{node_name(j)} {a:.2f}" for j, a in zip(record["inputs"], accs))
    kept = " and ".join(node_name(j) for j in record["choice_inputs"])
    return f"{head} node {record['node']}: keeps the edges from {kept} (accuracy without each edge: {without})"


# DARTS-PT on DARTS' search (ruocwang/darts-pt at 4ec3149): sota/cnn/train_search.py:37-56 (batch 64, lr 0.025
# to 0.001, weight decay 3e-4, momentum 0.9, 50 epochs, grad clip 5, Adam lr 3e-4 with weight decay 1e-3) and
# nasbench201/architect_ig.py:9-11 (betas (0.5, 0.999)), :20-21 (first order for 'darts'); the selection
# exp_scripts/darts-proj-sota.sh:34-35 (random edge order, accuracy, proj_intv 5).
register_preset("darts-pt", dict(DARTS_PRESET, order="first", selection="pt", selection_interval=DEFAULT_INTERVAL))

