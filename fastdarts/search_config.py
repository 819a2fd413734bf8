"""The configuration of a search run: DARTS' fields plus the registered methods' options.

``SearchConfig`` holds the core's fields as a dataclass; each registered
method adds its options (``method.Option``), which are given and read like
fields (``SearchConfig(some_option=4).some_option``) and kept in
``options``. ``checked()`` applies the ``--method`` preset, validates
everything (each method its own options and what it cannot run with) and
returns the canonical form a resumed run is compared in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from .data import check_data_settings
from .errors import FastDartsError
from .layout import layout_string, reduction_layout
from .method import method_options, methods_for, preset, register_preset, registered_methods
from .mixed_op import DEFAULT_BACKEND, check_backend
from .ops import resolve_ops
from .recompute import check_recompute
from .run_utils import check_finite_settings
from .supernet import STEMS

DEFAULT_LAYERS = 8  # the paper's search network

# DARTS' published CIFAR-10 search (Liu et al., ICLR 2019): the core's own preset, ``--method darts``.
DARTS_PRESET = dict(batch_size=64, epochs=50, lr=0.025, lr_min=0.001, arch_lr=3e-4, arch_weight_decay=1e-3,
                    arch_beta1=0.5, order="second", arch_warmup_epochs=0, arch_grad_clip=None, arch_every=1,
                    arch_after_weights=False)
register_preset("darts", DARTS_PRESET)


@dataclass
class _CoreFields:
    """Everything a search run depends on, apart from the methods' options.
    Fields left ``None`` take the ``method``'s published value (its preset;
    DARTS: the paper's); a value given explicitly wins over the preset."""
    method: str = "darts"              # a registered preset (``--method``): darts or a method's
    dataset: str = "cifar10"
    data: str = "./data"
    download: bool = False
    image_size: int | None = None      # folder: images resized to it (None: median shorter side, <= 64); imagenet: crop
    skip_bad_images: bool = False      # folder: drop unreadable images instead of stopping
    subset: float | None = None        # a class-balanced fraction trains w, a disjoint quarter of it α (the
                                       # ImageNet search of Xu et al., 2020); None: the train_portion split
    stem: str | None = None            # "cifar" (one 3x3 conv) or "imagenet" (three stride-2); None: the data set's
    workers: int | None = None         # processes decoding images (ImageNet; building a folder's cache)
    data_budget_mb: float | None = None  # uint8 images held on the device up to this (None: serving.py's default)
    ops: str | Sequence[str] = "darts"
    layers: int | None = None          # cells (None: DEFAULT_LAYERS); reductions at layers//3 and 2*layers//3
    layout: str | None = None          # e.g. "N,R,N"; replaces `layers`
    channels: int = 16
    steps: int = 4
    multiplier: int = 4
    batch_size: int | None = None
    epochs: int | None = None          # of the run (of each stage, for a method that plans stages)
    lr: float | None = None
    lr_min: float | None = None
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float | None = None
    arch_weight_decay: float | None = None
    arch_beta1: float | None = None    # Adam's β1 on α (β2 is 0.999)
    arch_grad_clip: float | None = None  # clip ‖∇α‖ before Adam; None: no clipping (DARTS)
    order: str | None = None
    arch_warmup_epochs: int | None = None  # epochs (of each stage) without an architecture step at the start
    arch_every: int | None = None      # an architecture step after every k-th weight batch (1: every batch)
    arch_after_weights: bool | None = None  # the architecture step follows the weight step (DARTS: precedes it)
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
    options: dict[str, Any] = field(default_factory=dict)  # the methods' options (None: unset)


CORE_FIELDS = frozenset(f.name for f in dataclasses.fields(_CoreFields)) - {"options"}

# What a checkpoint written before a field existed ran: DARTS (every method option at its `off` value).
_LEGACY_CORE = dict(method="darts", arch_warmup_epochs=0, arch_beta1=0.5, arch_grad_clip=None, arch_every=1,
                    arch_after_weights=False, image_size=None, skip_bad_images=False, subset=None, stem="cifar")


def legacy_fields() -> dict[str, Any]:
    return {**_LEGACY_CORE, **{name: o.off for name, o in method_options().items()}}


