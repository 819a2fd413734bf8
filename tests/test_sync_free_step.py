"""Search and training steps read no device value on the host (a read
synchronises with the GPU and stalls the launch queue; a CUDA graph cannot
capture one). Two checks on the CPU: whole steps run on the ``meta`` device,
where any read of a value fails, and a dispatch mode fails on every op that
reads a value or has a data-dependent result inside a real CPU step."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdarts import Architect, NetworkCIFAR, DARTS_V2
from fastdarts.search_loop import search_step
from fastdarts.train_loop import train_step
from fastdarts.methods.progressive import set_skip_dropout
from helpers import tiny_net

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
BACKENDS = ["reference", "checkpoint", "fused"]


class NoHostReads(TorchDispatchMode):
    """Fails on an op that needs a device value on the host. ``allowed``
    tensors are exempt: the optimisers' step counters, which PyTorch keeps
    on the CPU precisely so that reading them costs no synchronisation."""

    def __init__(self, allowed=()):
        super().__init__()
        self.allowed = {id(t) for t in allowed}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        data_dependent = torch.Tag.data_dependent_output in func.tags or \
            torch.Tag.dynamic_output_shape in func.tags
        if func in HOST_READS or data_dependent:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if not (func in HOST_READS and tensors and all(id(t) in self.allowed for t in tensors)):
                raise AssertionError(f"{func} inside a step reads a device value on the host")
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def _one_thread():
    """What these tests check is which ops a step runs, not their numbers: one intra-op thread. With
    more, every op of a step under the dispatch mode (or on meta) wakes OpenMP workers that spin for
    a core; on a busy 2-core machine a step then took a minute instead of a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _step_counters(*optimizers):
    return [s["step"] for opt in optimizers for s in opt.state.values() if "step" in s]


# PC-DARTS' slice, bypass, shuffle and β are in the step too; P-DARTS' edges holding
# different ops and its skip dropout (random masks drawn on the device) too.
_PDARTS_OPS = {"normal": [("none", "skip_connect", "sep_conv_3x3"), ("max_pool_3x3", "skip_connect", "dil_conv_3x3"),
                          ("skip_connect", "sep_conv_3x3", "sep_conv_5x5"), ("none", "avg_pool_3x3", "skip_connect"),
                          ("avg_pool_3x3", "sep_conv_5x5", "dil_conv_5x5")],
               "reduce": [("none", "skip_connect", "sep_conv_3x3")] * 5}
METHODS = {"darts": {}, "pc-darts": dict(partial_channels=2, edge_norm=True), "darts-": dict(aux_skip=True),
           "p-darts": dict(edge_ops=_PDARTS_OPS, skip_dropout=0.3)}


def _grid(fast=None):
    """Every backend x order x method; those not in ``fast`` (None: all) only in the slow tier."""
    return [pytest.param(backend, order, method, id=f"{backend}-{order}-{method}",
                         marks=() if fast is None or (backend, order, method) in fast else (pytest.mark.slow,))
            for backend in BACKENDS for order in ("first", "second") for method in METHODS]


# Two steps on meta take seconds (its kernels are Python decompositions): the fast tier runs each
# backend, order and method there once; the host-read test below checks every combination.
META_FAST = {("checkpoint", "first", "darts"), ("fused", "second", "pc-darts"), ("reference", "first", "darts-"),
             ("fused", "first", "p-darts")}
# A second-order step on meta: about 10 s (fused-second-pc-darts above is the fast tier's).
SECOND_SLOW = pytest.param("second", marks=pytest.mark.slow)


def _search_setup(backend, order, device, recompute="edge", skip_dropout=None, **method):
    dropout = {} if skip_dropout is None else dict(skip_dropout=skip_dropout)  # the edges carry the term
    net = tiny_net(backend=backend, recompute=recompute, **method, **dropout).to(device)
    if skip_dropout is not None:
        set_skip_dropout(net, skip_dropout)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    architect = Architect(net, sgd, order=order)
    x = torch.randn(8, 3, 8, 8).to(device)
    y = torch.randint(0, 5, (8,)).to(device)
    return net, sgd, architect, (x, y)


@pytest.mark.parametrize("backend, order, method", _grid(META_FAST))
def test_search_step_runs_on_the_meta_device(backend, order, method):
    net, sgd, architect, batch = _search_setup(backend, order, "meta", **METHODS[method])
    for _ in range(2):  # the second step runs with momentum buffers and Adam state
        logits, loss, arch_loss = search_step(net, architect, sgd, batch, batch, 5.0)
    assert logits.device.type == "meta" and net.alpha_normal.device.type == "meta"


@pytest.mark.parametrize("order", ["first", SECOND_SLOW])
def test_search_step_with_cell_recompute_runs_on_the_meta_device(order):
    net, sgd, architect, batch = _search_setup("fused", order, "meta", recompute="cell")
    for _ in range(2):
        search_step(net, architect, sgd, batch, batch, 5.0)


