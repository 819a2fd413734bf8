import re

import pytest
import torch

from fastdarts import FastDartsError, SearchNetwork, reduction_layout
from fastdarts.supernet import SearchCell, num_edges
from helpers import tiny_net


def test_reduction_layout():
    assert reduction_layout(layers=8) == (False, False, True, False, False, True, False, False)
    assert reduction_layout(layers=5) == (False, True, False, True, False)
    assert reduction_layout(layout="N,R,N") == (False, True, False)
    assert reduction_layout(layout=" n , reduce,N ") == (False, True, False)


@pytest.mark.parametrize("kw, needle", [
    (dict(layout="N,X,N"), "malformed layout 'N,X,N'"),
    (dict(layout="N,,R"), "malformed layout"),
    (dict(layout=""), "malformed layout"),
    (dict(layers=0), "layers must be a positive integer"),
    (dict(layers=3, layout="N"), "not both"),
])
def test_bad_layouts(kw, needle):
    with pytest.raises(FastDartsError, match=needle):
        reduction_layout(**kw)


@pytest.mark.parametrize("reduction, reduction_prev", [(False, False), (True, False), (False, True)])
def test_cell_shapes(reduction, reduction_prev):
    C_pp, C_p, C = 12, 10, 4
    cell = SearchCell(("none", "skip_connect", "sep_conv_3x3"), steps=3, multiplier=2, C_prev_prev=C_pp,
                      C_prev=C_p, C=C, reduction=reduction, reduction_prev=reduction_prev, backend="reference")
    hw = 8
    s0 = torch.randn(2, C_pp, hw * 2 if reduction_prev else hw, hw * 2 if reduction_prev else hw)
    s1 = torch.randn(2, C_p, hw, hw)
    weights = torch.softmax(torch.randn(num_edges(3), 3), -1)
    out = cell(s0, s1, weights)
    out_hw = hw // 2 if reduction else hw
    assert out.shape == (2, 2 * C, out_hw, out_hw)
    assert len(cell.edges) == 2 + 3 + 4
    strides = [e.stride for e in cell.edges]
    # On reduction cells only the edges leaving the two input nodes are strided.
    expected = [2 if reduction and j < 2 else 1 for i in range(3) for j in range(2 + i)]
    assert strides == expected


@pytest.mark.parametrize("kw, channels", [
    (dict(layers=8), [64, 64, 128, 128, 128, 256, 256, 256]),
    (dict(layers=None, layout="N,R,N"), [64, 128, 128]),
])
def test_network_shapes(kw, channels):
    net = SearchNetwork(C=16, num_classes=10, **kw)
    x = torch.randn(2, 3, 32, 32)
    feats, s0 = [], net.stem(x)
    s1 = s0
    for cell in net.cells:
        s0, s1 = s1, cell(s0, s1, torch.softmax(net.alpha_reduce if cell.reduction else net.alpha_normal, -1))
        feats.append(s1.shape)
    assert [f[1] for f in feats] == channels
    assert net(x).shape == (2, 10)
    assert net.alpha_normal.shape == net.alpha_reduce.shape == (14, 8)


def test_alpha_kept_apart_and_saved():
    net = tiny_net()
    arch, weights = net.arch_parameters(), net.weight_parameters()
    assert [a.shape for a in arch] == [(5, 8), (5, 8)]
    assert not {id(p) for p in arch} & {id(p) for p in weights}
    assert len(arch) + len(weights) == len(list(net.parameters()))
    state = net.state_dict()
    assert torch.equal(state["alpha_normal"], net.alpha_normal.detach())
    assert torch.equal(state["alpha_reduce"], net.alpha_reduce.detach())
    # α starts near zero (1e-3 * randn), i.e. every op equally weighted.
    assert 0 < net.alpha_normal.abs().max() < 1e-2


