"""DARTS-' auxiliary skip (issue 9 §3): β_t·aux(x) added to every mixed op."""
import json

import pytest
import torch

from fastdarts.errors import FastDartsError
from fastdarts.methods.aux_skip import AuxiliarySkip, aux_skip_weight
from fastdarts.mixed_op import MixedOp
from fastdarts.ops import DARTS_OPS, FactorizedReduce, Identity
from fastdarts.search_loop import SearchConfig, search
from helpers import tiny_net

BACKENDS = ["reference", "checkpoint", "fused"]


def test_beta_falls_linearly_from_one_to_zero():
    assert [aux_skip_weight(t, 4) for t in range(4)] == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_op_adds_beta_times_the_auxiliary_op(backend, stride):
    torch.manual_seed(0)
    op = MixedOp(4, stride, DARTS_OPS, backend, terms=[AuxiliarySkip(None)]).double()
    assert isinstance(op.auxiliary_op, FactorizedReduce if stride == 2 else Identity)
    # Registered before the candidate ops, as DARTS-' code: weights copy across positionally.
    names = [n for n, _ in op.named_parameters()]
    if stride == 2:
        assert names[:2] == ["auxiliary_op.conv_1.weight", "auxiliary_op.conv_2.weight"]
    x = torch.randn(3, 4, 7, 7, dtype=torch.double, requires_grad=True)
    w = torch.softmax(torch.randn(8, dtype=torch.double), 0).requires_grad_()
    beta = torch.tensor(0.6, dtype=torch.double)
    y = op(x, w, extras={"aux_skip_weight": beta})
    # The formula, from the modules called one by one.
    expected = sum(wk * o(x) for wk, o in zip(w, op.ops)) + beta * op.auxiliary_op(x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, *op.parameters()], dy)
    expected_grads = torch.autograd.grad(expected, [x, w, *op.parameters()], dy)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", [{}, dict(partial_channels=2, edge_norm=True)])
@pytest.mark.parametrize("backend", ["checkpoint", "fused"])
def test_supernet_with_aux_skip_matches_the_reference(backend, method):
    torch.manual_seed(1)
    ref = tiny_net(backend="reference", aux_skip=True, **method).double()
    net = tiny_net(backend=backend, aux_skip=True, **method).double()
    net.load_state_dict(ref.state_dict())
    for m in (ref, net):
        m.start_epoch(0, 1, 4)  # β_t = 0.75
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.double), torch.randint(0, 5, (3,))
    results = []
    for m in (ref, net):
        xx = x.clone().requires_grad_()
        loss = m.loss(xx, y)
        results.append([loss, *torch.autograd.grad(loss, [xx, *m.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_zero_beta_is_plain_darts():
    torch.manual_seed(2)
    plain = tiny_net(backend="fused").double()
    aux = tiny_net(backend="fused", aux_skip=True).double()
    missing, unexpected = aux.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("auxiliary_op" in k for k in missing)
    aux.start_epoch(0, 4, 4)  # β_t = 1 − 4/4 = 0 (past the last epoch)
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.double), torch.randint(0, 5, (3,))
    torch.testing.assert_close(aux.loss(x, y), plain.loss(x, y), rtol=1e-12, atol=0)


def test_start_epoch_needs_the_number_of_epochs():
    with pytest.raises(FastDartsError, match="number of epochs"):
        tiny_net(aux_skip=True).start_epoch(0, 1)


def test_the_search_loop_decays_beta(tmp_path):
    config = SearchConfig(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2,
                          batch_size=16, max_steps=1, device="cpu", progress=False, order="first", epochs=3,
                          aux_skip=True)
    result = search(config, out=str(tmp_path), log=lambda _: None)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["aux_skip_weight"] for m in lines] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert float(result.model.aux_skip_weight) == pytest.approx(1 / 3)  # what the last epoch ran with
    assert lines[0]["config"]["aux_skip"] is True


def darts_minus_linear_decay(epoch: int, t_max: int = 50, t_start: int = 0, t_stop: int = 50,
                             base: float = 1.0) -> float:
    """The original's β_t, written from Meituan-AutoML/DARTS- src/utils.py:181-188
    (``DecayScheduler.step``, decay_type 'linear'): base·(T_max − epoch)/(T_max − T_start)
    while epoch ≤ T_stop; defaults from src/search/args.py:78-82 (skip_beta 1,
    decay_start_epoch 0, decay_stop_epoch 50, decay_max_epoch 50)."""
    assert t_start <= epoch <= t_stop
    return base * (t_max - epoch) / (t_max - t_start)


def test_the_darts_minus_preset_runs_the_original_settings():
    """scripts/run_darts_minus.sh: --auxiliary_skip --decay linear --skip_beta 1, no --unrolled
    (args.py:38: first order), the other settings DARTS' (args.py:28-37)."""
    config = SearchConfig(method="darts-").checked()
    assert config.aux_skip and config.order == "first"
    assert (config.batch_size, config.epochs, config.lr, config.lr_min, config.arch_lr, config.arch_weight_decay) == (
        64, 50, 0.025, 0.001, 3e-4, 1e-3)
    (method,) = [m for m in config.methods() if isinstance(m, AuxiliarySkip)]
    decay = method.decay_epochs(config.epochs)
    assert [aux_skip_weight(t, decay) for t in range(config.epochs)] == pytest.approx(
        [darts_minus_linear_decay(t) for t in range(50)], rel=1e-15)


def test_the_decay_length_is_its_own_option():
    # Past D the weight stays 0 (the original would go negative until decay_stop_epoch; see the module).
    assert [aux_skip_weight(t, 3) for t in range(5)] == [1.0, 1 - 1 / 3, 1 - 2 / 3, 0.0, 0.0]
    assert [aux_skip_weight(t, 50) for t in range(4)] == pytest.approx([darts_minus_linear_decay(t) for t in range(4)])
    config = SearchConfig(aux_skip=True, aux_skip_epochs=7, epochs=10).checked()
    (method,) = [m for m in config.methods() if isinstance(m, AuxiliarySkip)]
    assert method.decay_epochs(config.epochs) == 7
    config = SearchConfig(aux_skip=True, epochs=10).checked()  # the paper's text: over the run's epochs
    (method,) = [m for m in config.methods() if isinstance(m, AuxiliarySkip)]
    assert method.decay_epochs(config.epochs) == 10


def test_the_decay_length_is_recorded_per_epoch(tmp_path):
    result = search(dataset="digits", layout="N,R,N", channels=4, steps=2, multiplier=2, batch_size=16, epochs=3,
                    max_steps=1, order="first", device="cpu", progress=False, aux_skip=True, aux_skip_epochs=2,
                    out=str(tmp_path), log=lambda _: None)
    assert [h["aux_skip_weight"] for h in result.history] == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("kw, needle", [
    (dict(aux_skip=True, aux_skip_epochs=0), "aux-skip-epochs must be a positive integer"),
    (dict(aux_skip_epochs=5), "it needs --aux-skip"),
])
def test_bad_decay_lengths_are_refused(kw, needle):
    with pytest.raises(FastDartsError, match=needle):
        SearchConfig(**kw).checked()
