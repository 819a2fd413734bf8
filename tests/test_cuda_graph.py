"""``--cuda-graph``: what a captured step needs (a learning rate on the
device, a capturable Adam) is checked on the CPU against the plain step;
capture and replay themselves only where CUDA is (skipped otherwise)."""
import copy

import pytest
import torch

from fastdarts import Architect, FastDartsError, NetworkCIFAR, DARTS_V2, SearchConfig, TrainConfig, search, train
from fastdarts.cuda_graph import DeviceLrSGD, GraphedStep, adam_capturable, check_cuda_graph, hold_lr_on_device
from fastdarts.run_utils import cosine_lr, set_lr
from fastdarts.search_loop import search_step
from fastdarts.train_loop import train_step
from fastdarts.methods.progressive import set_skip_dropout
from helpers import search_cli_error, tiny_net

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _params(device="cpu"):
    torch.manual_seed(0)
    return [torch.randn(5, 3, device=device, requires_grad=True), torch.randn(7, device=device, requires_grad=True),
            torch.randn(2, device=device, requires_grad=True)]  # the last never gets a gradient


def _sgd_steps(optimizer_class, device_lr, steps=20, device="cpu"):
    params = _params(device)
    opt = optimizer_class(params, lr=0.1, momentum=0.9, weight_decay=3e-4)
    hold_lr_on_device(opt, device_lr)
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, 0.1, 0.001))
        for i, p in enumerate(params[:2]):  # the same gradients for both optimisers
            p.grad = torch.sin(torch.arange(p.numel(), dtype=p.dtype, device=p.device).view_as(p) + 7 * step + i)
        opt.step()
    return params, opt


def test_device_lr_sgd_with_a_float_lr_is_torch_sgd():
    ours, _ = _sgd_steps(DeviceLrSGD, device_lr=False)
    theirs, _ = _sgd_steps(torch.optim.SGD, device_lr=False)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_device_lr_sgd_with_a_tensor_lr_matches_torch_sgd():
    ours, opt = _sgd_steps(DeviceLrSGD, device_lr=True)
    theirs, reference = _sgd_steps(torch.optim.SGD, device_lr=False)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(cosine_lr(19, 20, 0.1, 0.001))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32 lr vs double
    assert torch.equal(ours[2], theirs[2])  # no gradient: untouched
    for p, q in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])


def test_a_checkpoint_moves_between_device_and_float_lr():
    """A state saved under graphs (tensor lr) loads into an eager run and back."""
    _, opt = _sgd_steps(DeviceLrSGD, device_lr=True, steps=3)
    state = copy.deepcopy(opt.state_dict())
    eager = DeviceLrSGD(_params(), lr=0.5, momentum=0.9, weight_decay=3e-4)
    eager.load_state_dict(state)
    hold_lr_on_device(eager, False)
    assert isinstance(eager.param_groups[0]["lr"], float)
    assert eager.param_groups[0]["lr"] == pytest.approx(cosine_lr(2, 3, 0.1, 0.001))
    hold_lr_on_device(eager, True)
    assert isinstance(eager.param_groups[0]["lr"], torch.Tensor)


def test_adam_capturable_moves_its_step_counts():
    p = torch.zeros(3, requires_grad=True)
    adam = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    adam.step()
    adam_capturable(adam, True)
    assert adam.param_groups[0]["capturable"] and adam.state[p]["step"].dtype == torch.float32
    adam_capturable(adam, False)
    assert not adam.param_groups[0]["capturable"] and adam.state[p]["step"].device.type == "cpu"
    adam.step()  # eager again
    assert adam.state[p]["step"].item() == 2


@pytest.mark.parametrize("order", ["first", "second"])
def test_search_steps_with_the_lr_on_the_device_match_float_lr(order):
    """The architect's virtual step reads ξ as a tensor under graphs: same α and weights."""
    results = []
    for device_lr in (False, True):
        torch.manual_seed(0)
        net = tiny_net(backend="fused")
        sgd = DeviceLrSGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        hold_lr_on_device(sgd, device_lr)
        architect = Architect(net, sgd, order=order)
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
        for step in range(4):
            set_lr(sgd, 0.025 * (1 - step / 8))
            search_step(net, architect, sgd, (x, y), (x.flip(0), y.flip(0)), 5.0)
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_check_cuda_graph_names_what_cannot_be_captured():
    with pytest.raises(FastDartsError, match="needs a CUDA device, got cpu"):
        check_cuda_graph(torch.device("cpu"))
    cuda = torch.device("cuda")  # a device object; nothing runs on it
    with pytest.raises(FastDartsError, match="torchrun"):
        check_cuda_graph(cuda, distributed=True)
    check_cuda_graph(cuda)  # fine


def test_methods_refuse_what_cuda_graphs_cannot_capture():
    # Each method says what it cannot capture, once, when the configuration is checked.
    graphed = dict(cuda_graph=True, device="cuda", epochs=2)
    with pytest.raises(FastDartsError, match="path sampling"):
        SearchConfig(method="proxyless", **graphed).checked()
    staged = dict(method="p-darts", stages="3:8,3:5", skip_dropout="0.1,0.2", arch_warmup_epochs=0, **graphed)
    with pytest.raises(FastDartsError, match="second-order step with skip dropout"):
        SearchConfig(**staged, order="second").checked()
    with pytest.raises(FastDartsError, match="--recompute cell with skip dropout"):
        SearchConfig(**staged, recompute="cell").checked()
    SearchConfig(**staged).checked()  # P-DARTS' first order: fine
    SearchConfig(**dict(staged, skip_dropout="0.0,0.0"), order="second", recompute="cell").checked()  # no dropout
    SearchConfig(order="second", recompute="cell", **graphed).checked()  # DARTS: fine


