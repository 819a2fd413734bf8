"""The networks trained from scratch from a genotype (SPEC §4).

``NetworkCIFAR`` stacks L cells built from a genotype's discrete normal and
reduction cells (reductions at L//3 and 2L//3, BN affine), an auxiliary head
after the cell at 2/3 depth (used only in training), global average pooling
and a linear classifier. ``NetworkImageNet`` is the same body behind the
original's ImageNet stem (three stride-2 3x3 convs: 224 -> 28 before the
first cell) with the original's ImageNet auxiliary head. Drop path zeroes
whole op outputs per sample during training, on every op but the identity.

Module names follow the original DARTS code's ``NetworkCIFAR`` /
``NetworkImageNet`` (``stem`` or ``stem0``/``stem1``,
``cells.k.preprocess0/preprocess1/_ops``, ``auxiliary_head.features`` /
``.classifier``, ``global_pooling``, ``classifier``; inside the ops the names
of ``ops.py``), so a state_dict saved by the original code for the same
genotype loads by name (see ``evaluate.load_original_darts_state_dict`` for
the few container-level differences). Like the original, ``forward`` returns
``(logits, logits_aux)`` with ``logits_aux`` None outside training.

A network's ``spec()`` (what a weights file stores to rebuild it) names its
``kind`` ("cifar" or "imagenet"); ``network_from_spec`` rebuilds either, a
spec without a kind (files written before there were two) being "cifar".
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import FastDartsError
from .genotype import Genotype
from .layout import reduction_layout
from .ops import OPS, FactorizedReduce, Identity, ReLUConvBN, imagenet_stems


def drop_path(x: torch.Tensor, drop_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each sample's ``x`` with probability ``drop_prob``, scale the kept
    ones by ``1/(1 - drop_prob)`` so the expectation is unchanged (the original
    DARTS ``utils.drop_path``, out of place). The Bernoulli mask is drawn from
    ``generator`` (on x's device) when given, so a training run can replay
    an epoch's masks exactly from its seed."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    mask.bernoulli_(keep, generator=generator)
    return x / keep * mask


class Cell(nn.Module):
    """One cell of a genotype: the two inputs preprocessed to C channels, each
    intermediate node the sum of its two kept ops, the output the concatenation
    of the genotype's concat nodes."""

    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=True)
        edges = genotype.reduce if reduction else genotype.normal
        self._concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self._indices = tuple(index for _, index in edges)
        self._steps = len(edges) // 2
        self.multiplier = len(self._concat)
        # Only the edges leaving the cell inputs are strided in a reduction cell.
        self._ops = nn.ModuleList(OPS[name](C, 2 if reduction and index < 2 else 1, True) for name, index in edges)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            node = 0
            for k in (2 * i, 2 * i + 1):
                op = self._ops[k]
                h = op(states[self._indices[k]])
                # The identity carries the signal unchanged: DARTS never drops it.
                if self.training and drop_prob > 0.0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob, generator)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self._concat], dim=1)


def _reduced(size: int) -> int:
    """Spatial size after a stride-2 op of the cells (3x3 pad 1, 5x5 pad 2, 1x1: all ceil(size/2))."""
    return (size + 1) // 2