def test_weight_parameters_follow_the_reference_registration_order():
    net = tiny_net()
    names = [n for n, _ in net.named_parameters() if not n.startswith("alpha")]
    assert [p.data_ptr() for p in net.weight_parameters()] == [dict(net.named_parameters())[n].data_ptr()
                                                                for n in names]

    def rank(name):  # stem, then per cell: preprocess0, preprocess1, edges in order, ops in op-set order; classifier
        if name.startswith("stem."):
            return (0,)
        if name.startswith("classifier."):
            return (2,)
        m = re.match(r"cells\.(\d+)\.(preprocess0|preprocess1|edges\.(\d+)\.ops\.(\d+))\.", name)
        assert m, name
        cell, part = int(m.group(1)), m.group(2)
        if part.startswith("preprocess"):
            return (1, cell, int(part[-1]))
        return (1, cell, 2, int(m.group(3)), int(m.group(4)))

    ranks = [rank(n) for n in names]
    assert ranks == sorted(ranks)
    assert names[0] == "stem.0.weight" and names[-1] == "classifier.bias"


def test_odd_channels_work():
    # FactorizedReduce halves its channels, but it only ever sees the doubled C of a reduction.
    assert tiny_net(C=5)(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_same_seed_same_network():
    torch.manual_seed(3)
    a = tiny_net()
    torch.manual_seed(3)
    b = tiny_net()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_genotype_and_alpha_summaries():
    net = tiny_net()
    with torch.no_grad():
        net.alpha_normal.zero_()
        net.alpha_normal[:, net.op_names.index("sep_conv_3x3")] = 5.0
    g = net.genotype()
    assert all(op == "sep_conv_3x3" for op, _ in g.normal)
    entropy = net.alpha_entropy()
    assert entropy["normal"] < entropy["reduce"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
    weights = net.alpha_weights()
    assert len(weights["normal"]) == 5 and abs(sum(weights["normal"][0]) - 1) < 1e-6


@pytest.mark.parametrize("kw, needle", [
    (dict(C=0), "channels must be a positive integer"),
    (dict(ops="darts,conv_9x9"), "unknown op 'conv_9x9'"),
    (dict(backend="fast"), "unknown backend 'fast'; known backends: reference, checkpoint"),
    (dict(multiplier=3), "multiplier"),
])
def test_bad_network_arguments(kw, needle):
    with pytest.raises(FastDartsError, match=needle):
        tiny_net(**kw)


def test_the_cell_output_gives_each_node_a_gradient_of_its_own():
    from fastdarts.supernet import concat_nodes

    torch.manual_seed(5)
    states = [torch.randn(3, c, 5, 7, requires_grad=True) for c in (2, 4, 1)]
    grad = torch.randn(3, 7, 5, 7)
    ours = torch.autograd.grad(concat_nodes(states), states, grad)
    cats = torch.autograd.grad(torch.cat(states, dim=1), states, grad)
    assert torch.equal(concat_nodes(states), torch.cat(states, dim=1))
    for g, c in zip(ours, cats):
        assert torch.equal(g, c)
        assert c._base is not None  # cat's: a slice of one buffer, which it keeps alive
        assert g._base is None and g.is_contiguous()  # ours: owned, so later edges sum into it in place
    # Differentiable twice (the reference backend's create_graph=True).
    x = states[0]
    (g,) = torch.autograd.grad((concat_nodes([x * x, states[1]]) * grad[:, :6]).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, 2 * grad[:, :2])


# ---------------------------------------------------------------- the ImageNet stem (PC-DARTS' search stem)

def test_the_imagenet_stem_takes_224_to_28_before_the_first_cell():
    """PC-DARTS' model_search_imagenet.py: stem0 (3x3 stride-2 convs to 3C/2 and 3C), stem1 (a third), the
    first cell halving stem0's output."""
    from fastdarts.ops import FactorizedReduce

    net = SearchNetwork(C=16, num_classes=1000, layers=8, stem="imagenet")
    assert net.stem_kind == "imagenet" and not hasattr(net, "stem")
    shapes = {k: tuple(v.shape) for k, v in net.named_parameters() if k.startswith("stem")}
    assert shapes == {"stem0.0.weight": (24, 3, 3, 3), "stem0.1.weight": (24,), "stem0.1.bias": (24,),
                      "stem0.3.weight": (48, 24, 3, 3), "stem0.4.weight": (48,), "stem0.4.bias": (48,),
                      "stem1.1.weight": (48, 48, 3, 3), "stem1.2.weight": (48,), "stem1.2.bias": (48,)}
    weights = [n for n, _ in net.named_parameters() if not n.startswith("alpha")]
    assert weights[:4] == ["stem0.0.weight", "stem0.1.weight", "stem0.1.bias", "stem0.3.weight"]  # PC-DARTS' order
    assert isinstance(net.cells[0].preprocess0, FactorizedReduce)
    with torch.no_grad():
        s0, s1 = net.stem_states(torch.randn(1, 3, 224, 224))
    assert s0.shape == (1, 48, 56, 56) and s1.shape == (1, 48, 28, 28)
    seen = []
    net = tiny_net(stem="imagenet")
    net.cells[0].register_forward_hook(lambda m, inp, out: seen.append((tuple(inp[1].shape), tuple(out.shape))))
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 5)
    assert seen == [((2, 4, 28, 28), (2, 8, 28, 28))]


def test_the_default_stem_is_unchanged():
    net = tiny_net()
    assert net.stem_kind == "cifar" and not hasattr(net, "stem0")
    assert [k for k in net.state_dict() if k.startswith("stem")] == [
        "stem.0.weight", "stem.1.weight", "stem.1.bias", "stem.1.running_mean", "stem.1.running_var",
        "stem.1.num_batches_tracked"]
    s0, s1 = net.stem_states(torch.randn(2, 3, 8, 8))
    assert s0 is s1 and s0.shape == (2, 4, 8, 8)


def _loss_grads_stats(net, x, y):
    loss = net.loss(x, y)
    params = [x] + list(net.parameters())
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads, [b.clone() for b in net.buffers()]


@pytest.mark.parametrize("recompute, backend", [("cell", "reference"), ("cell", "fused"), ("edge", "fused")])
def test_the_imagenet_stem_gives_the_reference_under_recompute_and_backends(recompute, backend):
    """float64: recompute="cell" and the fused backend with the ImageNet stem, the same loss, gradients
    and BatchNorm statistics as the reference backend without recompute."""
    torch.manual_seed(6)
    ref = tiny_net(stem="imagenet").double()
    net = tiny_net(stem="imagenet", recompute=recompute, backend=backend).double()
    net.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    (loss_r, grads_r, stats_r), (loss_n, grads_n, stats_n) = _loss_grads_stats(ref, x, y), _loss_grads_stats(net, x, y)
    tol = dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss_n, loss_r, **tol)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert any(n.startswith("stem1.") for n in names)
    for name, gr, gn in zip(names, grads_r, grads_n):
        assert gr.abs().max() > 0 or name.startswith("alpha"), name  # a gradient that means something
        torch.testing.assert_close(gn, gr, **tol, msg=name)
    for a, b in zip(stats_r, stats_n):
        torch.testing.assert_close(b, a, **tol)


