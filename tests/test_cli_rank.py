"""fastdarts-rank (SPEC §9): sampling, both scores, BatchNorm recalibration, the run, resume, bad input."""
import contextlib
import copy
import io
import itertools
import json
import math
import random

import pytest
import torch

import fastdarts.cli_rank as rank_module
from fastdarts.errors import FastDartsError
from fastdarts.genotype import Genotype, genotype_op_weights
from fastdarts.cli_rank import (alpha_score, architecture_key, count_genotypes, random_genotype, rank_main,
                                     sample_genotypes, scoring_loaders, subnetwork_weights, supernet_score)
from fastdarts.rank_stats import kendall_tau, sparse_kendall_tau, spearman_rho
from fastdarts.search_loop import load_search, search

SEARCH = dict(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, batch_size=32,
              epochs=1, max_steps=2, order="first", device="cpu", progress=False)
RANK = ["--num-archs", "3", "--layers", "3", "--channels", "4", "--train-epochs", "1", "--batch-size", "32",
        "--calib-batches", "2", "--max-steps", "2", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    search(out=str(out), log=lambda s: None, **SEARCH)
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    """(search config, data set, supernet) of the run; tests that change the supernet copy it."""
    return load_search(run_dir, device="cpu")


@pytest.fixture(scope="module")
def full_run(run_dir, tmp_path_factory):
    """An uninterrupted tiny fastdarts-rank run: (its --out, what it printed)."""
    out = tmp_path_factory.mktemp("rank") / "full"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert rank_main([str(run_dir), *RANK, "--out", str(out)]) == 0
    return out, printed.getvalue()


def _edge(node, source):
    """Index of the edge source -> node (node 0-based), counted by hand: node i has 2+i incoming edges."""
    return sum(2 + i for i in range(node)) + source


def independent_logits(model, genotype, x):
    """The genotype's network computed from the supernet's modules directly,
    without its mixed ops: each node is the sum of its 2 chosen edges' chosen op."""
    s0 = s1 = model.stem(x)
    for cell in model.cells:
        kind = "reduce" if cell.reduction else "normal"
        edges, concat = getattr(genotype, kind), getattr(genotype, f"{kind}_concat")
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        for node in range(model.steps):
            total = 0
            for op, source in edges[2 * node: 2 * node + 2]:
                e = _edge(node, source)
                total = total + cell.edges[e].ops[list(model.edge_ops[kind][e]).index(op)](states[source])
            states.append(total)
        s0, s1 = s1, torch.cat([states[i] for i in concat], dim=1)
    return model.classifier(model.global_pooling(s1).flatten(1))


def _with_other_op(genotype, edge_ops):
    """The genotype with its first normal edge's op swapped for another op that edge holds."""
    op, source = genotype.normal[0]
    other = next(o for o in edge_ops["normal"][_edge(0, source)] if o not in ("none", op))
    d = genotype.to_dict()
    d["normal"][0] = [other, source]
    return Genotype.from_dict(d)


# ---------------------------------------------------------------- scores

def test_discrete_scoring_is_the_sub_network(loaded):
    _, _, supernet = loaded
    derived = supernet.genotype()
    sampled = sample_genotypes(supernet.edge_ops, supernet.steps, supernet.multiplier, 1, seed=3,
                               exclude=[derived])[0]
    # float64 on the reference backend: the mixed ops add exact zeros, so nothing but rounding may differ.
    model = copy.deepcopy(supernet).set_backend("reference").double().eval()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for genotype in (derived, sampled):
            scored = model(x, op_weights=subnetwork_weights(model, genotype))
            torch.testing.assert_close(scored, independent_logits(model, genotype, x), rtol=0, atol=1e-12)
            # The check can fail: one op index off gives other logits.
            wrong = independent_logits(model, _with_other_op(genotype, model.edge_ops), x)
            assert (scored - wrong).abs().max() > 1e-6
        # The search's own backend (fused), as the run scores, in float32.
        fused = copy.deepcopy(supernet).eval()
        assert fused.backend == "fused"
        torch.testing.assert_close(fused(x.float(), op_weights=subnetwork_weights(fused, sampled)),
                                   independent_logits(fused, sampled, x.float()), rtol=1e-5, atol=1e-5)


def test_alpha_score_by_hand(loaded):
    _, _, model = loaded
    derived = model.genotype()
    sampled = sample_genotypes(model.edge_ops, model.steps, model.multiplier, 8, seed=1, exclude=[derived])
    for genotype in [derived, *sampled]:
        expected = 0.0
        for cell in ("normal", "reduce"):
            alpha = getattr(model, f"alpha_{cell}").detach().double()
            for position, (op, source) in enumerate(getattr(genotype, cell)):
                row = alpha[_edge(position // 2, source)]
                column = list(model.edge_ops[cell][_edge(position // 2, source)]).index(op)
                expected += (row[column] - torch.logsumexp(row, 0)).item()
        assert alpha_score(model, genotype) == pytest.approx(expected, rel=1e-12)
    # DARTS' derivation picks each node's strongest edges and ops: nothing derivable scores higher by α.
    assert all(alpha_score(model, derived) >= alpha_score(model, g) for g in sampled)


@pytest.mark.parametrize("options, strength", [
    (dict(sigmoid_ops=True), lambda alpha, _: torch.sigmoid(alpha)),  # FairDARTS ranks ops by σ(α)
    (dict(partial_channels=1, edge_norm=True), None),                  # PC-DARTS by softmax(α)·β
])
def test_alpha_score_is_the_log_of_what_the_method_ranks_by(options, strength):
    from helpers import tiny_net

    torch.manual_seed(3)
    model = tiny_net(**options).double()
    with torch.no_grad():
        for a in model.arch_parameters():
            a.copy_(torch.randn_like(a))
    derived = model.genotype()
    sampled = sample_genotypes(model.edge_ops, model.steps, model.multiplier, 8, seed=1, exclude=[derived])
    for genotype in [derived, *sampled]:
        expected = 0.0
        for cell in ("normal", "reduce"):
            alpha = getattr(model, f"alpha_{cell}").detach()
            if strength is not None:
                ranks = strength(alpha, cell)
            else:  # edge normalisation: softmax(α) times softmax of β over each node's incoming edges
                beta = getattr(model, f"beta_{cell}").detach()
                scale = torch.cat([torch.softmax(beta[_edge(n, 0):_edge(n, 0) + 2 + n], 0)
                                   for n in range(model.steps)])
                ranks = torch.softmax(alpha, -1) * scale[:, None]
            for position, (op, source) in enumerate(getattr(genotype, cell)):
                edge = _edge(position // 2, source)
                expected += math.log(ranks[edge, list(model.edge_ops[cell][edge]).index(op)])
        assert alpha_score(model, genotype) == pytest.approx(expected, rel=1e-12)
    assert all(alpha_score(model, derived) >= alpha_score(model, g) for g in sampled)


# ---------------------------------------------------------------- sampling

def test_sampling_is_seeded_distinct_and_valid(loaded):
    _, _, model = loaded
    derived = model.genotype()
    args = (model.edge_ops, model.steps, model.multiplier, 30)
    first = sample_genotypes(*args, seed=7, exclude=[derived])
    assert first == sample_genotypes(*args, seed=7, exclude=[derived])
    assert first != sample_genotypes(*args, seed=8, exclude=[derived])
    keys = [architecture_key(g) for g in first]
    assert len(set(keys)) == len(keys) and architecture_key(derived) not in keys
    for genotype in first:
        for cell in ("normal", "reduce"):
            edges = getattr(genotype, cell)
            assert getattr(genotype, f"{cell}_concat") == (2, 3)  # the last `multiplier` nodes
            for node in range(model.steps):
                (_, a), (_, b) = edges[2 * node: 2 * node + 2]
                assert a != b and 0 <= a < 2 + node and 0 <= b < 2 + node
            for position, (op, source) in enumerate(edges):
                assert op != "none" and op in model.edge_ops[cell][_edge(position // 2, source)]
        genotype_op_weights(genotype, model.edge_ops)  # the supernet holds it
    # Two spellings of one architecture (a node's edges swapped) are one architecture.
    d = derived.to_dict()
    d["normal"][0], d["normal"][1] = d["normal"][1], d["normal"][0]
    assert architecture_key(Genotype.from_dict(d)) == architecture_key(derived)


# P-DARTS-like edges: 2 ops each, `none` on some, so the edges allow 1 or 2 ops.
_EDGES = [("none", "skip_connect"), ("max_pool_3x3", "skip_connect"),
          ("none", "sep_conv_3x3"), ("avg_pool_3x3", "sep_conv_3x3"), ("skip_connect", "sep_conv_3x3")]
SMALL_SPACE = {"normal": _EDGES, "reduce": list(reversed(_EDGES))}


def _all_cells(edge_ops, cell, steps):
    """Every derivable cell, enumerated by brute force."""
    per_node = []
    for node in range(steps):
        options = []
        for a, b in itertools.combinations(range(2 + node), 2):
            ops_a = [o for o in edge_ops[cell][_edge(node, a)] if o != "none"]
            ops_b = [o for o in edge_ops[cell][_edge(node, b)] if o != "none"]
            options += [((oa, a), (ob, b)) for oa in ops_a for ob in ops_b]
        per_node.append(options)
    return list(itertools.product(*per_node))


# χ² quantiles at p = 0.001 by degrees of freedom.
CHI2_P001 = {15: 37.70, 19: 43.82}


def test_sampling_is_uniform_on_a_small_space():
    cells = {cell: _all_cells(SMALL_SPACE, cell, 2) for cell in ("normal", "reduce")}
    assert len(cells["normal"]) == 2 * (2 + 2 + 4) and len(cells["reduce"]) == 4 * (2 + 1 + 2)
    total = count_genotypes(SMALL_SPACE, 2)
    assert total == len(cells["normal"]) * len(cells["reduce"]) == 320
    rng = random.Random(0)
    draws = 4000
    counts = {cell: {c: 0 for c in cells[cell]} for cell in cells}
    for _ in range(draws):
        genotype = random_genotype(rng, SMALL_SPACE, 2, 2)
        for cell in cells:
            edges = getattr(genotype, cell)
            counts[cell][tuple((edges[k], edges[k + 1]) for k in (0, 2))] += 1
    for cell in cells:
        assert sum(counts[cell].values()) == draws  # every draw is one of the enumerated cells
        expected = draws / len(cells[cell])
        chi2 = sum((n - expected) ** 2 / expected for n in counts[cell].values())
        assert chi2 < CHI2_P001[len(cells[cell]) - 1], (cell, chi2)
    # The whole space less the excluded one, and no more.
    everything = sample_genotypes(SMALL_SPACE, 2, 2, total - 1, seed=0, exclude=[genotype])
    assert len({architecture_key(g) for g in everything} | {architecture_key(genotype)}) == total
    with pytest.raises(FastDartsError, match=f"exceeds the {total - 1} architectures"):
        sample_genotypes(SMALL_SPACE, 2, 2, total, seed=0, exclude=[genotype])


# ---------------------------------------------------------------- BatchNorm recalibration

def _norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_batchnorm_recalibration(loaded):
    config, dataset, supernet = loaded
    model = copy.deepcopy(supernet)
    calib, val = scoring_loaders(config, dataset, torch.device("cpu"))
    genotype = model.genotype()
    before = [(m.running_mean.clone(), m.num_batches_tracked.item()) for m in _norms(model)]
    score = supernet_score(model, genotype, calib, val, calib_batches=3, max_steps=2)
    norms = _norms(model)
    assert all(m.num_batches_tracked.item() == 3 for m in norms)  # reset, then exactly 3 batches
    assert all(m.momentum == 0.1 for m in norms)  # restored after
    assert all(not torch.equal(m.running_mean, mean) for m, (mean, _) in zip(norms, before))
    # The stem's BatchNorm holds the cumulative average of the 3 batches' statistics.
    with torch.no_grad():
        z = [model.stem[0](x) for x, _ in itertools.islice(calib.cycle(0), 3)]
    stem = model.stem[1]
    torch.testing.assert_close(stem.running_mean, torch.stack([t.mean((0, 2, 3)) for t in z]).mean(0))
    torch.testing.assert_close(stem.running_var, torch.stack([t.var((0, 2, 3)) for t in z]).mean(0))
    # The score is the recalibrated sub-network's validation accuracy, in eval mode.
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for x, y in itertools.islice(val.epoch(0), 2):
            correct += (model(x, op_weights=subnetwork_weights(model, genotype)).argmax(1) == y).sum().item()
            seen += len(y)
    assert score["supernet_acc"] == pytest.approx(100 * correct / seen)
    # 0 calibration batches: the supernet's own statistics, untouched.
    model = copy.deepcopy(supernet)
    supernet_score(model, genotype, calib, val, calib_batches=0, max_steps=1)
    assert all(torch.equal(m.running_mean, mean) and m.num_batches_tracked.item() == count
               for m, (mean, count) in zip(_norms(model), before))


# ---------------------------------------------------------------- the command

def _finite(v):
    return v if math.isfinite(v) else None


def test_full_run(full_run, loaded, run_dir):
    out, printed = full_run
    _, _, model = loaded
    result = json.loads((out / "rank.json").read_text())
    archs = result["architectures"]
    derived = model.genotype()
    sampled = sample_genotypes(model.edge_ops, model.steps, model.multiplier, 3, seed=0, exclude=[derived])
    assert [a["index"] for a in archs] == [0, 1, 2, 3]
    assert [a["derived"] for a in archs] == [True, False, False, False]
    assert [a["genotype"] for a in archs] == [g.to_dict() for g in [derived, *sampled]]
    assert result["search"]["derived"] == derived.to_dict() and result["search"]["run_dir"] == str(run_dir)
    assert result["settings"] == dict(num_archs=3, seed=0, calib_batches=2, layers=3, channels=4, train_epochs=1,
                                      batch_size=32, max_steps=2, device_type="cpu")
    for a, genotype in zip(archs, [derived, *sampled]):
        metrics = [json.loads(line) for line in (out / "archs" / f"{a['index']:03d}" / "metrics.jsonl")
                   .read_text().splitlines()]
        assert a["standalone_acc"] == metrics[-1]["test_acc"]
        assert a["alpha_score"] == pytest.approx(alpha_score(model, genotype), rel=1e-12)
        assert 0 <= a["supernet_acc"] <= 100 and a["supernet_loss"] > 0
    accuracy = [a["standalone_acc"] for a in archs]
    for name, key in (("supernet", "supernet_acc"), ("alpha", "alpha_score")):
        scores = [a[key] for a in archs]
        assert result["statistics"][name] == {
            "kendall_tau": _finite(kendall_tau(scores, accuracy)),
            "sparse_kendall_tau": _finite(sparse_kendall_tau(scores, accuracy)),
            "spearman_rho": _finite(spearman_rho(scores, accuracy))}
    assert result["statistics"]["architectures"] == 4
    assert (out / "rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The table: one row per architecture (the search's starred), then the correlations.
    lines = printed.splitlines()
    for a in archs:
        row = next(line for line in lines if line.startswith(f" {a['index']:03d} "))
        assert row.split()[-1] == f"{a['standalone_acc']:.2f}" and ("*" in row) == a["derived"]
    supernet_row = next(line for line in lines if line.startswith("supernet score "))
    tau = result["statistics"]["supernet"]["kendall_tau"]
    assert supernet_row.split()[2] == ("n/a" if tau is None else f"{tau:.3f}")
    assert any(line.startswith("α score ") for line in lines)


def test_resume_after_an_interrupt(full_run, run_dir, tmp_path, monkeypatch, capsys):
    real_train = rank_module.train
    out = tmp_path / "resumed"
    calls = []

    def interrupted_in_the_second(config, **kw):
        calls.append(config)
        if len(calls) == 2:  # after its epoch (and checkpoint): Ctrl-C
            return real_train(config, on_epoch_end=lambda entry: (_ for _ in ()).throw(KeyboardInterrupt), **kw)
        return real_train(config, **kw)

    monkeypatch.setattr(rank_module, "train", interrupted_in_the_second)
    assert rank_main([str(run_dir), *RANK, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and f"finished architectures are in {out}/rank.json" in err
    first = json.loads((out / "rank.json").read_text())["architectures"]
    assert len(first) == 1 and (out / "archs" / "001" / "checkpoint.pt").exists()

    calls.clear()
    monkeypatch.setattr(rank_module, "train", lambda config, **kw: calls.append(config) or real_train(config, **kw))
    assert rank_main([str(run_dir), *RANK, "--out", str(out), "--resume"]) == 0
    # Architecture 000 kept as it was; 001 continued from its own checkpoint; 002 and 003 trained.
    assert [c.out for c in calls] == [str(out / "archs" / f"{i:03d}") for i in (1, 2, 3)]
    assert [c.resume for c in calls] == [True, False, False]
    resumed = json.loads((out / "rank.json").read_text())
    assert resumed["architectures"][0] == first[0]
    uninterrupted = json.loads((full_run[0] / "rank.json").read_text())

    def results(doc):
        return [{k: v for k, v in a.items() if k != "seconds"} for a in doc["architectures"]]

    assert results(resumed) == results(uninterrupted)
    assert resumed["statistics"] == uninterrupted["statistics"]


def _error(argv, capsys):
    """The one stderr line of a run that must fail with status 2."""
    try:
        code = rank_main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fastdarts-rank: error: "), (code, err)
    return err[0]


def test_bad_input(full_run, run_dir, tmp_path, monkeypatch, capsys):
    out = str(full_run[0])
    assert "no search checkpoint at" in _error([str(tmp_path), *RANK, "--out", str(tmp_path / "o")], capsys)
    assert "--num-archs" in _error([str(run_dir), *RANK, "--num-archs", "0"], capsys)
    assert "--calib-batches" in _error([str(run_dir), *RANK, "--calib-batches", "-1"], capsys)
    assert "must be a positive integer" in _error([str(run_dir), *RANK, "--layers", "0"], capsys)

    # Refused before the search or any data is loaded.
    def untouchable(*args, **kw):
        raise AssertionError("the search was loaded")

    monkeypatch.setattr(rank_module, "load_search", untouchable)
    line = _error([str(run_dir), *RANK, "--out", out], capsys)
    assert "rank.json exists" in line and "--resume" in line and "--out" in line
    line = _error([str(run_dir), *RANK, "--num-archs", "4", "--out", out, "--resume"], capsys)
    assert "num-archs: rank.json 3 vs now 4" in line
    line = _error([str(run_dir), *RANK, "--seed", "1", "--out", out, "--resume"], capsys)
    assert "seed: rank.json 0 vs now 1" in line
    assert "no rank.json" in _error([str(run_dir), *RANK, "--out", str(tmp_path / "new"), "--resume"], capsys)


@pytest.mark.parametrize("method", [dict(method="fair-darts", fair_derivation="top2"),
                                    dict(method="darts-pt", selection_interval=0, selection_batches=1)])
def test_rank_runs_on_a_methods_search_and_starts_from_its_result(tmp_path, method):
    """A run of any method: its genotype.json is the search's own architecture (DARTS-PT's selection is not
    what α derives), its α score is what the method ranks by."""
    run = tmp_path / "search"
    result = search(out=str(run), log=lambda s: None, **{**SEARCH, **method})
    out = tmp_path / "rank"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert rank_main([str(run), *RANK, "--out", str(out)]) == 0
    ranked = json.loads((out / "rank.json").read_text())
    assert ranked["search"]["derived"] == result.genotype.to_dict()
    assert ranked["architectures"][0]["genotype"] == result.genotype.to_dict()
    _, _, model = load_search(run, device="cpu")
    assert ranked["architectures"][0]["alpha_score"] == pytest.approx(alpha_score(model, result.genotype),
                                                                      rel=1e-12)
