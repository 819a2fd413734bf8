"""Search methods beyond DARTS, as options of the one supernet and loop (SPEC §8).

Each method is a module here that the supernet, architect and search loop
call into (``partial_channels``, ``edge_norm``, ``path_sampling``); a
method's published settings form a preset (``--method``). A field left
``None`` in ``SearchConfig`` takes the method's value; one given explicitly
wins over the preset.
"""
from __future__ import annotations

from ..errors import FastDartsError

_DARTS = dict(
    batch_size=64, epochs=50, lr=0.025, lr_min=0.001, arch_lr=3e-4, arch_weight_decay=1e-3, order="second",
    partial_channels=1, edge_norm=False, sample_paths=0, arch_warmup_epochs=0,
)

# The published CIFAR-10 search settings of each method.
METHOD_PRESETS: dict[str, dict] = {
    # Liu et al., ICLR 2019.
    "darts": _DARTS,
    # Xu et al., ICLR 2020 (yuhuixu1993/PC-DARTS, train_search.py): K=4, edge normalisation,
    # batch 256, SGD lr 0.1 cosine to 0, Adam lr 6e-4 on α and β, first order, 15 warm-up epochs.
    "pc-darts": dict(_DARTS, batch_size=256, lr=0.1, lr_min=0.0, arch_lr=6e-4, order="first",
                     partial_channels=4, edge_norm=True, arch_warmup_epochs=15),
    # Cai et al., ICLR 2019 (mit-han-lab/proxylessnas): two paths per edge, first order, Adam lr 1e-3
    # without weight decay on α; DARTS' weight settings (their own are ImageNet's).
    "proxyless": dict(_DARTS, order="first", sample_paths=2, arch_lr=1e-3, arch_weight_decay=0.0),
}


def method_preset(name: str) -> dict:
    if name not in METHOD_PRESETS:
        raise FastDartsError(f"unknown method {name!r}; known methods: {', '.join(METHOD_PRESETS)}")
    return METHOD_PRESETS[name]