def test_bad_stems_are_one_line_errors():
    with pytest.raises(FastDartsError, match=r"^unknown stem 'mobile'; known: cifar, imagenet$"):
        tiny_net(stem="mobile")
    with pytest.raises(FastDartsError, match=r"the imagenet stem needs an even number of channels .* got 5$"):
        tiny_net(C=5, stem="imagenet")


def test_build_supernet_takes_the_stem_from_the_config_or_the_keyword():
    import types

    from fastdarts import SearchConfig
    from fastdarts.supernet import build_supernet

    config = SearchConfig(layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2).checked()
    data = types.SimpleNamespace(num_classes=5, in_channels=3, image_size=32)
    assert build_supernet(config, data, "cpu").stem_kind == "cifar"
    assert build_supernet(config, data, "cpu", stem="imagenet").stem_kind == "imagenet"

    class WithStem:  # a config that has a stem field
        def __init__(self, config, stem):
            self._config, self.stem = config, stem

        def __getattr__(self, name):
            return getattr(self._config, name)

    assert build_supernet(WithStem(config, "imagenet"), data, "cpu").stem_kind == "imagenet"
    assert build_supernet(WithStem(config, "imagenet"), data, "cpu", stem="cifar").stem_kind == "cifar"


def test_under_cell_recompute_the_imagenet_stem_keeps_only_its_inputs():
    """stem0 keeps the images only, stem1 its input (the first cell's s0, kept anyway)."""
    def kept(net):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net.loss(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))
        return shapes

    inner = (4, 2, 16, 16)  # stem0's first conv output (3C/2 = 2 channels at 16x16), kept for its BatchNorm
    assert inner in kept(tiny_net(stem="imagenet"))
    assert inner not in kept(tiny_net(stem="imagenet", recompute="cell"))
