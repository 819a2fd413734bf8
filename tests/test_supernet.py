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
