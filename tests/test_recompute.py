"""recompute="cell": each cell keeps only its inputs, same numbers as the reference."""
import pytest
import torch

from fastdarts.errors import FastDartsError
from helpers import assert_functional_call_matches, loss_and_grads, saved_activation_bytes, tiny_net

BACKENDS = ["reference", "checkpoint", "fused"]


# PC-DARTS' edges and edge normalisation change what a cell computes; the recompute must follow.
METHODS = {"darts": {}, "pc-darts": dict(partial_channels=2, edge_norm=True)}


def _pair(backend, **method):
    torch.manual_seed(1)
    ref = tiny_net(backend="reference", **method)
    net = tiny_net(backend=backend, recompute="cell", **method)
    net.load_state_dict(ref.state_dict())
    return ref, net


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_recompute_gives_the_reference(backend, method):
    ref, net = _pair(backend, **METHODS[method])
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    (loss_r, grads_r), (loss_c, grads_c) = loss_and_grads(ref, x, y), loss_and_grads(net, x, y)
    torch.testing.assert_close(loss_c, loss_r, rtol=1e-6, atol=0)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, gr, gc in zip(names, grads_r, grads_c):
        # fp32, fused inside: within 1e-5 of each gradient's scale (test_fused_mixed_op's bound).
        torch.testing.assert_close(gc, gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item(), msg=name)
    # Running statistics moved once per forward, not again by the recompute.
    for (name, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        if backend != "fused":
            assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_recompute_keeps_only_the_cell_inputs(backend):
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    edge = saved_activation_bytes(tiny_net(backend=backend), x, y)
    cell = saved_activation_bytes(tiny_net(backend=backend, recompute="cell"), x, y)
    assert cell < 0.5 * edge, (cell, edge)


def _kept_shapes(net, x, y) -> list[tuple]:
    """Shapes of what autograd keeps outside the recomputed regions."""
    kept = []

    def pack(t):
        kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.loss(x, y)
    return kept


def test_cell_recompute_keeps_only_the_images_of_the_stem():
    # The stem's conv output, kept for its BatchNorm, is as large as a cell's
    # input: with recompute="cell" the stem is rebuilt from the images too.
    torch.manual_seed(2)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    edge, cell = tiny_net(backend="fused"), tiny_net(backend="fused", recompute="cell")
    with torch.no_grad():
        stem_shape = tuple(cell.stem(x).shape)
    assert stem_shape in _kept_shapes(edge, x, y)  # what the check below would see without it
    assert stem_shape not in _kept_shapes(cell, x, y)


def test_cell_recompute_second_order_steps_give_the_reference_alpha():
    from fastdarts import Architect
    from fastdarts.search_loop import search_step

    ref, net = _pair("fused")
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    for m in (ref, net):
        sgd = torch.optim.SGD(m.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        architect = Architect(m, sgd, order="second")
        for _ in range(2):
            search_step(m, architect, sgd, batches[0], batches[1], 5.0)
    for a_r, a_c in zip(ref.arch_parameters(), net.arch_parameters()):
        # The three-step bound of test_fused_mixed_op (Adam: α error ≈ lr·δ).
        torch.testing.assert_close(a_c, a_r, rtol=0, atol=3 * 3e-4 * 1e-3)


def test_cell_recompute_with_functional_call_uses_the_substituted_weights():
    ref, net = _pair("fused")
    subs = {k: (v.detach() * 1.3).requires_grad_(True) for k, v in net.named_parameters()}
    assert_functional_call_matches(net, ref, subs)


def test_without_grad_the_cell_recompute_changes_nothing():
    ref, net = _pair("fused")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-6)


def test_unknown_recompute_mode_is_a_clear_error():
    from fastdarts import SearchConfig

    with pytest.raises(FastDartsError, match="unknown recompute mode 'node'; known: edge, cell"):
        tiny_net(recompute="node")
    with pytest.raises(FastDartsError, match="unknown recompute mode"):
        SearchConfig(recompute="node").checked()


def _fused_backward_order(net, x, y) -> list[str]:
    """The order in which backward runs the fused Functions of ``net``: "pp-fr"
    for a FactorizedReduce preprocessing, "reduce-edge" for a stride-2 edge."""
    from fastdarts.fused_mixed_op import FusedMixedOpFunction

    order, backward = [], FusedMixedOpFunction._backward

    def recording(ctx, dy):
        if len(ctx.cands) == 1 and ctx.cands[0].factorized_reduce is not None:
            order.append("pp-fr")
        elif ctx.stride == 2:
            order.append("reduce-edge")
        return backward(ctx, dy)

    FusedMixedOpFunction._backward = staticmethod(recording)
    try:
        net.loss(x, y).backward()
    finally:
        FusedMixedOpFunction._backward = staticmethod(backward)
    return order


def test_cell_recompute_runs_the_backward_of_a_factorized_reduce_after_the_reduction_cell():
    # N,R,N: cell 2 halves cell 0's output (its first input) with a
    # FactorizedReduce, whose backward makes a gradient of that output's full
    # size. Under recompute="cell" the FactorizedReduce runs before cell 1, so
    # its backward comes after cell 1's and that gradient is not held through
    # the reduction cell's backward (the peak of a step).
    torch.manual_seed(3)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    edge = _fused_backward_order(tiny_net(backend="fused"), x, y)
    cell = _fused_backward_order(tiny_net(backend="fused", recompute="cell"), x, y)
    assert edge.count("pp-fr") == cell.count("pp-fr") == 1 and "reduce-edge" in cell
    assert edge.index("pp-fr") < edge.index("reduce-edge")  # the order without it
    assert cell.index("pp-fr") > max(i for i, name in enumerate(cell) if name == "reduce-edge")


@pytest.mark.parametrize("layout", ["R,R,N", "N,R", "N,R,R"])
def test_cell_recompute_gives_the_reference_with_reductions_anywhere(layout):
    # A FactorizedReduce run ahead of the first cell (R,R), none to run (a
    # reduction cell last): the same numbers as without the recompute.
    torch.manual_seed(4)
    ref = tiny_net(backend="reference", layout=layout)
    net = tiny_net(backend="reference", layout=layout, recompute="cell")
    net.load_state_dict(ref.state_dict())
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    (loss_r, grads_r), (loss_c, grads_c) = loss_and_grads(ref, x, y), loss_and_grads(net, x, y)
    assert torch.equal(loss_c, loss_r)
    for gr, gc in zip(grads_r, grads_c):
        torch.testing.assert_close(gc, gr, rtol=1e-6, atol=1e-7)
