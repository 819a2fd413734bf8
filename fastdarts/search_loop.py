"""The DARTS search loop: ``search(...)`` and its configuration.

Each step takes one batch of the weight half and one of the architecture half
of the training set: an Adam step on α (first or second order), then an SGD
step on the weights (SPEC §2). After every epoch the run writes a checkpoint
(``checkpoint.pt``, written atomically) and ``metrics.jsonl``; ``resume=True``
continues from the checkpoint and ends with the same α as an uninterrupted
run, because every random draw of an epoch (shuffling, augmentation) comes
from a generator seeded by (seed, epoch), not from state that a crash loses.

Under torchrun (SPEC §10) every rank runs this loop on its shard of each
global batch (``--batch-size`` is global; passes of the weight and
architecture halves drop a short last batch, so every rank's shard is
equal). DistributedDataParallel does not fit the architect
(``autograd.grad``, frozen parameters), so gradients are averaged with
explicit all-reduces (``Architect(grad_reduce=...)``): every rank then holds
the same weights and α after every step. BatchNorm statistics stay per
rank within an epoch; at its end every rank takes rank 0's (the ones
checkpointed) before validating. Validation figures are reduced
exactly (sums of losses and of correct predictions); rank 0 alone writes
files, logs and shows progress. The world size is result-defining.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .architect import Architect, frozen
from .checkpoints import SEARCH_FORMAT, damaged, load_model_state, load_optimizer_state, read_checked
from .cuda_graph import DeviceLrSGD, GraphedStep, adam_capturable, check_cuda_graph, hold_lr_on_device
from .data import DeviceLoader, load_dataset
from .data.loader import mix_seed
from .distributed import (DistContext, all_reduce_mean_, all_reduce_sum_, barrier, broadcast_, collective_failures,
                          launch, main_rank_first, per_rank_batch)
from .errors import FastDartsError
from .evaluate import evaluate
from .files import check_writable, save_torch, write_jsonl, write_text
from .genotype import Genotype, num_edges
from .kernels.backend import available_backends, kernel_backend
from .layout import layout_string, reduction_layout
from .methods import method_preset
from .methods.aux_skip import aux_skip_weight
from .methods.partial_channels import check_partial_channels
from .methods.early_stop import canonical, parse_early_stop, rank_measures, skip_connects, stop_reason
from .methods.path_sampling import check_sample_paths
from .methods.progressive import (drop_ops, full_edge_ops, parse_rates, parse_stages, skip_dropout_rate,
                                  stages_string)
from .mixed_op import DEFAULT_BACKEND, check_backend
from .ops import resolve_ops
from .recompute import check_recompute
from .run_utils import (EpochProgress, check_finite_epoch, check_finite_settings, cosine_lr, resolve_device,
                        seed_everything, set_lr, steps_per_epoch)
from .size_check import check_search_size
from .supernet import SearchNetwork

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = SEARCH_FORMAT
DEFAULT_LAYERS = 8  # the paper's search network
# Pass numbers of mix_seed for the draws that are not the loader's (whose passes are 0, 1, ...).
_STAGE_PASS, _DROPOUT_PASS = 1 << 21, 1 << 22


@dataclass
class SearchConfig:
    """Everything a search run depends on. Fields left ``None`` take the
    ``method``'s published value (``methods.METHOD_PRESETS``; DARTS: the
    paper's); a value given explicitly wins over the preset."""
    method: str = "darts"              # darts, pc-darts, proxyless or p-darts
    dataset: str = "cifar10"
    data: str = "./data"
    download: bool = False
    ops: str | Sequence[str] = "darts"
    layers: int | None = None          # cells (None: DEFAULT_LAYERS); reductions at layers//3 and 2*layers//3
    layout: str | None = None          # e.g. "N,R,N"; replaces `layers`
    channels: int = 16
    steps: int = 4
    multiplier: int = 4
    batch_size: int | None = None
    epochs: int | None = None
    lr: float | None = None
    lr_min: float | None = None
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float | None = None
    arch_weight_decay: float | None = None
    arch_beta1: float | None = None    # Adam's β1 on α (β2 is 0.999)
    arch_grad_clip: float | None = None  # clip ‖∇α‖ before Adam (P-DARTS: 5); None: no clipping
    order: str | None = None
    partial_channels: int | None = None   # PC-DARTS' K (1: all channels)
    edge_norm: bool | None = None         # PC-DARTS' edge normalisation (β)
    sample_paths: int | None = None       # ProxylessNAS' paths per edge in the architecture step (0: off)
    arch_warmup_epochs: int | None = None  # epochs without an architecture step at the start
    aux_skip: bool = False             # DARTS-' auxiliary skip, weight 1 − t/E in epoch t
    early_stop: str | Sequence[str] | None = None  # DARTS+ criteria: "skip:2", "stable:10" or both
    stages: str | None = None          # P-DARTS: "5:8,11:5,17:3" (cells:ops per edge); `epochs` is per stage
    skip_dropout: str | Sequence[float] | None = None  # P-DARTS: initial dropout rate after skip_connect per stage
    max_skip: int | None = None        # P-DARTS: skip connections the final normal cell may keep
    train_portion: float = 0.5
    backend: str = DEFAULT_BACKEND
    recompute: str = "edge"            # or "cell": each cell keeps only its inputs for backward
    cuda_graph: bool = False           # capture each epoch's step once, replay it (cuda_graph.py)
    device: str = "auto"
    seed: int = 2
    out: str = "runs/search"
    resume: bool = False
    max_steps: int | None = None       # cap on steps per epoch, for smoke tests
    progress: bool = True

    # Fields that do not change what a run computes: a resumed run may differ in
    # these (the device only within its type: see _load_checkpoint).
    RUNTIME_ONLY = ("data", "download", "backend", "recompute", "cuda_graph", "device", "out", "resume",
                    "progress")

    def checked(self) -> "SearchConfig":
        """A validated copy in canonical form (method preset applied, ops
        resolved, layout spelled out), so that bad input fails before any data
        is touched and two spellings of one configuration compare equal on resume."""
        preset = method_preset(self.method)
        rates_from_preset = self.skip_dropout is None and preset.get("skip_dropout") is not None
        self = dataclasses.replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})
        check_finite_settings(self)
        positive = dict(channels=self.channels, batch_size=self.batch_size, epochs=self.epochs,
                        steps=self.steps, multiplier=self.multiplier, partial_channels=self.partial_channels)
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FastDartsError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.multiplier > self.steps:
            raise FastDartsError(f"multiplier ({self.multiplier}) cannot exceed steps ({self.steps})")
        if self.order not in ("first", "second"):
            raise FastDartsError(f"order must be 'first' or 'second', got {self.order!r}")
        for name in ("lr", "arch_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise FastDartsError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")
        if self.arch_grad_clip is not None and not self.arch_grad_clip > 0:
            raise FastDartsError(f"arch-grad-clip must be positive, got {self.arch_grad_clip!r}")
        if not 0 <= self.arch_beta1 < 1:
            raise FastDartsError(f"arch-beta1 must be in [0, 1), got {self.arch_beta1!r}")
        for name in ("lr_min", "momentum", "weight_decay", "arch_weight_decay"):
            if not getattr(self, name) >= 0:
                raise FastDartsError(f"{name.replace('_', '-')} must not be negative, got {getattr(self, name)!r}")
        w = self.arch_warmup_epochs
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise FastDartsError(f"arch-warmup-epochs must be a non-negative integer, got {w!r}")
        if not 0 <= self.seed < 2 ** 32:
            raise FastDartsError(f"seed must be in 0..2**32-1, got {self.seed}")
        check_backend(self.backend)
        check_recompute(self.recompute)
        ops = resolve_ops(self.ops)
        if all(op == "none" for op in ops):
            # Refused now, not after an epoch when the first derivation fails.
            raise FastDartsError("the op list has only 'none'; a cell needs at least one other op")
        check_partial_channels(self.partial_channels, self.channels)
        check_sample_paths(self.sample_paths, len(ops))
        if self.sample_paths and self.order == "second":
            raise FastDartsError("path sampling (sample-paths) has a first-order architecture step only; "
                                 "use --order first")
        if self.sample_paths and self.backend == "checkpoint":
            raise FastDartsError("path sampling does not run on the checkpoint backend; use --backend fused or "
                                 "reference")
        early_stop = canonical(parse_early_stop(self.early_stop))
        if self.max_skip is not None and (isinstance(self.max_skip, bool) or not isinstance(self.max_skip, int)
                                          or self.max_skip < 0):
            raise FastDartsError(f"max-skip must be a non-negative integer, got {self.max_skip!r}")
        if self.stages is None:
            if self.skip_dropout is not None:
                raise FastDartsError("skip-dropout gives one rate per stage; it needs --stages")
            layers = None if self.layout is not None else (DEFAULT_LAYERS if self.layers is None else self.layers)
            layout = layout_string(reduction_layout(layers, self.layout))
            return dataclasses.replace(self, ops=",".join(ops), layout=layout, layers=None,
                                       edge_norm=bool(self.edge_norm), aux_skip=bool(self.aux_skip),
                                       early_stop=early_stop)
        for name in ("layout", "layers"):
            if getattr(self, name) is not None:
                raise FastDartsError(f"--stages sets each stage's cells; drop --{name} (or give the stages' cells)")
        stages = parse_stages(self.stages, len(ops))
        if self.sample_paths and self.sample_paths >= stages[-1].ops:
            raise FastDartsError(f"sample-paths {self.sample_paths} needs more ops per edge than the last stage's "
                                 f"{stages[-1].ops}")
        if rates_from_preset and len(self.skip_dropout.split(",")) != len(stages):
            raise FastDartsError(f"the {self.method} preset's skip-dropout {self.skip_dropout} has one rate for each "
                                 f"of its stages; for --stages {self.stages} give --skip-dropout with "
                                 f"{len(stages)} rate(s)")
        rates = parse_rates(self.skip_dropout, len(stages))
        if len(stages) > 1 and self.arch_warmup_epochs >= self.epochs:
            raise FastDartsError(f"arch-warmup-epochs {self.arch_warmup_epochs} covers every one of the {self.epochs} "
                                 f"epochs of a stage: α would never be trained before the ops are pruned by it; "
                                 f"give more --epochs or fewer --arch-warmup-epochs")
        return dataclasses.replace(self, ops=",".join(ops), layout=None, layers=None, edge_norm=bool(self.edge_norm),
                                   aux_skip=bool(self.aux_skip), early_stop=early_stop,
                                   stages=stages_string(stages), skip_dropout=",".join(map(str, rates)))

    def stage_layouts(self) -> list[tuple[str, int]]:
        """(cell layout, ops per edge) of each stage (of a ``checked()`` config;
        one stage without --stages)."""
        if self.stages is None:
            return [(self.layout, len(self.ops.split(",")))]
        return [(layout_string(reduction_layout(st.cells)), st.ops)
                for st in parse_stages(self.stages, len(self.ops.split(",")))]

    def result_defining(self) -> dict:
        """The fields a checkpoint must agree on to be resumed (of a ``checked()`` config)."""
        d = dataclasses.asdict(self)
        for key in self.RUNTIME_ONLY:
            d.pop(key)
        return d

    def summary(self) -> str:
        """The effective configuration, one line (printed at the start of a run)."""
        d = self.result_defining()
        return ", ".join(f"{k}={v}" for k, v in d.items() if v is not None)


