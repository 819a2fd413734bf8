"""PC-DARTS (Xu et al., ICLR 2020): partial channel connections and edge
normalisation, against an independent statement of the original code's
forward (yuhuixu1993/PC-DARTS, model_search.py), its parameter layout and
initialisation, its β-weighted derivation, and through the search loop and CLI."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastdarts.supernet as supernet_module
from fastdarts import FastDartsError, SearchConfig, SearchNetwork, search
from fastdarts.genotype import Genotype, derive_genotype, num_edges
from fastdarts.methods.edge_norm import derive_with_beta, edge_weights_of
from fastdarts.methods.partial_channels import PartialChannelMixedOp, channel_shuffle
from helpers import search_cli_error, tiny_net

BACKENDS = ["reference", "checkpoint", "fused"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: one thread avoids OpenMP's overhead, which on a
    loaded 2-core machine costs seconds per step."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _quiet(_):
    pass


# -- an independent statement of the original PC-DARTS forward --------------

def shuffle_permutation(C: int, K: int) -> torch.Tensor:
    """The original's channel_shuffle as an index map: output channel
    c·K + g is input channel g·(C/K) + c."""
    perm = [0] * C
    for g in range(K):
        for c in range(C // K):
            perm[c * K + g] = g * (C // K) + c
    return torch.tensor(perm)


def op_softmax(alpha: torch.Tensor) -> torch.Tensor:
    e = torch.exp(alpha - alpha.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def node_softmax(beta: torch.Tensor, steps: int) -> torch.Tensor:
    """softmax(β) over each node's incoming edges (node i has 2+i), written out."""
    out, start = [], 0
    for i in range(steps):
        segment = beta[start:start + 2 + i]
        e = torch.exp(segment - segment.max())
        out.append(e / e.sum())
        start += 2 + i
    return torch.cat(out)


def pc_darts_forward(net: SearchNetwork, x: torch.Tensor, K: int, edge_norm: bool,
                     permutation=shuffle_permutation) -> torch.Tensor:
    """The logits of the original PC-DARTS Network, walking ``net``'s modules
    (stem, preprocessing, every candidate op one by one, classifier) but doing
    the method's own arithmetic here: the channel split, the weighted op sum,
    the bypass, the shuffle, β's per-node softmax, the node sums."""
    weights = {False: op_softmax(net.alpha_normal), True: op_softmax(net.alpha_reduce)}
    if edge_norm:
        scales = {False: node_softmax(net.beta_normal, net.steps), True: node_softmax(net.beta_reduce, net.steps)}
    s0 = s1 = net.stem(x)
    for cell in net.cells:
        w = weights[cell.reduction]
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        e = 0
        for _ in range(cell.steps):
            node = 0
            for j, h in enumerate(states):
                stride = 2 if cell.reduction and j < 2 else 1
                C = h.shape[1]
                part = C // K
                xa = h[:, :part]
                mixed = sum(w[e, k] * op(xa) for k, op in enumerate(cell.edges[e].ops))
                if K > 1:
                    rest = h[:, part:]
                    if stride == 2:
                        rest = F.max_pool2d(rest, 2, 2, ceil_mode=True)
                    y = torch.cat([mixed, rest], dim=1)[:, permutation(C, K)]
                else:
                    y = mixed
                node = node + (scales[cell.reduction][e] * y if edge_norm else y)
                e += 1
            states.append(node)
        s0, s1 = s1, torch.cat(states[-cell.multiplier:], dim=1)
    return F.linear(s1.mean(dim=(2, 3)), net.classifier.weight, net.classifier.bias)


def _pc_net(C, K, edge_norm, backend, **kw):
    args = dict(C=C, num_classes=5, layers=None, layout="N,R,N", ops="darts", steps=2, multiplier=2,
                stem_multiplier=1, in_channels=3, backend=backend, partial_channels=K, edge_norm=edge_norm)
    args.update(kw)
    net = SearchNetwork(**args).double()
    with torch.no_grad():  # α and β away from uniform, so a mixed-up weight shows
        for p in net.arch_parameters():
            p.normal_(0.0, 0.5)
    return net


