"""The fused backend against the reference: same loss, gradients, BN statistics
and search results, with less kept for backward."""
import pytest
import torch

from fastdarts.fused_mixed_op import FusedMixedOpFunction, _candidate, _resolve_params
from fastdarts.kernels.backend import kernel_backend
from fastdarts.mixed_op import MixedOp
from helpers import TINY_SEARCH, assert_functional_call_matches, loss_and_grads, saved_activation_bytes, tiny_net

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OP_SETS = ["darts", "extended", "none,skip_connect,conv_3x3", "max_pool_3x3,sep_conv_5x5,conv_1x3_3x1"]


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
    loss_r, grads_r = loss_and_grads(ref, x, y)
    loss_f, grads_f = loss_and_grads(fused, x, y)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=0)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, gr, gf in zip(names, grads_r, grads_f):
        # fp32: relative error ≲ 1e-5 of the gradient's scale.
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item(), msg=name)
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# TF32 rounds every conv/matmul input to a 10-bit mantissa (unit roundoff
# u = 2^-11 ≈ 4.9e-4). Fused and reference round independently and compute BN
# statistics with different kernels, so their gradients may differ by the
# errors of both paths, each a few u deep in the tiny net (a CPU emulation of
# TF32 measured 6e-4 of scale): 8u of each gradient's scale.
TF32_TOLERANCE = 8 * 2.0 ** -11


@pytest.mark.tf32
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a CUDA (Ampere+) mode")
def test_fused_matches_reference_under_tf32():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("no TF32 before Ampere")
    assert torch.backends.cudnn.allow_tf32
    torch.manual_seed(1)
    ref, fused = _pair("cuda")
    x, y = torch.randn(4, 3, 8, 8, device="cuda"), torch.randint(0, 5, (4,), device="cuda")
    loss_r, grads_r = loss_and_grads(ref, x, y)
    loss_f, grads_f = loss_and_grads(fused, x, y)
    torch.testing.assert_close(loss_f, loss_r, rtol=TF32_TOLERANCE, atol=0)
    for name, gr, gf in zip(["x"] + [n for n, _ in ref.named_parameters()], grads_r, grads_f):
        torch.testing.assert_close(gf, gr, rtol=0, atol=TF32_TOLERANCE * gr.abs().max().item(), msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order", ["first", "second"])
def test_search_steps_on_cuda_give_the_cpu_alpha(order):
    """Not only placement: fixed batches, three search steps (TF32 off), α on
    CUDA equals α on the CPU within the fp32 argument of the three-step test
    below (Adam turns a gradient error δ into an α error ≈ lr·δ)."""
    from fastdarts import Architect
    from fastdarts.search_loop import search_step

    torch.manual_seed(20)
    cpu = tiny_net(backend="fused")
    gpu = tiny_net(backend="fused").cuda()
    gpu.load_state_dict(cpu.state_dict())
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    for net, device in ((cpu, "cpu"), (gpu, "cuda")):
        sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        architect = Architect(net, sgd, order=order)
        train, val = ((x.to(device), y.to(device)) for x, y in batches)
        for _ in range(3):
            search_step(net, architect, sgd, train, val, 5.0)
    for a_cpu, a_gpu in zip(cpu.arch_parameters(), gpu.arch_parameters()):
        torch.testing.assert_close(a_gpu.cpu(), a_cpu, rtol=0, atol=3 * 3e-4 * 1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("ops", ["darts", "extended"])
def test_fused_edge_updates_running_stats_exactly_once(ops, stride, dtype):
    """The fused path updates each BN's statistics once (never in the
    recompute): the same batch counts, and running statistics equal to the
    reference's to rounding (a second update would move them by the momentum,
    10%). Not bit for bit: on stride-2 edges the fused FactorizedReduce runs
    its 1x1 convs at stride 1 on the subsampled input, which oneDNN may sum in
    another order (seen with one thread); exactness is tested in float64."""
    from fastdarts.ops import resolve_ops

    torch.manual_seed(2)
    ref = MixedOp(6, stride, resolve_ops(ops), backend="reference").to(dtype)
    fused = MixedOp(6, stride, resolve_ops(ops), backend="fused").to(dtype)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 9, 9, dtype=dtype, requires_grad=True)
    w = torch.softmax(torch.randn(len(ref.ops), dtype=dtype), 0).requires_grad_(True)
    for m in (ref, fused):
        out = m(x, w)
        out.square().sum().backward()
    tol = dict(rtol=1e-12, atol=1e-15) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, **tol, msg=name)
        else:
            assert torch.equal(a, b), name  # num_batches_tracked: one update each