@pytest.mark.parametrize("backend, order, method", _grid())
def test_search_step_has_no_host_read(backend, order, method):
    net, sgd, architect, batch = _search_setup(backend, order, "cpu", **METHODS[method])
    search_step(net, architect, sgd, batch, batch, 5.0)  # creates the optimiser state
    with NoHostReads(allowed=_step_counters(sgd, architect.optimizer)):
        search_step(net, architect, sgd, batch, batch, 5.0)


def test_a_warm_up_step_has_no_host_read():
    net, sgd, architect, batch = _search_setup("fused", "first", "cpu")
    search_step(net, architect, sgd, batch, batch, 5.0)
    with NoHostReads(allowed=_step_counters(sgd, architect.optimizer)):
        _, _, arch_loss = search_step(net, architect, sgd, batch, batch, 5.0, arch_step=False)
    assert arch_loss is None


def test_path_sampling_reads_alpha_on_the_host_and_says_so_on_meta():
    """The one method that must: the host launches the sampled ops, so it
    needs α's values (one small copy per forward). On the meta device that is
    a clear error, not a crash inside torch."""
    from fastdarts.errors import FastDartsError

    net, sgd, architect, batch = _search_setup("fused", "first", "meta", sample_paths=2)
    with pytest.raises(FastDartsError, match="path sampling .* host"):
        search_step(net, architect, sgd, batch, batch, 5.0)


def test_cumulative_batchnorm_momentum_has_no_host_read():
    """BatchNorm's momentum=None (a cumulative average) makes nn.BatchNorm2d
    call float() on its counter; the fused path keeps it on the device."""
    net, sgd, architect, batch = _search_setup("fused", "first", "cpu")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and not m.affine:  # the edges' (fused) BNs
            m.momentum = None
    search_step(net, architect, sgd, batch, batch, 5.0)
    with NoHostReads(allowed=_step_counters(sgd, architect.optimizer)):
        net.loss(*batch).backward()


def test_the_checker_can_fail():
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with NoHostReads():
            torch.ones(2).sum().item()
    with pytest.raises(AssertionError, match="nonzero"):
        with NoHostReads():
            torch.ones(2).nonzero()


def _train_setup(device):
    torch.manual_seed(0)
    net = NetworkCIFAR(DARTS_V2, C=4, num_classes=5, layers=3, auxiliary=True).to(device)
    net.drop_path_prob = 0.2
    sgd = torch.optim.SGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    # 32x32 (CIFAR): the auxiliary head pools the 8x8 maps after cell 2 as the original does.
    x, y = torch.randn(4, 3, 32, 32).to(device), torch.randint(0, 5, (4,)).to(device)
    return net, sgd, x, y


def test_train_step_runs_on_the_meta_device():
    net, sgd, x, y = _train_setup("meta")
    for _ in range(2):
        logits, loss, aux = train_step(net, sgd, x, y, auxiliary_weight=0.4, grad_clip=5.0, bf16=False)
    assert logits.device.type == "meta"


def test_train_step_has_no_host_read():
    net, sgd, x, y = _train_setup("cpu")
    train_step(net, sgd, x, y, auxiliary_weight=0.4, grad_clip=5.0, bf16=False)
    with NoHostReads(allowed=_step_counters(sgd)):
        train_step(net, sgd, x, y, auxiliary_weight=0.4, grad_clip=5.0, bf16=False)


@pytest.mark.parametrize("order", ["first", SECOND_SLOW])
def test_the_cuda_graph_optimisers_read_nothing_on_the_host(order):
    """Under --cuda-graph the weights' learning rate is a device tensor that
    the virtual step and DeviceLrSGD use without reading it (torch's SGD would)."""
    from fastdarts.cuda_graph import DeviceLrSGD, hold_lr_on_device
    from fastdarts.run_utils import set_lr

    for device in ("meta", "cpu"):
        net = tiny_net(backend="fused").to(device)
        sgd = DeviceLrSGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        hold_lr_on_device(sgd, True)
        architect = Architect(net, sgd, order=order)
        batch = (torch.randn(8, 3, 8, 8).to(device), torch.randint(0, 5, (8,)).to(device))
        search_step(net, architect, sgd, batch, batch, 5.0)  # creates the momentum buffers
        set_lr(sgd, 0.02)
        if device == "meta":
            search_step(net, architect, sgd, batch, batch, 5.0)
        else:
            with NoHostReads(allowed=_step_counters(architect.optimizer)):
                search_step(net, architect, sgd, batch, batch, 5.0)
    with pytest.raises(AssertionError, match="_local_scalar_dense"):  # torch's SGD reads a tensor lr
        sgd = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=torch.tensor(0.1))
        sgd.param_groups[0]["params"][0].grad = torch.ones(2)
        with NoHostReads():
            sgd.step()
