"""Rank disorder of a finished search (SPEC §9): ``fastdarts-rank RUN_DIR``.

Weight sharing is what makes DARTS cheap, and it is sound only if the trained
supernet orders architectures as they order when each is trained on its own
(Yu et al., ICLR 2020, "Evaluating the search phase of neural architecture
search"). This measures that order for one search: it draws architectures
uniformly from the search space, adds the search's own, and for each records

- its supernet score: the architecture as a discrete sub-network of the
  trained supernet (weight 1 on its ops, 0 elsewhere), BatchNorm statistics
  recalibrated on training batches first, as SPOS does (shared statistics
  belong to the mixture, not to any one sub-network), then its accuracy on
  the search's validation half;
- its α score: Σ log softmax(α) over its chosen ops, the ranking DARTS itself
  implies (under a method that ranks ops otherwise, e.g. FairDARTS' σ(α) or
  PC-DARTS' edge weights, the log of what its derivation ranks by);
- its stand-alone accuracy: trained from scratch by ``train_loop.train``.

Kendall τ, sparse Kendall τ and Spearman ρ between each score and the
stand-alone accuracy say how far the search's ranking can be trusted.
``rank.json`` is rewritten (atomically) after every architecture, so an
interrupted run resumes with ``--resume``; each training run keeps its own
checkpoint under ``archs/NNN/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cli import _Help, _non_negative_int, _Parser, _positive_int, _run
from .data import DeviceLoader, Loaders
from .errors import FastDartsError
from .ops import stem_output_size
from .genotype import DARTS_V2, Genotype, genotype_op_weights, num_edges
from .layout import reduction_layout
from .method import overrides
from .mixed_op import MIXED_OP_BACKENDS
from .rank_stats import kendall_tau, sparse_kendall_tau, spearman_rho
from .files import check_writable, save_figure, write_json
from .run_utils import resolve_device
from .search_loop import load_search
from .train_loop import CHECKPOINT as TRAIN_CHECKPOINT
from .train_loop import TrainConfig, train

PROG = "fastdarts-rank"
RANK_FILE = "rank.json"
RANK_FORMAT = 1
CELLS = ("normal", "reduce")
# score name -> (field of an architecture's entry, axis label, short name)
SCORES = {"supernet": ("supernet_acc", "accuracy in the supernet (%)", "supernet score"),
          "alpha": ("alpha_score", "α score (Σ log softmax α)", "α score")}
STATISTICS = {"kendall_tau": kendall_tau, "sparse_kendall_tau": sparse_kendall_tau, "spearman_rho": spearman_rho}


@dataclass
class RankConfig:
    """Everything a rank run depends on. The stand-alone training is the
    paper's recipe (``TrainConfig``) at a smaller size and length: a proxy,
    since training every architecture fully would take days."""
    run_dir: str = "runs/search"
    num_archs: int = 20             # sampled architectures, besides the search's own
    seed: int = 0                   # the sampling and every stand-alone training run
    calib_batches: int = 20         # BatchNorm recalibration batches (0: the supernet's statistics)
    layers: int = 8
    channels: int = 16
    train_epochs: int = 10
    batch_size: int = 96
    max_steps: int | None = None    # cap on validation, train and test steps, for smoke tests
    data: str = "./data"
    workers: int | None = None      # processes decoding images (ImageNet; a folder's first read)
    data_budget_mb: float | None = None  # uint8 images held on the device up to this (serving.py)
    backend: str | None = None      # None: the search's
    device: str = "auto"
    out: str | None = None          # None: RUN_DIR/rank
    resume: bool = False
    progress: bool = True

    # Fields that do not change what a run computes.
    RUNTIME_ONLY = ("run_dir", "data", "workers", "data_budget_mb", "backend", "device", "out", "resume",
                    "progress")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.run_dir) / "rank"

    def checked(self) -> "RankConfig":
        """Validated, so that bad input fails before any data is touched."""
        for name, value, least in (("num_archs", self.num_archs, 1), ("calib_batches", self.calib_batches, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a positive" if least else "a non-negative"
                raise FastDartsError(f"{name.replace('_', '-')} must be {kind} integer, got {value!r}")
        if self.backend is not None and self.backend not in MIXED_OP_BACKENDS:
            raise FastDartsError(f"unknown backend {self.backend!r}; known backends: {', '.join(MIXED_OP_BACKENDS)}")
        # The training settings, checked by the training loop's own rules (the genotype is a stand-in).
        self.train_config(DARTS_V2, dataset="digits", out=self.out_dir).checked()
        return self

    def train_config(self, genotype: Genotype, *, dataset: str, out: Path, resume: bool = False,
                     image_size: int | None = None, skip_bad_images: bool = False) -> TrainConfig:
        """The stand-alone training run of one architecture (on the search's data: ``dataset``,
        ``image_size``, ``skip_bad_images``)."""
        return TrainConfig(genotype=genotype, dataset=dataset, image_size=image_size,
                           skip_bad_images=skip_bad_images, data=self.data, workers=self.workers,
                           data_budget_mb=self.data_budget_mb, layers=self.layers,
                           channels=self.channels, epochs=self.train_epochs, batch_size=self.batch_size,
                           max_steps=self.max_steps, seed=self.seed, device=self.device, out=str(out),
                           resume=resume, progress=self.progress)

    def result_defining(self) -> dict:
        """The settings a resumed run must agree on (plus the device type: CPU and CUDA draw differently)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.RUNTIME_ONLY}
        d["device_type"] = resolve_device(self.device).type
        return d


