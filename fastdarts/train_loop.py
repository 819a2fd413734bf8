"""Training a genotype's network from scratch: ``train(...)`` and its configuration (SPEC §4).

The paper's recipe: SGD (lr 0.025 cosine-annealed to 0, momentum 0.9, weight
decay 3e-4, gradient-norm clip 5), batch 96, 600 epochs, the auxiliary head's
loss weighted 0.4, drop path ramped linearly from 0 to 0.2 over the epochs,
random crop + flip + cutout 16 on the whole training set, test accuracy after
every epoch.

After every epoch the run writes ``checkpoint.pt`` (everything a resume needs,
written atomically), ``last.pt`` (the weights, with the network they belong
to), ``best.pt`` when the test accuracy improved, and ``metrics.jsonl``; at the
end ``curves.png``. A resumed run ends with the same weights as an
uninterrupted one (bit for bit on the CPU) because every random draw of an
epoch (shuffling, crops, flips, cutout, drop-path masks) comes from a
generator seeded by (seed, epoch).

Under torchrun (SPEC §10) the network is wrapped in DistributedDataParallel
and ``batch_size`` stays the global batch: each rank trains on its part of
every batch of the single-process order, augmented exactly as the single
process augments it, with drop-path masks from (seed, epoch, rank); BatchNorm
normalises over each rank's part, which is why the number of ranks is part
of a run's configuration (``world_size`` in the checkpoint: a resume with
another is refused). The test set is shared out and the counts summed, and
rank 0 alone writes files, logs and shows the progress bar.
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

from .checkpoints import TRAIN_FORMAT, WEIGHTS_FORMAT, damaged, load_model_state, load_optimizer_state, read_checked
from .cuda_graph import DeviceLrSGD, GraphedStep, check_cuda_graph, hold_lr_on_device
from .data import DeviceLoader, FileDataset, Loaders, check_data_settings, load_dataset
from .data.loader import mix_seed
from .distributed import (DistContext, all_reduce_sum_, barrier, broadcast_, collective_failures, data_parallel,
                          launch, main_rank_first, per_rank_batch)
from .errors import FastDartsError
from .eval_network import GenotypeNetwork, build_network, count_parameters
from .model_size import describe_size
from .evaluate import autocast, evaluate
from .files import check_writable, save_torch, write_jsonl
from .genotype import Genotype, get_genotype
from .ops import too_many_reductions
from .layout import reduction_layout
from .run_utils import (EpochProgress, check_finite_epoch, check_finite_settings, cosine_lr, resolve_fast_options,
                        seed_everything, set_lr, steps_per_epoch)
from .size_check import check_train_size

CHECKPOINT = "checkpoint.pt"
LR_SCHEDULES = ("cosine", "exponential")
NETWORK_KINDS = ("cifar", "imagenet")
# DARTS' ImageNet training (the original's train_imagenet.py defaults and README command): what
# fastdarts-train --dataset imagenet starts from.
IMAGENET_TRAINING = dict(layers=14, channels=48, batch_size=128, epochs=250, lr=0.1, weight_decay=3e-5,
                         lr_schedule="exponential", lr_gamma=0.97, label_smoothing=0.1, drop_path_prob=0.0,
                         auxiliary=True, auxiliary_weight=0.4, grad_clip=5.0, cutout=0)
# Pass number of the drop-path generator in mix_seed (plus the rank); the loader's passes are 0, 1, ...
_DROP_PATH_PASS = 1 << 20


@dataclass
class TrainConfig:
    """Everything a training run depends on; the defaults are the paper's (SPEC §4)."""
    genotype: str | Genotype = "DARTS_V2"   # a published name, a genotype.json path, or a Genotype
    dataset: str = "cifar10"
    data: str = "./data"
    download: bool = False
    image_size: int | None = None   # folder: images resized to it (None: median shorter side, <= 64); imagenet: crop
    skip_bad_images: bool = False   # folder: drop unreadable images instead of stopping
    workers: int | None = None      # processes decoding images (ImageNet; building a folder's cache)
    data_budget_mb: float | None = None  # uint8 images held on the device up to this (None: serving.py's default)
    network: str | None = None      # "cifar" or "imagenet" (NetworkImageNet); None: imagenet for --dataset imagenet
    layers: int = 20
    channels: int = 36
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2
    cutout: int | None = None       # None: 16 px on 32 px images, scaled to the data set's image size
    batch_size: int = 96
    epochs: int = 600
    lr: float = 0.025
    lr_min: float = 0.0
    lr_schedule: str = "cosine"     # or "exponential": lr * lr_gamma ** epoch (DARTS' ImageNet training)
    lr_gamma: float = 0.97
    warmup_epochs: int = 0          # lr ramped linearly over these first epochs (large-batch ImageNet training)
    lr_reference_batch: int | None = None  # lr scaled by batch_size / this (the linear scaling rule); None: not
    label_smoothing: float = 0.0    # DARTS' ImageNet training: 0.1
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    bf16: bool | None = None        # None: on for CUDA devices with bf16 support, off on the CPU
    channels_last: bool | None = None  # None: on for CUDA, off on the CPU
    cuda_graph: bool = False        # capture each epoch's step once, replay it (cuda_graph.py)
    device: str = "auto"
    seed: int = 0
    out: str = "runs/train"
    resume: bool = False
    max_steps: int | None = None    # cap on train and test steps per epoch, for smoke tests
    progress: bool = True

    # Fields that do not change what a run computes (channels_last only in the
    # last bits of float rounding): a resumed run may differ in these.
    RUNTIME_ONLY = ("data", "download", "device", "out", "resume", "progress", "channels_last", "cuda_graph",
                    "workers", "data_budget_mb")
    # What a checkpoint written before these fields existed ran.
    LEGACY = dict(image_size=None, skip_bad_images=False, network="cifar", lr_schedule="cosine", lr_gamma=0.97,
                  warmup_epochs=0, lr_reference_batch=None, label_smoothing=0.0)

    def checked(self) -> "TrainConfig":
        """A validated copy with the genotype resolved to a ``Genotype``, so
        bad input fails before any data is touched and the same genotype named
        two ways (``DARTS_V2`` or its JSON file) compares equal on resume."""
        positive = dict(layers=self.layers, channels=self.channels, batch_size=self.batch_size, epochs=self.epochs)
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FastDartsError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.cutout is not None and (isinstance(self.cutout, bool) or not isinstance(self.cutout, int)
                                        or self.cutout < 0):
            raise FastDartsError(f"cutout must be a non-negative integer (0: none), got {self.cutout!r}")
        check_finite_settings(self)
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise FastDartsError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")
        for name in ("lr_min", "momentum", "weight_decay", "auxiliary_weight"):
            if not getattr(self, name) >= 0:
                raise FastDartsError(f"{name.replace('_', '-')} must not be negative, got {getattr(self, name)!r}")
        if self.lr_min > self.lr:
            raise FastDartsError(f"lr-min ({self.lr_min!r}) must not exceed lr ({self.lr!r}): the schedule anneals "
                                 f"from lr down to lr-min")
        if self.auxiliary and self.batch_size == 1:
            raise FastDartsError("batch-size 1 cannot train the auxiliary head (its BatchNorm sees 1x1 maps, one "
                                 "value per channel): use a larger batch or --no-auxiliary")
        if not 0 <= self.drop_path_prob < 1:
            raise FastDartsError(f"drop-path-prob must be in [0, 1), got {self.drop_path_prob!r}")
        if not 0 <= self.seed < 2 ** 32:
            raise FastDartsError(f"seed must be in 0..2**32-1, got {self.seed}")
        check_data_settings(self.dataset, image_size=self.image_size, skip_bad_images=self.skip_bad_images,
                            workers=self.workers, download=self.download, data_budget_mb=self.data_budget_mb)
        network = self.network if self.network is not None else ("imagenet" if self.dataset == "imagenet" else "cifar")
        if network not in NETWORK_KINDS:
            raise FastDartsError(f"network must be one of {', '.join(NETWORK_KINDS)}, got {network!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise FastDartsError(f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 < self.lr_gamma <= 1:
            raise FastDartsError(f"lr-gamma must be in (0, 1], got {self.lr_gamma!r}")
        w = self.warmup_epochs
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= self.epochs:
            raise FastDartsError(f"warmup-epochs must be an integer in 0..epochs ({self.epochs}), got {w!r}")
        b = self.lr_reference_batch
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b <= 0):
            raise FastDartsError(f"lr-reference-batch must be a positive integer, got {b!r}")
        if not 0 <= self.label_smoothing < 1:
            raise FastDartsError(f"label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        genotype = self.genotype if isinstance(self.genotype, Genotype) else get_genotype(self.genotype)
        return dataclasses.replace(self, genotype=genotype, network=network)

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (0-based): the schedule from the (scaled) lr, ramped up in the warm-up."""
        lr = self.lr * (self.batch_size / self.lr_reference_batch if self.lr_reference_batch else 1.0)
        if self.lr_schedule == "exponential":  # StepLR(1, gamma) stepped before each epoch, as DARTS' ImageNet
            scheduled = lr * self.lr_gamma ** epoch
        else:
            scheduled = cosine_lr(epoch, self.epochs, lr, self.lr_min)
        if epoch < self.warmup_epochs:  # as Xu et al.'s (2020) ImageNet training: lr * (epoch + 1) / warm-up epochs
            return lr * (epoch + 1) / self.warmup_epochs
        return scheduled

    def result_defining(self) -> dict:
        """The fields a checkpoint must agree on to be resumed (of a ``checked()`` config)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.RUNTIME_ONLY}
        d["genotype"] = self.genotype.to_dict()
        return d