def _loss_and_grads(net, forward, x, y):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(forward(net, x), y)
    return loss.detach(), torch.autograd.grad(loss, [x] + list(net.parameters()))


# float64 throughout: the backends and the independent forward sum in different
# orders, so they differ by rounding only, amplified by BN's 1/σ over a few
# layers (measured: at most 1.5e-14 of a gradient's scale). 1e-11 of each
# tensor's scale leaves a thousandfold margin and is still ~10^10 times below
# what a wrong channel, weight or β changes (O(1) of the scale).
TOL = 1e-11


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C, K, edge_norm, recompute", [
    (6, 2, True, "edge"),    # C/K = 3 channels per op in the normal cells (odd)
    (12, 4, True, "edge"),   # C/K = 3, K = 4 as the paper
    (4, 1, True, "edge"),    # β alone, every channel through the ops
    (6, 2, False, "edge"),   # partial channels alone
    (6, 2, True, "cell"),    # each cell rebuilt in backward, around any backend
])
def test_supernet_matches_the_original_pc_darts_forward(backend, C, K, edge_norm, recompute):
    torch.manual_seed(1)
    net = _pc_net(C, K, edge_norm, backend, recompute=recompute)
    if K > 1:
        assert all(isinstance(e, PartialChannelMixedOp) and e.k == K for cell in net.cells for e in cell.edges)
    twin = copy.deepcopy(net)
    # Odd batch, odd image size (7 -> 4 at the reduction), a non-contiguous input.
    x = torch.randn(3, 3, 7, 14, dtype=torch.float64)[..., ::2]
    y = torch.tensor([0, 3, 4])

    loss, grads = _loss_and_grads(net, lambda n, x: n(x), x, y)
    loss_i, grads_i = _loss_and_grads(twin, lambda n, x: pc_darts_forward(n, x, K, edge_norm), x, y)

    torch.testing.assert_close(loss, loss_i, rtol=TOL, atol=0)
    names = ["x"] + [n for n, _ in net.named_parameters()]
    assert names[1:5 if edge_norm else 3] == (["alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"]
                                              if edge_norm else ["alpha_normal", "alpha_reduce"])
    for name, g, gi in zip(names, grads, grads_i):
        assert gi.abs().max() > 0, name  # every gradient is compared, none is vacuous
        torch.testing.assert_close(g, gi, rtol=TOL, atol=TOL * gi.abs().max().item(), msg=name)
    # BN running statistics after one training-mode forward (and its backward: a
    # recompute must not move them again).
    for (name, a), b in zip(twin.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=TOL, atol=TOL, msg=name)

    # Eval mode (BN on the running statistics) gives the same logits too.
    net.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), pc_darts_forward(twin, x, K, edge_norm), rtol=TOL, atol=TOL)


def test_the_comparison_tells_a_wrong_shuffle_apart():
    """The comparison above can fail: the same independent forward with the
    shuffle's inverse permutation (or none) disagrees with the supernet."""
    torch.manual_seed(1)
    net = _pc_net(6, 2, True, "reference").eval()
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)

    def inverse(C, K):
        return torch.argsort(shuffle_permutation(C, K))

    def identity(C, K):
        return torch.arange(C)

    with torch.no_grad():
        logits = net(x)
        torch.testing.assert_close(logits, pc_darts_forward(net, x, 2, True), rtol=TOL, atol=TOL)
        for wrong in (inverse, identity):
            assert not torch.allclose(logits, pc_darts_forward(net, x, 2, True, wrong), rtol=1e-3, atol=1e-3)


# -- the channel shuffle -------------------------------------------------------