@dataclass
class RankResult:
    architectures: list[dict]
    statistics: dict
    out: Path


# ---------------------------------------------------------------- sampling

def _held_ops(edge_ops: dict[str, Sequence[Sequence[str]]], cell: str, node: int) -> list[list[str]]:
    """The ops a derived cell may keep on each incoming edge of ``node``: those the edge holds, but `none`."""
    start = num_edges(node)
    return [[op for op in edge_ops[cell][start + source] if op != "none"] for source in range(2 + node)]


def _node_choices(held: list[list[str]]) -> list[tuple[tuple[int, int], int]]:
    """Each pair of distinct inputs of a node with how many op assignments it allows."""
    return [((a, b), len(held[a]) * len(held[b])) for a, b in itertools.combinations(range(len(held)), 2)]


def count_genotypes(edge_ops: dict[str, Sequence[Sequence[str]]], steps: int) -> int:
    """How many architectures the search space can derive (both cells)."""
    total = 1
    for cell in CELLS:
        for node in range(steps):
            total *= sum(n for _, n in _node_choices(_held_ops(edge_ops, cell, node)))
    return total


def random_genotype(rng: random.Random, edge_ops: dict[str, Sequence[Sequence[str]]], steps: int,
                    multiplier: int) -> Genotype:
    """One architecture, uniform over the derivable ones. Nodes are
    independent, so a node's (pair of inputs, ops) drawn uniformly from its own
    choices makes the whole uniform: a pair is weighted by the op assignments
    it allows (edges may hold different ops), then each op is uniform."""
    cells = {}
    for cell in CELLS:
        edges = []
        for node in range(steps):
            held = _held_ops(edge_ops, cell, node)
            choices = _node_choices(held)
            total = sum(n for _, n in choices)
            if total == 0:
                raise FastDartsError(f"{cell} node {node} has no two incoming edges holding an op besides 'none'")
            r = rng.randrange(total)
            for (a, b), n in choices:
                if r < n:
                    break
                r -= n
            edges += [(rng.choice(held[a]), a), (rng.choice(held[b]), b)]
        cells[cell] = edges
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=cells["normal"], normal_concat=concat, reduce=cells["reduce"], reduce_concat=concat)


def architecture_key(genotype: Genotype) -> tuple:
    """The same for two spellings of one architecture (a node's two edges in either order)."""
    def cell(edges):
        return tuple(tuple(sorted(edges[k:k + 2], key=lambda e: (e[1], e[0]))) for k in range(0, len(edges), 2))
    return cell(genotype.normal), genotype.normal_concat, cell(genotype.reduce), genotype.reduce_concat


def sample_genotypes(edge_ops: dict[str, Sequence[Sequence[str]]], steps: int, multiplier: int, num: int, seed: int,
                     exclude: Iterable[Genotype] = ()) -> list[Genotype]:
    """``num`` distinct architectures, uniform over the derivable ones not in
    ``exclude`` (rejection keeps the draw uniform), the same for the same seed."""
    seen = {architecture_key(g) for g in exclude}
    available = count_genotypes(edge_ops, steps) - len(seen)
    if num > available:
        raise FastDartsError(f"num-archs {num} exceeds the {available} architectures this search space can derive "
                             f"besides the search's own")
    rng = random.Random(seed)
    sampled = []
    while len(sampled) < num:
        genotype = random_genotype(rng, edge_ops, steps, multiplier)
        key = architecture_key(genotype)
        if key not in seen:
            seen.add(key)
            sampled.append(genotype)
    return sampled


