"""FairDARTS: σ(α) op weights, the zero-one loss and the σ-ranked (threshold) derivation."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdarts import Architect
from fastdarts.errors import FastDartsError
from fastdarts.genotype import num_edges
from fastdarts.method import PRESETS
from fastdarts.methods.fair_darts import FAIR_OPS, THRESHOLD_FILE, parse_derivation, threshold_cell
from fastdarts.ops import DARTS_OPS
from fastdarts.search_loop import SearchConfig, search
from helpers import Interrupt, search_cli_error, stop_after_first_epoch, tiny_net

TINY = dict(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, batch_size=16,
            epochs=2, max_steps=2, device="cpu", progress=False)
FAIR = dict(sigmoid_ops=True, zero_one_loss=10.0)


# -- the original's rules, written from its text (xiaomi-automl/FairDARTS, fairdarts/) -------------------
def original_zero_one(alpha_normal, alpha_reduce, weight=10.0):
    """separate_loss.py:16-17 with architect.py:22: weight · -mse_loss(cat([σ(α_normal), σ(α_reduce)]), 0.5)."""
    aux_input = torch.cat([torch.sigmoid(alpha_normal), torch.sigmoid(alpha_reduce)], dim=0)
    return weight * -F.mse_loss(aux_input, torch.full_like(aux_input, 0.5))


def original_parse(weights, operation_set, op_threshold, parse_method, steps):
    """utils.py:143-189 (``parse``), its 'darts' and 'threshold_sparse' branches, restated."""
    gene, start, n = [], 0, 2
    for i in range(steps):
        W = weights[start:start + n]
        edges = sorted(range(i + 2), key=lambda x: -max(W[x]))[:2]
        for j in edges:
            k_best = None
            for k in range(len(W[j])):
                if k_best is None or W[j][k] > W[j][k_best]:
                    k_best = k
            if parse_method == "darts":
                gene.append((operation_set[k_best], j))
            elif W[j][k_best] >= op_threshold:
                gene.append((operation_set[k_best], i + 2, j))
        start += n
        n += 1
    return gene


def _randomise(net, scale=2.0, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in (net.alpha_normal, net.alpha_reduce):
            a.copy_(scale * torch.randn(a.shape, generator=g, dtype=a.dtype))
    return net


def _batch(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.double), torch.randint(0, 5, (n,), generator=g)


def _sgd(net):
    return torch.optim.SGD(net.weight_parameters(), lr=0.005, momentum=0.9, weight_decay=3e-4)


# -- the supernet ----------------------------------------------------------------------------------
def test_alpha_starts_at_zero_and_the_weights_are_sigmoid():
    net = tiny_net(**FAIR)
    assert torch.equal(net.alpha_normal, torch.zeros_like(net.alpha_normal))  # model_search.py:125-126
    _randomise(net)
    (wn, *_), (wr, *_) = net._cell_arguments()
    assert torch.equal(wn, torch.sigmoid(net.alpha_normal)) and torch.equal(wr, torch.sigmoid(net.alpha_reduce))


def test_forward_and_gradients_are_darts_with_sigmoid_weights():
    """model_search.py:104-111: the DARTS supernet with weights σ(α) per cell type."""
    fair = _randomise(tiny_net(**FAIR).double())
    plain = tiny_net().double()
    plain.load_state_dict(fair.state_dict())
    x, y = _batch()
    loss = fair.loss(x, y)
    a_n, a_r = (a.detach().clone().requires_grad_() for a in (plain.alpha_normal, plain.alpha_reduce))
    expected = F.cross_entropy(plain(x, op_weights={"normal": torch.sigmoid(a_n), "reduce": torch.sigmoid(a_r)}), y)
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    got = torch.autograd.grad(loss, [fair.alpha_normal, fair.alpha_reduce, *fair.weight_parameters()])
    want = torch.autograd.grad(expected, [a_n, a_r, *plain.weight_parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("backend, recompute", [("checkpoint", "edge"), ("fused", "edge"), ("fused", "cell"),
                                                ("reference", "cell")])
def test_every_backend_matches_the_reference(backend, recompute):
    ref = _randomise(tiny_net(**FAIR).double())
    net = tiny_net(backend=backend, recompute=recompute, **FAIR).double()
    net.load_state_dict(ref.state_dict())
    x, y = _batch()
    results = []
    for m in (ref, net):
        xx = x.clone().requires_grad_()
        loss = m.loss(xx, y) + m.arch_loss_terms()
        results.append([loss, *torch.autograd.grad(loss, [xx, *m.parameters()])])
    names = ["loss", "x"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)


def test_none_is_inert():
    """The original's op set has no `none` (genotypes.py:8-16): with it in the op set, the search computes
    what a supernet without it computes, and its α gets no gradient."""
    with_none = _randomise(tiny_net(**FAIR).double())
    without = tiny_net(ops=list(FAIR_OPS), **FAIR).double()
    assert list(DARTS_OPS[1:]) == list(FAIR_OPS) and DARTS_OPS[0] == "none"
    state = {}
    for key, value in with_none.state_dict().items():  # op k of an edge is op k-1 without `none`
        key = re.sub(r"\.ops\.(\d+)\.", lambda m: f".ops.{int(m.group(1)) - 1}.", key)
        state[key] = value[:, 1:] if key.startswith("alpha_") else value
    without.load_state_dict(state)
    x, y = _batch()
    objectives = [m.loss(x, y) + m.arch_loss_terms() for m in (with_none, without)]
    torch.testing.assert_close(objectives[0], objectives[1], rtol=1e-13, atol=0)
    g_with = torch.autograd.grad(objectives[0], [with_none.alpha_normal, with_none.alpha_reduce])
    g_without = torch.autograd.grad(objectives[1], [without.alpha_normal, without.alpha_reduce])
    for a, b in zip(g_with, g_without):
        assert torch.equal(a[:, 0], torch.zeros_like(a[:, 0]))
        torch.testing.assert_close(a[:, 1:], b, rtol=1e-11, atol=1e-14)
    assert with_none.genotype() == without.genotype()


# -- the zero-one loss -------------------------------------------------------------------------------
def test_zero_one_loss_is_the_originals():
    net = _randomise(tiny_net(ops=list(FAIR_OPS), **FAIR).double())
    torch.testing.assert_close(net.arch_loss_terms(), original_zero_one(net.alpha_normal, net.alpha_reduce),
                               rtol=1e-13, atol=0)
    # With `none` in the op set the mean is over the original's ops (its column left out).
    net = _randomise(tiny_net(**FAIR).double())
    torch.testing.assert_close(net.arch_loss_terms(),
                               original_zero_one(net.alpha_normal[:, 1:], net.alpha_reduce[:, 1:]),
                               rtol=1e-13, atol=0)
    assert tiny_net(sigmoid_ops=True).arch_loss_terms() is None  # weight 0: no term


def test_first_order_gradient_is_val_loss_plus_the_zero_one_loss():
    net = _randomise(tiny_net(ops=list(FAIR_OPS), **FAIR).double())
    (xt, yt), (xv, yv) = _batch(seed=1), _batch(seed=2)
    grads, _ = Architect(net, _sgd(net), order="first").arch_gradients(xt, yt, xv, yv)
    plain = tiny_net(ops=list(FAIR_OPS)).double()
    plain.load_state_dict(net.state_dict())
    a_n, a_r = (a.detach().clone().requires_grad_() for a in (plain.alpha_normal, plain.alpha_reduce))
    logits = plain(xv, op_weights={"normal": torch.sigmoid(a_n), "reduce": torch.sigmoid(a_r)})
    expected = torch.autograd.grad(F.cross_entropy(logits, yv) + original_zero_one(a_n, a_r), [a_n, a_r])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)


def test_second_order_gradient_adds_the_zero_one_gradient():
    nets = [_randomise(tiny_net(ops=list(FAIR_OPS), sigmoid_ops=True, zero_one_loss=w).double()) for w in (10.0, 0.0)]
    nets[1].load_state_dict(nets[0].state_dict())
    batches = (*_batch(seed=1), *_batch(seed=2))
    (with_term, _), (without, _) = [Architect(n, _sgd(n), order="second").arch_gradients(*batches) for n in nets]
    a_n, a_r = (a.detach().clone().requires_grad_() for a in (nets[0].alpha_normal, nets[0].alpha_reduce))
    expected = torch.autograd.grad(original_zero_one(a_n, a_r), [a_n, a_r])
    for w, wo, e in zip(with_term, without, expected):
        torch.testing.assert_close(w - wo, e, rtol=1e-8, atol=1e-12)


# -- the derivation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_threshold_cell_is_the_originals(seed):
    rng = np.random.default_rng(seed)
    steps = 4
    # Low σ everywhere but one op per edge, near the threshold (ties between edges included).
    sigma = rng.uniform(0.01, 0.3, size=(num_edges(steps), len(FAIR_OPS)))
    for row in sigma:
        row[rng.integers(len(FAIR_OPS))] = rng.choice([0.6, 0.84, 0.8499, 0.85, 0.8501, 0.99])
    sigma = sigma.tolist()
    ops = [list(FAIR_OPS)] * num_edges(steps)
    got = threshold_cell(sigma, sigma, ops, steps, 0.85)
    assert list(got) == original_parse(sigma, FAIR_OPS, 0.85, "threshold_sparse", steps)


def test_top2_derivation_is_the_originals_darts_parse_of_sigmoid():
    net = _randomise(tiny_net(ops=list(FAIR_OPS), steps=4, multiplier=4, **FAIR).double(), scale=3.0)
    genotype = net.genotype(final=True)
    for cell in ("normal", "reduce"):
        sigma = torch.sigmoid(getattr(net, f"alpha_{cell}")).tolist()
        assert list(getattr(genotype, cell)) == original_parse(sigma, FAIR_OPS, None, "darts", 4)


def test_ranking_keeps_edge_normalisation():
    """With edge normalisation an op on edge (i, j) ranks by σ(α)·softmax(β over node j)."""
    from fastdarts.genotype import derive_genotype
    from fastdarts.methods.edge_norm import edge_weights

    net = _randomise(tiny_net(edge_norm=True, steps=3, multiplier=3, **FAIR).double())
    with torch.no_grad():
        net.beta_normal.copy_(torch.randn(num_edges(3), dtype=torch.double) * 3)
        net.beta_reduce.copy_(torch.randn(num_edges(3), dtype=torch.double) * 3)
    scales = {c: edge_weights(getattr(net, f"beta_{c}").detach(), 3) for c in ("normal", "reduce")}
    expected = derive_genotype(net.alpha_normal, net.alpha_reduce, net.op_names, 3, 3, strengths=lambda cell, w: (
        torch.sigmoid(getattr(net, f"alpha_{cell}").detach()) * scales[cell][:, None]))
    assert net.genotype() == expected


def test_derivation_option_spellings():
    assert parse_derivation("threshold") == "threshold:0.85"
    assert parse_derivation("threshold:0.9") == "threshold:0.9"
    assert parse_derivation("top2") == "top2"
    for bad in ("threshold:1", "threshold:0", "threshold:x", "top3", ""):
        with pytest.raises(FastDartsError, match="fair-derivation must be top2 or threshold"):
            parse_derivation(bad)


# -- configuration ---------------------------------------------------------------------------------------
def test_preset_and_canonical_options():
    p = PRESETS["fair-darts"]
    assert (p["batch_size"], p["lr"], p["lr_min"], p["arch_lr"], p["arch_beta1"], p["arch_weight_decay"],
            p["order"], p["sigmoid_ops"], p["zero_one_loss"], p["fair_derivation"]) == \
        (128, 0.005, 0.001, 3e-3, 0.9, 1e-3, "first", True, 10.0, "threshold:0.85")
    cfg = SearchConfig(method="fair-darts", **TINY).checked()
    assert [type(m).__name__ for m in cfg.methods()] == ["FairDarts"]
    assert (cfg.zero_one_loss, cfg.fair_derivation) == (10.0, "threshold:0.85")
    assert SearchConfig(sigmoid_ops=True, **TINY).checked().fair_derivation == "top2"
    assert SearchConfig(sigmoid_ops=True, zero_one_loss="3", **TINY).checked().zero_one_loss == 3.0
    # --no-sigmoid-ops under the preset: DARTS with its settings, no zero-one loss or threshold.
    off = SearchConfig(method="fair-darts", sigmoid_ops=False, **TINY).checked()
    assert (off.zero_one_loss, off.fair_derivation, off.methods()) == (0.0, None, ())


# -- whole runs -------------------------------------------------------------------------------------------
def _config(**kw):
    return SearchConfig(method="fair-darts", **{**TINY, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_search_end_to_end_and_exact_resume(tmp_path, backend):
    logs = []
    whole = search(_config(backend=backend), out=str(tmp_path / "whole"), log=logs.append)
    net = whole.model
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert m["config"]["sigmoid_ops"] is True and m["config"]["zero_one_loss"] == 10.0
        assert set(m["sigmoid_above_threshold"]) == {"normal", "reduce"}
    torch.testing.assert_close(torch.tensor(lines[-1]["sigmoid_alphas"]["normal"], dtype=torch.double),
                               torch.sigmoid(net.alpha_normal.detach().double()), rtol=1e-12, atol=0)
    # The threshold cell, next to the genotype, and the log's note.
    written = json.loads((tmp_path / "whole" / THRESHOLD_FILE).read_text())
    for cell in ("normal", "reduce"):
        sigma = torch.sigmoid(getattr(net, f"alpha_{cell}").detach().double()).tolist()
        assert net.op_names[0] == "none"  # the preset keeps --ops; the original's op set is the rest
        expected = original_parse([row[1:] for row in sigma], FAIR_OPS, 0.85, "threshold_sparse", 2)
        assert [tuple(e) for e in written[cell]] == list(expected)
    assert written["threshold"] == 0.85
    final = [line for line in logs if line.startswith("searched genotype")]
    assert len(final) == 1 and "σ ≥ 0.85" in final[0]
    dropped = [(cell, i) for cell in ("normal", "reduce") for i, (op, src) in enumerate(getattr(whole.genotype, cell))
               if [op, i // 2 + 2, src] not in written[cell]]
    if dropped:
        assert f"drops {len(dropped)} of these edges" in final[0]

    with pytest.raises(Interrupt):
        search(_config(backend=backend), out=str(tmp_path / "split"), log=lambda _: None,
               on_epoch_end=stop_after_first_epoch)
    split = search(_config(backend=backend, resume=True), out=str(tmp_path / "split"), log=lambda _: None)
    for (name, a), b in zip(net.state_dict().items(), split.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert split.genotype == whole.genotype


@pytest.mark.slow
def test_cli_runs_the_preset(tmp_path, capsys):
    from fastdarts.cli import search_main

    out = tmp_path / "run"
    code = search_main(["--method", "fair-darts", "--dataset", "digits", "--layout", "N,R,N", "--channels", "4",
                        "--steps", "2", "--multiplier", "2", "--batch-size", "16", "--epochs", "1",
                        "--max-steps", "1", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0
    assert "σ(α): mean (σ-½)²" in capsys.readouterr().out
    assert (out / "genotype.json").exists() and (out / THRESHOLD_FILE).exists()


CLI_TINY = ["--dataset", "digits", "--layout", "N,R,N", "--steps", "2", "--multiplier", "2", "--batch-size", "16",
            "--max-steps", "1", "--epochs", "1", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("argv, needle", [
    (["--method", "fair-darts", "--zero-one-loss", "-1"], "zero-one-loss must be a finite non-negative number"),
    (["--method", "fair-darts", "--zero-one-loss", "much"], "zero-one-loss must be a finite non-negative number"),
    (["--method", "fair-darts", "--fair-derivation", "threshold:1.5"], "fair-derivation must be top2 or threshold"),
    (["--method", "fair-darts", "--fair-derivation", "best"], "fair-derivation must be top2 or threshold"),
    (["--zero-one-loss", "5"], "zero-one-loss pushes σ(α)"),
    (["--fair-derivation", "top2"], "fair-derivation ranks ops by σ(α)"),
    (["--method", "fair-darts", "--sample-paths", "2"], "cannot run with path-sampling"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, needle):
    line = search_cli_error(CLI_TINY + argv + ["--out", str(tmp_path / "x")], capsys)
    assert needle in line