# What a checkpoint written before the methods existed ran: DARTS.
_LEGACY_FIELDS = dict(method="darts", partial_channels=1, edge_norm=False, sample_paths=0, arch_warmup_epochs=0,
                      aux_skip=False, early_stop=None, stages=None, skip_dropout=None, max_skip=None,
                      arch_beta1=0.5, arch_grad_clip=None)


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict]
    out: Path
    model: SearchNetwork = field(repr=False)

    @property
    def stopped(self) -> str | None:
        """Why the search stopped early (DARTS+ criteria), or None."""
        return self.history[-1].get("stopped") if self.history else None


def genotype_line(genotype: Genotype) -> str:
    """One-line form for the per-epoch log: op(input) per edge, nodes split by '|'."""
    def cell(edges):
        pairs = [f"{op}({i})" for op, i in edges]
        return " | ".join(" ".join(pairs[k:k + 2]) for k in range(0, len(pairs), 2))
    return f"normal: {cell(genotype.normal)}  reduce: {cell(genotype.reduce)}"


def beta_line(betas: dict[str, list[float]], steps: int) -> str:
    """softmax(β) per node for the per-epoch log: nodes split by '|'."""
    from .methods.edge_norm import node_segments

    def cell(w):
        return " | ".join(" ".join(f"{v:.3f}" for v in w[start:start + n]) for start, n in node_segments(steps))
    return f"edge weights (softmax β) normal: {cell(betas['normal'])}  reduce: {cell(betas['reduce'])}"