# ---------------------------------------------------------------- scores

def alpha_score(model: nn.Module, genotype: Genotype) -> float:
    """Σ over the architecture's (edge, op) pairs of log softmax(α), both cells;
    under a method that ranks ops otherwise (σ(α), edge weights), the log of
    what its derivation ranks by (``SearchNetwork.op_strengths``)."""
    chosen = genotype_op_weights(genotype, model.edge_ops, dtype=torch.float64)
    total = 0.0
    for cell, alpha in zip(CELLS, (model.alpha_normal, model.alpha_reduce)):
        if any(overrides(m, "op_strengths") for m in getattr(model, "methods", ())):
            log_p = model.op_strengths(cell).double().clamp_min(torch.finfo(torch.float64).tiny).log()
        else:
            log_p = F.log_softmax(alpha.detach().cpu().double(), dim=-1)
        total += float((chosen[cell] * log_p).sum())
    return total


def subnetwork_weights(model: nn.Module, genotype: Genotype) -> dict[str, torch.Tensor]:
    """Op weights that make the supernet the architecture's discrete sub-network."""
    return {cell: w.to(model.alpha_normal) for cell, w in genotype_op_weights(genotype, model.edge_ops).items()}


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, op_weights: dict[str, torch.Tensor],
                          batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Every BatchNorm's running statistics afresh, as the cumulative average
    over ``batches`` run through the sub-network in training mode (SPOS);
    returns how many batches that took. The momentum is restored after."""
    norms = _batch_norms(model)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    model.train()
    seen = 0
    try:
        for x, _ in batches:
            model(x, op_weights=op_weights)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return seen


@torch.no_grad()
def validate_subnetwork(model: nn.Module, op_weights: dict[str, torch.Tensor], loader: DeviceLoader,
                        max_steps: int | None = None) -> tuple[float, float | None]:
    """(accuracy in percent, mean cross-entropy) of the sub-network on ``loader``,
    eval mode; the loss is None if not finite (a sub-network may overflow)."""
    model.eval()
    loss_sum = torch.zeros((), device=loader.device, dtype=torch.float64)
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    seen = 0
    for x, y in itertools.islice(loader.epoch(0), max_steps):
        logits = model(x, op_weights=op_weights)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return 100 * correct.item() / seen, _finite(loss_sum.item() / seen)


def supernet_score(model: nn.Module, genotype: Genotype, calib_loader: DeviceLoader, val_loader: DeviceLoader,
                   calib_batches: int, max_steps: int | None = None) -> dict:
    """The architecture scored in the supernet: BatchNorm recalibrated on the
    first ``calib_batches`` batches of ``calib_loader`` (more passes if it has
    fewer; the same batches for every architecture), then validated."""
    op_weights = subnetwork_weights(model, genotype)
    if calib_batches:
        recalibrate_batchnorm(model, op_weights, itertools.islice(calib_loader.cycle(0), calib_batches))
    acc, loss = validate_subnetwork(model, op_weights, val_loader, max_steps)
    return dict(supernet_acc=acc, supernet_loss=loss)


def scoring_loaders(search_config, dataset, device: torch.device, *, workers: int | None = None,
                    budget_mb: float | None = None) -> tuple[DeviceLoader, DeviceLoader]:
    """The calibration loader (the search's weight half, augmented as the
    search trained on it) and the validation loader (its architecture half,
    not augmented), both at the search's batch size."""
    loaders = Loaders(dataset, dataset.search_split(search_config.train_portion, search_config.subset,
                                                    search_config.seed),
                      device, workers=workers, budget_mb=budget_mb)
    train_set, val_set = loaders.placed
    calib = loaders(train_set, search_config.batch_size, train=True, shuffle=True, seed=search_config.seed,
                    colour_jitter=False)  # augmented as the search trained on it
    return calib, loaders(val_set, search_config.batch_size, train=False, shuffle=False)


# ---------------------------------------------------------------- statistics, files

def _finite(value: float) -> float | None:
    """JSON has no NaN: a constant sequence's correlation is recorded as null."""
    return value if math.isfinite(value) else None


def rank_statistics(architectures: Sequence[dict]) -> dict:
    """Each score's Kendall τ, sparse Kendall τ and Spearman ρ against the
    stand-alone accuracy (None with fewer than 2 architectures, or when constant)."""
    accuracies = [a["standalone_acc"] for a in architectures]
    stats: dict[str, Any] = {"architectures": len(architectures)}
    for name, (key, _, _) in SCORES.items():
        scores = [a[key] for a in architectures]
        stats[name] = {stat: _finite(f(scores, accuracies)) if len(scores) >= 2 else None
                       for stat, f in STATISTICS.items()}
    return stats


