"""How big a trained network is: parameters and multiply-adds per image.

The two figures papers give for a network. Parameters follow the original
DARTS ``count_parameters_in_MB`` (``eval_network.count_parameters``: the
auxiliary head, dropped after training, not counted). Multiply-adds follow
the convention behind DARTS' "574M multiply-adds" for its ImageNet network
(the mobile setting: under 600 M at 224x224): one image's forward in eval
mode, counting each ``nn.Conv2d`` as output elements × (input channels /
groups) × kernel height × kernel width and each ``nn.Linear`` as input
features × output features per row. BatchNorm, pooling, ReLU, additions,
concatenations and biases are not counted; the auxiliary head is not run in
eval mode, so it is not counted either. The counts are taken with forward
hooks on the modules, so they cover every conv and linear a network runs
through those modules (the evaluation networks; not the fused supernet
kernels, which call no ``nn.Conv2d``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .eval_network import count_parameters


def count_multiply_adds(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of ``model``'s forward of one image of ``input_shape``
    (channels, height, width) in eval mode, by the convention above. The
    model's training mode is restored; its weights and statistics are not
    changed (a no-grad eval forward of zeros)."""
    total = 0

    def conv(module: nn.Conv2d, inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear(module: nn.Linear, inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += (output.numel() // module.out_features) * module.in_features * module.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    reference = next(model.parameters(), None)
    x = torch.zeros((1, *input_shape), device=None if reference is None else reference.device,
                    dtype=None if reference is None else reference.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


def _millions(n: int) -> str:
    """Three significant figures (4.70, 46.7, 0.0113), whole millions from 100 on (574, 1234)."""
    m = n / 1e6
    return f"{m:.0f}" if m >= 99.5 else f"{m:#.3g}"


def describe_size(model: nn.Module, input_shape: Sequence[int]) -> str:
    """One line for a log: "4.72 M parameters (5.98 M with the auxiliary
    head), 574 M multiply-adds at 3x224x224" (no parenthesis when the
    network has no auxiliary head)."""
    params, with_aux = count_parameters(model), count_parameters(model, auxiliary=True)
    aux = f" ({_millions(with_aux)} M with the auxiliary head)" if with_aux != params else ""
    shape = "x".join(str(int(d)) for d in input_shape)
    return (f"{_millions(params)} M parameters{aux}, "
            f"{_millions(count_multiply_adds(model, input_shape))} M multiply-adds at {shape}")