def search_step(model: SearchNetwork, architect: Architect, weight_optimizer: torch.optim.Optimizer,
                train_batch, val_batch, grad_clip: float, arch_step: bool = True):
    """One DARTS step: Adam on α (first or second order; skipped when not
    ``arch_step``, as in a warm-up epoch), then SGD on the weights. Returns
    the train logits and loss and the validation loss (None without an
    architecture step), detached. In a multi-process run the architect's
    ``grad_reduce`` also averages the weights' gradient over the ranks,
    before clipping."""
    x, y = train_batch
    arch_loss = architect.step(x, y, *val_batch) if arch_step else None
    weight_optimizer.zero_grad(set_to_none=True)
    with frozen(model.arch_parameters()):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
    architect.grad_reduce([p.grad for p in model.weight_parameters()])
    torch.nn.utils.clip_grad_norm_(model.weight_parameters(), grad_clip)
    weight_optimizer.step()
    return logits.detach(), loss.detach(), arch_loss


def build_supernet(config: SearchConfig, dataset, device: torch.device | str, layout: str | None = None,
                   edge_ops: dict | None = None) -> SearchNetwork:
    """The supernet a (``checked()``) configuration searches on ``dataset``;
    ``layout`` and ``edge_ops``: a P-DARTS stage's cells and the ops its edges hold."""
    return SearchNetwork(
        C=config.channels, num_classes=dataset.num_classes,
        layers=None, layout=layout or config.layout, ops=config.ops.split(","),
        steps=config.steps, multiplier=config.multiplier, in_channels=dataset.in_channels,
        backend=config.backend, recompute=config.recompute, partial_channels=config.partial_channels,
        edge_norm=config.edge_norm, sample_paths=config.sample_paths, aux_skip=config.aux_skip,
        edge_ops=edge_ops).to(device)


