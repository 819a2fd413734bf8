"""β-DARTS' Beta-Decay regularisation: λ_t · mean over edges of logsumexp(α) on the architecture loss."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastdarts import Architect
from fastdarts.method import PRESETS
from fastdarts.methods.beta_decay import beta_decay_weight
from fastdarts.search_loop import SearchConfig, search
from helpers import Interrupt, search_cli_error, stop_after_first_epoch, tiny_net

TINY = dict(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, batch_size=16,
            epochs=2, max_steps=2, device="cpu", progress=False)
PRESET = dict(beta_decay=50.0, beta_decay_epochs=100)


def original_term(alpha_normal, alpha_reduce, epoch):
    """The original's, written from Sunshine-Ye/Beta-DARTS optimizers/darts/architect.py:55-59 and 81:
    weights = 0 + 50*epoch/100; mlc_loss = mean over the rows of α of log(Σ exp(row)); α stacked over
    the two cell types (one matrix of 2k edges, as its NAS-Bench-201 model's single α)."""
    weights = 0 + 50 * epoch / 100
    rows = list(alpha_normal) + list(alpha_reduce)
    return weights * sum(torch.log(torch.exp(row).sum()) for row in rows) / len(rows)


def _net(**kw):
    net = tiny_net(**{**PRESET, **kw}).double()
    with torch.no_grad():
        for a in (net.alpha_normal, net.alpha_reduce):
            a.copy_(torch.randn_like(a))  # away from the near-uniform start: a term worth testing
    return net


def _batch(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.double), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("epoch", [0, 1, 7, 49])
def test_the_term_is_the_originals(epoch):
    net = _net()
    net.start_epoch(0, epoch, 50)
    expected = original_term(net.alpha_normal, net.alpha_reduce, epoch)
    torch.testing.assert_close(net.arch_loss_terms(), expected, rtol=1e-13, atol=1e-15)


def test_the_weight_grows_linearly_from_zero():
    # The preset: the original's literal 50·t/100, whatever the run's length (not capped at λ).
    assert [beta_decay_weight(50.0, t, 100) for t in (0, 1, 2, 49, 150)] == [0.0, 0.5, 1.0, 24.5, 75.0]
    # Unset ramp: over the run's epochs (of the stage, in a staged run).
    net = tiny_net(beta_decay=8.0)
    seen = []
    for t in range(4):
        net.start_epoch(0, t, 4)
        seen.append(float(net.beta_decay_weight))
    assert seen == [0.0, 2.0, 4.0, 6.0]
    net.start_epoch(0, 9, 4, stage_epoch=1)
    assert float(net.beta_decay_weight) == 2.0


def test_only_alpha_is_regularised():
    # The original regularises α (its _arch_parameters), not another method's β.
    net = _net(edge_norm=True)
    net.start_epoch(0, 10, 50)
    betas = net.arch_parameters()[2:]
    assert len(betas) == 2
    grads = torch.autograd.grad(net.arch_loss_terms(), net.arch_parameters(), allow_unused=True)
    assert all(g is None for g in grads[2:]) and all(g is not None for g in grads[:2])


def test_first_order_gradient_is_val_loss_plus_the_term():
    net = _net()
    net.start_epoch(0, 10, 50)  # λ_t = 5
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    arch = Architect(net, sgd, order="first")
    (xt, yt), (xv, yv) = _batch(seed=1), _batch(seed=2)
    grads, val_loss = arch.arch_gradients(xt, yt, xv, yv)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    # Independently: autograd of the validation loss plus the original's term.
    plain = tiny_net().double()
    plain.load_state_dict(state)
    objective = F.cross_entropy(plain(xv), yv) + original_term(plain.alpha_normal, plain.alpha_reduce, 10)
    expected = torch.autograd.grad(objective, [plain.alpha_normal, plain.alpha_reduce])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(val_loss, F.cross_entropy(plain(xv), yv).detach(), rtol=1e-12, atol=0)


def test_second_order_gradient_adds_the_terms_gradient():
    net = _net()
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    arch = Architect(net, sgd, order="second")
    (xt, yt), (xv, yv) = _batch(seed=1), _batch(seed=2)
    net.start_epoch(0, 0, 50)  # λ_0 = 0: DARTS' second-order gradient
    without, _ = arch.arch_gradients(xt, yt, xv, yv)
    net.start_epoch(0, 10, 50)  # λ_t = 5
    with_term, _ = arch.arch_gradients(xt, yt, xv, yv)
    a_n, a_r = (a.detach().clone().requires_grad_() for a in (net.alpha_normal, net.alpha_reduce))
    expected = torch.autograd.grad(original_term(a_n, a_r, 10), [a_n, a_r])
    for w, wo, e in zip(with_term, without, expected):
        assert not torch.allclose(w, wo)
        torch.testing.assert_close(w - wo, e, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend, recompute", [("checkpoint", "edge"), ("fused", "edge"), ("fused", "cell")])
def test_architecture_gradient_matches_the_reference(backend, recompute):
    ref = _net()
    net = tiny_net(backend=backend, recompute=recompute, **PRESET).double()
    net.load_state_dict(ref.state_dict())
    out = []
    for m in (ref, net):
        m.start_epoch(0, 20, 50)
        sgd = torch.optim.SGD(m.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        out.append(Architect(m, sgd, order="first").arch_gradients(*_batch(seed=1), *_batch(seed=2)))
    for a, b in zip(out[0][0] + [out[0][1]], out[1][0] + [out[1][1]]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_preset_and_canonical_options():
    preset = PRESETS["beta-darts"]
    assert (preset["order"], preset["beta_decay"], preset["beta_decay_epochs"]) == ("first", 50.0, 100)
    cfg = SearchConfig(method="beta-darts", **TINY).checked()
    assert (cfg.beta_decay, cfg.beta_decay_epochs, cfg.order, cfg.lr, cfg.arch_lr) == (50.0, 100, "first", 0.025,
                                                                                        3e-4)
    assert [type(m).__name__ for m in cfg.methods()] == ["BetaDecay"]
    # The CLI's text and a number are one setting.
    assert SearchConfig(beta_decay="2.5", **TINY).checked().beta_decay == 2.5
    # λ = 0 under the preset switches the method off (its ramp with it).
    off = SearchConfig(method="beta-darts", beta_decay=0, **TINY).checked()
    assert (off.beta_decay, off.beta_decay_epochs, off.methods()) == (0.0, None, ())


def _run(tmp_path, name, **kw):
    return search(SearchConfig(method="beta-darts", **{**TINY, **kw}), out=str(tmp_path / name),
                  log=lambda _: None)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_search_end_to_end_and_exact_resume(tmp_path, backend):
    whole = _run(tmp_path, "whole", backend=backend)
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [m["beta_decay_weight"] for m in lines] == [0.0, 0.5]
    for m in lines:
        assert math.isfinite(m["beta_decay_loss"]) and m["config"]["beta_decay"] == 50.0
    assert float(whole.model.beta_decay_weight) == 0.5  # what the last epoch ran with

    with pytest.raises(Interrupt):
        search(SearchConfig(method="beta-darts", backend=backend, **TINY), out=str(tmp_path / "split"),
               log=lambda _: None, on_epoch_end=stop_after_first_epoch)
    split = _run(tmp_path, "split", backend=backend, resume=True)
    for (name, a), b in zip(whole.model.state_dict().items(), split.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert split.genotype == whole.genotype


@pytest.mark.slow
def test_cli_runs_the_preset(tmp_path, capsys):
    from fastdarts.cli import search_main

    out = tmp_path / "run"
    code = search_main(["--method", "beta-darts", "--dataset", "digits", "--layout", "N,R,N", "--channels", "4",
                        "--steps", "2", "--multiplier", "2", "--batch-size", "16", "--epochs", "2",
                        "--max-steps", "1", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0
    assert "beta-decay λ_t 0.5" in capsys.readouterr().out
    assert (out / "genotype.json").exists()


CLI_TINY = ["--dataset", "digits", "--layout", "N,R,N", "--steps", "2", "--multiplier", "2", "--batch-size", "16",
            "--max-steps", "1", "--epochs", "1", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("argv, needle", [
    (["--beta-decay", "-1"], "beta-decay must be a finite non-negative number"),
    (["--beta-decay", "lots"], "beta-decay must be a finite non-negative number"),
    (["--beta-decay", "nan"], "beta-decay must be a finite non-negative number"),
    (["--beta-decay-epochs", "0"], "--beta-decay-epochs"),
    (["--beta-decay-epochs", "10"], "beta-decay-epochs sets how fast"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, needle):
    line = search_cli_error(CLI_TINY + argv + ["--out", str(tmp_path / "x")], capsys)
    assert needle in line
