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
from typing import Callable

import torch
import torch.nn.functional as F

from .architect import Architect, frozen
from .checkpoints import SEARCH_FORMAT, damaged, load_model_state, load_optimizer_state, read_checked
from .cuda_graph import DeviceLrSGD, GraphedStep, adam_capturable, check_cuda_graph, hold_lr_on_device
from .data import DeviceLoader, Loaders, load_dataset
from .data.loader import mix_seed
from .distributed import (DistContext, all_reduce_mean_, all_reduce_sum_, barrier, broadcast_, collective_failures,
                          launch, main_rank_first, per_rank_batch)
from .edge_ops import full_edge_ops
from .errors import FastDartsError
from .evaluate import evaluate
from .files import check_writable, save_torch, write_jsonl, write_text
from .genotype import Genotype, num_edges
from .kernels.backend import available_backends, kernel_backend
from .method import method_options
from .mixed_op import DEFAULT_BACKEND
from .ops import too_many_reductions
from .rank_stats import rank_measures, skip_connects
from .run_utils import (EpochProgress, check_finite_epoch, cosine_lr, resolve_device, seed_everything, set_lr,
                        steps_per_epoch)
from .search_config import CORE_FIELDS, SearchConfig, legacy_fields
from .size_check import check_search_size
from .supernet import SearchNetwork, build_supernet  # noqa: F401  (re-exported)
from .visualize import plot_alpha_history, plot_genotype

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = SEARCH_FORMAT
# Pass numbers of mix_seed for the draws that are not the loader's (whose passes are 0, 1, ...).
STAGE_PASS = 1 << 21


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict]
    out: Path
    model: SearchNetwork = field(repr=False)

    @property
    def stopped(self) -> str | None:
        """Why the search stopped early (a method's criteria), or None."""
        return self.history[-1].get("stopped") if self.history else None


def genotype_line(genotype: Genotype) -> str:
    """One-line form for the per-epoch log: op(input) per edge, nodes split by '|'."""
    def cell(edges):
        pairs = [f"{op}({i})" for op, i in edges]
        return " | ".join(" ".join(pairs[k:k + 2]) for k in range(0, len(pairs), 2))
    return f"normal: {cell(genotype.normal)}  reduce: {cell(genotype.reduce)}"


def search_step(model: SearchNetwork, architect: Architect, weight_optimizer: torch.optim.Optimizer,
                train_batch, val_batch, grad_clip: float, arch_step: bool = True, arch_after_weights: bool = False):
    """One DARTS step: Adam on α (first or second order; skipped when not
    ``arch_step``, as in a warm-up epoch), then SGD on the weights
    (``arch_after_weights``: the SGD step first, as some methods order
    them). Returns the train logits and loss and the validation loss (None
    without an architecture step), detached. In a multi-process run the
    architect's ``grad_reduce`` also averages the weights' gradient over the
    ranks, before clipping."""
    x, y = train_batch
    arch_loss = architect.step(x, y, *val_batch) if arch_step and not arch_after_weights else None
    weight_optimizer.zero_grad(set_to_none=True)
    with frozen(model.arch_parameters()):
        # The methods' preparation of the weight step (e.g. a perturbation of the op weights), and the
        # weight step's forward, which the methods' ``adjust_op_weights`` see as such.
        model.before_weight_step(x, y)
        with model.weight_step():
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
    architect.grad_reduce([p.grad for p in model.weight_parameters()])
    torch.nn.utils.clip_grad_norm_(model.weight_parameters(), grad_clip)
    weight_optimizer.step()
    if arch_step and arch_after_weights:
        arch_loss = architect.step(x, y, *val_batch)
    return logits.detach(), loss.detach(), arch_loss


def _read_checkpoint(path: Path, device, what: str = "search checkpoint") -> dict:
    """A search checkpoint's contents, checked entry by entry (``checkpoints``);
    a missing, truncated, foreign or damaged file is one line naming it."""
    return read_checked(path, (CHECKPOINT_FORMAT,), what, device)