def test_fused_gradcheck_float64():
    torch.manual_seed(3)
    for stride in (1, 2):
        op = MixedOp(2, stride, ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                                 "dil_conv_3x3", "conv_1x3_3x1"), backend="fused").double()
        cands = [_candidate(k, m) for k, m in enumerate(op.ops)]
        params = _resolve_params(cands)
        x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
        w = torch.softmax(torch.randn(len(op.ops), dtype=torch.float64), 0).requires_grad_(True)
        # Max pool is not differentiable at ties; random input has none.
        assert torch.autograd.gradcheck(
            lambda x, w, *ps: FusedMixedOpFunction.apply(cands, stride, x, w, *ps), (x, w, *params),
            eps=1e-6, atol=1e-5, rtol=1e-4)


def _preprocessing_grads(module, x, use_fused, need_x, need_weight):
    from fastdarts.fused_mixed_op import fused_preprocess

    x = x.clone().requires_grad_(need_x)
    module.op[1].weight.requires_grad_(need_weight)
    y = fused_preprocess(module, x) if use_fused else module(x)
    leaves = [t for t, need in ((x, need_x), (module.op[1].weight, need_weight)) if need]
    grads = torch.autograd.grad((y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum(), leaves)
    return y.detach(), grads


@pytest.mark.parametrize("need_x,need_weight", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_cells_1x1_preprocessing_takes_the_matmul_backward_and_gives_the_reference(need_x, need_weight, dtype):
    """ReLU -> 1x1 conv -> BN (a cell's preprocessing) differentiates its conv
    with two matmuls instead of the convolution backward: odd sizes, every
    combination of wanted gradients, against the module itself."""
    from fastdarts.ops import ReLUConvBN

    torch.manual_seed(7)
    module = ReLUConvBN(5, 7, 1, 1, 0, affine=False).to(dtype)
    assert _candidate(0, module).pointwise
    # Other convs keep the autograd backward: k > 1, stride 2, a bias.
    assert not _candidate(0, ReLUConvBN(5, 7, 3, 1, 1, affine=False)).pointwise
    assert not _candidate(0, ReLUConvBN(5, 7, 1, 2, 0, affine=False)).pointwise
    biased = ReLUConvBN(5, 7, 1, 1, 0, affine=False)
    biased.op[1] = torch.nn.Conv2d(5, 7, 1, bias=True)
    assert not _candidate(0, biased).pointwise
    x = torch.randn(3, 5, 5, 3, dtype=dtype)
    reference = ReLUConvBN(5, 7, 1, 1, 0, affine=False).to(dtype)
    reference.load_state_dict(module.state_dict())
    y_r, grads_r = _preprocessing_grads(reference, x, False, need_x, need_weight)
    y_f, grads_f = _preprocessing_grads(module, x, True, need_x, need_weight)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_f, y_r, **tol)
    assert len(grads_f) == len(grads_r) == need_x + need_weight
    for gf, gr in zip(grads_f, grads_r):
        assert gf.dtype == gr.dtype and gf.shape == gr.shape
        torch.testing.assert_close(gf, gr, rtol=tol["rtol"], atol=tol["atol"] * gr.abs().max().item())
    torch.testing.assert_close(module.op[2].running_var, reference.op[2].running_var, **tol)


def test_the_1x1_preprocessings_weight_gradient_under_autocast_is_summed_in_fp32():
    """Under bf16 autocast the matmul backward of a 1x1 preprocessing sums the
    batch's products in fp32 (autocast off inside): its weight gradient is as
    close to fp64 as the convolution backward's, which rounds once. A bf16
    bmm rounds every sample's product first (measured: 2.5x the reference's
    error at this size)."""
    import contextlib

    from fastdarts.fused_mixed_op import fused_preprocess
    from fastdarts.ops import ReLUConvBN

    torch.manual_seed(0)
    module = ReLUConvBN(64, 32, 1, 1, 0, affine=False)
    module64 = ReLUConvBN(64, 32, 1, 1, 0, affine=False).double()
    module64.load_state_dict(module.state_dict())
    x = torch.randn(32, 64, 16, 16)

    def weight_grad(m, x, fused, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            y = fused_preprocess(m, x) if fused else m(x)
        probe = torch.linspace(-1, 2, y.numel(), dtype=torch.float64).view_as(y)
        return torch.autograd.grad((y.double() * probe).sum(), m.op[1].weight)[0].double()

    exact = weight_grad(module64, x.double(), False, False)
    err = {fused: ((weight_grad(module, x, fused, True) - exact).abs().max() / exact.abs().max()).item()
           for fused in (False, True)}
    assert err[True] <= 1.25 * err[False], err


# One bf16 rounding at the scale of the result (unit roundoff 2^-9, so 2^-8
# covers a rounding of each of the two results compared).
BF16_FLOOR = 2.0 ** -8


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, BF16_FLOOR)])
def test_fused_low_precision_close_to_reference(dtype, tol):
    torch.manual_seed(4)
    ref, fused = _pair("cpu", dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    y = torch.randint(0, 5, (4,))
    ref64 = tiny_net(backend="reference").double()
    ref64.load_state_dict(ref.state_dict())
    loss_64, grads_64 = loss_and_grads(ref64, x.double(), y)
    loss_r, grads_r = loss_and_grads(ref, x, y)
    loss_f, grads_f = loss_and_grads(fused, x, y)
    # flash-attention's criterion: no worse than twice PyTorch's own error in that dtype.
    err_r = max((a.double() - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads_r, grads_64))
    err_f = max((a.double() - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads_f, grads_64))
    assert err_f <= 2 * err_r + tol, (err_f, err_r)
    assert abs(loss_f.double() - loss_64) <= 2 * abs(loss_r.double() - loss_64) + tol * abs(loss_64)


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
    loss_r, grads_r = loss_and_grads(ref, x, torch.tensor([0, 1]))
    loss_f, grads_f = loss_and_grads(fused, x, torch.tensor([0, 1]))
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


def _digits_batches(n_batches, batch=32):
    """The first ``n_batches`` pairs of (train, validation) batches of digits, normalised, float64."""
    from fastdarts.data import load_dataset

    data = load_dataset("digits")
    images = data.train.images.double() / 255
    mean = torch.tensor(data.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float64).view(1, -1, 1, 1)
    images, labels = (images - mean) / std, data.train.labels
    for i in range(n_batches):
        t, v = slice(2 * i * batch, (2 * i + 1) * batch), slice((2 * i + 1) * batch, (2 * i + 2) * batch)
        yield (images[t], labels[t]), (images[v], labels[v])


@pytest.mark.parametrize("order", ["first", "second"])
def test_three_search_steps_on_digits_give_the_reference_in_float64(order):
    """Three whole search steps (architecture step, then weight step) on real
    digits batches: in float64 fused and reference agree to rounding, in α
    (Adam normalises each gradient component, so a near-zero component's
    rounding would show here in float32 at any tolerance below the learning
    rate: that is why this test is float64), weights and the genotype."""
    from fastdarts import SearchNetwork
    from fastdarts.architect import Architect
    from fastdarts.search_loop import search_step

    torch.manual_seed(3)
    kw = dict(C=4, num_classes=10, layout="N,R,N", ops="darts", steps=2, multiplier=2, in_channels=1)
    nets = {"reference": SearchNetwork(backend="reference", **kw).double()}
    nets["fused"] = SearchNetwork(backend="reference", **kw).double()
    nets["fused"].load_state_dict(nets["reference"].state_dict())
    nets["fused"].set_backend("fused")
    for net in nets.values():
        w_opt = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        architect = Architect(net, w_opt, order=order, lr=3e-4, weight_decay=1e-3, betas=(0.5, 0.999))
        for train, val in _digits_batches(3):
            search_step(net, architect, w_opt, train, val, grad_clip=5.0)
    ref, fused = nets["reference"], nets["fused"]
    for a_r, a_f in zip(ref.arch_parameters(), fused.arch_parameters()):
        assert (a_r - a_r.detach().clone().zero_()).abs().max() > 0  # α moved
        torch.testing.assert_close(a_f, a_r, rtol=0, atol=1e-12)
    for (name, w_r), w_f in zip(ref.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(w_f, w_r, rtol=1e-9, atol=1e-12, msg=name)
    assert fused.genotype() == ref.genotype()


def test_search_on_digits_in_float32_gives_the_reference_losses(tmp_path):
    """The whole search loop in float32: what float32 can promise across
    machines and thread counts is the losses to its rounding (α's small
    components are normalised by Adam; the float64 test above checks them)."""
    from fastdarts import search

    results = {backend: search(epochs=1, out=str(tmp_path / backend), backend=backend, log=lambda _: None,
                               **TINY_SEARCH)
               for backend in ("reference", "fused")}
    r, f = results["reference"].history[0], results["fused"].history[0]
    for key in ("train_loss", "arch_loss", "val_loss"):
        assert f[key] == pytest.approx(r[key], rel=1e-4), key


@pytest.mark.parametrize("kernels", ["ref", "cpp", "triton"])
def test_every_kernel_backend_gives_the_reference(kernels, monkeypatch):
    from fastdarts import available_backends

    if kernels not in available_backends():
        pytest.skip(f"{kernels} kernels are not usable here ({available_backends()})")
    monkeypatch.setenv("FASTDARTS_BACKEND", kernels)
    torch.manual_seed(8)
    ref, fused = _pair("cpu")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    loss_r, grads_r = loss_and_grads(ref, x, y)
    loss_f, grads_f = loss_and_grads(fused, x, y)
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
    """bf16 autocast: fused is no further from the fp64 result than twice the
    reference's own bf16 error, plus one bf16 rounding (flash-attention's criterion)."""
    torch.manual_seed(10)
    ref, fused = _pair("cpu")
    ref64 = tiny_net(backend="reference").double()
    ref64.load_state_dict(ref.state_dict())
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    loss_64 = ref64.loss(x.double(), y)
    grads_64 = torch.autograd.grad(loss_64, ref64.arch_parameters())
    results = []
    for net in (ref, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net.loss(x, y)
        results.append((loss.detach().double(), torch.autograd.grad(loss, net.arch_parameters())))
    (loss_r, grads_r), (loss_f, grads_f) = results
    assert abs(loss_f - loss_64) <= 2 * abs(loss_r - loss_64) + BF16_FLOOR * abs(loss_64)
    for gr, gf, g64 in zip(grads_r, grads_f, grads_64):
        err_r = (gr.double() - g64).abs().max() / g64.abs().max()
        err_f = (gf.double() - g64).abs().max() / g64.abs().max()
        assert err_f <= 2 * err_r + BF16_FLOOR, (err_f, err_r)


# -- the recompute uses exactly the forward's tensors (issue 12 §1) ----------

BACKENDS = ["reference", "checkpoint", "fused"]
PROBE_OPS = ("sep_conv_3x3", "skip_connect", "max_pool_3x3")


def _edge(backend, seed=11):
    torch.manual_seed(seed)
    return MixedOp(4, 1, PROBE_OPS, backend=backend)


def _substitutes(module, seed=12):
    """New tensors for every parameter, differing from the module's own."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (p.detach() * 1.5 + 0.3 * torch.randn(p.shape, generator=gen)).requires_grad_(True)
            for name, p in module.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_uses_the_substituted_weights(backend):
    """``functional_call`` (how an unrolled step is written): forward and
    backward both see the substituted tensors, never the module's own."""
    edge = _edge(backend)
    subs = _substitutes(edge)
    x = torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(13), requires_grad=True)
    w = torch.softmax(torch.tensor([0.3, -0.2, 0.5]), 0).requires_grad_(True)
    out = torch.func.functional_call(edge, subs, (x, w))
    grads = torch.autograd.grad(out.square().sum(), [x, w, *subs.values()])
    # Ground truth: a reference edge that holds the substituted weights itself.
    truth = _edge("reference")
    truth.load_state_dict({**edge.state_dict(), **{k: v.detach() for k, v in subs.items()}})
    out_t = truth(x, w)
    grads_t = torch.autograd.grad(out_t.square().sum(), [x, w, *truth.parameters()])
    torch.testing.assert_close(out, out_t, rtol=1e-6, atol=1e-6)
    for name, g, gt in zip(["x", "w", *subs], grads, grads_t):
        torch.testing.assert_close(g, gt, rtol=1e-5, atol=1e-5 * gt.abs().max().item(), msg=name)
    assert all(p.grad is None for p in edge.parameters())  # the module's own weights got nothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_on_the_supernet(backend):
    torch.manual_seed(14)
    net = tiny_net(backend=backend)
    truth = tiny_net(backend="reference")
    truth.load_state_dict(net.state_dict())
    assert_functional_call_matches(net, truth, _substitutes(net))


@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_reload_after_a_first_step(backend):
    """``load_state_dict(assign=True)`` swaps the parameter objects: the
    next steps differentiate the new ones."""
    torch.manual_seed(15)
    net, truth = tiny_net(backend=backend), tiny_net(backend="reference")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    net.loss(x, y).backward()
    new = {k: v.clone() * (1.2 if v.is_floating_point() else 1) for k, v in truth.state_dict().items()}
    net.load_state_dict(new, assign=True)
    truth.load_state_dict(new)
    grads = torch.autograd.grad(net.loss(x, y), list(net.parameters()))
    grads_t = torch.autograd.grad(truth.loss(x, y), list(truth.parameters()))
    for (name, _), g, gt in zip(net.named_parameters(), grads, grads_t):
        torch.testing.assert_close(g, gt, rtol=1e-5, atol=1e-5 * gt.abs().max().item(), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_and_modules_replaced_between_steps(backend):
    torch.manual_seed(16)
    nets = {b: _edge(b) for b in (backend, "reference")}
    x = torch.randn(3, 4, 7, 7, requires_grad=True)
    w = torch.softmax(torch.tensor([0.3, -0.2, 0.5]), 0).requires_grad_(True)
    results = {}
    for b, edge in nets.items():
        edge(x, w).sum().backward()
        torch.manual_seed(17)
        edge.ops[0].op[1].weight = torch.nn.Parameter(torch.randn_like(edge.ops[0].op[1].weight))
        edge.ops[0].op[5] = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True)  # a new module, with a bias
        out = edge(x, w)
        results[b] = torch.autograd.grad(out.square().sum(), [x, w, *edge.parameters()])
    for g, gt in zip(results[backend], results["reference"]):
        # The new bias's gradient is zero up to rounding (a BN follows): an absolute floor of the
        # rounding of a 147-term fp32 sum of O(1) values (1e-5 failed under OMP_NUM_THREADS=1).
        torch.testing.assert_close(g, gt, rtol=1e-5, atol=1e-4 * max(gt.abs().max().item(), 1.0))


# -- the recompute runs under the forward's autocast state (issue 12 §2) ------

@pytest.mark.parametrize("forward_autocast", [False, True])
def test_recompute_follows_the_forward_autocast_state(forward_autocast):
    """Whatever autocast state the backward runs in, the gradients are the
    ones of the forward's state: bit-identical on the CPU. One edge, so that
    no built-in op's backward is in the graph (those follow the ambient
    autocast state in PyTorch itself, reference included)."""
    edge = _edge("fused", seed=18)
    x = torch.randn(3, 4, 7, 7, requires_grad=True)
    w = torch.softmax(torch.tensor([0.3, -0.2, 0.5]), 0).requires_grad_(True)
    grads = []
    for backward_autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_autocast):
            out = edge(x, w)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_autocast):
            grads.append(torch.autograd.grad(out, [x, w, *edge.parameters()], torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b), (a - b).abs().max()


# -- what the fused path cannot compute is refused (issue 12 §3) -------------

@pytest.mark.parametrize("when", ["before", "after"])
def test_sync_batchnorm_is_refused(when):
    from fastdarts.errors import FastDartsError

    net = tiny_net(backend="fused")
    x = torch.randn(2, 3, 8, 8)
    if when == "after":  # the structure cached at the first forward must not hide the new modules
        net(x)
    net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    with pytest.raises(FastDartsError, match="SyncBatchNorm.*backend='reference'"):
        net(x)


def test_subclassed_conv_is_refused():
    from fastdarts.errors import FastDartsError

    class StandardisedConv(torch.nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    edge = _edge("fused")
    old = edge.ops[0].op[1]
    edge.ops[0].op[1] = StandardisedConv(4, 4, 3, padding=1, groups=4, bias=False)
    edge.ops[0].op[1].weight = old.weight
    with pytest.raises(FastDartsError, match="StandardisedConv"):
        edge(torch.randn(2, 4, 5, 5), torch.tensor([0.2, 0.3, 0.5]))


# -- kernel selection survives kernels that fail on first use (issue 12 §4) --

def _triton_fails_to_compile(monkeypatch):
    """Triton preferred on the CPU (through its interpreter), and its kernels
    failing on first use the way an old ptxas makes them fail."""
    from fastdarts.kernels import backend, triton_bn_accumulate

    if not triton_bn_accumulate.HAS_TRITON:
        pytest.skip(f"triton unusable: {triton_bn_accumulate.TRITON_ERROR}")

    def broken(*args, **kwargs):
        raise RuntimeError("PTXAS error: Internal Triton PTX codegen error\nptxas fatal : Value 'sm_999' is not "
                           "defined for option 'gpu-name'")

    monkeypatch.setattr(triton_bn_accumulate, "bn_accumulate_triton", broken)
    monkeypatch.setattr(backend, "_DEFAULTS", {**backend._DEFAULTS, "cpu": ("triton", "cpp", "ref")})
    monkeypatch.setattr(backend, "_PROBED", {})
    monkeypatch.setattr(backend, "_WARNED", set())
    monkeypatch.delenv("FASTDARTS_BACKEND", raising=False)


def test_a_kernel_that_fails_to_compile_falls_back_with_one_warning(monkeypatch):
    from fastdarts import available_backends

    _triton_fails_to_compile(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"the triton kernels fail on cpu \(RuntimeError: PTXAS error.*\); "
                                            r"using the (cpp|ref) kernels on cpu instead"):
        chosen = kernel_backend(torch.device("cpu"))
    assert chosen == ("cpp" if "cpp" in available_backends() else "ref")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        assert kernel_backend(torch.device("cpu")) == chosen
        torch.manual_seed(19)
        ref, fused = _pair("cpu")
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        (loss_r, grads_r), (loss_f, grads_f) = loss_and_grads(ref, x, y), loss_and_grads(fused, x, y)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=0)
    for gr, gf in zip(grads_r, grads_f):
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item())