class AuxiliaryHead(nn.Module):
    """The auxiliary classifier of the original ``AuxiliaryHeadCIFAR``: ReLU,
    5x5 average pool stride 3 (8x8 -> 2x2), 1x1 conv to 128, BN, ReLU, 2x2
    conv to 768, BN, ReLU, linear. On maps where that pool does not give 2x2
    (digits' 2x2 maps) the pool is an adaptive one to 2x2 instead; it has no
    parameters, so the state_dict names are the same either way."""

    def __init__(self, C: int, num_classes: int, size: int = 8):
        super().__init__()
        if size >= 5 and (size - 5) // 3 + 1 == 2:
            pool: nn.Module = nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
        else:
            pool = nn.AdaptiveAvgPool2d(2)
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            pool,
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AuxiliaryHeadImageNet(nn.Module):
    """The auxiliary classifier of the original ``AuxiliaryHeadImageNet`` as
    at the original's HEAD: ReLU, 5x5 average pool stride 2 (7x7 -> 2x2),
    1x1 conv to 128, BN, ReLU, 2x2 conv to 768, ReLU, linear. The original's
    first release had a BatchNorm after the 2x2 conv; its HEAD comments it
    out ("omitted in my earlier implementation due to a typo", kept out "for
    consistency with the experiments in the paper"), so there is none here
    either and the state_dict names (``features.2/3/5``) are HEAD's. Where
    that pool does not give 2x2 (maps other than 7x7 or 8x8: inputs other
    than 193 to 256) the pool is an adaptive one to 2x2; it has no
    parameters, so the names are the same either way."""

    def __init__(self, C: int, num_classes: int, size: int = 7):
        super().__init__()
        if size >= 5 and (size - 5) // 2 + 1 == 2:
            pool: nn.Module = nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False)
        else:
            pool = nn.AdaptiveAvgPool2d(2)
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            pool,
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class GenotypeNetwork(nn.Module):
    """What the two networks share: the checked constructor arguments and
    their ``spec()``, the cells with the auxiliary head, pooling and
    classifier after the stem, and the forward. A subclass builds its stem
    and then calls ``_build_body`` (modules created in the original's order,
    so the same seed gives the same initial weights), and says in ``_stem``
    what its stem gives the first cell."""

    KIND = ""
    SPEC_KEYS = ("genotype", "channels", "num_classes", "layers", "auxiliary", "in_channels", "image_size")

    def __init__(self, genotype: Genotype, C: int, num_classes: int, layers: int, auxiliary: bool,
                 in_channels: int, image_size: int):
        super().__init__()
        if not isinstance(genotype, Genotype):
            raise FastDartsError(f"{type(self).__name__} needs a Genotype, got {type(genotype).__name__}")
        for name, value in (("channels", C), ("num_classes", num_classes), ("layers", layers),
                            ("in_channels", in_channels), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FastDartsError(f"{name} must be a positive integer, got {value!r}")
        self.genotype = genotype
        self._spec = dict(kind=self.KIND, genotype=genotype.to_dict(), channels=C, num_classes=num_classes,
                          layers=layers, auxiliary=bool(auxiliary), in_channels=in_channels, image_size=image_size)
        self._auxiliary = bool(auxiliary)
        self._auxiliary_index = 2 * layers // 3
        self.drop_path_prob = 0.0
        self.drop_path_generator: torch.Generator | None = None

    def _build_body(self, C: int, C_stem: int, size: int, reduction_prev: bool) -> None:
        """The cells after a stem of ``C_stem`` channels at ``size`` (its second
        output's; ``reduction_prev``: its first output is twice that size),
        then the auxiliary head, the pooling and the classifier."""
        genotype, num_classes = self.genotype, self._spec["num_classes"]
        C_prev_prev, C_prev, C_curr = C_stem, C_stem, C
        self.cells = nn.ModuleList()
        C_aux = size_aux = None
        for i, reduction in enumerate(reduction_layout(self._spec["layers"])):
            if reduction:
                C_curr *= 2
                size = _reduced(size)
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self._auxiliary_index:
                C_aux, size_aux = C_prev, size
        if self._auxiliary:
            self.auxiliary_head = self._auxiliary_head(C_aux, num_classes, size_aux)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def _auxiliary_head(self, C: int, num_classes: int, size: int) -> nn.Module:
        raise NotImplementedError

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first cell's two inputs."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The constructor arguments as plain data (genotype as a dict) and the
        network's ``kind``: what a weights file stores so that it can rebuild
        this network (``network_from_spec``)."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._spec.items()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "GenotypeNetwork":
        """The network ``spec()`` describes; a malformed spec (not a dict, a
        key missing, a value of the wrong type, another kind of network) is a
        one-line FastDartsError. A spec without a kind is a CIFAR network's."""
        if not isinstance(spec, dict):
            raise FastDartsError(f"a network spec must be a dict, got {type(spec).__name__}")
        kind = spec.get("kind", "cifar")
        if kind != cls.KIND:
            raise FastDartsError(f"network spec: kind {kind!r} is not a {cls.__name__} ({cls.KIND!r});"
                                 f" rebuild it with network_from_spec")
        missing = [k for k in cls.SPEC_KEYS if k not in spec]
        if missing:
            raise FastDartsError(f"network spec lacks {', '.join(missing)}")
        if not isinstance(spec["auxiliary"], bool):
            raise FastDartsError(f"network spec: auxiliary must be true or false, got {spec['auxiliary']!r}")
        return cls(Genotype.from_dict(spec["genotype"]), C=spec["channels"], num_classes=spec["num_classes"],
                   layers=spec["layers"], auxiliary=spec["auxiliary"], in_channels=spec["in_channels"],
                   image_size=spec["image_size"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_aux = None
        drop_prob = self.drop_path_prob if self.training else 0.0
        s0, s1 = self._stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop_prob, self.drop_path_generator)
            if i == self._auxiliary_index and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1)), logits_aux