def load_search(run_dir: str | Path, *, data: str = "./data", device: str = "cpu", backend: str | None = None):
    """A search run's configuration, data set and supernet (its last
    checkpoint: weights, α and, for a staged run, the last stage's edges) ->
    ``(config, dataset, model)``. ``backend`` (default the run's) may differ:
    every backend computes the same function."""
    path = Path(run_dir) / CHECKPOINT
    state = _read_checkpoint(path, "cpu")
    fields = {**legacy_fields(), **state["config"]}
    known = CORE_FIELDS | set(method_options())
    config = SearchConfig(**{k: v for k, v in fields.items() if k in known}, data=data, device=device,
                          backend=backend or state.get("backend", DEFAULT_BACKEND), out=str(run_dir))
    try:
        config = config.checked()
    except FastDartsError as e:
        raise damaged(path, f"its configuration is invalid ({e})") from None
    dataset = load_dataset(config.dataset, data, image_size=config.image_size,
                           skip_bad_images=config.skip_bad_images, progress=False)
    stage = state.get("stage")
    try:
        model = build_supernet(config, dataset, resolve_device(device),
                               layout=None if stage is None else stage["layout"],
                               edge_ops=None if stage is None else stage["edge_ops"])
    except (FastDartsError, KeyError, TypeError, ValueError, IndexError) as e:
        raise damaged(path, f"its stage does not describe a supernet ({type(e).__name__}: {e})") from None
    load_model_state(model, state["model"], path, "the supernet its configuration describes")
    return config, dataset, model


