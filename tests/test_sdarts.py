"""SDARTS-RS and SDARTS-ADV (Chen & Hsieh, ICML 2020): the weight step's op
weights perturbed around softmax(α), against independent statements of the
original code (xiangning-chen/SmoothDARTS: attacker/perturb.py,
attacker/linf_sgd.py, sota/cnn/model_search.py, sota/cnn/train_search.py),
and through the search loop, its resume and the CLI."""
import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from fastdarts import FastDartsError, SearchConfig, search
from fastdarts.architect import frozen
from fastdarts.cli import search_main
from fastdarts.methods.sdarts import (clip_op_weights, perturbation_epsilon, pgd_perturbation,
                                      random_perturbation)
from helpers import run_cli, search_cli_error, tiny_net

BACKENDS = ["reference", "checkpoint", "fused"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: one thread avoids OpenMP's overhead on a loaded machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# -- the original's rules, stated from its text ------------------------------------------------

def original_clip(params):
    """sota/cnn/model_search.py l.170-177 (``Network.clip``), in place, row by row."""
    for p in params:
        for line in p:
            max_index = line.argmax()
            line.clamp_(0, 1)
            if line.sum() == 0.0:
                line[max_index] = 1.0
            line.div_(line.sum())


def original_random(params, epsilon):
    """attacker/perturb.py l.47-50 (``Random_alpha``) on the softmax'ed α (model_search.py l.160-163)."""
    for p in params:
        p.add_(torch.zeros_like(p).uniform_(-epsilon, epsilon))
    original_clip(params)


def original_pgd(model, x, y, epsilon, steps=7):
    """attacker/perturb.py l.11-44 (``Linf_PGD_alpha``, random start) with attacker/linf_sgd.py's step
    (l.72: sign of the gradient, l.89: p -= lr·sign), on the arch parameters holding softmax(α)
    (model_search.py l.160-163), whose forward with updateType='weight' takes them as the op weights
    (l.125-133): here ``model(x, op_weights=...)``."""
    def loss(ps):
        return F.cross_entropy(model(x, op_weights={"normal": ps[0], "reduce": ps[1]}), y)

    training = model.training
    if training:
        model.eval()
    params = [F.softmax(a.detach(), dim=-1).clone() for a in (model.alpha_normal, model.alpha_reduce)]
    saved_params = [p.clone() for p in params]
    lr = 2 * epsilon / steps
    with torch.no_grad():
        loss_before = loss(params)
    for p in params:  # random_start
        p.add_(torch.zeros_like(p).uniform_(-epsilon, epsilon))
    original_clip(params)
    for _ in range(steps):
        leaves = [p.clone().requires_grad_(True) for p in params]
        grads = torch.autograd.grad(-loss(leaves), leaves)
        for p, g in zip(params, grads):
            p.add_(torch.sign(g), alpha=-lr)
        diff = [(params[i] - saved_params[i]).clamp_(-epsilon, epsilon) for i in range(len(saved_params))]
        for i, p in enumerate(params):
            p.copy_(diff[i] + saved_params[i])
        original_clip(params)
    with torch.no_grad():
        loss_after = loss(params)
    if loss_before > loss_after:
        for i, p in enumerate(params):
            p.copy_(saved_params[i])
    if training:
        model.train()
    return params


def original_epsilon(epoch, epochs, epsilon_alpha):
    """sota/cnn/train_search.py l.170."""
    return 0.03 + (epsilon_alpha - 0.03) * epoch / epochs


def _batch(seed=3, n=4, size=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.double), torch.randint(0, 5, (n,), generator=g)


def _net(seed=1, **kw):
    torch.manual_seed(seed)
    net = tiny_net(**kw).double()
    with torch.no_grad():  # α away from uniform, so the op weights differ per op
        for a in (net.alpha_normal, net.alpha_reduce):
            a.normal_(0, 0.5)
    return net


def _ops(weights):
    return {"normal": weights[0], "reduce": weights[1]}


def _clean(net):
    return [F.softmax(a.detach(), dim=-1) for a in (net.alpha_normal, net.alpha_reduce)]


# -- (1) clip and SDARTS-RS --------------------------------------------------------------------

def test_clip_is_the_originals_rule():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g, dtype=torch.double) * 0.6
    w[1] = -torch.rand(8, generator=g, dtype=torch.double) - 0.1  # all negative: 1 at its argmax
    w[2, 3] = 1.7  # above 1: clamped
    expected = w.clone()
    original_clip([expected])
    got = clip_op_weights(w)
    assert torch.equal(got, expected)
    assert got[1].tolist() == [1.0 if k == int(w[1].argmax()) else 0.0 for k in range(8)]
    assert torch.equal(w, w.clone()) and not torch.equal(got, w)  # a new tensor; the input is left