def _read_previous(path: Path, settings: dict) -> list[dict]:
    """The finished architectures of an earlier run of the same settings."""
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FastDartsError(f"cannot read {path}: {e}") from None
    except RecursionError:  # '[' nested a hundred thousand times
        raise FastDartsError(f"cannot read {path}: its JSON is nested too deeply to be a {RANK_FILE}") from None
    if not isinstance(document, dict) or document.get("format") != RANK_FORMAT:
        raise FastDartsError(f"{path} is not a fastdarts-rank result")
    theirs = document.get("settings", {})
    diff = [f"{k.replace('_', '-')}: {RANK_FILE} {theirs.get(k)!r} vs now {v!r}" for k, v in settings.items()
            if theirs.get(k) != v]
    if diff:
        raise FastDartsError(f"{path} was written with different settings ({'; '.join(diff)}); "
                             f"pass the same ones or choose another --out")
    return list(document.get("architectures", []))


def _check_same_architectures(previous: list[dict], genotypes: Sequence[Genotype], path: Path) -> None:
    """A resumed run continues the same list: the search's genotype and the seed's draws."""
    for entry, genotype in zip(previous, genotypes):
        if entry["genotype"] != genotype.to_dict():
            what = ("the search's derived genotype" if entry["derived"]
                    else f"architecture {entry['index']:03d} as the seed draws it now")
            raise FastDartsError(f"{path} holds a different {what}: RUN_DIR is not the search it ranked; "
                                 f"choose another --out")


def plot_rank(architectures: Sequence[dict], statistics: dict, path: Path) -> Path:
    """Two scatter plots: each score against the stand-alone accuracy, τ in the title."""
    from .visualize import _figure

    fig = _figure((10.0, 4.2))
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.86, wspace=0.25)
    accuracy = [a["standalone_acc"] for a in architectures]
    for ax, (name, (key, label, short)) in zip(axes, SCORES.items()):
        for derived, style in ((False, dict(color="#1f77b4", marker="o", s=30, label="sampled")),
                               (True, dict(color="#d62728", marker="*", s=160, label="the search's"))):
            points = [(a[key], acc) for a, acc in zip(architectures, accuracy) if a["derived"] == derived]
            if points:
                ax.scatter(*zip(*points), zorder=3, **style)
        tau = statistics[name]["kendall_tau"]
        sparse = statistics[name]["sparse_kendall_tau"]
        ax.set_title(f"{short}: Kendall τ {'n/a' if tau is None else f'{tau:.3f}'} "
                     f"(sparse {'n/a' if sparse is None else f'{sparse:.3f}'})", fontsize=10)
        ax.set_xlabel(label)
        ax.tick_params(labelsize=8)
        ax.set_ylabel("stand-alone test accuracy (%)")
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"rank disorder: {len(architectures)} architectures against their stand-alone accuracy",
                 fontsize=12, fontweight="bold")
    return save_figure(fig, path)