@pytest.mark.parametrize("K, order", [
    (2, [0, 4, 1, 5, 2, 6, 3, 7]),
    (4, [0, 2, 4, 6, 1, 3, 5, 7]),
    (1, [0, 1, 2, 3, 4, 5, 6, 7]),
])
def test_channel_shuffle_order(K, order):
    x = torch.arange(8.0).view(1, 8, 1, 1).expand(2, 8, 3, 2)
    out = channel_shuffle(x.contiguous(), K)
    assert out.shape == (2, 8, 3, 2)
    assert out[0, :, 0, 0].tolist() == order and out[1, :, 2, 1].tolist() == order
    assert shuffle_permutation(8, K).tolist() == order
    # On content varying over every position too.
    z = torch.randn(3, 8, 4, 5)
    assert torch.equal(channel_shuffle(z, K), z[:, shuffle_permutation(8, K)])


# -- parameters: the original's layout and initialisation ----------------------

def original_weight_shapes(C, K, layout, steps, multiplier, num_classes, in_channels, stem_multiplier):
    """Parameter shapes of the original PC-DARTS Network (darts ops), in
    registration order, each marked with how the original initialises it:
    'kaiming' (kaiming_uniform_, a=√5), 'linear_bias' (uniform ±1/√fan_in),
    'bn' (ones/zeros: no random draw)."""
    shapes = []
    c_curr = stem_multiplier * C
    shapes += [("kaiming", (c_curr, in_channels, 3, 3)), ("bn", (c_curr,)), ("bn", (c_curr,))]
    c_pp, c_p, c_curr = c_curr, c_curr, C
    reduction_prev = False
    for r in layout:
        if r:
            c_curr *= 2
        if reduction_prev:  # FactorizedReduce(C_pp, C): two 1x1 convs to C/2, BN affine=False
            shapes += [("kaiming", (c_curr // 2, c_pp, 1, 1))] * 2
        else:               # ReLUConvBN 1x1
            shapes += [("kaiming", (c_curr, c_pp, 1, 1))]
        shapes += [("kaiming", (c_curr, c_p, 1, 1))]
        c = c_curr // K    # every op is built for C/K channels
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if r and j < 2 else 1
                # none, max_pool_3x3 (+BN affine=False), avg_pool_3x3 (+BN): no parameters
                if stride == 2:  # skip_connect = FactorizedReduce(c, c)
                    shapes += [("kaiming", (c // 2, c, 1, 1))] * 2
                for k in (3, 5):  # sep_conv_kxk: (dw k, pw) twice
                    shapes += [("kaiming", (c, 1, k, k)), ("kaiming", (c, c, 1, 1))] * 2
                for k in (3, 5):  # dil_conv_kxk: dw k (dilation 2), pw
                    shapes += [("kaiming", (c, 1, k, k)), ("kaiming", (c, c, 1, 1))]
        reduction_prev = r
        c_pp, c_p = c_p, multiplier * c_curr
    shapes += [("kaiming", (num_classes, c_p)), ("linear_bias", (num_classes,))]
    return shapes


def test_parameters_follow_the_original_layout_order_and_initialisation():
    kw = dict(C=8, num_classes=10, layers=None, layout="N,R,N", steps=3, multiplier=3, stem_multiplier=3,
              in_channels=3, partial_channels=4, edge_norm=True, backend="reference")
    torch.manual_seed(5)
    net = SearchNetwork(**kw)
    expected = original_weight_shapes(8, 4, (False, True, False), 3, 3, 10, 3, 3)
    k, n = num_edges(3), 8
    arch = [(k, n), (k, n), (k,), (k,)]
    # The root module's own parameters (α, β) come first in parameters(), the weights after.
    assert [tuple(p.shape) for p in net.parameters()] == arch + [s for _, s in expected]
    assert [tuple(p.shape) for p in net.weight_parameters()] == [s for _, s in expected]
    assert [tuple(p.shape) for p in net.arch_parameters()] == arch
    assert [n for n, _ in net.named_parameters()][:4] == ["alpha_normal", "alpha_reduce", "beta_normal",
                                                          "beta_reduce"]
    arch_ids = [id(p) for p in net.arch_parameters()]
    assert arch_ids == [id(net.alpha_normal), id(net.alpha_reduce), id(net.beta_normal), id(net.beta_reduce)]
    # β right after α in the state_dict (and so in every checkpoint).
    keys = [key for key in net.state_dict() if key.startswith(("alpha", "beta"))]
    assert keys == ["alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"]

    # The same seed gives the original's values: its weights initialised in
    # registration order (convs and the classifier's weight: kaiming_uniform_
    # with a=√5; its bias: uniform ±1/√fan_in; BN: no draw), then α_n, α_r,
    # β_n, β_r as 1e-3·randn, in that order.
    torch.manual_seed(5)
    for (kind, shape), param in zip(expected, net.weight_parameters()):
        t = torch.empty(shape)
        if kind == "kaiming":
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        elif kind == "linear_bias":
            bound = 1 / math.sqrt(expected[-2][1][1])
            torch.nn.init.uniform_(t, -bound, bound)
        else:
            continue
        assert torch.equal(param.detach(), t), shape
    for p, shape in zip(net.arch_parameters(), arch):
        assert torch.equal(p.detach(), 1e-3 * torch.randn(shape))
    state_after = torch.get_rng_state()
    torch.manual_seed(5)
    SearchNetwork(**kw)
    assert torch.equal(torch.get_rng_state(), state_after)  # nothing drawn after β


def test_edge_norm_adds_beta_after_alpha_and_changes_nothing_else():
    kw = dict(C=8, layout="N,R,N", layers=None, steps=2, multiplier=2, partial_channels=4)
    torch.manual_seed(7)
    plain = SearchNetwork(**kw)
    beta_n, beta_r = 1e-3 * torch.randn(5), 1e-3 * torch.randn(5)
    torch.manual_seed(7)
    pc = SearchNetwork(**kw, edge_norm=True)
    assert torch.equal(pc.beta_normal.detach(), beta_n) and torch.equal(pc.beta_reduce.detach(), beta_r)
    theirs = pc.state_dict()
    assert [k for k in theirs if k not in plain.state_dict()] == ["beta_normal", "beta_reduce"]
    for name, a in plain.state_dict().items():  # same weights and α from the same seed
        assert torch.equal(a, theirs[name]), name
    assert not hasattr(plain, "beta_normal") and len(plain.arch_parameters()) == 2


@pytest.mark.parametrize("C, K", [(6, 4), (16, 3), (4, 8)])
def test_channels_not_divisible_by_k(C, K):
    with pytest.raises(FastDartsError, match=rf"K={K} does not divide the channels C={C}"):
        SearchNetwork(C=C, layout="N,R,N", layers=None, partial_channels=K)


@pytest.mark.parametrize("K", [0, -2, 2.0, True, "4"])
def test_k_must_be_a_positive_integer(K):
    with pytest.raises(FastDartsError, match="partial-channels K must be a positive integer"):
        tiny_net(C=8, partial_channels=K)


# -- derivation with β ----------------------------------------------------------

OPS4 = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")


def _alpha(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_beta_changes_which_edges_are_kept():
    # softmax over 4 ops of [0,0,0,2]: 0.711 (sep); [0,0,1.5,0]: 0.599 (skip); [0,1,0,0]: 0.475 (max pool).
    alpha = _alpha([[0, 0, 0, 2], [0, 0, 1.5, 0],               # node 0: edges from inputs 0, 1
                    [0, 0, 0, 2], [0, 0, 1.5, 0], [0, 1, 0, 0]])  # node 1: edges from 0, 1, node 0
    plain = derive_genotype(alpha, alpha, OPS4, steps=2, multiplier=2)
    assert plain.normal == (("sep_conv_3x3", 0), ("skip_connect", 1), ("sep_conv_3x3", 0), ("skip_connect", 1))
    # β node 0: softmax[0, 1] = [0.269, 0.731] -> sep 0.191 < skip 0.438: order swaps;
    # β node 1: softmax[-3, 0, 0] = [0.024, 0.488, 0.488] -> 0.017, 0.292, 0.232: edge from input 0 drops.
    beta = torch.tensor([0.0, 1.0, -3.0, 0.0, 0.0], dtype=torch.float64)
    zero = torch.zeros(5, dtype=torch.float64)
    g = derive_with_beta(alpha, alpha, OPS4, steps=2, multiplier=2, beta_normal=beta, beta_reduce=zero)
    assert g.normal == (("skip_connect", 1), ("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 2))
    assert g.reduce == plain.reduce  # equal β within each node: α alone decides
    assert g.normal_concat == g.reduce_concat == (2, 3)
    # numpy arrays are accepted as well.
    assert derive_with_beta(alpha.numpy(), alpha.numpy(), OPS4, 2, 2, beta.numpy(), zero.numpy()) == g


def test_beta_ties_keep_the_earlier_edge_and_op():
    alpha = torch.zeros(5, 4)
    alpha[:, 1:] = torch.tensor([1.0, 1.0, 0.0])  # max pool and skip tie on every edge
    beta = torch.full((5,), 0.3)                  # equal β: every edge of a node equally strong
    g = derive_with_beta(alpha, alpha, OPS4, 2, 2, beta_normal=beta, beta_reduce=beta)
    assert g.normal == g.reduce == (("max_pool_3x3", 0), ("max_pool_3x3", 1),
                                    ("max_pool_3x3", 0), ("max_pool_3x3", 1))
    # Node 1: plain α keeps the strong edge from input 0 first; β (-5) drops it, and
    # the edges from input 1 and node 0, with equal α rows and equal β, tie exactly:
    # the earlier edge comes first.
    alpha = torch.zeros(5, 4)
    alpha[2, 3] = 3.0
    plain = derive_genotype(alpha, alpha, OPS4, 2, 2)
    assert plain.normal[2:] == (("sep_conv_3x3", 0), ("max_pool_3x3", 1))
    beta = torch.tensor([0.2, 0.2, -5.0, 0.5, 0.5])
    g = derive_with_beta(alpha, alpha, OPS4, 2, 2, beta_normal=beta, beta_reduce=torch.zeros(5))
    assert g.normal == (("max_pool_3x3", 0), ("max_pool_3x3", 1), ("max_pool_3x3", 1), ("max_pool_3x3", 2))
    assert g.reduce == plain.reduce


def test_none_is_never_kept_and_does_not_rank_an_edge():
    # Node 1: the edge from input 0 has `none` strongest (0.96) but its best other op
    # only 0.029; the edge from input 1 is uniform (0.25 each, max pool first);
    # the edge from node 0 has sep 0.355.
    alpha = _alpha([[5, 0, 0, 1], [0, 0, 0, 1],
                    [5, 0, 0, 1.5], [0, 0, 0, 0], [0, 0, 0, 0.5]])
    beta = torch.zeros(5, dtype=torch.float64)
    g = derive_with_beta(alpha, alpha, OPS4, 2, 2, beta_normal=beta, beta_reduce=beta)
    # Node 0 has only two edges: both kept, with their strongest op that is not `none`,
    # the stronger non-`none` first (0.475 from input 1 over 0.018 from input 0).
    assert g.normal == (("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 2), ("max_pool_3x3", 1))
    assert all(op != "none" for op, _ in g.normal + g.reduce)


@pytest.mark.parametrize("betas, needle", [
    (dict(beta_normal=torch.zeros(4), beta_reduce=torch.zeros(5)), r"beta_normal has shape \(4,\), expected \(5,\)"),
    (dict(beta_normal=torch.zeros(5), beta_reduce=torch.zeros(5, 1)), r"beta_reduce has shape \(5, 1\)"),
    (dict(beta_normal=torch.zeros(5)), "give both beta_normal and beta_reduce, or neither"),
    (dict(beta_reduce=torch.zeros(5)), "give both beta_normal and beta_reduce, or neither"),
    (dict(beta_normal=[0.0] * 5, beta_reduce=torch.zeros(5)), "beta_normal must be a numeric torch tensor"),
    (dict(beta_normal=torch.tensor([0, 0, float("nan"), 0, 0]), beta_reduce=torch.zeros(5)), "NaN or inf"),
])
def test_bad_beta(betas, needle):
    alpha = torch.zeros(5, 4)
    with pytest.raises(FastDartsError, match=needle):
        derive_with_beta(alpha, alpha, OPS4, 2, 2, **betas)


def test_network_genotype_uses_beta():
    net = tiny_net(C=8, ops=OPS4, partial_channels=2, edge_norm=True)
    alpha = _alpha([[0, 0, 0, 2], [0, 0, 1.5, 0], [0, 0, 0, 2], [0, 0, 1.5, 0], [0, 1, 0, 0]]).float()
    with torch.no_grad():
        net.alpha_normal.copy_(alpha), net.alpha_reduce.copy_(alpha)
        net.beta_normal.copy_(torch.tensor([0.0, 1.0, -3.0, 0.0, 0.0]))
        net.beta_reduce.zero_()
    g = net.genotype()
    assert g.normal == (("skip_connect", 1), ("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 2))
    assert g.reduce == derive_genotype(alpha, alpha, OPS4, 2, 2).reduce
    assert g != derive_genotype(alpha, alpha, OPS4, 2, 2)
    weights = edge_weights_of(net)
    assert weights["normal"][2:] == pytest.approx(node_softmax(net.beta_normal.detach().double(), 2)[2:].tolist())


# -- the search loop ------------------------------------------------------------

PC_TINY = dict(method="pc-darts", dataset="digits", layout="N,R,N", layers=None, channels=8, steps=2, multiplier=2,
               batch_size=16, max_steps=2, epochs=2, arch_warmup_epochs=1, device="cpu", progress=False)


def test_preset_and_explicit_fields():
    c = SearchConfig(method="pc-darts").checked()
    assert (c.partial_channels, c.edge_norm, c.batch_size, c.lr, c.lr_min, c.arch_lr, c.order,
            c.arch_warmup_epochs) == (4, True, 256, 0.1, 0.0, 6e-4, "first", 15)
    c = SearchConfig(method="pc-darts", lr=0.05, batch_size=32, partial_channels=2, edge_norm=False,
                     arch_warmup_epochs=0, order="second").checked()
    assert (c.lr, c.batch_size, c.partial_channels, c.edge_norm, c.arch_warmup_epochs, c.order) == (
        0.05, 32, 2, False, 0, "second")
    assert c.arch_lr == 6e-4  # the fields not given still come from the preset
    # The options work on their own with DARTS too.
    c = SearchConfig(partial_channels=2, edge_norm=True).checked()
    assert (c.method, c.partial_channels, c.edge_norm, c.lr) == ("darts", 2, True, 0.025)


def test_warmup_metrics_and_exact_resume(tmp_path, monkeypatch):
    """One 2-epoch run (the first a warm-up), checked step by step, then the same
    run interrupted after the warm-up epoch and resumed: identical state."""
    initial = {}
    real = supernet_module.SearchNetwork  # what build_supernet builds

    def recording(*args, **kwargs):
        net = real(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        return net

    monkeypatch.setattr(supernet_module, "SearchNetwork", recording)
    after_epoch = {}
    whole_out = tmp_path / "whole"

    def snapshot(entry):
        after_epoch[entry["epoch"]] = torch.load(whole_out / "checkpoint.pt", weights_only=True)["model"]

    whole = search(out=str(whole_out), log=_quiet, on_epoch_end=snapshot, **PC_TINY)
    monkeypatch.setattr(supernet_module, "SearchNetwork", real)
    net = whole.model
    assert [type(m).__name__ for m in net.methods] == ["PartialChannels", "EdgeNormalisation"]  # the preset's
    assert net.methods[0].config.partial_channels == 4
    assert all(isinstance(e, PartialChannelMixedOp) for cell in net.cells for e in cell.edges)
    for name in ("alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"):
        # The warm-up epoch leaves α and β as they were made; the next one moves them.
        assert torch.equal(after_epoch[1][name], initial[name]), name
        assert not torch.equal(after_epoch[2][name], initial[name]), name
    # The weights do train in the warm-up epoch.
    assert not torch.equal(after_epoch[1]["classifier.weight"], initial["classifier.weight"])

    lines = [json.loads(line) for line in (whole_out / "metrics.jsonl").read_text().splitlines()]
    assert [m["arch_step"] for m in lines] == [False, True]
    assert lines[0]["arch_loss"] is None and lines[1]["arch_loss"] > 0
    assert lines[0]["lr"] == 0.1  # the preset's, cosine-annealed from there
    for m in lines:
        assert m["method"] == "pc-darts"
        cfg = m["config"]
        assert (cfg["partial_channels"], cfg["edge_norm"], cfg["lr"], cfg["lr_min"], cfg["arch_lr"],
                cfg["order"]) == (4, True, 0.1, 0.0, 6e-4, "first")
        # Given explicitly: they win over the preset's 256 and 15.
        assert (cfg["batch_size"], cfg["arch_warmup_epochs"]) == (16, 1)
        for cell in ("normal", "reduce"):
            w = m["betas"][cell]  # softmax(β) per node: nodes of 2 and 3 edges
            assert len(w) == num_edges(2) and sum(w[:2]) == pytest.approx(1) and sum(w[2:]) == pytest.approx(1)
        Genotype.from_dict(m["genotype"])
    assert lines[1]["betas"]["normal"] == pytest.approx(
        node_softmax(net.beta_normal.detach().double(), 2).tolist(), rel=1e-6)
    assert json.loads((whole_out / "genotype.json").read_text()) == net.genotype().to_dict()

    class Interrupt(Exception):
        pass

    def stop(entry):
        raise Interrupt

    with pytest.raises(Interrupt):
        search(out=str(tmp_path / "split"), log=_quiet, on_epoch_end=stop, **PC_TINY)
    split = search(out=str(tmp_path / "split"), resume=True, log=_quiet, **PC_TINY)
    for a, b in zip(net.arch_parameters(), split.model.arch_parameters()):
        assert torch.equal(a, b)
    for (name, a), b in zip(net.state_dict().items(), split.model.state_dict().values()):
        assert torch.equal(a, b), name
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["arch_step"] for m in lines] == [False, True]
    assert split.genotype == whole.genotype


# -- bad input through the CLI --------------------------------------------------

CLI_TINY = ["--dataset", "digits", "--layout", "N,R,N", "--steps", "2", "--multiplier", "2", "--batch-size", "16",
            "--max-steps", "1", "--epochs", "1", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("argv, needles", [
    (["--method", "pc-darts", "--channels", "8", "--partial-channels", "0"],
     ["--partial-channels", "must be a positive integer, got 0"]),
    (["--method", "pc-darts", "--channels", "16", "--partial-channels", "3"],
     ["K=3 does not divide the channels C=16"]),
    (["--channels", "6"], ["K=4 does not divide the channels C=6"]),  # pc-darts' preset K
    (["--method", "unknown", "--channels", "8"], ["--method", "'unknown'", "darts", "pc-darts", "proxyless"]),
])
def test_cli_bad_input(tmp_path, capsys, argv, needles):
    out = tmp_path / "out"
    if "--method" not in argv:
        argv = ["--method", "pc-darts"] + argv
    line = search_cli_error(CLI_TINY + argv + ["--out", str(out)], capsys)
    for needle in needles:
        assert needle in line, line
    assert not out.exists()