def test_the_clip_comparison_can_fail():
    w = torch.tensor([[0.5, -0.2, 0.9]], dtype=torch.double)
    expected = w.clone()
    original_clip([expected])
    assert not torch.equal(w.clamp(0, 1), expected)  # a clamp without the renormalisation is told apart


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_weight_step_sees_the_originals_rule_and_nothing_else_does(backend):
    net = _net(backend=backend, perturb_alpha="random", perturb_epsilon=0.9)
    net.start_epoch(0, 3, 4)  # ε = 0.03 + 0.87·3/4: large enough that clip clamps
    epsilon = original_epsilon(3, 4, 0.9)
    assert net.sdarts_epsilon == epsilon
    x, y = _batch()
    torch.manual_seed(11)
    expected = [w.clone() for w in _clean(net)]
    original_random(expected, epsilon)
    assert any(bool((w == 0).any()) for w in expected)  # the clamp did something

    net.train()
    torch.manual_seed(11)
    with frozen(net.arch_parameters()):
        net.before_weight_step(x, y)
        with net.weight_step():
            perturbed = net(x)
    assert torch.equal(perturbed, net(x, op_weights=_ops(expected)))
    # The architecture step's passes, a later forward and evaluation: softmax(α) unchanged.
    clean = net(x, op_weights=_ops(_clean(net)))
    assert torch.equal(net(x), clean)
    assert not torch.equal(perturbed, clean)
    with net.weight_step():  # the perturbation was for one weight step
        assert torch.equal(net(x), clean)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x, op_weights=_ops(_clean(net))))


def test_the_random_draw_is_the_default_generators():
    clean = [torch.full((5, 8), 1 / 8, dtype=torch.double), torch.full((5, 8), 1 / 8, dtype=torch.double)]
    torch.manual_seed(4)
    a = random_perturbation(clean, 0.2)
    torch.manual_seed(4)
    b = random_perturbation(clean, 0.2)
    c = random_perturbation(clean, 0.2)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not torch.equal(a[0], c[0])
    for p in a:  # on the simplex, within ε of the clean weights before the renormalisation
        torch.testing.assert_close(p.sum(-1), torch.ones(5, dtype=torch.double), rtol=0, atol=1e-15)


# -- (2) the ε schedule ------------------------------------------------------------------------

def test_epsilon_schedule_is_the_originals():
    for epochs, top in ((50, 0.3), (7, 0.5), (3, 0.01)):
        assert [perturbation_epsilon(t, epochs, top) for t in range(epochs)] == \
            [original_epsilon(t, epochs, top) for t in range(epochs)]
    assert perturbation_epsilon(0, 50, 0.3) == 0.03 and perturbation_epsilon(25, 50, 0.3) == pytest.approx(0.165)
    net = tiny_net(perturb_alpha="random")
    assert net.sdarts_epsilon == 0.03  # epoch 0's until the loop says
    net.start_epoch(0, 9, 10, stage_epoch=2)  # a staged run: the schedule restarts each stage
    assert net.sdarts_epsilon == original_epsilon(2, 10, 0.3)
    with pytest.raises(FastDartsError, match="number of epochs"):
        net.start_epoch(0, 1)


# -- (3) SDARTS-ADV ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend, recompute", [("reference", "edge"), ("checkpoint", "edge"), ("fused", "edge"),
                                                ("fused", "cell")])