class NetworkCIFAR(GenotypeNetwork):
    """The evaluation network of a genotype on small images (CIFAR's 32x32).

    Args:
        genotype: the discrete cells.
        C: channels of the first cells (the stem has ``3 * C``); the paper's 36.
        num_classes: classifier outputs.
        layers: number of cells, reductions at ``layers//3`` and ``2*layers//3``; the paper's 20.
        auxiliary: build the auxiliary head after cell ``2*layers//3``.
        in_channels: image channels (3 for CIFAR-10, 1 for digits).
        image_size: input height = width; only decides the auxiliary head's pooling.

    ``drop_path_prob`` (attribute, 0 at construction) is the probability used in
    training; ``drop_path_generator`` (None: the global generator) is where its
    masks come from. The training loop sets both at the start of each epoch.
    """

    KIND = "cifar"

    def __init__(self, genotype: Genotype, C: int = 36, num_classes: int = 10, layers: int = 20,
                 auxiliary: bool = True, in_channels: int = 3, image_size: int = 32):
        super().__init__(genotype, C, num_classes, layers, auxiliary, in_channels, image_size)
        C_stem = 3 * C
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_stem),
        )
        self._build_body(C, C_stem, image_size, reduction_prev=False)

    def _auxiliary_head(self, C: int, num_classes: int, size: int) -> nn.Module:
        return AuxiliaryHead(C, num_classes, size)

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stem(x)
        return s, s


class NetworkImageNet(GenotypeNetwork):
    """The evaluation network of a genotype on ImageNet-sized images (the
    original's ``NetworkImageNet``; the paper's mobile setting is C=48, 14
    cells, 224x224: 4.7 M parameters).

    The stem halves the resolution three times (224 -> 112 -> 56 -> 28):
    ``stem0`` (3x3 stride-2 conv to C/2, BN, ReLU, 3x3 stride-2 conv to C,
    BN) gives the first cell's first input at 56x56, ``stem1`` (ReLU, 3x3
    stride-2 conv, BN) its second at 28x28, so the first cell halves its
    first input (``reduction_prev``). Same arguments, attributes and
    ``forward`` as ``NetworkCIFAR``; ``image_size`` decides the auxiliary
    head's pooling. The original's global pooling, ``AvgPool2d(7)``, works
    only at 224 (a 7x7 last map); this one is adaptive, the same mean of the
    7x7 map at 224 and the mean of whatever map other sizes give.
    """

    KIND = "imagenet"

    def __init__(self, genotype: Genotype, C: int = 48, num_classes: int = 1000, layers: int = 14,
                 auxiliary: bool = True, in_channels: int = 3, image_size: int = 224):
        super().__init__(genotype, C, num_classes, layers, auxiliary, in_channels, image_size)
        if C % 2:
            raise FastDartsError(f"NetworkImageNet needs an even number of channels (its first cell halves the"
                                 f" stem's output with a FactorizedReduce), got {C}")
        self.stem0, self.stem1 = imagenet_stems(in_channels, C)
        self._build_body(C, C, _reduced(_reduced(_reduced(image_size))), reduction_prev=True)

    def _auxiliary_head(self, C: int, num_classes: int, size: int) -> nn.Module:
        return AuxiliaryHeadImageNet(C, num_classes, size)

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


NETWORKS: dict[str, type[GenotypeNetwork]] = {"cifar": NetworkCIFAR, "imagenet": NetworkImageNet}


def _check_kind(kind: Any) -> type[GenotypeNetwork]:
    if not isinstance(kind, str) or kind not in NETWORKS:
        raise FastDartsError(f"unknown network kind {kind!r}; known: {', '.join(NETWORKS)}")
    return NETWORKS[kind]


def build_network(kind: str, genotype: Genotype, **kwargs: Any) -> GenotypeNetwork:
    """The ``kind`` network ("cifar": ``NetworkCIFAR``, "imagenet":
    ``NetworkImageNet``) of ``genotype``, with that class's keyword arguments."""
    return _check_kind(kind)(genotype, **kwargs)


def network_from_spec(spec: dict[str, Any]) -> GenotypeNetwork:
    """The network a ``spec()`` describes, of its ``kind`` (none: "cifar",
    as files written before the kind was stored); an unknown kind or a
    malformed spec is a one-line FastDartsError."""
    if not isinstance(spec, dict):
        raise FastDartsError(f"a network spec must be a dict, got {type(spec).__name__}")
    kind = spec.get("kind", "cifar")
    if not isinstance(kind, str) or kind not in NETWORKS:
        raise FastDartsError(f"network spec: unknown network kind {kind!r}; known: {', '.join(NETWORKS)}")
    return NETWORKS[kind].from_spec(spec)


def count_parameters(model: nn.Module, auxiliary: bool = False) -> int:
    """Number of parameters; without the auxiliary head by default, as the
    paper's 3.3 M (the original ``count_parameters_in_MB`` skips every name
    containing "auxiliary"): the head is dropped after training."""
    return sum(p.numel() for name, p in model.named_parameters() if auxiliary or "auxiliary" not in name)