def test_a_forced_kernel_that_fails_is_an_error_naming_the_failure(monkeypatch):
    from fastdarts.errors import FastDartsError

    _triton_fails_to_compile(monkeypatch)
    monkeypatch.setenv("FASTDARTS_BACKEND", "triton")
    with pytest.raises(FastDartsError, match=r"FASTDARTS_BACKEND=triton: its kernels fail on cpu "
                                             r"\(RuntimeError: PTXAS error: Internal Triton PTX codegen error\)"):
        kernel_backend(torch.device("cpu"))


def test_channels_last_is_converted_once_per_edge_not_per_op(monkeypatch):
    """A channels-last model and input: same numbers as the reference, and
    every tensor the kernels get is already NCHW-contiguous (the kernels copy
    anything else)."""
    import fastdarts.fused_mixed_op as fmo

    seen = []

    def recording(device):
        ops = kernel_ops(device)
        def fwd(acc, z, *rest):
            seen.append(z.is_contiguous() and acc.is_contiguous())
            return ops.bn_accumulate(acc, z, *rest)
        def bwd(dy, z, *rest):
            seen.append(z.is_contiguous() and dy.is_contiguous())
            return ops.bn_accumulate_backward(dy, z, *rest)
        return ops._replace(bn_accumulate=fwd, bn_accumulate_backward=bwd)

    from fastdarts.kernels.backend import kernel_ops
    monkeypatch.setattr(fmo, "kernel_ops", recording)
    torch.manual_seed(21)
    ref, fused = _pair("cpu")
    for net in (ref, fused):
        net.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (4,))
    loss_r, grads_r = loss_and_grads(ref, x, y)
    loss_f, grads_f = loss_and_grads(fused, x, y)
    assert seen and all(seen)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=0)
    for gr, gf in zip(grads_r, grads_f):
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item())