def format_table(architectures: Sequence[dict], statistics: dict) -> str:
    """Each architecture's scores, then the rank correlations."""
    def number(v, digits=3):
        return "n/a" if v is None else f"{v:.{digits}f}"

    lines = [f"{'arch':>4} {'':1} {'supernet acc':>12} {'supernet loss':>13} {'α score':>9} {'stand-alone acc':>15}"]
    for a in architectures:
        lines.append(f" {a['index']:03d} {'*' if a['derived'] else ' '} {a['supernet_acc']:>12.2f} "
                     f"{number(a['supernet_loss'], 4):>13} {a['alpha_score']:>9.3f} {a['standalone_acc']:>15.2f}")
    lines.append(f"(* the search's own genotype) rank correlation with the stand-alone accuracy over "
                 f"{statistics['architectures']} architectures:")
    lines.append(f"{'score':<14} {'Kendall τ':>9} {'sparse τ':>9} {'Spearman ρ':>10}")
    for name, (_, _, short) in SCORES.items():
        s = statistics[name]
        lines.append(f"{short:<14} {number(s['kendall_tau']):>9} {number(s['sparse_kendall_tau']):>9} "
                     f"{number(s['spearman_rho']):>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the run

def _prepare_out(config: RankConfig, settings: dict) -> list[dict]:
    """Checks --out and --resume; returns the architectures an earlier run finished."""
    out = config.out_dir
    path = out / RANK_FILE
    check_writable(out)  # found now, not after the first architecture's training
    if path.exists() and not config.resume:
        raise FastDartsError(f"{path} exists; pass --resume to continue that run or choose another --out")
    if config.resume and not path.exists():
        raise FastDartsError(f"--resume given but there is no {RANK_FILE} in {out}")
    if not config.resume and (out / "archs").is_dir() and any((out / "archs").iterdir()):
        raise FastDartsError(f"{out / 'archs'} holds training runs but {out} has no {RANK_FILE}; "
                             f"choose another --out")
    return _read_previous(path, settings) if config.resume else []


def _check_image_size(config: RankConfig, dataset) -> None:
    reductions = sum(reduction_layout(config.layers))
    # The stand-alone networks are NetworkImageNet on ImageNet (TrainConfig's default network).
    size = stem_output_size("imagenet" if dataset.name == "imagenet" else "cifar", dataset.image_size)
    if size < 2 ** reductions:
        raise FastDartsError(f"{config.layers} layers have {reductions} reduction cells, but {dataset.image_size}x"
                             f"{dataset.image_size} {dataset.name} images ({size}x{size} after the stem) allow at "
                             f"most {size.bit_length() - 1}")


def _quiet(_: str) -> None:
    pass


def train_standalone(config: RankConfig, genotype: Genotype, search_config, out: Path):
    """The architecture trained from scratch in ``out`` (``TrainResult``) on the search's data,
    continuing its own checkpoint if an interrupted run left one there."""
    resume = (out / TRAIN_CHECKPOINT).exists()
    return train(config.train_config(genotype, dataset=search_config.dataset, out=out, resume=resume,
                                     image_size=search_config.image_size,
                                     skip_bad_images=search_config.skip_bad_images), log=_quiet)


def rank_architecture(index: int, genotype: Genotype, model: nn.Module, loaders: tuple[DeviceLoader, DeviceLoader],
                      config: RankConfig, search_config) -> dict:
    """One architecture's entry of ``rank.json``: its supernet score, α score
    and stand-alone accuracy (index 0 is the search's own)."""
    start = time.perf_counter()
    entry = dict(index=index, derived=index == 0, genotype=genotype.to_dict(),
                 **supernet_score(model, genotype, *loaders, config.calib_batches, config.max_steps),
                 alpha_score=alpha_score(model, genotype))
    trained = train_standalone(config, genotype, search_config, config.out_dir / "archs" / f"{index:03d}")
    entry.update(standalone_acc=trained.test_acc, parameters=trained.parameters,
                 seconds=time.perf_counter() - start)
    return entry


def rank(config: RankConfig | None = None, *, log: Callable[[str], None] = print,
         on_architecture_end: Callable[[dict], None] | None = None, **overrides) -> RankResult:
    """Measure the rank disorder of the search in ``config.run_dir`` and write
    ``rank.json`` and ``rank.png`` to ``config.out_dir``.

    ``rank(run_dir="runs/digits", num_archs=10, train_epochs=2)`` overrides
    single fields of the default ``RankConfig``. ``on_architecture_end`` is
    called with each architecture's entry after ``rank.json`` holds it.
    """
    from tqdm.auto import tqdm

    config = dataclasses.replace(config or RankConfig(), **overrides).checked()
    settings = config.result_defining()
    out = config.out_dir
    path = out / RANK_FILE
    finished = _prepare_out(config, settings)
    device = resolve_device(config.device)
    search_config, dataset, model = load_search(config.run_dir, data=config.data, device=config.device,
                                                backend=config.backend)
    _check_image_size(config, dataset)
    # The search's result: its genotype.json (a selection after the search, such as DARTS-PT's, chose it on a
    # supernet the checkpoint does not hold), else the derivation from the checkpoint's α.
    result = Path(config.run_dir) / "genotype.json"
    derived = Genotype.load(result) if result.exists() else model.genotype(final=True)
    genotypes = [derived] + sample_genotypes(model.edge_ops, model.steps, model.multiplier, config.num_archs,
                                             config.seed, exclude=[derived])
    _check_same_architectures(finished, genotypes, path)
    loaders = scoring_loaders(search_config, dataset, device, workers=config.workers,
                              budget_mb=config.data_budget_mb)
    search = dict(run_dir=str(config.run_dir), config=search_config.result_defining(), derived=derived.to_dict())
    architectures = list(finished)

    def save() -> dict:
        statistics = rank_statistics(architectures)
        write_json(path, dict(format=RANK_FORMAT, settings=settings, search=search,
                                    architectures=architectures, statistics=statistics))
        return statistics

    out.mkdir(parents=True, exist_ok=True)
    save()  # at once, so that an interrupt during the first architecture can be resumed
    log(f"ranking {len(genotypes)} architectures of {config.run_dir} (the search's and {config.num_archs} sampled, "
        f"seed {config.seed}): supernet score after {config.calib_batches} BatchNorm calibration batches, "
        f"stand-alone training {config.layers} cells, C={config.channels}, {config.train_epochs} epochs"
        + (f"; {len(finished)} finished earlier" if finished else ""))
    bar = tqdm(total=len(genotypes), initial=len(finished), desc="architectures", disable=not config.progress,
               dynamic_ncols=True)
    try:
        for index in range(len(finished), len(genotypes)):
            entry = rank_architecture(index, genotypes[index], model, loaders, config, search_config)
            architectures.append(entry)
            save()
            bar.update()
            whose = " (the search's)" if index == 0 else ""
            with tqdm.external_write_mode():
                log(f"architecture {index:03d}{whose}: supernet acc "
                    f"{entry['supernet_acc']:.2f}  α score {entry['alpha_score']:.3f}  stand-alone acc "
                    f"{entry['standalone_acc']:.2f}  {entry['seconds']:.1f}s")
            if on_architecture_end is not None:
                on_architecture_end(entry)
    finally:
        bar.close()
    statistics = save()
    picture = plot_rank(architectures, statistics, out / "rank.png")
    log(format_table(architectures, statistics))
    log(f"wrote {path}, {picture}")
    return RankResult(architectures=architectures, statistics=statistics, out=out)


# ---------------------------------------------------------------- command line

def rank_parser() -> argparse.ArgumentParser:
    d = RankConfig()
    p = _Parser(
        prog=PROG,
        description="Rank disorder of a finished search (Yu et al., ICLR 2020): sample architectures uniformly "
                    "from its search space, add its own, and rank each by its accuracy in the trained supernet "
                    "(a discrete sub-network, BatchNorm recalibrated), by α, and by its accuracy trained from "
                    "scratch; report Kendall τ, sparse Kendall τ and Spearman ρ. Writes rank.json and rank.png.",
        formatter_class=_Help)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a fastdarts-search output directory (its checkpoint.pt)")
    p.add_argument("--num-archs", type=_positive_int, default=d.num_archs,
                   help="architectures sampled uniformly, besides the search's own")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the sampling and every stand-alone training run")
    p.add_argument("--calib-batches", type=_non_negative_int, default=d.calib_batches,
                   help="training batches (the search's batch size) that recalibrate BatchNorm before an "
                        "architecture is validated in the supernet; 0 keeps the supernet's statistics")
    train_group = p.add_argument_group("stand-alone training (the paper's recipe at this size and length)")
    train_group.add_argument("--layers", type=_positive_int, default=d.layers, help="cells")
    train_group.add_argument("--channels", type=_positive_int, default=d.channels, help="initial channels C")
    train_group.add_argument("--train-epochs", type=_positive_int, default=d.train_epochs)
    train_group.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    run = p.add_argument_group("run")
    run.add_argument("--data", default=d.data, help="the search's data: CIFAR's folder, or the folder holding "
                                                    "train/ and val/")
    run.add_argument("--workers", type=_non_negative_int, default=None,
                     help="processes decoding images (imagenet; a folder's first read); 0: in this process")
    run.add_argument("--data-budget-mb", type=float, default=None, metavar="MB",
                     help="hold uint8 images on the device up to this size, stream beyond (0: always stream)")
    run.add_argument("--backend", choices=list(MIXED_OP_BACKENDS), default=None,
                     help="mixed-op backend of the supernet (default: the search's; every one computes the same)")
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--out", default=None, help="output directory (default: RUN_DIR/rank)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out: finished architectures are kept")
    run.add_argument("--max-steps", type=_positive_int, default=None,
                     help="cap the validation, train and test steps (a quick smoke test)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def rank_main(argv: Sequence[str] | None = None) -> int:
    config = RankConfig(**vars(rank_parser().parse_args(argv)))
    return _run(PROG, lambda: rank(config), resume_from=str(config.out_dir), resume_file=RANK_FILE,
                kept=f"finished architectures are in {{}}/{RANK_FILE}")[0]


if __name__ == "__main__":
    sys.exit(rank_main())
