"""Class-balanced subsets of a labelled set: the same fraction of every class.

The published ImageNet search uses 10 % of each class's training images for
the weights and another, disjoint 2.5 % for the architecture parameters::

    weights = class_balanced_subset(labels, 0.1, seed=seed)
    alphas = class_balanced_subset(labels, 0.025, seed=seed, exclude=weights)

Generic over any integer labels (a folder's file list, an in-memory
``ImageSet``'s tensor). Each class's choice is a seeded permutation of its
indices (numpy's SeedSequence of (seed, class)), so it depends on nothing but
the labels, the seed and the class, not on the other classes.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import FastDartsError


def class_balanced_subset(labels: Sequence[int] | np.ndarray | torch.Tensor, fraction: float, *, seed: int,
                          exclude: Iterable[int] | None = None) -> list[int]:
    """Sorted indices: from each class with c members, ``round(fraction * c)`` (half up) but at least 1,
    drawn from its indices not in ``exclude``."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise FastDartsError(f"labels of shape {labels.shape} ({labels.dtype}) are not one integer per image")
    if not 0.0 < fraction <= 1.0:
        raise FastDartsError(f"subset fraction {fraction} is outside (0, 1]: pass a fraction such as 0.1")
    excluded = np.zeros(len(labels), dtype=bool)
    if exclude is not None:
        exclude = np.asarray(list(exclude), dtype=np.int64)
        if exclude.size and (exclude.min() < 0 or exclude.max() >= len(labels)):
            raise FastDartsError(f"excluded indices must lie in [0, {len(labels)}): got {int(exclude.min())}.."
                                 f"{int(exclude.max())}")
        excluded[exclude] = True
    chosen = []
    for label in np.unique(labels).tolist():
        members = np.flatnonzero(labels == label)
        take = max(1, math.floor(fraction * len(members) + 0.5))
        free = members[~excluded[members]]
        if len(free) < take:
            raise FastDartsError(f"class {label} has {len(members)} images, {len(members) - len(free)} of them "
                                 f"excluded: too few left for {take} more; lower the fractions")
        rng = np.random.default_rng((seed % 2**64, label % 2**64))
        chosen.append(rng.permutation(free)[:take])
    return sorted(np.concatenate(chosen).tolist()) if chosen else []