def test_weight_hooks_fire_once_as_on_the_reference():
    counts = {}
    for backend in ("reference", "fused"):
        edge = _edge(backend)
        counts[backend] = 0

        def hook(grad, backend=backend):
            counts[backend] += 1

        edge.ops[0].op[1].weight.register_hook(hook)
        x = torch.randn(2, 4, 5, 5, requires_grad=True)
        edge(x, torch.tensor([0.2, 0.3, 0.5])).sum().backward()
    assert counts == {"reference": 1, "fused": 1}


@pytest.mark.parametrize("hook", ["forward_hook", "spectral_norm"])
def test_module_hooks_are_refused_not_skipped(hook):
    """The fused form never calls the modules, so a module hook (and old-style
    spectral_norm, built on one) would silently not run."""
    from fastdarts.errors import FastDartsError

    edge = _edge("fused")
    x, w = torch.randn(2, 4, 5, 5), torch.tensor([0.2, 0.3, 0.5])
    edge(x, w)  # the structure is cached by now: the hook must still be seen
    if hook == "forward_hook":
        edge.ops[0].op[-1].register_forward_hook(lambda m, i, o: o * 2)
    else:
        torch.nn.utils.spectral_norm(edge.ops[0].op[1])
    with pytest.raises(FastDartsError, match="module hook"):
        edge(x, w)


