"""The DARTS supernet: cells whose every edge is a mixed operation (SPEC §1).

The methods beyond DARTS plug into this one network through their hooks
(``method.SearchMethod``): a mixed op of their own, terms added to an edge,
extra architecture parameters and per-edge scales, op weights computed from
α another way, and what ranks an op in the derivation. The network holds the
run's method instances (``methods``); built directly, it takes the methods'
options as keyword arguments (``SearchNetwork(**options)``).

Parameters are registered in the order of the original code's
``model_search.Network`` (stem, cells in order, each with its preprocessing
and then its edges, ops in op-set order, classifier), so weights copy across
positionally (``stem="imagenet"``: the ImageNet supernet of Xu et al.'s
``model_search_imagenet.py``, its ``stem0`` and ``stem1`` first). The architecture weights α are two
``nn.Parameter``s kept apart from the weights (``arch_parameters()`` /
``weight_parameters()``); being parameters, they are part of
``state_dict()`` and so of every checkpoint.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .edge_ops import check_edge_ops
from .errors import FastDartsError
from .fused_mixed_op import fused_preprocess
from .genotype import Genotype, derive_genotype, num_edges
from .layout import reduction_layout
from .method import OptionValues, SearchMethod, first, methods_for, overrides
from .mixed_op import DEFAULT_BACKEND, MixedOp, check_backend
from .ops import FactorizedReduce, ReLUConvBN, imagenet_stems, resolve_ops
from .recompute import check_recompute, recompute_cell, recompute_module

STEMS = ("cifar", "imagenet")


def check_stem(stem: Any) -> str:
    """``stem`` if it names a supernet stem (``SearchNetwork(stem=...)``), else a one-line error."""
    if stem not in STEMS:
        raise FastDartsError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
    return stem


class _ConcatNodes(torch.autograd.Function):
    """``torch.cat(states, dim=1)`` whose backward hands each state a
    gradient of its own. ``cat``'s backward gives channel slices of one
    buffer: a node whose gradient also comes from later edges then cannot
    sum in place (the sum is a new tensor), and the whole cell-output
    gradient stays alive until the last slice is dropped. Owned copies
    release it at once and sum in place. Same values (copies)."""

    @staticmethod
    def forward(ctx, *states: torch.Tensor) -> torch.Tensor:
        ctx.channels = [s.shape[1] for s in states]
        return torch.cat(states, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return tuple(g.contiguous() for g in grad.split(ctx.channels, dim=1))


def concat_nodes(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """A cell's output: its last nodes concatenated along the channels."""
    return _ConcatNodes.apply(*states)