def _read_checkpoint(path: Path, device, what: str = "search checkpoint") -> dict:
    """A search checkpoint's contents, checked entry by entry (``checkpoints``);
    a missing, truncated, foreign or damaged file is one line naming it."""
    return read_checked(path, (CHECKPOINT_FORMAT,), what, device)


def load_search(run_dir: str | Path, *, data: str = "./data", device: str = "cpu", backend: str | None = None):
    """A search run's configuration, data set and supernet (its last
    checkpoint: weights, α and, for P-DARTS, the last stage's edges) ->
    ``(config, dataset, model)``. ``backend`` (default the run's) may differ:
    every backend computes the same function."""
    path = Path(run_dir) / CHECKPOINT
    state = _read_checkpoint(path, "cpu")
    fields = {**_LEGACY_FIELDS, **state["config"]}
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    config = SearchConfig(**{k: v for k, v in fields.items() if k in known}, data=data, device=device,
                          backend=backend or state.get("backend", DEFAULT_BACKEND), out=str(run_dir))
    try:
        config = config.checked()
    except FastDartsError as e:
        raise damaged(path, f"its configuration is invalid ({e})") from None
    dataset = load_dataset(config.dataset, data)
    stage = state.get("stage")
    try:
        model = build_supernet(config, dataset, resolve_device(device),
                               layout=None if stage is None else stage["layout"],
                               edge_ops=None if stage is None else stage["edge_ops"])
    except (FastDartsError, KeyError, TypeError, ValueError, IndexError) as e:
        raise damaged(path, f"its stage does not describe a supernet ({type(e).__name__}: {e})") from None
    load_model_state(model, state["model"], path, "the supernet its configuration describes")
    return config, dataset, model


