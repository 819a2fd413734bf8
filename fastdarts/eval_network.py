"""The network trained from scratch from a genotype (SPEC §4).

``NetworkCIFAR`` stacks L cells built from a genotype's discrete normal and
reduction cells (reductions at L//3 and 2L//3, BN affine), an auxiliary head
after the cell at 2/3 depth (used only in training), global average pooling
and a linear classifier. Drop path zeroes whole op outputs per sample during
training, on every op but the identity.

Module names follow the original DARTS code's ``NetworkCIFAR`` (``stem``,
``cells.k.preprocess0/preprocess1/_ops``, ``auxiliary_head.features`` /
``.classifier``, ``global_pooling``, ``classifier``; inside the ops the names
of ``ops.py``), so a state_dict saved by the original code for the same
genotype loads by name (see ``evaluate.load_original_darts_state_dict`` for
the few container-level differences). Like the original, ``forward`` returns
``(logits, logits_aux)`` with ``logits_aux`` None outside training.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import FastDartsError
from .genotype import Genotype
from .layout import reduction_layout
from .ops import OPS, FactorizedReduce, Identity, ReLUConvBN


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


class NetworkCIFAR(nn.Module):
    """The evaluation network of a genotype.

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

    def __init__(self, genotype: Genotype, C: int = 36, num_classes: int = 10, layers: int = 20,
                 auxiliary: bool = True, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        if not isinstance(genotype, Genotype):
            raise FastDartsError(f"NetworkCIFAR needs a Genotype, got {type(genotype).__name__}")
        for name, value in (("channels", C), ("num_classes", num_classes), ("layers", layers),
                            ("in_channels", in_channels), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FastDartsError(f"{name} must be a positive integer, got {value!r}")
        self.genotype = genotype
        self._spec = dict(genotype=genotype.to_dict(), channels=C, num_classes=num_classes, layers=layers,
                          auxiliary=bool(auxiliary), in_channels=in_channels, image_size=image_size)
        self._auxiliary = bool(auxiliary)
        self._auxiliary_index = 2 * layers // 3
        self.drop_path_prob = 0.0
        self.drop_path_generator: torch.Generator | None = None

        C_curr = 3 * C
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        size = image_size
        self.cells = nn.ModuleList()
        reduction_prev = False
        C_aux = size_aux = None
        for i, reduction in enumerate(reduction_layout(layers)):
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
            self.auxiliary_head = AuxiliaryHead(C_aux, num_classes, size_aux)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def spec(self) -> dict[str, Any]:
        """The constructor arguments as plain data (genotype as a dict): what a
        weights file stores so that it can rebuild this network."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._spec.items()}

    SPEC_KEYS = ("genotype", "channels", "num_classes", "layers", "auxiliary", "in_channels", "image_size")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "NetworkCIFAR":
        """The network ``spec()`` describes; a malformed spec (not a dict, a
        key missing, a value of the wrong type) is a one-line FastDartsError."""
        if not isinstance(spec, dict):
            raise FastDartsError(f"a network spec must be a dict, got {type(spec).__name__}")
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
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop_prob, self.drop_path_generator)
            if i == self._auxiliary_index and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1)), logits_aux


def count_parameters(model: nn.Module, auxiliary: bool = False) -> int:
    """Number of parameters; without the auxiliary head by default, as the
    paper's 3.3 M (the original ``count_parameters_in_MB`` skips every name
    containing "auxiliary"): the head is dropped after training."""
    return sum(p.numel() for name, p in model.named_parameters() if auxiliary or "auxiliary" not in name)
