"""The fused backend against the reference: same loss, gradients, BN statistics
and search results, with less kept for backward."""
import pytest
import torch

from fastdarts.fused_mixed_op import FusedMixedOpFunction, _candidate
from fastdarts.kernels.backend import kernel_backend
from fastdarts.mixed_op import MixedOp
from conftest import saved_activation_bytes, tiny_net

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OP_SETS = ["darts", "extended", "none,skip_connect,conv_3x3", "max_pool_3x3,sep_conv_5x5,conv_1x3_3x1"]


def _grads(net, x, y):
    x = x.clone().requires_grad_(True)
    loss = net.loss(x, y)
    grads = torch.autograd.grad(loss, [x] + list(net.parameters()))
    return loss.detach(), grads


def _pair(device, dtype=torch.float32, **kw):
    ref = tiny_net(backend="reference", **kw).to(device, dtype)
    fused = tiny_net(backend="reference", **kw).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused.set_backend("fused")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ops", OP_SETS)
@pytest.mark.parametrize("hw", [8, 7])
def test_fused_network_matches_reference(ops, hw, device):
    torch.manual_seed(1)
    ref, fused = _pair(device, ops=ops)
    # A non-contiguous input: every other column of a wider tensor. The N,R,N
    # layout covers the stride-2 edges of a reduction cell.
    x = torch.randn(4, 3, hw, 2 * hw, device=device)[..., ::2]
    y = torch.randint(0, 5, (4,), device=device)
    loss_r, grads_r = _grads(ref, x, y)
    loss_f, grads_f = _grads(fused, x, y)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=0)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, gr, gf in zip(names, grads_r, grads_f):
        # fp32: relative error ≲ 1e-5 of the gradient's scale.
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item(), msg=name)
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("ops", ["darts", "extended"])
def test_fused_edge_updates_running_stats_exactly_once(ops, stride):
    """On one edge the fused path sees the reference's exact z, so its BN
    statistics (updated once, never by the recompute) are bit-identical."""
    from fastdarts.ops import resolve_ops

    torch.manual_seed(2)
    ref = MixedOp(6, stride, resolve_ops(ops), backend="reference")
    fused = MixedOp(6, stride, resolve_ops(ops), backend="fused")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 9, 9, requires_grad=True)
    w = torch.softmax(torch.randn(len(ref.ops)), 0).requires_grad_(True)
    for m in (ref, fused):
        out = m(x, w)
        out.square().sum().backward()
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), name


def test_fused_gradcheck_float64():
    torch.manual_seed(3)
    for stride in (1, 2):
        op = MixedOp(2, stride, ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                                 "dil_conv_3x3", "conv_1x3_3x1"), backend="fused").double()
        cands = [_candidate(k, m) for k, m in enumerate(op.ops)]
        params = [p for c in cands for p in c.params]
        x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
        w = torch.softmax(torch.randn(len(op.ops), dtype=torch.float64), 0).requires_grad_(True)
        # Max pool is not differentiable at ties; random input has none.
        assert torch.autograd.gradcheck(
            lambda x, w, *ps: FusedMixedOpFunction.apply(cands, stride, x, w, *ps), (x, w, *params),
            eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2)])
def test_fused_low_precision_close_to_reference(dtype, tol):
    torch.manual_seed(4)
    ref, fused = _pair("cpu", dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    y = torch.randint(0, 5, (4,))
    ref64 = tiny_net(backend="reference").double()
    ref64.load_state_dict(ref.state_dict())
    loss_64, grads_64 = _grads(ref64, x.double(), y)
    loss_r, grads_r = _grads(ref, x, y)
    loss_f, grads_f = _grads(fused, x, y)
    # flash-attention's criterion: no worse than twice PyTorch's own error in that dtype.
    err_r = max((a.double() - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads_r, grads_64))
    err_f = max((a.double() - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads_f, grads_64))
    assert err_f <= 2 * err_r + tol, (err_f, err_r)
    assert abs(loss_f.double() - loss_64) <= 2 * abs(loss_r.double() - loss_64) + tol


def test_fused_without_grad_and_in_eval():
    torch.manual_seed(5)
    ref, fused = _pair("cpu")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        ref.eval(), fused.eval()
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-6)
    # Gradients in eval mode (BN on running statistics) go through the reference path.
    loss_r, grads_r = _grads(ref, x, torch.tensor([0, 1]))
    loss_f, grads_f = _grads(fused, x, torch.tensor([0, 1]))
    for gr, gf in zip(grads_r, grads_f):
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-6)


def test_only_alpha_gradient_needed():
    """The w± passes of the second-order step need ∂L/∂α alone."""
    torch.manual_seed(6)
    ref, fused = _pair("cpu")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    grads = []
    for net in (ref, fused):
        for p in net.weight_parameters():
            p.requires_grad_(False)
        grads.append(torch.autograd.grad(net.loss(x, y), net.arch_parameters()))
    for gr, gf in zip(*grads):
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-7)


