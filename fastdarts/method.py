"""The method protocol: how a search method beyond DARTS plugs into the core (SPEC §8, §12).

DARTS itself is the core (supernet, mixed op, architect, loop, derivation).
A method is a subclass of ``SearchMethod`` in a module of its own, registered
with ``register_method``; the core calls its hooks at fixed points and never
names it. Every hook has a no-op default, so a method overrides only what it
changes. One instance is made per run (``methods_for(config)``) for every
registered method that the configuration switches on (``active``); state that
belongs to one supernet (a parameter, a buffer, a sampler) is put on the
network by ``setup_network``, so a new supernet (a stage) starts clean.

Hooks, by where the core calls them:

- options (class level, before a run exists): ``options`` (its fields of
  ``SearchConfig``, CLI flags included), ``check`` (validation and canonical
  form), ``incompatible`` (backends, recompute modes, orders, CUDA graphs it
  cannot run with), ``stage_plan`` (a run of several supernets),
  ``channel_step`` (the channel counts its edges accept);
- the supernet: ``setup_network`` (extra architecture parameters, buffers),
  ``build_edge`` (a mixed op of its own), ``attach_to_edge``/``split_edge``/
  ``add_to_edge`` (terms added to an edge's output), ``edge_scales`` (a
  weight per edge), ``op_weights`` (an edge's op weights from α, instead of
  softmax), ``adjust_op_weights`` (e.g. the weight step's perturbed op
  weights), ``forward_extras`` (tensors its edge terms read), ``network_epoch``;
- the loop: ``start_epoch``, ``before_weight_step``, ``before_arch_update``/``after_arch_update``,
  ``arch_loss_term``, ``epoch_figures``, ``stop_reason``, ``next_stage_edges``,
  ``epoch_log``, ``prepare_size_estimate``;
- derivation: ``op_strengths`` (what ranks an op), ``select_cell`` (limits on
  the final cells), ``select_after_search`` (a selection run after the search).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from .errors import FastDartsError

if TYPE_CHECKING:  # for annotations only
    import torch
    from torch import nn


@dataclass(frozen=True)
class Option:
    """A setting a method adds to ``SearchConfig`` (and, as ``--name-with-dashes``, to the CLI).

    ``off``: the value that leaves the method out (a preset that does not
    name the option gets it; so does a checkpoint written before the option
    existed). ``kind`` (for the CLI): ``positive_int``, ``non_negative_int``,
    ``flag`` (``--x``), ``bool`` (``--x``/``--no-x``), ``text`` or ``list``
    (a flag that may be given several times). ``result_defining``: a resumed
    run must agree on it."""
    name: str
    off: Any
    help: str
    kind: str = "text"
    metavar: str | None = None
    result_defining: bool = True


class SearchMethod:
    """Base of every method: each hook does nothing (DARTS' behaviour).

    ``config``: the run's checked ``SearchConfig`` (or, for a network built
    directly, a namespace holding every option)."""

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, config: Any):
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- options (class level) -------------------------------------------------
    @classmethod
    def active(cls, config: Any) -> bool:
        """Whether ``config`` switches the method on: by default, any option not at its ``off`` value
        (``True`` is not the ``off`` value 1: a bad value switches the method on, whose check refuses it)."""
        return any(not _is_off(getattr(config, o.name), o.off) for o in cls.options)

    @classmethod
    def check(cls, config: Any, from_preset: frozenset[str]) -> dict[str, Any]:
        """Validate the method's options (the core fields are checked and the
        preset applied); return their canonical values (two spellings of one
        setting must compare equal on resume). ``from_preset``: the option
        names whose value came from the ``--method`` preset."""
        return {}

    @classmethod
    def incompatible(cls, config: Any) -> str | None:
        """Why the (canonical) configuration cannot run with this method (a
        backend, recompute mode, order or CUDA-graph capture it does not
        support), or None. Asked once, by ``SearchConfig.checked``."""
        return None

    @classmethod
    def stage_plan(cls, config: Any) -> list[tuple[str, int]] | None:
        """A run of several supernets: (cell layout, ops per edge) per stage; None: one supernet."""
        return None

    @classmethod
    def channel_step(cls, config: Any) -> int:
        """The channel counts the method's edges accept are multiples of this."""
        return 1

    # -- the supernet --------------------------------------------------------------
    def check_network(self, model: nn.Module, C: int | None, backend: str) -> None:
        """Refuse a supernet (built directly, or moved to ``backend``) the method cannot run on
        (``C``: its channels; None when only the backend changes)."""

    def first_order_only(self, model: nn.Module) -> bool:
        """Whether the architecture step must be first order (the architect refuses the second)."""
        return False

    def setup_network(self, model: nn.Module) -> list[torch.nn.Parameter]:
        """Called once the supernet's weights and α exist (in that order, as
        the original code draws them): add buffers or state to ``model`` and
        return the extra architecture parameters it registered (after α in
        ``arch_parameters()``)."""
        return []

    def build_edge(self, C: int, stride: int, op_names: Sequence[str], backend: str,
                   terms: Sequence["SearchMethod"]) -> nn.Module | None:
        """A mixed op of the method's own for an edge (a ``MixedOp`` subclass taking the same
        forward arguments), or None for the core's."""
        return None

    def attach_to_edge(self, edge: nn.Module, C: int, stride: int) -> None:
        """Register the method's modules on a new edge (before its ops are built)."""

    def split_edge(self, edge: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                   paths: tuple[int, ...] | None) -> tuple[torch.Tensor, Any]:
        """Before the backend: the op weights it sees and a value for ``add_to_edge``."""
        return weights, None

    def add_to_edge(self, edge: nn.Module, x: torch.Tensor, y: torch.Tensor, split: Any,
                    scale: torch.Tensor | None, extras: dict, params: Sequence[torch.Tensor] | None = None
                    ) -> torch.Tensor:
        """After the backend: the edge output ``y`` plus the method's term.
        ``scale``: the edge's weight to fold into the term (None: applied
        outside, as the reference does); ``extras``: ``forward_extras``;
        ``params``: the term's parameters to use instead of the modules'
        (a recompute passes the forward's tensors)."""
        return y

    def term_parameters(self, edge: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The (name, tensor) of the parameters the method's term uses on ``edge`` (for a recompute)."""
        return []

    def edge_draws_random_numbers(self, edge: nn.Module) -> bool:
        """Whether the edge's term draws random numbers in training (a recompute must replay them)."""
        return False

    def edge_scales(self, model: nn.Module) -> list[torch.Tensor] | None:
        """One weight per edge for the normal and the reduction cell, or None."""
        return None

    def op_weights(self, model: nn.Module, alphas: list[torch.Tensor]) -> list[tuple] | None:
        """Per cell type (op weights, paths) from α, instead of softmax(α) (paths:
        the op indices each edge computes, or None for every op); or None."""
        return None

    def adjust_op_weights(self, model: nn.Module, weights: list[torch.Tensor], weight_step: bool
                          ) -> list[torch.Tensor]:
        """The op weights (per cell type, (edges, ops)) a forward uses, from
        those of softmax(α) or ``op_weights``: e.g. perturbed in the weight
        step, or with some ops removed. ``weight_step``: the search loop's
        weight step (training; not the architect's passes)."""
        return weights

    def before_weight_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Before the search loop's weight step on the batch (x, y), α frozen (after the
        architecture step, unless the run orders them the other way)."""

    def forward_extras(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors the method's edge terms read in a forward (device values, so nothing is baked in)."""
        return {}

    def network_epoch(self, model: nn.Module, seed: int, epoch: int, epochs: int | None,
                      stage_epoch: int | None) -> None:
        """Called before each epoch (0-based) of the run; ``stage_epoch`` of ``epochs``: its place in its stage."""

    # -- the loop ------------------------------------------------------------------
    def start_run(self, run: Any) -> None:
        """Once the run is set up (before a resume is loaded): e.g. a note for its log."""

    def start_epoch(self, run: Any, epoch: int, stage_epoch: int) -> dict[str, Any]:
        """Before an epoch's steps (after ``network_epoch``); returns figures for its metrics entry."""
        return {}

    def before_arch_update(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        """After the architecture gradients are set, before Adam steps; the value goes to ``after_arch_update``."""
        return None

    def after_arch_update(self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: Any) -> None:
        """After Adam's step on the architecture parameters."""

    def arch_loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the architecture step's loss (a regulariser of α), or None."""
        return None

    def epoch_figures(self, run: Any, entry: dict) -> dict[str, Any]:
        """Figures added to an epoch's metrics entry (after training and validation)."""
        return {}

    def stop_reason(self, run: Any, entry: dict) -> str | None:
        """Why the search (or its stage) stops after this epoch, or None."""
        return None

    def next_stage_edges(self, run: Any, alphas: dict, keep: int) -> dict:
        """The ops each edge of the next stage holds (the method that plans stages)."""
        raise NotImplementedError

    def epoch_log(self, run: Any, entry: dict) -> str | None:
        """A line for the epoch's log, or None."""
        return None

    def prepare_size_estimate(self, model: nn.Module) -> None:
        """Make a meta-device supernet runnable for the size estimate (no host reads of α)."""

    # -- derivation ----------------------------------------------------------------
    def op_strengths(self, model: nn.Module, cell: str, weights: torch.Tensor) -> torch.Tensor:
        """What ranks the ops of a cell type's edges (default: softmax(α), as given)."""
        return weights

    def select_cell(self, cell: str, weights: list[list[float]], edge_ops: Sequence[Sequence[str]],
                    steps: int) -> tuple | None:
        """The final cell derived from ``weights`` under the method's limits, or None (the core's choice)."""
        return None

    def describe_final(self, genotype: Any, unlimited: Any) -> str | None:
        """A note on how the final genotype differs from the unlimited derivation, or None."""
        return None

    def select_after_search(self, run: Any, genotype: Any) -> Any:
        """A selection procedure run after the search (on its supernet); returns the genotype."""
        return genotype


def _is_off(value: Any, off: Any) -> bool:
    return value is None or (type(value) is type(off) and value == off)


# -- the registry ---------------------------------------------------------------------
_METHODS: dict[str, type[SearchMethod]] = {}
PRESETS: dict[str, dict[str, Any]] = {}


def register_method(cls: type[SearchMethod]) -> type[SearchMethod]:
    """Class decorator: make a method known to the configuration, the CLI and the run."""
    if not cls.name:
        raise FastDartsError(f"{cls.__name__} needs a name")
    taken = {o.name for other in _METHODS.values() if other is not cls for o in other.options}
    clash = [o.name for o in cls.options if o.name in taken]
    if clash:
        raise FastDartsError(f"method {cls.name!r}: option(s) {', '.join(clash)} already exist")
    _METHODS[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Forget a registered method (and nothing else): e.g. a test's own."""
    _METHODS.pop(name, None)


def register_preset(name: str, settings: dict[str, Any]) -> None:
    """A ``--method`` preset: published settings (core fields and method options)."""
    PRESETS[name] = dict(settings)


def registered_methods() -> tuple[type[SearchMethod], ...]:
    return tuple(_METHODS.values())


def method_options() -> dict[str, Option]:
    """Every registered option by name, in registration order."""
    return {o.name: o for cls in _METHODS.values() for o in cls.options}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise FastDartsError(f"unknown method {name!r}; known methods: {', '.join(PRESETS)}")
    return PRESETS[name]


def methods_for(config: Any) -> tuple[SearchMethod, ...]:
    """One instance of each registered method the configuration switches on, in registration order."""
    return tuple(cls(config) for cls in _METHODS.values() if cls.active(config))


@dataclass
class OptionValues:
    """The method options of a network built without a ``SearchConfig``
    (``SearchNetwork(**options)``): each registered option, at its ``off`` value unless given."""
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = method_options()
        unknown = [k for k in self.values if k not in known]
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; registered: {', '.join(known) or 'none'}")
        self.values = {name: o.off if self.values.get(name) is None else self.values[name]
                       for name, o in known.items()}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def first(methods: Sequence[SearchMethod], hook: str, *args) -> Any:
    """The first non-None result of ``hook`` over ``methods``, or None."""
    for m in methods:
        value = getattr(m, hook)(*args)
        if value is not None:
            return value
    return None


def overrides(method: SearchMethod, hook: str) -> bool:
    """Whether ``method`` overrides ``hook`` (the core skips no-op hooks on hot paths)."""
    return getattr(type(method), hook) is not getattr(SearchMethod, hook)