def test_settings_changed_after_the_first_forward_are_checked_again():
    from fastdarts.errors import FastDartsError

    edge = _edge("fused")
    x, w = torch.randn(2, 4, 5, 5), torch.tensor([0.2, 0.3, 0.5])
    edge(x, w)
    edge.ops[0].op[1].padding_mode = "circular"
    with pytest.raises(FastDartsError, match="padding_mode='circular'"):
        edge(x, w)


def test_eval_mode_uses_running_statistics_whenever_they_exist():
    """nn.BatchNorm2d in eval mode normalises with its buffers even after
    ``track_running_stats`` was switched off; so must the fused forward."""
    torch.manual_seed(22)
    ref, fused = _edge("reference"), _edge("fused")
    x, w = torch.randn(3, 4, 6, 6), torch.softmax(torch.randn(3), 0)
    with torch.no_grad():
        for edge in (ref, fused):
            edge(x * 3 + 1, w)  # move the running statistics away from the batch's
            for b in edge.modules():
                if isinstance(b, torch.nn.BatchNorm2d):
                    b.track_running_stats = False
            edge.eval()
        torch.testing.assert_close(fused(x, w), ref(x, w), rtol=1e-5, atol=1e-6)


def test_first_call_under_inference_mode_does_not_poison_training(monkeypatch):
    import fastdarts.fused_mixed_op as fmo

    monkeypatch.setattr(fmo, "_ONE", {})
    net = tiny_net(backend="fused")
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    with torch.inference_mode():
        net(x)
    net.loss(x, y).backward()
    assert net.alpha_normal.grad is not None