class SearchConfig(_CoreFields):
    __doc__ = _CoreFields.__doc__ + """

    Method options (``method.Option``) are keyword arguments and attributes
    like the fields: ``SearchConfig(method=preset_name, some_option=2)``."""

    # Fields that do not change what a run computes: a resumed run may differ in
    # these (the device only within its type: see the search loop's resume).
    RUNTIME_ONLY = ("data", "download", "backend", "recompute", "cuda_graph", "device", "out", "resume",
                    "progress", "workers", "data_budget_mb")

    def __init__(self, *args, options: dict[str, Any] | None = None, **kwargs):
        known = method_options()
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in known}
        super().__init__(*args, **kwargs)
        merged = dict(options or {})
        unknown = [k for k in merged if k not in known]
        if unknown:
            raise TypeError(f"SearchConfig: unknown option(s) {', '.join(unknown)}")
        merged.update(given)
        self.options = {name: merged.get(name) for name in known}

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        options = self.__dict__.get("options")
        if options is not None and name in options:
            options[name] = value
        else:
            super().__setattr__(name, value)

    # -- canonical form ------------------------------------------------------------
    def checked(self) -> "SearchConfig":
        """A validated copy in canonical form (method preset applied, ops
        resolved, layout spelled out), so that bad input fails before any data
        is touched and two spellings of one configuration compare equal on resume."""
        settings = preset(self.method)
        options = method_options()
        core = {k: v for k, v in settings.items() if k in CORE_FIELDS and getattr(self, k) is None}
        from_preset = frozenset(k for k in options if self.options[k] is None and settings.get(k) is not None)
        filled = {k: (settings.get(k, o.off) if self.options[k] is None else self.options[k])
                  for k, o in options.items()}
        self = dataclasses.replace(self, **core, options=filled)
        check_finite_settings(self)
        positive = dict(channels=self.channels, batch_size=self.batch_size, epochs=self.epochs,
                        steps=self.steps, multiplier=self.multiplier)
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
        k = self.arch_every
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise FastDartsError(f"arch-every must be a positive integer, got {k!r}")
        if not isinstance(self.arch_after_weights, bool):
            raise FastDartsError(f"arch-after-weights must be true or false, got {self.arch_after_weights!r}")
        if not 0 <= self.seed < 2 ** 32:
            raise FastDartsError(f"seed must be in 0..2**32-1, got {self.seed}")
        check_data_settings(self.dataset, image_size=self.image_size, skip_bad_images=self.skip_bad_images,
                            workers=self.workers, download=self.download, data_budget_mb=self.data_budget_mb)
        if self.subset is not None and not (isinstance(self.subset, (int, float)) and 0 < self.subset <= 0.8):
            raise FastDartsError(f"subset must be a fraction in (0, 0.8] (of each class, training w; α gets a "
                                 f"quarter of it), got {self.subset!r}")
        stem = self.stem if self.stem is not None else ("imagenet" if self.dataset == "imagenet" else "cifar")
        if stem not in STEMS:
            raise FastDartsError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        self = dataclasses.replace(self, stem=stem)
        check_backend(self.backend)
        check_recompute(self.recompute)
        ops = resolve_ops(self.ops)
        if all(op == "none" for op in ops):
            # Refused now, not after an epoch when the first derivation fails.
            raise FastDartsError("the op list has only 'none'; a cell needs at least one other op")
        self = dataclasses.replace(self, ops=",".join(ops))
        for cls in registered_methods():  # each method its own options
            self = dataclasses.replace(self, options={**self.options, **cls.check(self, from_preset)})
        if self.stage_plan() is None:
            layers = None if self.layout is not None else (DEFAULT_LAYERS if self.layers is None else self.layers)
            self = dataclasses.replace(self, layout=layout_string(reduction_layout(layers, self.layout)), layers=None)
        else:
            self = dataclasses.replace(self, layout=None, layers=None)
        for cls in registered_methods():  # what each cannot run with, once everything is canonical
            reason = cls.incompatible(self) if cls.active(self) else None
            if reason:
                raise FastDartsError(reason)
        if self.cuda_graph and self.arch_every > 1:  # after the methods' reasons, which say more
            # One captured step per epoch: a step with and one without α's update would need two graphs.
            raise FastDartsError(f"--cuda-graph captures one step per epoch; --arch-every {self.arch_every} "
                                 f"alternates two kinds of step: run without --cuda-graph or with --arch-every 1")
        return self

    def methods(self) -> tuple:
        """The run's method instances (``method.methods_for``)."""
        return methods_for(self)

    def stage_plan(self) -> list[tuple[str, int]] | None:
        """The stages a method plans (cell layout, ops per edge), or None for one supernet."""
        for cls in registered_methods():
            if cls.active(self):
                plan = cls.stage_plan(self)
                if plan is not None:
                    return plan
        return None

    def stage_layouts(self) -> list[tuple[str, int]]:
        """(cell layout, ops per edge) of each stage (of a ``checked()`` config;
        one stage unless a method plans stages)."""
        return self.stage_plan() or [(self.layout, len(self.ops.split(",")))]

    def channel_step(self) -> int:
        """The channel counts the configuration's edges accept are multiples of this."""
        step = 1
        for cls in registered_methods():
            if cls.active(self):
                step = max(step, cls.channel_step(self))
        return step

    def result_defining(self) -> dict:
        """The fields a checkpoint must agree on to be resumed (of a ``checked()`` config)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        for key in self.RUNTIME_ONLY:
            d.pop(key)
        known = method_options()
        d.update((k, v) for k, v in self.options.items() if known[k].result_defining)
        return d

    def summary(self) -> str:
        """The effective configuration, one line (printed at the start of a run)."""
        d = self.result_defining()
        return ", ".join(f"{k}={v}" for k, v in d.items() if v is not None)