def test_pgd_is_the_originals_attack_and_raises_the_loss(backend, recompute):
    epsilon = original_epsilon(1, 2, 0.3)
    truth = _net(backend="reference")
    net = _net(backend=backend, recompute=recompute, perturb_alpha="pgd", perturb_epsilon=0.3)
    missing, unexpected = net.load_state_dict(truth.state_dict(), strict=False)
    assert not missing and not unexpected
    net.start_epoch(0, 1, 2)
    x, y = _batch()
    for m in (truth, net):  # BN running statistics away from their initial values
        m.train()
        with torch.no_grad():
            m(x)
    torch.manual_seed(7)
    expected = original_pgd(truth, x, y, epsilon)

    buffers = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net.train()
    torch.manual_seed(7)
    with frozen(net.arch_parameters()):
        net.before_weight_step(x, y)
    assert net.training
    # Eval mode during the attack: BatchNorm's running statistics are as they were.
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in buffers.items())
    attacked = net._sdarts_weights
    for got, want in zip(attacked, expected):
        if backend == "reference":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    clean = _clean(net)
    for got, w in zip(attacked, clean):
        assert not torch.equal(got, w)
    net.eval()
    with torch.no_grad():
        before = F.cross_entropy(net(x, op_weights=_ops(clean)), y)
        after = F.cross_entropy(net(x, op_weights=_ops(attacked)), y)
    assert after > before
    net.train()
    with torch.no_grad():
        want = net(x, op_weights=_ops(attacked))
    with frozen(net.arch_parameters()), net.weight_step():
        assert torch.equal(net(x), want)  # the weight step's forward uses them
    assert int(net.sdarts_rejected) == 0


def test_pgd_keeps_the_clean_weights_when_the_attack_lowers_the_loss():
    clean = [torch.softmax(torch.randn(5, 8, dtype=torch.double), -1) for _ in range(2)]
    # Largest at the clean weights: every perturbation lowers it (perturb.py l.40-42 restores them).
    def loss_of(ws):
        return -sum(((w - c) ** 2).sum() for w, c in zip(ws, clean))

    got, rejected = pgd_perturbation(loss_of, clean, 0.1, 7)
    assert bool(rejected) and all(torch.equal(g, c) for g, c in zip(got, clean))
    got, rejected = pgd_perturbation(lambda ws: -loss_of(ws), clean, 0.1, 7)  # growing away from them
    assert not bool(rejected) and not torch.equal(got[0], clean[0])


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_the_attack_sees_the_other_methods_terms(backend):
    """With PC-DARTS' partial channels, edge weights β and DARTS-' auxiliary skip, the attack's
    forwards are the supernet's own (the function the weight step trains), not a discrete sub-network."""
    net = _net(backend=backend, perturb_alpha="pgd", partial_channels=2, edge_norm=True, aux_skip=True)
    with torch.no_grad():
        net.beta_normal.normal_(0, 1)
        net.beta_reduce.normal_(0, 1)
    net.start_epoch(0, 1, 3)
    x, y = _batch()
    net.eval()
    seen = []

    def loss_of(ws):
        net._sdarts_attack = ws
        try:
            return F.cross_entropy(net(x), y)
        finally:
            net._sdarts_attack = None

    with torch.no_grad():
        seen.append(loss_of(_clean(net)))
        assert torch.equal(seen[0], net.loss(x, y))
        assert not torch.equal(seen[0], F.cross_entropy(net(x, op_weights=_ops(_clean(net))), y))
    net.train()
    with frozen(net.arch_parameters()):
        net.before_weight_step(x, y)
        with net.weight_step():
            net(x).sum().backward()  # the weight step runs on them
    assert all(p.grad is None for p in net.arch_parameters())


# -- (4) the search loop -----------------------------------------------------------------------

@contextlib.contextmanager
def float64_one_thread():
    """Searches in float64 (the model by the default dtype, the batches through the loader's conversion)."""
    import fastdarts.data.loader as loader

    dtype, to_float = torch.get_default_dtype(), loader.to_float
    torch.set_default_dtype(torch.float64)
    loader.to_float = lambda images: images.to(torch.float64).div_(255.0)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        loader.to_float = to_float


TINY = dict(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, batch_size=16,
            epochs=2, max_steps=2, device="cpu", progress=False)