def test_no_probe_is_cached_under_a_fake_tensor_mode(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fastdarts.kernels import backend

    monkeypatch.setattr(backend, "_PROBED", {})
    with FakeTensorMode():
        assert backend._probed("cpp", torch.device("cpu")) is None
    assert backend._PROBED == {}


def test_gradients_in_eval_mode_are_recomputed_not_kept():
    """Gradients through BN on running statistics (e.g. SDARTS-ADV's attack on
    the op weights, run in eval mode) are not the kernels' (they assume batch
    statistics): each mixed op's reference is recomputed in backward, so the
    fused backend still keeps no op outputs. Same gradients, float64."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(8)
        nets = {"reference": tiny_net(backend="reference", C=8)}
        for backend in ("checkpoint", "fused"):
            nets[backend] = tiny_net(backend=backend, C=8)
            nets[backend].load_state_dict(nets["reference"].state_dict())
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        with torch.no_grad():
            for net in nets.values():
                net(x * 2 + 1)  # running statistics away from the batch's
                net.eval()
        grads = {b: loss_and_grads(net, x, y) for b, net in nets.items()}
        for backend in ("checkpoint", "fused"):
            torch.testing.assert_close(grads[backend][0], grads["reference"][0], rtol=1e-12, atol=1e-12)
            for a, b in zip(grads[backend][1], grads["reference"][1]):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        kept = {b: saved_activation_bytes(net, x, y) for b, net in nets.items()}
        assert kept["fused"] <= kept["checkpoint"] and kept["fused"] < kept["reference"] / 3, kept
    finally:
        torch.set_default_dtype(dtype)