def test_cli_refuses_cuda_graph_on_the_cpu(capsys, tmp_path):
    err = search_cli_error(["--dataset", "digits", "--device", "cpu", "--cuda-graph", "--out", str(tmp_path)],
                           capsys)
    assert "--cuda-graph needs a CUDA device" in err
    with pytest.raises(FastDartsError, match="--cuda-graph needs a CUDA device"):
        train(TrainConfig(dataset="digits", device="cpu", cuda_graph=True, out=str(tmp_path / "t")))


def test_the_model_says_when_it_draws_random_numbers():
    net = tiny_net(skip_dropout=0.3)
    assert not net.draws_random_numbers
    set_skip_dropout(net, 0.3)
    assert net.draws_random_numbers
    net.eval()
    assert not net.draws_random_numbers


# -- on a GPU ----------------------------------------------------------------------------------
def _search_pair(backend, order, graphed, steps=20):
    torch.manual_seed(0)
    net = tiny_net(backend=backend).cuda()
    sgd = DeviceLrSGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    architect = Architect(net, sgd, order=order)
    hold_lr_on_device(sgd, graphed)
    adam_capturable(architect.optimizer, graphed)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 8, 8, generator=g).cuda(), torch.randint(0, 5, (8,), generator=g).cuda())
               for _ in range(2 * steps)]

    def step(x, y, xv, yv):
        return search_step(net, architect, sgd, (x, y), (xv, yv), 5.0)

    run = GraphedStep(step) if graphed else step
    losses = []
    for i in range(steps):
        set_lr(sgd, 0.025 * (1 - i / (2 * steps)))  # the schedule moves under the graph
        _, loss, _ = run(*batches[2 * i], *batches[2 * i + 1])
        losses.append(loss.clone())
    torch.cuda.synchronize()
    return net, torch.stack(losses), run


@needs_cuda
@pytest.mark.parametrize("order", ["first", "second"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_twenty_replayed_search_steps_equal_twenty_eager_ones(backend, order):
    eager, eager_losses, _ = _search_pair(backend, order, graphed=False)
    graphed, graph_losses, run = _search_pair(backend, order, graphed=True)
    assert run.replays == 20 - run.warmup and run.graph is not None
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)


@needs_cuda
def test_a_short_last_batch_runs_eagerly_between_replays():
    _, _, run = _search_pair("fused", "first", graphed=True, steps=5)
    x, y = torch.randn(3, 3, 8, 8).cuda(), torch.randint(0, 5, (3,)).cuda()
    calls, replays = run.eager_calls, run.replays
    run(x, y, x, y)  # 3 images: eager, on the tensors the graph updates
    assert run.eager_calls == calls + 1 and run.replays == replays
    x, y = torch.randn(8, 3, 8, 8).cuda(), torch.randint(0, 5, (8,)).cuda()
    _, loss, _ = run(x, y, x, y)
    assert torch.isfinite(loss).item()


@needs_cuda
def test_twenty_replayed_train_steps_equal_twenty_eager_ones():
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        net = NetworkCIFAR(DARTS_V2, C=8, num_classes=10, layers=3, auxiliary=True).cuda()
        net.drop_path_prob = 0.2
        net.drop_path_generator = generator = torch.Generator(device="cuda").manual_seed(5)
        sgd = DeviceLrSGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        hold_lr_on_device(sgd, graphed)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(16, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (16,), generator=g).cuda())
                   for _ in range(20)]

        def step(x, y):
            return train_step(net, sgd, x, y, auxiliary_weight=0.4, grad_clip=5.0, bf16=False)

        run = GraphedStep(step, generators=[generator]) if graphed else step
        for i, (x, y) in enumerate(batches):
            set_lr(sgd, 0.025 * (1 - i / 40))
            run(x, y)
        torch.cuda.synchronize()
        results.append(net.state_dict())
    for name, a in results[1].items():
        torch.testing.assert_close(a.float(), results[0][name].float(), rtol=1e-4, atol=1e-5, msg=name)


SEARCH = dict(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, batch_size=32,
              max_steps=6, device="cuda", progress=False, epochs=2, order="second")


@needs_cuda
@pytest.mark.parametrize("first_graphed", [True, False])
def test_a_checkpoint_taken_under_graphs_resumes_eagerly_and_back(tmp_path, first_graphed):
    whole = search(SearchConfig(**SEARCH), out=str(tmp_path / "whole"), log=lambda _: None)

    class Interrupt(Exception):
        pass

    def stop(entry):
        raise Interrupt

    with pytest.raises(Interrupt):
        search(SearchConfig(**SEARCH, cuda_graph=first_graphed), out=str(tmp_path / "split"), log=lambda _: None,
               on_epoch_end=stop)
    search(SearchConfig(**SEARCH, cuda_graph=not first_graphed), out=str(tmp_path / "split"), resume=True,
           log=lambda _: None)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(b[name].float(), a[name].float(), rtol=1e-4, atol=1e-5, msg=name)
    assert whole.history[-1]["epoch"] == 2


@needs_cuda
def test_train_runs_under_graphs_and_resumes_eagerly(tmp_path):
    common = dict(dataset="digits", layers=3, channels=8, batch_size=32, epochs=2, max_steps=6, device="cuda",
                  progress=False, bf16=False)
    whole = train(TrainConfig(**common, out=str(tmp_path / "whole")), log=lambda _: None)
    graphed = train(TrainConfig(**common, cuda_graph=True, out=str(tmp_path / "graphed")), log=lambda _: None)
    for a, b in zip(whole.history, graphed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