class SearchCell(nn.Module):
    """A cell of the supernet: 2 inputs, ``steps`` intermediate nodes, the
    output concatenates the last ``multiplier`` of them. ``edge_ops``: the
    ops of every edge, or one list per edge; ``methods``: the run's methods
    (an edge of a method's own, terms on every edge)."""

    def __init__(self, edge_ops: Sequence[Sequence[str]], steps: int, multiplier: int, C_prev_prev: int,
                 C_prev: int, C: int, reduction: bool, reduction_prev: bool, backend: str,
                 methods: Sequence[SearchMethod] = ()):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        terms = [m for m in methods
                 if any(overrides(m, hook) for hook in ("attach_to_edge", "split_edge", "add_to_edge"))]

        def edge(stride: int, op_names: Sequence[str]) -> MixedOp:
            own = first(methods, "build_edge", C, stride, op_names, backend, terms)
            return own if own is not None else MixedOp(C, stride, op_names, backend, terms)

        pairs = [(i, j) for i in range(steps) for j in range(2 + i)]
        if edge_ops and isinstance(edge_ops[0], str):  # one op list for every edge
            edge_ops = [edge_ops] * len(pairs)
        self.edges = nn.ModuleList(edge(2 if reduction and j < 2 else 1, ops) for (i, j), ops in zip(pairs, edge_ops))

    @property
    def _fused(self) -> bool:
        return self.edges[0].backend == "fused"

    def _preprocess(self, module: nn.Module, s: torch.Tensor) -> torch.Tensor:
        if self._fused:
            # The preprocessing's ReLU and conv outputs are the largest
            # activations left once the edges keep none: recompute them too.
            return fused_preprocess(module, s)
        return module(s)

    def preprocess_ahead(self, s0: torch.Tensor) -> torch.Tensor:
        """``preprocess0(s0)`` keeping only ``s0`` for backward, for a caller
        that runs it ahead of the cell and passes ``s0_preprocessed=True``."""
        if self._fused:  # fused_preprocess keeps only its input already
            return self._preprocess(self.preprocess0, s0)
        return recompute_module(self.preprocess0, s0)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_scales: torch.Tensor | None = None, paths: tuple | None = None,
                extras: dict | None = None, s0_preprocessed: bool = False) -> torch.Tensor:
        """``weights``: one row of op weights per edge (with ``paths``, one per
        computed path); ``edge_scales``: a weight per edge; ``extras``: what
        the edge terms read; ``s0_preprocessed``: ``s0`` is ``preprocess_ahead``'s output."""
        states = [s0 if s0_preprocessed else self._preprocess(self.preprocess0, s0),
                  self._preprocess(self.preprocess1, s1)]
        offset = 0
        for _ in range(self.steps):
            s = sum(self.edges[offset + j](h, weights[offset + j], None if paths is None else paths[offset + j],
                                           None if edge_scales is None else edge_scales[offset + j], extras)
                    for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return concat_nodes(states[-self.multiplier:])


class SearchNetwork(nn.Module):
    """The supernet searched by DARTS.

    Args:
        C: channels of the first cell (the stem has ``stem_multiplier * C``).
        num_classes: classifier outputs.
        layers: number of cells, reductions at ``layers//3`` and ``2*layers//3``.
        layout: instead of ``layers``, an explicit string such as ``"N,R,N"``.
        ops: an op-set name (``darts``, ``extended``) or a list of op names.
        steps, multiplier: intermediate nodes per cell, and how many of the
            last ones the output concatenates.
        in_channels: image channels (3 for CIFAR-10, 1 for digits).
        backend: how mixed operations are evaluated (``mixed_op.MIXED_OP_BACKENDS``).
        recompute: ``"edge"`` (what the backend keeps for backward) or
            ``"cell"``: each cell keeps only its two inputs and rebuilds its
            node states in backward, the stem only the images
            (``recompute.py``); same results.
        stem: ``"cifar"`` (one 3x3 conv and BN, resolution kept: ``stem``)
            or ``"imagenet"``, the ImageNet search stem of Xu et al.'s
            ``model_search_imagenet.py`` (``stem0``, ``stem1``: three
            stride-2 3x3 convs, 224 -> 28; the first cell halves
            ``stem0``'s output; needs an even C; with ``recompute="cell"``
            each keeps only its input). ``stem_kind`` holds the choice.
        edge_ops: ``{"normal": [ops of edge 0, ...], "reduce": [...]}``, the
            ops each edge holds (``edge_ops.py``); None: every edge holds
            every op. α's columns follow each edge's list.
        methods: the run's method instances (``method.methods_for(config)``);
            None: those the keyword ``options`` switch on.
        options: the registered methods' options (their ``Option`` names).
    """

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int | None = 8, layout: str | None = None,
                 ops: str | Sequence[str] = "darts", steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3,
                 in_channels: int = 3, backend: str = DEFAULT_BACKEND, recompute: str = "edge",
                 edge_ops: dict[str, Sequence[Sequence[str]]] | None = None,
                 methods: Sequence[SearchMethod] | None = None, stem: str = "cifar", **options: Any):
        super().__init__()
        if methods is not None and options:
            raise TypeError("give the methods or their options, not both")
        self.methods = tuple(methods) if methods is not None else methods_for(OptionValues(options))
        self._in_weight_step = False  # set by ``weight_step()``
        self.recompute = check_recompute(recompute)
        self.stem_kind = check_stem(stem)
        for name, value in (("channels", C), ("num_classes", num_classes), ("steps", steps),
                            ("multiplier", multiplier), ("stem_multiplier", stem_multiplier),
                            ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FastDartsError(f"{name} must be a positive integer, got {value!r}")
        if multiplier > steps:
            raise FastDartsError(f"multiplier ({multiplier}) cannot exceed steps ({steps})")
        if stem == "imagenet" and C % 2:
            raise FastDartsError(f"the imagenet stem needs an even number of channels (the first cell halves the"
                                 f" stem's output with a FactorizedReduce), got {C}")
        self.op_names = resolve_ops(ops)
        self.edge_ops = check_edge_ops(edge_ops, self.op_names, num_edges(steps))
        check_backend(backend)
        for m in self.methods:
            m.check_network(self, C, backend)
        self.reductions = reduction_layout(None if layout is not None else layers, layout)
        self.steps, self.multiplier = steps, multiplier

        C_curr = stem_multiplier * C
        if stem == "imagenet":
            # As model_search_imagenet.py: 3C//2 then 3C channels, BN affine.
            self.stem0, self.stem1 = imagenet_stems(in_channels, C_curr)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
                nn.BatchNorm2d(C_curr),
            )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = stem == "imagenet"  # the first cell's s0 is twice s1's size
        for reduction in self.reductions:
            if reduction:
                C_curr *= 2
            self.cells.append(SearchCell(self.edge_ops["reduce" if reduction else "normal"], steps, multiplier,
                                         C_prev_prev, C_prev, C_curr, reduction, reduction_prev, backend,
                                         self.methods))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        # Created after the weights, as in the original code, so the same seed
        # gives the same initial weights and α.
        k, n = num_edges(steps), len(self.edge_ops["normal"][0])
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(k, n))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(k, n))
        # Then each method's architecture parameters (after α: the original codes draw them so).
        extra = [p for m in self.methods for p in m.setup_network(self)]
        names = {id(p): name for name, p in self.named_parameters()}
        self._method_arch = [names[id(p)] for p in extra]  # by name: a reload may swap the tensors

    # -- parameters ---------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """α (normal, reduce), then the methods' architecture parameters."""
        return [self.alpha_normal, self.alpha_reduce, *(self.get_parameter(n) for n in self._method_arch)]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    # -- backend ------------------------------------------------------------
    @property
    def backend(self) -> str:
        return next(m.backend for m in self.modules() if isinstance(m, MixedOp))

    def set_backend(self, backend: str) -> "SearchNetwork":
        check_backend(backend)
        for m in self.methods:
            m.check_network(self, None, backend)
        for m in self.modules():
            if isinstance(m, MixedOp):
                m.backend = backend
        return self

    # -- forward ------------------------------------------------------------
    @property
    def draws_random_numbers(self) -> bool:
        """Whether a forward pass draws from the random generators (an edge
        term in training), so that a repeat must restore them."""
        return self.training and any(isinstance(m, MixedOp) and m.draws_random_numbers for m in self.modules())

    def _cell_arguments(self, op_weights: dict[str, torch.Tensor] | None = None) -> tuple[tuple, tuple]:
        """The architecture arguments of a normal and of a reduction cell:
        (op weights, edge scales, paths, extras). ``op_weights`` given: those,
        and nothing else (a discrete sub-network)."""
        if op_weights is not None:
            return tuple((op_weights[cell].to(self.alpha_normal), None, None, None) for cell in ("normal", "reduce"))
        alphas = [self.alpha_normal, self.alpha_reduce]
        sampled = first(self.methods, "op_weights", self, alphas)
        if sampled is None:
            weights, paths = [F.softmax(a, dim=-1) for a in alphas], [None, None]
        else:
            weights, paths = zip(*sampled)
        weight_step = self._in_weight_step and self.training
        for m in self.methods:  # e.g. a perturbation of the weight step's op weights
            weights = m.adjust_op_weights(self, list(weights), weight_step)
        scales = first(self.methods, "edge_scales", self) or [None, None]
        extras: dict = {}
        for m in self.methods:
            extras.update(m.forward_extras(self))
        return tuple((w, s, p, extras or None) for w, s, p in zip(weights, scales, paths))

    def stem_states(self, x: torch.Tensor, recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The first cell's two inputs from the images ``x`` (``recompute``:
        each stem module keeping only its input for backward)."""
        def run(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
            return recompute_module(module, inp) if recompute else module(inp)

        if self.stem_kind == "imagenet":
            s0 = run(self.stem0, x)
            return s0, run(self.stem1, s0)
        s = run(self.stem, x)
        return s, s

    def forward(self, x: torch.Tensor, op_weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of ``x``. ``op_weights`` (``{"normal": (edges, ops), "reduce": ...}``)
        replace softmax(α), and the methods' edge scales, sampled paths and
        extras are off: e.g. ``genotype.genotype_op_weights`` scores an
        architecture as a discrete sub-network of the supernet (SPEC §9)."""
        arguments = self._cell_arguments(op_weights)
        cell_recompute = self.recompute == "cell" and torch.is_grad_enabled()
        s0, s1 = self.stem_states(x, cell_recompute)
        ahead = None  # the next cell's FactorizedReduce of s1, run before the cell (below)
        for i, cell in enumerate(self.cells):
            args = arguments[cell.reduction]
            if not cell_recompute:
                s0, s1 = s1, cell(s0, s1, *args)
                continue
            s0_ahead, ahead = ahead, None
            following = self.cells[i + 1] if i + 1 < len(self.cells) else None
            if following is not None and isinstance(following.preprocess0, FactorizedReduce):
                # The cell after a reduction cell halves s1 (this reduction cell's
                # input) with a FactorizedReduce. Run it now, before this cell:
                # autograd runs backward in reverse creation order, so its
                # backward, which makes a gradient of s1's full size, then comes
                # after this cell's backward instead of being held through it
                # (8 MiB at issue 3's setting, where that backward is the peak).
                ahead = following.preprocess_ahead(s1)
            s0, s1 = s1, recompute_cell(cell, s0 if s0_ahead is None else s0_ahead, s1, *args,
                                        s0_preprocessed=s0_ahead is not None)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x), y)

    # -- method hooks (search loop and architect) -------------------------------
    @contextlib.contextmanager
    def weight_step(self):
        """Inside: the search loop's weight step (its forward), which the
        methods' ``adjust_op_weights`` see as such (not the architect's passes)."""
        self._in_weight_step = True
        try:
            yield
        finally:
            self._in_weight_step = False

    def before_weight_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called by the search loop before the weight step's forward on (x, y), α frozen."""
        for m in self.methods:
            m.before_weight_step(self, x, y)

    def start_epoch(self, seed: int, epoch: int, epochs: int | None = None, stage_epoch: int | None = None) -> None:
        """Called by the search loop before each epoch (0-based) of the run;
        ``stage_epoch`` of ``epochs`` is its place in its stage (the
        schedules restart each stage), by default ``epoch``."""
        for m in self.methods:
            m.network_epoch(self, seed, epoch, epochs, stage_epoch)

    def before_arch_update(self, optimizer: torch.optim.Optimizer) -> list:
        """Called by the architect after the gradients are set, before Adam steps."""
        return [m.before_arch_update(self, optimizer) for m in self.methods]

    def after_arch_update(self, optimizer: torch.optim.Optimizer, saved: list) -> None:
        for m, kept in zip(self.methods, saved):
            m.after_arch_update(self, optimizer, kept)

    def arch_loss_terms(self) -> torch.Tensor | None:
        """The methods' terms added to the architecture step's loss (None: none)."""
        terms = [t for t in (m.arch_loss_term(self) for m in self.methods) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    @property
    def supports_second_order(self) -> bool:
        return not any(m.first_order_only(self) for m in self.methods)

    # -- architecture -------------------------------------------------------
    def op_strengths(self, cell: str) -> torch.Tensor:
        """What ranks the ops of ``cell``'s edges in the derivation (edges, ops), on the host, in α's
        precision: softmax(α), or what the methods make of it (e.g. σ(α), or weighted per edge)."""
        alpha = (self.alpha_normal if cell == "normal" else self.alpha_reduce).detach().cpu()
        weights = torch.softmax(alpha, dim=-1)
        for m in self.methods:
            weights = m.op_strengths(self, cell, weights)
        return weights

    def genotype(self, final: bool = False) -> Genotype:
        """The derived cells; ``final``: with the methods' limits on the final cells."""
        def strengths(cell: str, weights: torch.Tensor) -> torch.Tensor:
            for m in self.methods:
                weights = m.op_strengths(self, cell, weights)
            return weights

        def select(cell, weights, edge_ops, steps):
            return first(self.methods, "select_cell", cell, weights, edge_ops, steps) if final else None

        return derive_genotype(self.alpha_normal, self.alpha_reduce, self.op_names, self.steps, self.multiplier,
                               edge_ops=self.edge_ops, strengths=strengths if self.methods else None,
                               select_cell=select if final and self.methods else None)

    def alpha_weights(self) -> dict[str, list[list[float]]]:
        """softmax(α) of both cell types as plain lists (for logs and plots)."""
        return {name: F.softmax(a.detach().float(), dim=-1).cpu().tolist()
                for name, a in (("normal", self.alpha_normal), ("reduce", self.alpha_reduce))}

    def alpha_entropy(self) -> dict[str, float]:
        """Mean entropy (nats) of the per-edge op distributions; ln|O| at the
        start, falling as the search commits to ops."""
        out = {}
        for name, a in (("normal", self.alpha_normal), ("reduce", self.alpha_reduce)):
            logp = F.log_softmax(a.detach().float(), dim=-1)
            out[name] = float(-(logp.exp() * logp).sum(-1).mean())
        return out


def build_supernet(config: Any, dataset: Any, device: torch.device | str, layout: str | None = None,
                   edge_ops: dict | None = None, methods: Sequence[SearchMethod] | None = None,
                   stem: str | None = None) -> SearchNetwork:
    """The supernet a (``checked()``) ``SearchConfig`` searches on ``dataset``;
    ``layout`` and ``edge_ops``: a stage's cells and the ops its edges hold;
    ``methods``: the run's method instances (None: new ones for ``config``);
    ``stem``: ``SearchNetwork``'s (None: the config's ``stem``, else "cifar")."""
    return SearchNetwork(
        C=config.channels, num_classes=dataset.num_classes,
        layers=None, layout=layout or config.layout, ops=config.ops.split(","),
        steps=config.steps, multiplier=config.multiplier, in_channels=dataset.in_channels,
        backend=config.backend, recompute=config.recompute, edge_ops=edge_ops,
        methods=methods_for(config) if methods is None else methods,
        stem=(getattr(config, "stem", None) or "cifar") if stem is None else stem).to(device)