@dataclass
class TrainResult:
    history: list[dict]
    out: Path
    test_acc: float                 # after the last epoch: the figure to report
    best_test_acc: float            # the best epoch's, chosen on the test set: optimistic
    parameters: int                 # without the auxiliary head, as the paper counts
    model: GenotypeNetwork = field(repr=False)


def default_cutout(image_size: int) -> int:
    """The paper's 16 px cutout on 32 px CIFAR-10, as the same fraction of other image sizes."""
    return 16 * image_size // 32


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               auxiliary_weight: float, grad_clip: float, bf16: bool, loss_scale: float = 1.0,
               label_smoothing: float = 0.0):
    """One SGD step on a batch; returns the main head's logits and loss and
    the auxiliary loss (None without the head), detached.

    ``model`` may be the network in DistributedDataParallel, which averages
    the ranks' gradients during backward; ``loss_scale`` weights this rank's
    part of a batch so that the average is the whole batch's mean gradient
    when the parts differ in size (a short last batch). ``label_smoothing``:
    targets (1 - eps) one-hot + eps / classes, both heads, as DARTS' ImageNet
    ``CrossEntropyLabelSmooth``."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, bf16):
        logits, logits_aux = model(x)
    # Losses in float32 whatever the forward ran in.
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    total = loss
    aux_loss = None
    if logits_aux is not None:
        aux_loss = F.cross_entropy(logits_aux.float(), y, label_smoothing=label_smoothing)
        total = loss + auxiliary_weight * aux_loss
    if loss_scale != 1.0:
        total = total * loss_scale
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return logits.detach(), loss.detach(), None if aux_loss is None else aux_loss.detach()


class _Trainer:
    """The state of one training run; ``train()`` drives it."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None], dist: DistContext):
        config = config.checked()
        self.dist = dist
        per_rank = per_rank_batch(config.batch_size, dist.world_size)
        if dist.distributed and config.auxiliary and per_rank == 1:
            raise FastDartsError(f"batch-size {config.batch_size} gives each of the {dist.world_size} ranks one image "
                                 f"per batch, which cannot train the auxiliary head (its BatchNorm sees 1x1 maps): "
                                 f"use a batch of at least {2 * dist.world_size} or --no-auxiliary")
        self.log = log if dist.is_main else _silent
        self.device = dist.device
        if config.cuda_graph:
            check_cuda_graph(self.device, distributed=dist.distributed)
        bf16, channels_last = resolve_fast_options(self.device, config.bf16, config.channels_last)
        config = dataclasses.replace(config, bf16=bf16, channels_last=channels_last)
        self.out = Path(config.out)
        self.checkpoint_path = self.out / CHECKPOINT
        # Found now, not when the first epoch's checkpoint is written.
        check_writable(self.out)
        if self.checkpoint_path.exists() and not config.resume:
            raise FastDartsError(f"{self.out} already holds a training checkpoint; pass --resume to continue it"
                                 f" or choose another --out")
        if config.resume and not self.checkpoint_path.exists():
            raise FastDartsError(f"--resume given but there is no checkpoint at {self.checkpoint_path}")

        seed_everything(config.seed)
        # A download goes into one folder: rank 0 fetches it while the others wait; a folder's cache
        # too, the others waiting on the file system (decoding may outlast a collective's timeout).
        with main_rank_first(dist) if config.download else contextlib.nullcontext():
            dataset = load_dataset(config.dataset, config.data, download=config.download,
                                   image_size=config.image_size, skip_bad_images=config.skip_bad_images,
                                   workers=config.workers, progress=config.progress and dist.is_main, log=self.log,
                                   build_cache=dist.is_main)
        reductions = sum(reduction_layout(config.layers))
        problem = too_many_reductions(reductions, dataset.image_size, config.network, config.dataset,
                                      f"{config.network} network's stem")
        if problem:
            raise FastDartsError(f"{config.layers} layers have {reductions} reduction cells, but {problem}")
        if config.cutout is None:  # the streamed JPEG route has no cutout (DARTS' ImageNet training has none)
            config = dataclasses.replace(config, cutout=0 if isinstance(dataset, FileDataset)
                                         else default_cutout(dataset.image_size))
        # Before anything real is built: a network that cannot fit is one line saying what fits.
        check_train_size(config, dataset, self.device, world_size=dist.world_size)
        self.config = config
        self.dataset_name = dataset.name
        loaders = Loaders(dataset, (dataset.train, dataset.test), self.device,
                          shard=(dist.rank, dist.world_size) if dist.distributed else None,
                          budget_mb=config.data_budget_mb, workers=config.workers)
        train_set, test_set = loaders.placed
        self.train_loader = loaders(train_set, config.batch_size, train=True, shuffle=True, seed=config.seed,
                                    cutout=config.cutout,
                                    drop_last=self.drops_last_batch(len(train_set), config.batch_size,
                                                                    dist.world_size))
        self.test_loader = loaders(test_set, config.batch_size, train=False, shuffle=False)
        self.data_route = loaders.describe()

        self.model = build_network(config.network, config.genotype, C=config.channels,
                                   num_classes=dataset.num_classes, layers=config.layers,
                                   auxiliary=config.auxiliary, in_channels=dataset.in_channels,
                                   image_size=dataset.image_size).to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = DeviceLrSGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                     weight_decay=config.weight_decay)
        hold_lr_on_device(self.optimizer, config.cuda_graph)
        self.parameters = count_parameters(self.model)
        self.history: list[dict] = []
        size = (describe_size(self.model, (dataset.in_channels, dataset.image_size, dataset.image_size))
                if dist.is_main else "")
        self.log(f"network: {config.network}, {config.layers} cells, C={config.channels}, {size}; "
                 f"{len(train_set)} training / {len(test_set)} test images of {dataset.name} "
                 f"({self.data_route}); "
                 f"device {self.device}, bf16 {'on' if config.bf16 else 'off'}, "
                 f"channels-last {'on' if config.channels_last else 'off'}"
                 + (f"; {dist.world_size} ranks, {per_rank} images each per batch of {config.batch_size}"
                    if dist.distributed else ""))
        if config.resume:
            self._load_checkpoint()
        # After the resume: DDP starts every rank from rank 0's weights and buffers.
        self.net = data_parallel(self.model, dist)

    @staticmethod
    def drops_last_batch(n_train: int, batch_size: int, world_size: int = 1) -> bool:
        """Whether the training loader drops its last batch: only when that
        batch would hold a single image (or, shared among ranks, give some rank
        one or none), which BatchNorm cannot normalise in training (the
        auxiliary head's maps are 1x1, so one image is one value per channel).
        Other short last batches are kept, as the original does."""
        last = n_train % batch_size
        return n_train > batch_size and 0 < last and last // world_size < 2

    # -- files --------------------------------------------------------------
    def _weights(self, entry: dict) -> dict:
        return dict(format=WEIGHTS_FORMAT, network=self.model.spec(), dataset=self.dataset_name,
                    epoch=entry["epoch"], test_acc=entry["test_acc"],
                    state_dict={k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()})

    def _result_defining(self) -> dict:
        # The number of ranks decides the part of a batch each BatchNorm normalises over.
        return dict(self.config.result_defining(), world_size=self.dist.world_size)

    def _save(self, entry: dict) -> None:
        state = dict(format=TRAIN_FORMAT, config=self._result_defining(),
                     device_type=self.device.type, network=self.model.spec(), dataset=self.dataset_name,
                     model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), history=self.history)
        weights = self._weights(entry)
        save_torch(self.out / "last.pt", weights)
        # Strictly better than every earlier epoch: best.pt is the first best epoch, as _finish reports.
        if entry["test_acc"] > max((h["test_acc"] for h in self.history[:-1]), default=float("-inf")):
            save_torch(self.out / "best.pt", weights)
        # metrics.jsonl, then the checkpoint last: a crash between them never leaves a checkpoint newer
        # than the metrics, and the resumed epoch rewrites the same files.
        write_jsonl(self.out / "metrics.jsonl", self.history)
        save_torch(self.checkpoint_path, state)

    def _load_checkpoint(self) -> None:
        path = self.checkpoint_path
        state = read_checked(path, (TRAIN_FORMAT,), "training checkpoint", self.device)
        ours, theirs = self._result_defining(), dict(state["config"])
        theirs.setdefault("world_size", 1)  # written before runs could span processes
        for key, value in TrainConfig.LEGACY.items():
            theirs.setdefault(key, value)
        if isinstance(theirs["world_size"], bool) or not isinstance(theirs["world_size"], int):
            raise damaged(path, f"its world size {theirs['world_size']!r} is not a number of processes")
        diff = [f"{k}: checkpoint {theirs.get(k)!r} vs now {v!r}" for k, v in ours.items()
                if theirs.get(k) != v and k != "genotype"]
        if theirs.get("genotype") != ours["genotype"]:
            diff.insert(0, "genotype differs")
        # CPU and CUDA generators draw different crops, masks and shuffles from the same seed.
        if state.get("device_type") != self.device.type:
            diff.append(f"device type: checkpoint {state.get('device_type')!r} vs now {self.device.type!r}")
        hint, world = "", theirs["world_size"]
        if world != ours["world_size"]:
            hint = (f": the number of processes decides the part of a batch each BatchNorm normalises over, so "
                    f"resume it with {world} processes (torchrun --nproc_per_node {world})"
                    if world != 1 else ": resume it without torchrun")
        if diff:
            raise FastDartsError(f"checkpoint {path} was written by a different configuration ({'; '.join(diff)})"
                                 + hint)
        load_model_state(self.model, state["model"], path, "the network of this configuration")
        load_optimizer_state(self.optimizer, state["optimizer"], path, "optimizer")
        hold_lr_on_device(self.optimizer, self.config.cuda_graph)  # whichever form the checkpoint held
        self.history = list(state["history"])
        if len(self.history) > self.config.epochs:
            raise damaged(path, f"its history holds {len(self.history)} epochs of a {self.config.epochs}-epoch run")
        self.log(f"resumed from {path} after epoch {len(self.history)}/{self.config.epochs}")

    # -- one epoch ----------------------------------------------------------
    def _steps(self, loader: DeviceLoader) -> int:
        return steps_per_epoch(len(loader), self.config.max_steps)

    def _train_epoch(self, epoch: int) -> dict:
        cfg, model, dist = self.config, self.model, self.dist
        self.net.train()
        model.drop_path_prob = cfg.drop_path_prob * epoch / cfg.epochs
        generator = torch.Generator(device=self.device)
        # Rank 0 draws the single process's masks; the others their own, equally replayable.
        generator.manual_seed(mix_seed(cfg.seed, epoch, _DROP_PATH_PASS + dist.rank))
        model.drop_path_generator = generator
        n_steps = self._steps(self.train_loader)
        progress = EpochProgress(self.device, n_steps, f"epoch {epoch + 1}/{cfg.epochs}",
                                 cfg.progress and dist.is_main)
        aux_sum = torch.zeros((), device=self.device)

        def step(x, y, scale=1.0):
            return train_step(self.net, self.optimizer, x, y, auxiliary_weight=cfg.auxiliary_weight,
                              grad_clip=cfg.grad_clip, bf16=cfg.bf16, loss_scale=scale,
                              label_smoothing=cfg.label_smoothing)

        # One graph per epoch: it bakes in the epoch's drop-path probability.
        graphed = GraphedStep(step, generators=[generator]) if cfg.cuda_graph else None
        try:
            for index, (x, y) in enumerate(self.train_loader.epoch(epoch)):
                if index >= n_steps:
                    break
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if graphed is not None:  # one process: every batch has the loss scale 1
                    logits, loss, aux_loss = graphed(x, y)
                else:
                    scale = (dist.world_size * len(y) / self.train_loader.batch_images(index)
                             if dist.distributed else 1.0)
                    logits, loss, aux_loss = step(x, y, scale)
                if aux_loss is not None:
                    aux_sum += aux_loss * len(y)
                progress.update(logits, y, loss)
        finally:
            progress.close()
            model.drop_path_generator = None
            if graphed is not None:
                graphed.close()
        if dist.distributed:  # the epoch's figures over every rank's images
            progress.sum_over_ranks(all_reduce_sum_, aux_sum)
        entry = progress.summary()
        if cfg.auxiliary:
            entry["aux_loss"] = aux_sum.item() / progress.seen
        return entry

    def run(self, on_epoch_end: Callable[[dict], None] | None) -> TrainResult:
        cfg, dist = self.config, self.dist
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        for epoch in range(len(self.history), cfg.epochs):
            start = time.perf_counter()
            lr = cfg.epoch_lr(epoch)
            set_lr(self.optimizer, lr)
            train_metrics = self._train_epoch(epoch)
            # The probability the epoch's forward passes used, as _train_epoch set it.
            entry = dict(epoch=epoch + 1, lr=lr, drop_path_prob=self.model.drop_path_prob, **train_metrics)
            # Every rank tests rank 0's BatchNorm statistics: the ones its files hold.
            broadcast_(list(self.model.buffers()))
            test = evaluate(self.model, self.test_loader.epoch(0), bf16=cfg.bf16, channels_last=cfg.channels_last,
                            max_steps=self._steps(self.test_loader), dist=dist)
            entry.update(test_loss=test["loss"], test_acc=test["top1"], test_top5=test["top5"],
                         seconds=time.perf_counter() - start)
            check_finite_epoch(entry, ("train_loss", "aux_loss", "test_loss"), self.checkpoint_path,
                               f"lower --lr (now {cfg.lr:g})")
            self.history.append(entry)
            if dist.is_main:
                self._save(entry)
            barrier(dist)  # on_epoch_end runs once the checkpoint is there, on every rank
            best = max(h["test_acc"] for h in self.history)
            self.log(f"epoch {epoch + 1}/{cfg.epochs}  lr {lr:.5f}  drop_path {entry['drop_path_prob']:.3f}  "
                     f"train_loss {entry['train_loss']:.4f}  train_acc {entry['train_acc']:.2f}  "
                     f"test_loss {entry['test_loss']:.4f}  test_acc {entry['test_acc']:.2f}  (best {best:.2f})  "
                     f"{entry['seconds']:.1f}s")
            if on_epoch_end is not None:
                on_epoch_end(entry)
        return self._finish()

    def _finish(self) -> TrainResult:
        from .visualize import plot_learning_curves

        if not self.history:
            raise FastDartsError("the run has no finished epoch")
        curves = plot_learning_curves(self.history, self.out / "curves.png") if self.dist.is_main else None
        # No rank returns before rank 0's files are complete: what comes next may read them.
        barrier(self.dist)
        last = self.history[-1]
        best = max(self.history, key=lambda h: h["test_acc"])
        self.log(f"final test accuracy {last['test_acc']:.2f}% (top-5 {last['test_top5']:.2f}%) after epoch "
                 f"{last['epoch']}; best {best['test_acc']:.2f}% at epoch {best['epoch']} (chosen on the test set)")
        self.log(f"wrote {self.out / 'last.pt'}, {self.out / 'best.pt'}, {self.out / CHECKPOINT}, "
                 f"{self.out / 'metrics.jsonl'}, {curves}")
        return TrainResult(history=self.history, out=self.out, test_acc=last["test_acc"],
                           best_test_acc=best["test_acc"], parameters=self.parameters, model=self.model)


def _silent(_: str) -> None:
    pass


def train(config: TrainConfig | None = None, *, on_epoch_end: Callable[[dict], None] | None = None,
          log: Callable[[str], None] = print, dist: DistContext | None = None, **overrides) -> TrainResult:
    """Train a genotype's network from scratch and write its results to ``config.out``.

    ``train(genotype="DARTS_V2", dataset="digits", layers=5, channels=8, epochs=5)``
    overrides single fields of the default ``TrainConfig``. ``on_epoch_end`` is
    called (on every rank) with each epoch's metrics after its checkpoint is written.

    ``dist``: the process's place in a multi-process run; None takes it from
    the process group already initialised, else from torchrun's environment
    for the length of the run (``fastdarts.distributed.launch``), else a
    single process; its device is the run's (``config.device`` only when
    None). Only rank 0 logs. A collective that fails because another rank
    stopped or hung raises ``distributed.RankLost``.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    if dist is None:
        with launch(config.device) as dist:
            return train(config, on_epoch_end=on_epoch_end, log=log, dist=dist)
    with collective_failures(dist):
        return _Trainer(config, log, dist).run(on_epoch_end)