def _quiet(_):
    pass


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sdarts-rs", "sdarts-adv"])
def test_search_runs_alike_on_every_backend_and_resumes_exactly(tmp_path, method):
    results = {}
    with float64_one_thread():
        for backend in ("reference", "fused"):
            results[backend] = search(method=method, backend=backend, out=str(tmp_path / backend), log=_quiet,
                                      **TINY)

        class Interrupt(Exception):
            pass

        def stop(entry):
            raise Interrupt

        with pytest.raises(Interrupt):
            search(method=method, backend="fused", out=str(tmp_path / "split"), log=_quiet, on_epoch_end=stop, **TINY)
        split = search(method=method, backend="fused", out=str(tmp_path / "split"), resume=True, log=_quiet, **TINY)
    ref, fused = results["reference"], results["fused"]
    assert ref.model.alpha_normal.dtype == torch.float64
    for a, b in zip(ref.model.arch_parameters(), fused.model.arch_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    for a, b in zip(ref.model.weight_parameters(), fused.model.weight_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert ref.genotype == fused.genotype
    # α moved: the perturbed weight steps and the clean architecture steps both ran.
    assert not torch.equal(ref.model.alpha_normal, torch.zeros_like(ref.model.alpha_normal))
    for (name, a), b in zip(fused.model.state_dict().items(), split.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert split.genotype == fused.genotype

    lines = _metrics(tmp_path / "fused")
    assert [m["epsilon_alpha"] for m in lines] == [original_epsilon(t, 2, 0.3) for t in range(2)]
    assert lines[-1]["config"]["perturb_alpha"] == ("random" if method == "sdarts-rs" else "pgd")
    assert lines[-1]["config"]["order"] == "first"
    if method == "sdarts-adv":
        assert all(isinstance(m["pgd_rejected"], int) and 0 <= m["pgd_rejected"] <= 2 for m in lines)
    else:
        assert "pgd_rejected" not in lines[-1]
    split_lines = _metrics(tmp_path / "split")
    for a, b in zip(lines, split_lines):
        assert {k: a[k] for k in ("epsilon_alpha", "train_loss", "val_loss", "alphas")} == \
            {k: b[k] for k in ("epsilon_alpha", "train_loss", "val_loss", "alphas")}


@pytest.mark.slow
def test_sdarts_composes_with_pc_darts(tmp_path):
    result = search(method="pc-darts", perturb_alpha="pgd", perturb_steps=2, arch_warmup_epochs=0, batch_size=16,
                    out=str(tmp_path), log=_quiet, **{k: v for k, v in TINY.items() if k != "batch_size"})
    line = _metrics(tmp_path)[-1]
    assert line["config"]["partial_channels"] == 4 and line["config"]["perturb_steps"] == 2
    assert "betas" in line and "epsilon_alpha" in line
    assert result.model.beta_normal.requires_grad


# -- the preset and the options ----------------------------------------------------------------

def test_presets_are_the_originals_settings():
    # sota/cnn/train_search.py l.34-57, optimizers/darts/architect.py l.18, README.MD's commands.
    for method, mode, steps in (("sdarts-rs", "random", None), ("sdarts-adv", "pgd", 7)):
        c = SearchConfig(method=method).checked()
        assert (c.batch_size, c.epochs, c.lr, c.lr_min, c.momentum, c.weight_decay, c.grad_clip) == \
            (64, 50, 0.025, 0.001, 0.9, 3e-4, 5.0)
        assert (c.arch_lr, c.arch_weight_decay, c.arch_beta1, c.order, c.train_portion) == \
            (3e-4, 1e-3, 0.5, "first", 0.5)
        assert (c.perturb_alpha, c.perturb_epsilon, c.perturb_steps) == (mode, 0.3, steps)
        assert c.checked() == c
        assert [type(m).__name__ for m in c.methods()] == ["SmoothDARTS"]


def test_options_canonical_forms():
    def options(**kw):
        c = SearchConfig(**kw).checked()
        return c.perturb_alpha, c.perturb_epsilon, c.perturb_steps

    assert options(perturb_alpha="pgd_linf") == ("pgd", 0.3, 7)  # the original's spelling and defaults
    assert options(perturb_alpha="random", perturb_epsilon="0.5") == ("random", 0.5, None)  # the CLI's text
    assert options(method="sdarts-adv", perturb_alpha="random") == ("random", 0.3, None)  # the preset's steps go
    assert options(method="sdarts-adv", perturb_steps=3, perturb_epsilon=0.1) == ("pgd", 0.1, 3)
    assert options() == (None, None, None)
    assert SearchConfig().checked().methods() == ()


# -- (5) the CLI, (6) refusals -----------------------------------------------------------------

CLI_TINY = ["--dataset", "digits", "--layout", "N,R,N", "--channels", "4", "--steps", "2", "--multiplier", "2",
            "--batch-size", "16", "--max-steps", "1", "--epochs", "2", "--device", "cpu", "--no-progress"]


@pytest.mark.slow
def test_cli_runs_sdarts(tmp_path):
    code, err = run_cli(search_main, CLI_TINY + ["--method", "sdarts-rs", "--perturb-epsilon", "0.2",
                                                 "--out", str(tmp_path / "rs")])
    assert code == 0, err
    lines = _metrics(tmp_path / "rs")
    assert lines[0]["method"] == "sdarts-rs"
    assert (lines[0]["config"]["perturb_alpha"], lines[0]["config"]["perturb_epsilon"]) == ("random", 0.2)
    assert [m["epsilon_alpha"] for m in lines] == [original_epsilon(t, 2, 0.2) for t in range(2)]
    code, err = run_cli(search_main, CLI_TINY + ["--method", "sdarts-adv", "--perturb-steps", "2",
                                                 "--out", str(tmp_path / "adv")])
    assert code == 0, err
    assert _metrics(tmp_path / "adv")[0]["config"]["perturb_steps"] == 2


@pytest.mark.parametrize("settings, needle", [
    (dict(method="sdarts-rs", cuda_graph=True), "--cuda-graph cannot capture SDARTS"),
    (dict(method="sdarts-adv", perturb_epsilon=0), "perturb-epsilon must be a number in (0, 1], got 0"),
    (dict(method="sdarts-adv", perturb_epsilon=-0.1), "perturb-epsilon must be a number in (0, 1]"),
    (dict(method="sdarts-adv", perturb_epsilon=1.5), "perturb-epsilon must be a number in (0, 1]"),
    (dict(method="sdarts-adv", perturb_epsilon=float("nan")), "perturb-epsilon must be a"),
    (dict(method="sdarts-adv", perturb_epsilon="big"), "perturb-epsilon must be a number in (0, 1], got 'big'"),
    (dict(method="sdarts-adv", perturb_epsilon=True), "perturb-epsilon must be a number"),
    (dict(perturb_alpha="gaussian"), "perturb-alpha must be random (SDARTS-RS) or pgd (SDARTS-ADV)"),
    (dict(perturb_epsilon=0.2), "perturb-epsilon only shapes SDARTS' perturbation, which needs --perturb-alpha"),
    (dict(method="sdarts-rs", perturb_steps=3), "perturb-steps is the PGD attack's"),
    (dict(method="sdarts-adv", perturb_steps=0), "perturb-steps must be a positive integer, got 0"),
    (dict(method="sdarts-rs", sample_paths=2), "SDARTS perturbs softmax(α), but path-sampling computes"),
])
def test_bad_settings_are_refused(settings, needle):
    with pytest.raises(FastDartsError) as e:
        SearchConfig(**settings).checked()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_network_built_directly_refuses_what_a_config_does():
    with pytest.raises(FastDartsError, match="perturb-epsilon must be"):
        tiny_net(perturb_alpha="random", perturb_epsilon=2.0)
    with pytest.raises(FastDartsError, match="path-sampling computes the op weights another way"):
        tiny_net(perturb_alpha="pgd", sample_paths=2, backend="fused")


@pytest.mark.parametrize("argv, needle", [
    (["--method", "sdarts-rs", "--cuda-graph"], "--cuda-graph cannot capture SDARTS"),
    (["--method", "sdarts-adv", "--perturb-epsilon", "-1"], "perturb-epsilon must be a number in (0, 1]"),
    (["--method", "sdarts-adv", "--perturb-epsilon", "x"], "got 'x'"),
    (["--perturb-alpha", "adversarial"], "perturb-alpha must be random"),
    (["--method", "sdarts-adv", "--perturb-steps", "0"], "--perturb-steps"),
])
def test_cli_refusals_are_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    line = search_cli_error(CLI_TINY + argv + ["--out", str(out)], capsys)
    assert needle in line, line
    assert not out.exists()
