"""Search methods beyond DARTS, each a plug-in of the one core (SPEC §8, §12).

Each module here defines one method (a ``method.SearchMethod`` subclass,
registered on import) and imports the core only; the core calls its hooks
and never names it. A method's options are ``SearchConfig`` fields and CLI
flags; a paper's published settings form a preset (``--method``). A field
left ``None`` takes the preset's value; one given explicitly wins.

Registration order is the order in which an edge's terms apply and
hooks run: partial channels, edge normalisation, path sampling, P-DARTS'
progressive search, DARTS-' auxiliary skip, DARTS+' early stop, SDARTS' perturbation,
β-DARTS' Beta-Decay, FairDARTS' sigmoid, DARTS-PT's selection.
"""
from __future__ import annotations

from ..method import PRESETS, preset, register_preset
from ..search_config import DARTS_PRESET as _DARTS
from . import partial_channels, edge_norm, path_sampling, progressive, aux_skip, early_stop  # noqa: F401  (register)

# Xu et al., ICLR 2020 (yuhuixu1993/PC-DARTS, train_search.py): K=4, edge normalisation,
# batch 256, SGD lr 0.1 cosine to 0, Adam lr 6e-4 on α and β, first order, 15 warm-up epochs.
register_preset("pc-darts", dict(_DARTS, batch_size=256, lr=0.1, lr_min=0.0, arch_lr=6e-4, order="first",
                                 partial_channels=4, edge_norm=True, arch_warmup_epochs=15))
# PC-DARTS' search on ImageNet (yuhuixu1993/PC-DARTS, train_search_imagenet.py:24-45, 95-104, 123-129,
# 196-208; model_search_imagenet.py:34, 113-130): K=2, edge normalisation, the ImageNet stem (three
# stride-2 convolutions), 8 cells of C=16, batch 1024, SGD lr 0.5 cosine to 0, Adam lr 6e-3 (weight decay
# 1e-3, betas (0.5, 0.999)) on α with its gradient's norm clipped to 5, first order, no α step in the first
# 35 of 50 epochs; the weights on 10 % of each class, α on 2.5 % (the paper's subsets; the code reads them
# from prepared folders). Not reproduced: its 5-epoch linear warm-up of the weights' lr at batch > 256.
register_preset("pc-darts-imagenet", dict(_DARTS, batch_size=1024, lr=0.5, lr_min=0.0, arch_lr=6e-3,
                                          order="first", partial_channels=2, edge_norm=True,
                                          arch_warmup_epochs=35, arch_grad_clip=5.0, subset=0.1,
                                          stem="imagenet"))
# Cai et al., ICLR 2019 (mit-han-lab/proxylessnas, search/): two paths per edge, first order, Adam lr 1e-3
# with betas (0, 0.999) and no weight decay on α (imagenet_arch_search.py:80-84); DARTS' weight settings
# (their own are ImageNet's). Its schedule (nas_manager.py:71-76, 328-393): weights alone for
# warmup_epochs=40, then n_epochs=120 in which epoch 0 makes no α step and the others one α step after
# every 5th weight step (grad_update_arch_param_every=5, imagenet_arch_search.py:75, 37, 87), taken after
# that batch's weight step. Scaled to 50 epochs: 40/(40+120) of them, 12, weights alone, plus the first
# joint epoch: 13 epochs without α steps. (The original restarts its cosine learning rate after the
# warm-up; here one cosine spans the run.)
register_preset("proxyless", dict(_DARTS, order="first", sample_paths=2, arch_lr=1e-3, arch_weight_decay=0.0,
                                  arch_beta1=0.0, arch_warmup_epochs=13, arch_every=5, arch_after_weights=True))
# Chen et al., ICCV 2019 (chenxin061/pdarts, train_search.py): 3 stages of 25 epochs, 5, 11 and 17 cells
# holding 8, 5 and 3 ops per edge; batch 96, SGD lr 0.025 cosine to 0, Adam lr 6e-4, first order, no
# architecture step in the first 10 epochs of a stage; skip dropout 0.0, 0.4, 0.7; at most 2 skip
# connections in the final normal cell; the α gradient's norm clipped to 5 (its train() does). The skip
# dropout rates 0.0, 0.4, 0.7 are the paper's text (its CIFAR-10 search settings); its code differs in two
# ways: train_search.py:119-122 falls back to 0.0, 0.0, 0.0 when --dropout_rate is not given three times,
# and its README's search command (README.md:56-63) passes 0.1, 0.4, 0.7. Give --skip-dropout 0.1,0.4,0.7
# to run the README's command.
register_preset("p-darts", dict(_DARTS, batch_size=96, epochs=25, lr_min=0.0, arch_lr=6e-4, order="first",
                                arch_warmup_epochs=10, stages="5:8,11:5,17:3", skip_dropout="0.0,0.4,0.7",
                                max_skip=2, arch_grad_clip=5.0))

# Chu et al., ICLR 2021 (Meituan-AutoML/DARTS-): the auxiliary skip, decayed linearly over 50 epochs
# (src/search/args.py:82 decay_max_epoch; scripts/run_darts_minus.sh: --auxiliary_skip --decay linear
# --skip_beta 1), first order (args.py:38: --unrolled off, and the script does not set it); DARTS' other
# settings (args.py:28-37).
register_preset("darts-", dict(_DARTS, order="first", aux_skip=True, aux_skip_epochs=50))

# The methods whose module registers its own presets (after the ones above, so --help lists those first).
from . import sdarts, beta_decay, fair_darts, perturbation_selection  # noqa: E402, F401  (register)

METHOD_PRESETS = PRESETS  # the presets by name (darts, pc-darts, proxyless, p-darts, darts-, and any registered later)


def method_preset(name: str) -> dict:
    """A preset's settings; options it does not name are at their ``off`` values."""
    return preset(name)