class _Searcher:
    """The state of one search run; ``search()`` drives it. A P-DARTS run
    (``--stages``) is a sequence of stages, each a new supernet with its own
    optimisers; the checkpoint holds the current stage's."""

    def __init__(self, config: SearchConfig, log: Callable[[str], None], dist: DistContext):
        config = config.checked()
        self.config, self.dist = config, dist
        self.log = log if dist.is_main else (lambda _: None)
        per_rank = per_rank_batch(config.batch_size, dist.world_size)
        self.device = dist.device
        self.out = Path(config.out)
        self.checkpoint_path = self.out / CHECKPOINT
        # Found now, not when the first epoch's checkpoint is written.
        check_writable(self.out)
        if self.checkpoint_path.exists() and not config.resume:
            raise FastDartsError(f"{self.out} already holds a search checkpoint; pass --resume to continue it"
                                 f" or choose another --out")
        if config.resume and not self.checkpoint_path.exists():
            raise FastDartsError(f"--resume given but there is no checkpoint at {self.checkpoint_path}")

        self.stages = config.stage_layouts()
        self.staged = config.stages is not None
        self.dropout_rates = parse_rates(config.skip_dropout, len(self.stages)) if self.staged else (0.0,)
        if config.cuda_graph:
            check_cuda_graph(self.device, distributed=dist.distributed, sample_paths=config.sample_paths,
                             second_order=config.order == "second", skip_dropout=any(self.dropout_rates),
                             cell_recompute=config.recompute == "cell")
        seed_everything(config.seed)
        # A download goes into one folder: rank 0 fetches it while the others wait.
        with main_rank_first(dist) if config.download else contextlib.nullcontext():
            dataset = self.dataset = load_dataset(config.dataset, config.data, download=config.download)
        for layout, _ in self.stages:
            reductions = layout.count("R")
            if dataset.image_size < 2 ** reductions:
                raise FastDartsError(
                    f"layout {layout} has {reductions} reduction cells, but {dataset.image_size}x"
                    f"{dataset.image_size} {config.dataset} images allow at most "
                    f"{dataset.image_size.bit_length() - 1}")
        # Before anything real is built: a supernet that cannot fit is one line saying what fits.
        check_search_size(config, dataset, self.device, world_size=dist.world_size)
        # Moved once: the loaders of the architecture half then share one copy on the device.
        train_set, val_set = (part.to(self.device) for part in dataset.search_split(config.train_portion))
        loader = dict(device=self.device, mean=dataset.mean, std=dataset.std,
                      shard=(dist.rank, dist.world_size) if dist.distributed else None)
        # Shards of equal size (the all-reduces average per-rank means): whole global batches only.
        augment = dict(crop_padding=dataset.crop_padding, flip=dataset.flip, drop_last=dist.distributed)
        self.train_loader = DeviceLoader(train_set, config.batch_size, shuffle=True, seed=config.seed,
                                         **augment, **loader)
        self.arch_loader = DeviceLoader(val_set, config.batch_size, shuffle=True, seed=config.seed + 1,
                                        **augment, **loader)
        self.eval_loader = DeviceLoader(val_set, config.batch_size, shuffle=False, **loader)

        self.criteria = parse_early_stop(config.early_stop)
        # Stage 1 right after seeding, as an unstaged run builds its one supernet.
        self._build_stage(0, full_edge_ops(config.ops.split(","), num_edges(config.steps)), reseed=False)
        # Chosen (and the compiled kernels tried) now, so a fallback shows before the first step.
        self.kernels = kernel_backend(self.device) if config.backend == "fused" else None
        self.log(f"method: {config.method} ({config.summary()})")
        if dist.distributed:
            self.log(f"{dist.world_size} ranks, {per_rank} images each per batch of {config.batch_size}")
        if config.sample_paths == 1:
            self.log("note: with --sample-paths 1 the architecture gradient Σ_j g_j q_j (δ_ij − q_i) over one path is "
                "zero, so α moves only by weight decay; ProxylessNAS samples 2")
        self.log(f"mixed-op backend: {config.backend}, recompute: {config.recompute}" + (
            f", kernels: {self.kernels} (usable here: {', '.join(available_backends())})" if self.kernels else ""))
        self.history: list[dict] = []
        if config.resume:
            self._load_checkpoint()

    def _build_stage(self, index: int, edge_ops: dict, reseed: bool = True) -> None:
        """The supernet and optimisers of stage ``index`` (0-based), its edges
        holding ``edge_ops``; weights and α drawn afresh from (seed, stage)."""
        cfg = self.config
        if reseed:
            seed_everything(mix_seed(cfg.seed, index, _STAGE_PASS) % 2 ** 32)
        self.stage, self.edge_ops = index, edge_ops
        if index > 0:  # a later stage's edges are known only now
            check_search_size(cfg, self.dataset, self.device, world_size=self.dist.world_size,
                              layout=self.stages[index][0], edge_ops=edge_ops, stage=index)
        self.model = build_supernet(cfg, self.dataset, self.device, layout=self.stages[index][0], edge_ops=edge_ops)
        self.weight_optimizer = DeviceLrSGD(self.model.weight_parameters(), lr=cfg.lr,
                                            momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.architect = Architect(self.model, self.weight_optimizer, order=cfg.order, lr=cfg.arch_lr,
                                   weight_decay=cfg.arch_weight_decay, betas=(cfg.arch_beta1, 0.999),
                                   grad_clip=cfg.arch_grad_clip,
                                   grad_reduce=all_reduce_mean_ if self.dist.distributed else None)
        self._optimizers_for_graphs()
        self._broadcast_model()
        # Softmax(α) before the stage's first epoch: what that epoch's ranking is compared with.
        self.initial_alphas = self.model.alpha_weights()

    def _optimizers_for_graphs(self) -> None:
        """Learning rate on the device and a capturable Adam under --cuda-graph,
        host floats otherwise (whatever form a checkpoint held)."""
        hold_lr_on_device(self.weight_optimizer, self.config.cuda_graph)
        adam_capturable(self.architect.optimizer, self.config.cuda_graph)

    def _broadcast_model(self) -> None:
        """Every rank starts from rank 0's weights, α and buffers (equal anyway: same seed or checkpoint)."""
        if self.dist.distributed:
            broadcast_(list(self.model.parameters()) + list(self.model.buffers()))

    # -- checkpoints --------------------------------------------------------
    def _result_defining(self) -> dict:
        """The configuration a resume must match: the config's fields and the world size."""
        return dict(self.config.result_defining(), world_size=self.dist.world_size)

    def _save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        stage = dict(index=self.stage, layout=self.stages[self.stage][0], edge_ops=self.edge_ops)
        state = dict(format=CHECKPOINT_FORMAT, config=self._result_defining(), device_type=self.device.type,
                     backend=self.config.backend, kernels=self.kernels, stage=stage, model=self.model.state_dict(),
                     weight_optimizer=self.weight_optimizer.state_dict(),
                     arch_optimizer=self.architect.optimizer.state_dict(), history=self.history)
        save_torch(self.checkpoint_path, state)

    def _load_checkpoint(self) -> None:
        path = self.checkpoint_path
        state = _read_checkpoint(path, self.device)
        ours = self._result_defining()
        theirs = {**_LEGACY_FIELDS, "world_size": 1, **state["config"]}
        if isinstance(theirs["world_size"], bool) or not isinstance(theirs["world_size"], int):
            raise damaged(path, f"its world size {theirs['world_size']!r} is not a number of processes")
        diff = [f"{k}: checkpoint {theirs.get(k)!r} vs now {v!r}" for k, v in ours.items() if theirs.get(k) != v]
        if theirs["world_size"] != ours["world_size"]:
            diff.append(f"the world size sets the per-rank batch BatchNorm sees: resume with torchrun "
                        f"--nproc_per_node {theirs['world_size']}" if theirs["world_size"] > 1 else
                        "the world size sets the per-rank batch BatchNorm sees: resume without torchrun")
        # CPU and CUDA generators draw different crops and shuffles from the same seed.
        if state.get("device_type") != self.device.type:
            diff.append(f"device type: checkpoint {state.get('device_type')!r} vs now {self.device.type!r}")
        if diff:
            raise FastDartsError(f"checkpoint {path} was written by a different configuration ({'; '.join(diff)})")
        stage = state.get("stage")
        if stage is not None and stage["index"] >= len(self.stages):
            raise damaged(path, f"its stage {stage['index'] + 1} is past the run's {len(self.stages)} stage(s)")
        if stage is not None and stage["index"] > 0:
            try:
                self._build_stage(stage["index"], stage["edge_ops"])
            except (FastDartsError, KeyError, TypeError, ValueError, IndexError) as e:
                raise damaged(path, f"its stage does not describe a supernet ({type(e).__name__}: {e})") from None
        load_model_state(self.model, state["model"], path, "the supernet of this configuration")
        load_optimizer_state(self.weight_optimizer, state["weight_optimizer"], path, "weight_optimizer")
        load_optimizer_state(self.architect.optimizer, state["arch_optimizer"], path, "arch_optimizer")
        self._optimizers_for_graphs()
        self.history = list(state["history"])
        try:
            position = self._position()
        except (KeyError, TypeError, ValueError) as e:
            raise damaged(path, f"its history does not say where the run stands ({type(e).__name__}: {e})") from None
        if position is not None and position[0] not in (self.stage, self.stage + 1):
            raise damaged(path, f"its history ends in stage {position[0] + 1}, its supernet is stage {self.stage + 1}")
        if position is not None and position[0] != self.stage and not isinstance(
                self.history[-1].get("next_edge_ops"), dict):
            raise damaged(path, "its last epoch ends a stage but does not say which ops the next stage keeps")
        self._broadcast_model()
        where = f"stage {self.stage + 1}/{len(self.stages)}, " if self.staged else ""
        self.log(f"resumed from {path} after epoch {len(self.history)} ({where}{self.config.epochs} epochs"
                 f"{' per stage' if self.staged else ''})")

    def _write_metrics(self) -> None:
        if self.dist.is_main:
            write_jsonl(self.out / "metrics.jsonl", self.history)

    # -- where the run stands -----------------------------------------------------
    def _position(self) -> tuple[int, int] | None:
        """(stage, epoch within it), both 0-based, of the next epoch to run; None when the search is over."""
        if not self.history:
            return 0, 0
        last = self.history[-1]
        stage, done = last.get("stage", 1) - 1, last.get("stage_epoch", last["epoch"])
        if done < self.config.epochs and not last.get("stopped"):
            return stage, done
        return (stage + 1, 0) if stage + 1 < len(self.stages) else None

    # -- one epoch ----------------------------------------------------------
    def _steps(self, loader: DeviceLoader) -> int:
        return steps_per_epoch(len(loader), self.config.max_steps)

    def _train_epoch(self, epoch: int, stage_epoch: int) -> dict:
        """Epoch ``epoch`` of the run (0-based; it seeds the batch order and
        draws), ``stage_epoch`` of its stage (it sets the schedules)."""
        cfg, model = self.config, self.model
        model.train()
        arch_stream = self.arch_loader.cycle(epoch)
        n_steps = self._steps(self.train_loader)
        arch_step = stage_epoch >= cfg.arch_warmup_epochs
        model.start_epoch(cfg.seed, epoch, cfg.epochs, stage_epoch)
        dropout = self._skip_dropout(stage_epoch)
        model.set_skip_dropout(dropout)
        if dropout is not None:
            # The dropout masks come from the global generator: seeded per epoch (and rank: each its own
            # masks), so a resumed run draws the same.
            torch.manual_seed(mix_seed(cfg.seed, epoch, _DROPOUT_PASS + self.dist.rank))
        where = f"stage {self.stage + 1}/{len(self.stages)} " if self.staged else ""
        progress = EpochProgress(self.device, n_steps, f"{where}epoch {stage_epoch + 1}/{cfg.epochs}",
                                 cfg.progress and self.dist.is_main)
        arch_loss_sum = torch.zeros((), device=self.device)

        def step(x, y, x_val, y_val):
            return search_step(model, self.architect, self.weight_optimizer, (x, y), (x_val, y_val),
                               cfg.grad_clip, arch_step=arch_step)

        # One graph per epoch: what it bakes in (rates, warm-up, the stage's supernet) is the epoch's.
        run_step = GraphedStep(step) if cfg.cuda_graph else step
        try:
            for index, (x, y) in enumerate(self.train_loader.epoch(epoch)):
                if index >= n_steps:
                    break
                # Drawn in warm-up epochs too, so the batch order does not depend on the warm-up.
                x_val, y_val = next(arch_stream)
                logits, loss, arch_loss = run_step(x, y, x_val, y_val)
                if arch_step:
                    arch_loss_sum += arch_loss
                progress.update(logits, y, loss)
        finally:
            progress.close()
            if cfg.cuda_graph:
                run_step.close()
        if self.dist.distributed:  # the epoch's figures over every rank's images
            progress.sum_over_ranks(all_reduce_sum_, arch_loss_sum)
            arch_loss_sum /= self.dist.world_size  # of per-rank means
        return dict(**progress.summary(), arch_step=arch_step,
                    arch_loss=arch_loss_sum.item() / n_steps if arch_step else None,
                    **({"skip_dropout": dropout} if self.staged else {}))

    def _skip_dropout(self, stage_epoch: int) -> float | None:
        """P-DARTS' rate after skip_connect in this epoch; None when the stage has none (p₀ = 0)."""
        p0 = self.dropout_rates[self.stage]
        if p0 == 0:
            return None
        return skip_dropout_rate(p0, stage_epoch, self.config.epochs, self.config.arch_warmup_epochs)

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Loss and accuracy on the architecture half, eval mode, no augmentation.
        Every rank evaluates with rank 0's BatchNorm statistics, the ones the
        checkpoint holds, so a resumed run goes on exactly as an uninterrupted one."""
        if self.dist.distributed:
            broadcast_(list(self.model.buffers()))
        # The training loop's evaluation: eval mode, empty shards skipped, sums exact over the ranks.
        result = evaluate(self.model, self.eval_loader.epoch(0), max_steps=self._steps(self.eval_loader),
                          dist=self.dist)
        return dict(val_loss=result["loss"], val_acc=result["top1"])

    def run(self, on_epoch_end: Callable[[dict], None] | None) -> SearchResult:
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        position = self._position()
        if position is None and self.history[-1].get("stopped"):
            self.log(f"this search has finished: it stopped after epoch {len(self.history)} "
                     f"({self.history[-1]['stopped']}); nothing to resume")
        while position is not None:
            stage, stage_epoch = position
            if stage != self.stage:  # the previous stage ended: its entry says which ops the edges keep
                self._build_stage(stage, self.history[-1]["next_edge_ops"])
            entry = self._run_epoch(stage_epoch)
            if on_epoch_end is not None:
                on_epoch_end(entry)
            position = self._position()
            if self.staged and self.dist.is_main and (position is None or position[0] != self.stage):
                self._plot_alphas(self.out / f"alphas_stage{self.stage + 1}.png")
        return self._finish()

    def _run_epoch(self, stage_epoch: int) -> dict:
        cfg, epoch = self.config, len(self.history)
        start = time.perf_counter()
        lr = cosine_lr(stage_epoch, cfg.epochs, cfg.lr, cfg.lr_min)
        set_lr(self.weight_optimizer, lr)
        entry = dict(epoch=epoch + 1, **self._stage_fields(stage_epoch), lr=lr,
                     **self._train_epoch(epoch, stage_epoch), **self._evaluate(),
                     method=cfg.method, backend=cfg.backend, recompute=cfg.recompute, kernels=self.kernels)
        # A diverged epoch ends the run before it is written: the checkpoint keeps the last finite one.
        alpha_finite = all(bool(torch.isfinite(a).all()) for a in self.model.arch_parameters())
        check_finite_epoch({**entry, "alpha": 0.0 if alpha_finite else float("nan")},
                           ("train_loss", "arch_loss", "val_loss", "alpha"), self.checkpoint_path,
                           f"lower --lr (now {cfg.lr:g}) or --arch-lr (now {cfg.arch_lr:g})")
        if cfg.aux_skip:
            entry["aux_skip_weight"] = aux_skip_weight(stage_epoch, cfg.epochs)
        genotype = self.model.genotype()
        entropy = self.model.alpha_entropy()
        betas = self.model.edge_weights()
        alphas = self.model.alpha_weights()
        previous = self.history[-1] if stage_epoch > 0 else None
        entry.update(alpha_entropy=entropy, genotype=genotype.to_dict(), alphas=alphas,
                     **({"betas": betas} if betas is not None else {}),
                     skip_connects=skip_connects(genotype),
                     **rank_measures(previous["alphas"] if previous else self.initial_alphas, alphas,
                                     self.edge_ops, previous.get("rank_unchanged_epochs", 0) if previous else 0),
                     config=self._result_defining())
        if not entry["arch_step"]:
            # α did not move because it was not trained: that is no evidence of a stable ranking.
            entry["rank_unchanged_epochs"] = 0
        stopped = stop_reason(self.criteria, entry)
        entry.update(stopped=stopped, seconds=time.perf_counter() - start)
        last_stage = self.stage + 1 == len(self.stages)
        if (stopped or stage_epoch + 1 == cfg.epochs) and not last_stage:
            # P-DARTS: each edge keeps its strongest ops by softmax(α) for the next stage.
            entry["next_edge_ops"] = drop_ops(self.edge_ops, alphas, self.stages[self.stage + 1][1])
        self.history.append(entry)
        # Metrics first: a crash between the two never leaves a checkpoint newer than them.
        self._write_metrics()
        self._save_checkpoint()
        # Every rank goes on (or stops, and may resume at once) only once rank 0's checkpoint is there.
        barrier(self.dist)
        where = f"stage {self.stage + 1}/{len(self.stages)} ({self.stages[self.stage][1]} ops) " if self.staged else ""
        self.log(f"{where}epoch {stage_epoch + 1}/{cfg.epochs}  lr {lr:.5f}  train_acc {entry['train_acc']:.2f}  "
                 f"val_acc {entry['val_acc']:.2f}  alpha_entropy normal {entropy['normal']:.4f} "
                 f"reduce {entropy['reduce']:.4f}  rank tau {entry['alpha_rank_tau']:.3f} "
                 f"(unchanged {entry['rank_unchanged_epochs']})  skips {entry['skip_connects']}  "
                 f"{entry['seconds']:.1f}s"
                 + ("" if entry["arch_step"] else "  (architecture warm-up: no α step)")
                 + (f"\n  {beta_line(betas, self.model.steps)}" if betas is not None else "")
                 + f"\n  genotype {genotype_line(genotype)}")
        if stopped:
            what = f" stage {self.stage + 1}" if self.staged and not last_stage else ""
            self.log(f"stopping{what} after epoch {stage_epoch + 1}/{cfg.epochs}: {stopped}")
        if "next_edge_ops" in entry:
            kept = self.stages[self.stage + 1][1]
            self.log(f"stage {self.stage + 1} done: every edge keeps its {kept} strongest ops for stage "
                     f"{self.stage + 2} ({self.stages[self.stage + 1][0].count(',') + 1} cells)"
                     + "".join(f"\n  {cell} edge {e}: {', '.join(ops)}" for cell in ("normal", "reduce")
                               for e, ops in enumerate(entry["next_edge_ops"][cell])))
        return entry

    def _stage_fields(self, stage_epoch: int) -> dict:
        if not self.staged:
            return {}
        layout, ops = self.stages[self.stage]
        return dict(stage=self.stage + 1, stage_epoch=stage_epoch + 1, cells=layout.count(",") + 1,
                    ops_per_edge=ops, edge_ops=self.edge_ops)

    def _plot_alphas(self, path: Path) -> None:
        from .visualize import plot_alpha_history

        entries = [h for h in self.history if h.get("stage", 1) == self.stage + 1]
        plot_alpha_history([h["alphas"] for h in entries], self.model.op_names, self.model.steps, path,
                           betas=[h["betas"] for h in entries] if self.model.edge_norm else None,
                           edge_ops=self.edge_ops)

    def _finish(self) -> SearchResult:
        from .visualize import plot_genotype

        cfg = self.config
        genotype = self.model.genotype(max_skip=cfg.max_skip)
        pictures = []
        if self.dist.is_main:
            genotype.save(self.out / "genotype.json")
            write_text(self.out / "genotype.txt", str(genotype) + "\n")
            pictures = plot_genotype(genotype, self.out)
            self._plot_alphas(self.out / "alphas.png")
        # No rank returns before rank 0's files are complete: what comes next may read them.
        barrier(self.dist)
        stopped = self.history[-1].get("stopped") if self.history else None
        limited = cfg.max_skip is not None and genotype != self.model.genotype()
        self.log(f"searched genotype{f' (epoch {len(self.history)}, {stopped})' if stopped else ''}"
                 f"{f' (normal cell limited to {cfg.max_skip} skip connections)' if limited else ''}:\n{genotype}")
        self.log(f"wrote {self.out / 'genotype.json'}, {', '.join(str(p) for p in pictures)}, "
                 f"{self.out / 'alphas.png'}, {self.out / 'metrics.jsonl'}")
        return SearchResult(genotype=genotype, history=self.history, out=self.out, model=self.model)


def search(config: SearchConfig | None = None, *, on_epoch_end: Callable[[dict], None] | None = None,
           log: Callable[[str], None] = print, dist: DistContext | None = None, **overrides) -> SearchResult:
    """Run a DARTS search and write its results to ``config.out``.

    ``search(dataset="digits", epochs=1, out="runs/demo")`` overrides single
    fields of the default ``SearchConfig``. ``on_epoch_end`` is called with each
    epoch's metrics after its checkpoint is written. ``dist``: the process's
    place in a multi-process run (its device overrides ``config.device``);
    None takes it from an existing process group or torchrun's environment
    (a single process without either).
    """
    config = dataclasses.replace(config or SearchConfig(), **overrides)
    if dist is None:
        with launch(config.device) as dist:
            return search(config, on_epoch_end=on_epoch_end, log=log, dist=dist)
    with collective_failures(dist):
        return _Searcher(config, log, dist).run(on_epoch_end)