class SearchRun:
    """The state of one search run; ``search()`` drives it, and each method's
    loop hooks receive it (``method.SearchMethod``). What a hook may read:
    ``config``, ``methods``, ``model`` (the current supernet), ``architect``,
    ``stage``/``stages``/``staged``/``edge_ops``, ``history`` (the finished
    epochs' metrics), ``initial_alphas``, ``dist`` (``rank``, ``world_size``),
    ``device``, ``out`` and ``log``. A run whose method plans stages is a
    sequence of stages, each a new supernet with its own optimisers; the
    checkpoint holds the current stage's."""

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

        self.methods = config.methods()
        self.stages = config.stage_layouts()
        self.staged = config.stage_plan() is not None
        # The method that plans the stages chooses each next stage's edges.
        self.planner = next((m for m in self.methods if type(m).stage_plan(config) is not None), None)
        if config.cuda_graph:  # what the methods cannot capture was refused by config.checked()
            check_cuda_graph(self.device, distributed=dist.distributed)
        seed_everything(config.seed)
        # A download goes into one folder: rank 0 fetches it while the others wait; a folder's cache
        # too, the others waiting on the file system (decoding may outlast a collective's timeout).
        with main_rank_first(dist) if config.download else contextlib.nullcontext():
            dataset = self.dataset = load_dataset(
                config.dataset, config.data, download=config.download, image_size=config.image_size,
                skip_bad_images=config.skip_bad_images, workers=config.workers,
                progress=config.progress and dist.is_main, log=self.log, build_cache=dist.is_main)
        for layout, _ in self.stages:
            reductions = layout.count("R")
            problem = too_many_reductions(reductions, dataset.image_size, config.stem, config.dataset,
                                          f"{config.stem} stem")
            if problem:
                raise FastDartsError(f"layout {layout} has {reductions} reduction cells, but {problem}")
        # Before anything real is built: a supernet that cannot fit is one line saying what fits.
        check_search_size(config, dataset, self.device, world_size=dist.world_size)
        # Placed once: the loaders of the architecture half then share one copy on the device.
        loaders = Loaders(dataset, dataset.search_split(config.train_portion, config.subset, config.seed),
                          self.device, shard=(dist.rank, dist.world_size) if dist.distributed else None,
                          budget_mb=config.data_budget_mb, workers=config.workers)
        train_set, val_set = loaders.placed
        # Shards of equal size (the all-reduces average per-rank means): whole global batches only.
        # ImageNet: random-resized crops and flips, no colour jitter, as the ImageNet search of Xu et al. (2020).
        # Both read at every step: they share the decoding workers.
        common = dict(train=True, shuffle=True, drop_last=dist.distributed, colour_jitter=False, share=2)
        self.train_loader = loaders(train_set, config.batch_size, seed=config.seed, **common)
        self.arch_loader = loaders(val_set, config.batch_size, seed=config.seed + 1, **common)
        self.eval_loader = loaders(val_set, config.batch_size, train=False, shuffle=False)
        # Logged after the configuration and the backend, which come first.
        data_line = (f"data: {len(train_set)} images train w, {len(val_set)} train α, of {dataset.name} "
                     f"({dataset.num_classes} classes, {dataset.in_channels}x{dataset.image_size}x"
                     f"{dataset.image_size}); {loaders.describe()}")

        # Stage 1 right after seeding, as an unstaged run builds its one supernet.
        self._build_stage(0, full_edge_ops(config.ops.split(","), num_edges(config.steps)), reseed=False)
        # Chosen (and the compiled kernels tried) now, so a fallback shows before the first step.
        self.kernels = kernel_backend(self.device) if config.backend == "fused" else None
        self.log(f"method: {config.method} ({config.summary()})")
        if dist.distributed:
            self.log(f"{dist.world_size} ranks, {per_rank} images each per batch of {config.batch_size}")
        for m in self.methods:
            m.start_run(self)
        self.log(f"mixed-op backend: {config.backend}, recompute: {config.recompute}" + (
            f", kernels: {self.kernels} (usable here: {', '.join(available_backends())})" if self.kernels else ""))
        self.log(data_line)
        self.history: list[dict] = []
        if config.resume:
            self._load_checkpoint()

    def _build_stage(self, index: int, edge_ops: dict, reseed: bool = True) -> None:
        """The supernet and optimisers of stage ``index`` (0-based), its edges
        holding ``edge_ops``; weights and α drawn afresh from (seed, stage)."""
        cfg = self.config
        if reseed:
            seed_everything(mix_seed(cfg.seed, index, STAGE_PASS) % 2 ** 32)
        self.stage, self.edge_ops = index, edge_ops
        if index > 0:  # a later stage's edges are known only now
            check_search_size(cfg, self.dataset, self.device, world_size=self.dist.world_size,
                              layout=self.stages[index][0], edge_ops=edge_ops, stage=index)
        self.model = build_supernet(cfg, self.dataset, self.device, layout=self.stages[index][0], edge_ops=edge_ops,
                                    methods=self.methods)
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
        theirs = {**legacy_fields(), "world_size": 1, **state["config"]}
        if isinstance(theirs["world_size"], bool) or not isinstance(theirs["world_size"], int):
            raise damaged(path, f"its world size {theirs['world_size']!r} is not a number of processes")
        unknown = sorted(k for k in theirs if k not in ours)
        if unknown:
            raise FastDartsError(f"checkpoint {path} was written with option(s) {', '.join(unknown)}, which no "
                                 f"registered method has now: import the method's module before resuming")
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
        arch_epoch = stage_epoch >= cfg.arch_warmup_epochs
        model.start_epoch(cfg.seed, epoch, cfg.epochs, stage_epoch)
        figures: dict = {}
        for m in self.methods:
            figures.update(m.start_epoch(self, epoch, stage_epoch))
        where = f"stage {self.stage + 1}/{len(self.stages)} " if self.staged else ""
        progress = EpochProgress(self.device, n_steps, f"{where}epoch {stage_epoch + 1}/{cfg.epochs}",
                                 cfg.progress and self.dist.is_main)
        arch_loss_sum = torch.zeros((), device=self.device)
        arch_steps = 0

        def step(x, y, x_val, y_val, arch_step=arch_epoch):
            return search_step(model, self.architect, self.weight_optimizer, (x, y), (x_val, y_val),
                               cfg.grad_clip, arch_step=arch_step, arch_after_weights=cfg.arch_after_weights)

        # One graph per epoch: what it bakes in (rates, warm-up, the stage's supernet) is the epoch's.
        run_step = GraphedStep(step) if cfg.cuda_graph else step
        try:
            for index, (x, y) in enumerate(self.train_loader.epoch(epoch)):
                if index >= n_steps:
                    break
                # An architecture step after every k-th weight batch (``(i + 1) % k == 0``, as a
                # method's schedule may ask); each takes the architecture half's next batch.
                scheduled = (index + 1) % cfg.arch_every == 0
                if not scheduled:
                    logits, loss, _ = step(x, y, None, None, arch_step=False)
                    progress.update(logits, y, loss)
                    continue
                # Drawn in warm-up epochs too, so the batch order does not depend on the warm-up.
                x_val, y_val = next(arch_stream)
                logits, loss, arch_loss = run_step(x, y, x_val, y_val)
                if arch_epoch:
                    arch_loss_sum += arch_loss
                    arch_steps += 1
                progress.update(logits, y, loss)
        finally:
            progress.close()
            if cfg.cuda_graph:
                run_step.close()
        if self.dist.distributed:  # the epoch's figures over every rank's images
            progress.sum_over_ranks(all_reduce_sum_, arch_loss_sum)
            arch_loss_sum /= self.dist.world_size  # of per-rank means
        return dict(**progress.summary(), arch_step=arch_steps > 0, arch_steps=arch_steps,
                    arch_loss=arch_loss_sum.item() / arch_steps if arch_steps else None, **figures)

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
        for m in self.methods:
            entry.update(m.epoch_figures(self, entry))
        genotype = self.model.genotype()
        entropy = self.model.alpha_entropy()
        alphas = self.model.alpha_weights()
        previous = self.history[-1] if stage_epoch > 0 else None
        entry.update(alpha_entropy=entropy, genotype=genotype.to_dict(), alphas=alphas,
                     skip_connects=skip_connects(genotype),
                     **rank_measures(previous["alphas"] if previous else self.initial_alphas, alphas,
                                     self.edge_ops, previous.get("rank_unchanged_epochs", 0) if previous else 0),
                     config=self._result_defining())
        if not entry["arch_step"]:
            # α did not move because it was not trained: that is no evidence of a stable ranking.
            entry["rank_unchanged_epochs"] = 0
        stopped = "; ".join(r for r in (m.stop_reason(self, entry) for m in self.methods) if r) or None
        entry.update(stopped=stopped, seconds=time.perf_counter() - start)
        last_stage = self.stage + 1 == len(self.stages)
        if (stopped or stage_epoch + 1 == cfg.epochs) and not last_stage:
            # The planning method chooses the ops each edge keeps for the next stage.
            entry["next_edge_ops"] = self.planner.next_stage_edges(self, alphas, self.stages[self.stage + 1][1])
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
                 + "".join(f"\n  {line}" for line in (m.epoch_log(self, entry) for m in self.methods) if line)
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
        entries = [h for h in self.history if h.get("stage", 1) == self.stage + 1]
        plot_alpha_history([h["alphas"] for h in entries], self.model.op_names, self.model.steps, path,
                           betas=[h["betas"] for h in entries] if entries and all("betas" in h for h in entries)
                           else None,
                           edge_ops=self.edge_ops)

    def _finish(self) -> SearchResult:
        unlimited = self.model.genotype()
        genotype = self.model.genotype(final=True)
        for m in self.methods:  # a selection a method runs after the search
            genotype = m.select_after_search(self, genotype)
        pictures = []
        if self.dist.is_main:
            genotype.save(self.out / "genotype.json")
            write_text(self.out / "genotype.txt", str(genotype) + "\n")
            pictures = plot_genotype(genotype, self.out)
            self._plot_alphas(self.out / "alphas.png")
        # No rank returns before rank 0's files are complete: what comes next may read them.
        barrier(self.dist)
        stopped = self.history[-1].get("stopped") if self.history else None
        notes = "".join(f" ({n})" for n in (m.describe_final(genotype, unlimited) for m in self.methods) if n)
        self.log(f"searched genotype{f' (epoch {len(self.history)}, {stopped})' if stopped else ''}{notes}:\n{genotype}")
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
        return SearchRun(config, log, dist).run(on_epoch_end)