def test_in_place_change_of_a_weight_before_backward_is_caught():
    net = tiny_net(backend="fused")
    loss = net.loss(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with torch.no_grad():
        net.cells[0].edges[0].ops[4].op[1].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fused_keeps_least_for_backward_and_stays_flat_in_the_number_of_ops():
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    saved = {(backend, ops): saved_activation_bytes(tiny_net(backend=backend, ops=ops), x, y)
             for backend in ("reference", "checkpoint", "fused")
             for ops in ("none,skip_connect,sep_conv_3x3,dil_conv_3x3", "extended")}
    few, many = "none,skip_connect,sep_conv_3x3,dil_conv_3x3", "extended"
    # Between forward and backward fused keeps what checkpoint keeps (the edge
    # inputs, plus two numbers per channel and op); unlike checkpoint it never
    # holds all ops' activations at once in backward (benchmarks/search_step.py).
    assert saved["fused", many] < 1.1 * saved["checkpoint", many], saved
    assert saved["fused", many] < saved["reference", many] / 8, saved
    # 4 -> 10 ops: the reference keeps every op's activations, fused keeps the
    # same per-edge state (x and two numbers per channel and op).
    growth_ref = saved["reference", many] - saved["reference", few]
    growth_fused = saved["fused", many] - saved["fused", few]
    assert growth_fused < 0.1 * growth_ref, saved


def test_default_kernel_backend_on_cpu():
    assert kernel_backend(torch.device("cpu")) in ("cpp", "ref")


def test_second_order_search_step_gives_the_reference_alpha():
    from fastdarts import Architect
    from fastdarts.search_loop import search_step

    torch.manual_seed(7)
    ref, fused = _pair("cpu")
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    for net in (ref, fused):
        sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        architect = Architect(net, sgd, order="second")
        for _ in range(2):  # the second step also uses the momentum buffer
            search_step(net, architect, sgd, batches[0], batches[1], 5.0)
    for a_r, a_f in zip(ref.arch_parameters(), fused.arch_parameters()):
        torch.testing.assert_close(a_f, a_r, rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_three_search_steps_on_digits_give_the_reference_genotype(tmp_path):
    from fastdarts import search
    from test_search import TINY

    results = {backend: search(epochs=1, out=str(tmp_path / backend), backend=backend, log=lambda _: None, **TINY)
               for backend in ("reference", "fused")}
    assert results["fused"].genotype == results["reference"].genotype
    # Adam moves each α by about lr·g/|g| per step whatever |g| is, so where a
    # gradient is near zero fp32 rounding shows in α: allow 5% of the largest
    # move three steps can make (3 x 3e-4).
    for a_r, a_f in zip(results["reference"].model.arch_parameters(), results["fused"].model.arch_parameters()):
        torch.testing.assert_close(a_f, a_r, rtol=0, atol=0.05 * 3 * 3e-4)


@pytest.mark.parametrize("kernels", ["ref", "cpp", "triton"])
def test_every_kernel_backend_gives_the_reference(kernels, monkeypatch):
    from fastdarts import available_backends

    if kernels not in available_backends():
        pytest.skip(f"{kernels} kernels are not usable here ({available_backends()})")
    monkeypatch.setenv("FASTDARTS_BACKEND", kernels)
    torch.manual_seed(8)
    ref, fused = _pair("cpu")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    loss_r, grads_r = _grads(ref, x, y)
    loss_f, grads_f = _grads(fused, x, y)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=0)
    for gr, gf in zip(grads_r, grads_f):
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item())


def test_forcing_an_unusable_kernel_backend_is_a_clear_error(monkeypatch):
    from fastdarts.errors import FastDartsError

    monkeypatch.setenv("FASTDARTS_BACKEND", "cuda")
    with pytest.raises(FastDartsError, match="FASTDARTS_BACKEND=cuda cannot run on cpu"):
        kernel_backend(torch.device("cpu"))
    monkeypatch.setenv("FASTDARTS_BACKEND", "fast")
    with pytest.raises(FastDartsError, match="not a kernel backend"):
        kernel_backend(torch.device("cpu"))


@pytest.mark.parametrize("variant", ["cumulative_momentum", "no_running_stats", "one_bn_in_eval"])
def test_batchnorm_variants_match_the_reference(variant):
    from fastdarts.ops import DARTS_OPS

    torch.manual_seed(9)
    ref = MixedOp(4, 1, DARTS_OPS, backend="reference")
    fused = MixedOp(4, 1, DARTS_OPS, backend="fused")
    fused.load_state_dict(ref.state_dict())
    for m in (ref, fused):
        norms = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
        if variant == "cumulative_momentum":
            for b in norms:
                b.momentum = None
        elif variant == "no_running_stats":
            for b in norms:
                b.track_running_stats = False
                b.running_mean = b.running_var = b.num_batches_tracked = None
        else:  # a user freezes one BN: it uses running statistics, so the kernels' backward does not apply
            norms[3].eval()
    x = torch.randn(3, 4, 7, 7, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_(True)
    grads = []
    for m in (ref, fused):
        for _ in range(2):  # the second step sees the counters the first one moved
            out = m(x, w)
            grads.append(torch.autograd.grad(out.square().sum(), [x, w] + list(m.parameters())))
    for gr, gf in zip(grads[:2], grads[2:]):
        for a, b in zip(gr, gf):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_double_backward_is_refused_not_wrong():
    net = tiny_net(backend="fused")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(net.loss(x, torch.tensor([0, 1])), net.alpha_normal, create_graph=True)


def test_bf16_autocast_on_cpu_close_to_reference():
    torch.manual_seed(10)
    ref, fused = _pair("cpu")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    results = []
    for net in (ref, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net.loss(x, y)
        results.append((loss.float(), torch.autograd.grad(loss, net.arch_parameters())))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-2)
    for a, b in zip(results[0][1], results[1][1]):
        # bf16 has 8 bits of mantissa: compare the α gradients at the scale of their largest entry.
        assert (a - b).abs().max() <= 0.1 * a.abs().max() + 1e-4
