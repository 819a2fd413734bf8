"""Search methods beyond DARTS, as options of the one supernet and loop (SPEC §8).

Each method is a module here that the supernet, architect and search loop
call into (``partial_channels``, ``edge_norm``, ``path_sampling``,
``progressive``, ``early_stop``, ``aux_skip``); a
method's published settings form a preset (``--method``). A field left
``None`` in ``SearchConfig`` takes the method's value; one given explicitly
wins over the preset.
"""
from __future__ import annotations

from ..errors import FastDartsError

_DARTS = dict(
    batch_size=64, epochs=50, lr=0.025, lr_min=0.001, arch_lr=3e-4, arch_weight_decay=1e-3, arch_beta1=0.5,
    order="second",
    partial_channels=1, edge_norm=False, sample_paths=0, arch_warmup_epochs=0,
    stages=None, skip_dropout=None, max_skip=None, arch_grad_clip=None,
)

# The published CIFAR-10 search settings of each method.
METHOD_PRESETS: dict[str, dict] = {
    # Liu et al., ICLR 2019.
    "darts": _DARTS,
    # Xu et al., ICLR 2020 (yuhuixu1993/PC-DARTS, train_search.py): K=4, edge normalisation,
    # batch 256, SGD lr 0.1 cosine to 0, Adam lr 6e-4 on α and β, first order, 15 warm-up epochs.
    "pc-darts": dict(_DARTS, batch_size=256, lr=0.1, lr_min=0.0, arch_lr=6e-4, order="first",
                     partial_channels=4, edge_norm=True, arch_warmup_epochs=15),
    # Cai et al., ICLR 2019 (mit-han-lab/proxylessnas): two paths per edge, first order, Adam lr 1e-3 with
    # betas (0, 0.999) and no weight decay on α; DARTS' weight settings (their own are ImageNet's).
    "proxyless": dict(_DARTS, order="first", sample_paths=2, arch_lr=1e-3, arch_weight_decay=0.0, arch_beta1=0.0),
    # Chen et al., ICCV 2019 (chenxin061/pdarts, train_search.py): 3 stages of 25 epochs, 5, 11 and 17 cells
    # holding 8, 5 and 3 ops per edge; batch 96, SGD lr 0.025 cosine to 0, Adam lr 6e-4, first order, no
    # architecture step in the first 10 epochs of a stage; skip dropout 0.0, 0.4, 0.7; at most 2 skip
    # connections in the final normal cell; the α gradient's norm clipped to 5 (its train() does).
    "p-darts": dict(_DARTS, batch_size=96, epochs=25, lr_min=0.0, arch_lr=6e-4, order="first", arch_warmup_epochs=10,
                    stages="5:8,11:5,17:3", skip_dropout="0.0,0.4,0.7", max_skip=2, arch_grad_clip=5.0),
}


def method_preset(name: str) -> dict:
    if name not in METHOD_PRESETS:
        raise FastDartsError(f"unknown method {name!r}; known methods: {', '.join(METHOD_PRESETS)}")
    return METHOD_PRESETS[name]
