"""DARTS-PT's perturbation-based selection (``--selection pt``; fastdarts/methods/perturbation_selection.py).

The original is ruocwang/darts-pt at 4ec3149 (sota/cnn/projection.py, sota/cnn/model_search_darts_proj.py,
sota/cnn/train_search.py); each rule below is restated from its text with the file and lines.
"""
import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdarts.cli import search_main
from fastdarts.errors import FastDartsError
from fastdarts.genotype import Genotype
from fastdarts.methods import perturbation_selection as pt
from fastdarts.methods.perturbation_selection import (DEFAULT_INTERVAL, Projection, decision_plan, keep_edges,
                                                      keep_op, node_edges)
from fastdarts.search_config import SearchConfig
from fastdarts.search_loop import search
from helpers import search_cli_error, spawn_ranks, tiny_net

# 'none' is in the op list so that its exclusion is exercised; three candidates keep the runs short.
OPS = "none,max_pool_3x3,skip_connect,sep_conv_3x3"
TINY = dict(dataset="digits", layout="N,R,N", channels=4, steps=2, multiplier=2, batch_size=16, epochs=1,
            max_steps=1, device="cpu", progress=False, order="first", ops=OPS)
PT = dict(TINY, selection="pt", selection_interval=1)
DECISIONS = 2 * (5 + 1)  # per cell type: 5 edges (steps=2), then node 1's inputs


def _quiet(_):
    pass


def _records(out):
    return [json.loads(line) for line in (out / "selection.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the rules, restated from the original

def original_project_op(accs):
    """sota/cnn/projection.py:30-53 with proj_crit 'acc': compare = x < y; the first op measured sets the
    extremum, a later one replaces it only when strictly lower; the op kept is best_opid."""
    best_opid, crit_extrema = 0, None
    for opid, crit in enumerate(accs):
        if crit_extrema is None or crit < crit_extrema:
            crit_extrema, best_opid = crit, opid
    return best_opid


def original_project_edge(accs):
    """sota/cnn/projection.py:82-100: while more than two edges remain, measure each remaining edge's
    removal and delete the one for which `not compare(crit, crit_extrema)` last held (the highest
    accuracy, the later of equals); the edges left are the node's."""
    eids = list(range(len(accs)))
    while len(eids) > 2:
        eid_todel, crit_extrema = None, None
        for eid in eids:
            crit = accs[eid]
            if crit_extrema is None or not crit < crit_extrema:
                crit_extrema, eid_todel = crit, eid
        eids.remove(eid_todel)
    return eids


def test_the_decision_rules_are_the_originals():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 8)
        accs = [rng.choice([0.0, 12.5, 25.0, 37.5]) for _ in range(n)]  # coarse: many ties
        assert keep_op(accs) == original_project_op(accs)
        if n >= 2:
            assert keep_edges(accs) == original_project_edge(accs)
    # In words: the op whose removal hurts most (ties: the first); the two edges whose removal hurts most
    # (ties: the earlier).
    assert keep_op([60.0, 42.5, 70.0, 42.5]) == 1
    assert keep_edges([50.0, 40.0, 50.0, 40.0, 45.0]) == [1, 3]
    assert keep_edges([30.0, 30.0, 30.0]) == [0, 1]


def test_the_edge_order_is_the_originals_random_draw():
    """train_search.py:181 seeds NumPy's global generator with --seed; pt_project (projection.py:157-181)
    decides at each point one normal edge, then one reduce edge, each np.random.choice of the remaining
    (projection.py:24-26); after all edges, the nodes 0..2 of nid2eids (model_search_darts_proj.py:22,
    our nodes 1..3) the same way (projection.py:69-71)."""
    saved = np.random.get_state()
    try:
        for seed in (2, 7):
            np.random.seed(seed)
            flags = {c: [True] * 14 for c in ("normal", "reduce")}
            expected = []
            for point in range(14):
                for cell in ("normal", "reduce"):
                    remain = np.nonzero(flags[cell])[0]
                    eid = np.random.choice(remain, size=1)[0]
                    flags[cell][eid] = False
                    expected.append((point, cell, "op", int(eid)))
            node_flags = {c: [True] * 3 for c in ("normal", "reduce")}
            for point in range(14, 17):
                for cell in ("normal", "reduce"):
                    nid = np.random.choice(np.nonzero(node_flags[cell])[0], size=1)[0]
                    node_flags[cell][nid] = False
                    expected.append((point, cell, "edges", int(nid) + 1))
            assert decision_plan(seed, 4) == expected
    finally:
        np.random.set_state(saved)
    assert node_edges(4) == [[0, 1], [2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12, 13]]  # nid2eids 0..2 = nodes 1..3


# ---------------------------------------------------------------- the op weights a forward uses

def _projected(net, decided=((1, 2),), dropped=(), probe=None):
    """Switch the net's projection on: ``decided`` (edge, column) pairs of the normal cell,
    ``dropped`` normal edges, ``probe`` as Projection.probe."""
    proj = net.pt_projection
    proj.active = True
    for e, k in decided:
        proj.decide_op("normal", e, k)
    for e in dropped:
        proj.kept["normal"][e] = False
    proj.changed()
    proj.set_probe(probe)
    return proj


def _by_hand(net, decided=((1, 2),), dropped=(), probe=None):
    """The op weights the original's get_projected_weights gives, then masks (model_search_darts_proj.py:65-81,
    projection.py:41-44, 87-88): softmax(α); a decided edge its one-hot proj_weights row; a dropped edge 0;
    the measured op (or edge) 0, nothing renormalised."""
    w = {c: F.softmax(a.detach(), dim=-1).clone() for c, a in (("normal", net.alpha_normal),
                                                                ("reduce", net.alpha_reduce))}
    for e, k in decided:
        w["normal"][e] = 0
        w["normal"][e, k] = 1
    for e in dropped:
        w["normal"][e] = 0
    if probe is not None:
        cell, e, k = probe
        if k is None:
            w[cell][e] = 0
        else:
            w[cell][e, k] = 0
    return w


@pytest.mark.parametrize("probe", [None, ("normal", 3, 4), ("reduce", 0, 1), ("normal", 4, None)])
def test_removal_and_decisions_are_the_weights_of_the_forward(probe):
    torch.manual_seed(1)
    net = tiny_net(selection="pt").double()
    with torch.no_grad():
        net.alpha_normal.normal_()
        net.alpha_reduce.normal_()
    x = torch.randn(3, 3, 8, 8, dtype=torch.double)
    plain = net(x)
    _projected(net, decided=((1, 2), (0, 5)), dropped=(2,), probe=probe)
    got = net(x)
    expected = net(x, op_weights=_by_hand(net, decided=((1, 2), (0, 5)), dropped=(2,), probe=probe))
    assert torch.equal(got, expected)
    assert not torch.allclose(got, plain)  # the statement can fail: the projection changes the output
    # The weight step's forward goes through the same weights.
    with net.weight_step():
        assert torch.equal(net(x), expected)


def test_an_inactive_projection_leaves_the_search_alone():
    net = tiny_net(selection="pt")
    weights = [torch.rand(5, 8), torch.rand(5, 8)]
    assert net.pt_projection.adjust(weights) is weights
    net.pt_projection.active = True  # on, nothing decided: the same tensors
    out = net.pt_projection.adjust(weights)
    assert all(a is b for a, b in zip(out, weights))


def test_decided_and_dropped_edges_pass_no_gradient_to_alpha():
    torch.manual_seed(2)
    net = tiny_net(selection="pt").double()
    _projected(net, decided=((1, 2), (3, 0)), dropped=(4,))
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.double), torch.randint(0, 5, (4,))
    (g,) = torch.autograd.grad(net.loss(x, y), [net.alpha_normal])
    assert torch.equal(g[[1, 3, 4]], torch.zeros_like(g[[1, 3, 4]]))
    assert g[[0, 2]].abs().sum() > 0


@pytest.mark.parametrize("backend, recompute", [("checkpoint", "edge"), ("fused", "edge"), ("fused", "cell"),
                                                ("reference", "cell")])
def test_every_backend_computes_the_projected_supernet(backend, recompute):
    torch.manual_seed(3)
    ref = tiny_net(selection="pt", backend="reference").double()
    net = tiny_net(selection="pt", backend=backend, recompute=recompute).double()
    net.load_state_dict(ref.state_dict())
    for m in (ref, net):
        _projected(m, decided=((1, 2), (0, 7)), dropped=(3,), probe=("normal", 4, 5))
        m.pt_projection.decide_op("reduce", 2, 1)
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.double), torch.randint(0, 5, (3,))
    results = []
    for m in (ref, net):
        xx = x.clone().requires_grad_()
        loss = m.loss(xx, y)
        results.append([loss, *torch.autograd.grad(loss, [xx, *m.parameters()], allow_unused=True)])
    for a, b in zip(*results):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted DARTS-PT run and a plain DARTS run of the same search."""
    root = tmp_path_factory.mktemp("pt")
    lines = []
    result = search(**PT, out=str(root / "pt"), log=lines.append)
    alpha = search(**TINY, out=str(root / "alpha"), log=_quiet)
    return root, result, alpha, lines


def _genotype_from_records(records, fallback):
    """The cells the decisions describe: node 0 keeps both inputs, a later node the two the topology phase
    kept, each edge with the op decided for it; inputs in order."""
    ops = {(r["cell"], r["edge"]): r["choice"] for r in records if r["kind"] == "op"}
    kept = {(r["cell"], r["node"]): r["choice_inputs"] for r in records if r["kind"] == "edges"}
    cells = {}
    for cell in ("normal", "reduce"):
        gene, start = [], 0
        for node in range(2):
            for j in kept.get((cell, node), [0, 1]):
                gene.append((ops[(cell, start + j)], j))
            start += 2 + node
        cells[cell] = gene
    return Genotype(normal=cells["normal"], normal_concat=fallback.normal_concat, reduce=cells["reduce"],
                    reduce_concat=fallback.reduce_concat)


def test_a_search_with_pt_selection_writes_every_decision(whole):
    root, result, alpha, lines = whole
    records = _records(root / "pt")
    assert len(records) == DECISIONS
    assert [r["decision"] for r in records] == list(range(1, DECISIONS + 1))
    plan = decision_plan(2, 2)
    assert [(r["point"] - 1, r["cell"], r["kind"], r["edge" if r["kind"] == "op" else "node"])
            for r in records] == plan
    for r in records:
        assert r["images"] == 16  # one batch (max_steps=1)
        if r["kind"] == "op":
            assert r["candidates"] == ["max_pool_3x3", "skip_connect", "sep_conv_3x3"]  # never 'none'
            assert r["choice"] == r["candidates"][original_project_op(r["accuracy_without"])]
        else:
            assert r["candidates"] == [2, 3, 4] and r["inputs"] == [0, 1, 2]
            assert r["choice"] == [r["candidates"][p] for p in original_project_edge(r["accuracy_without"])]
    # The genotype is the decisions', wherever it is reported.
    expected = _genotype_from_records(records, alpha.genotype)
    assert result.genotype == expected
    assert Genotype.load(root / "pt" / "genotype.json") == expected
    assert any("chosen by DARTS-PT" in line for line in lines)
    # The search itself is DARTS' own: the same α, epoch by epoch.
    assert [h["alphas"] for h in result.history] == [h["alphas"] for h in alpha.history]
    assert result.history[-1]["config"]["selection"] == "pt"


class Stop(Exception):
    pass


def _decided(lines):
    """The decisions a run's log reports ("DARTS-PT 4/12 ...")."""
    return [int(m.group(1)) for m in (re.match(r"DARTS-PT (\d+)/\d+ ", line) for line in lines) if m]


def test_an_interrupted_selection_resumes_to_the_same_result(whole, tmp_path, monkeypatch):
    root, result, _, _ = whole
    out = tmp_path / "run"

    def stop_after_third(line):
        if line.startswith("DARTS-PT 3/"):
            raise Stop  # decision 3 is written: the checkpoint holds 3 decisions

    with pytest.raises(Stop):
        search(**PT, out=str(out), log=stop_after_third)
    assert len(_records(out)) == 3

    # Then interrupted again inside the fine-tuning before decision 5 (after decision 4).
    real_step = pt.search_step

    def failing_step(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(pt, "search_step", failing_step)
    lines = []
    with pytest.raises(Stop):
        search(**PT, out=str(out), resume=True, log=lines.append)
    assert _decided(lines) == [4]
    assert len(_records(out)) == 4

    monkeypatch.setattr(pt, "search_step", real_step)
    lines = []
    resumed = search(**PT, out=str(out), resume=True, log=lines.append)
    assert _decided(lines) == list(range(5, 13))  # continued, not restarted
    assert resumed.genotype == result.genotype
    assert (out / "selection.jsonl").read_text() == (root / "pt" / "selection.jsonl").read_text()
    whole_state, resumed_state = result.model.state_dict(), resumed.model.state_dict()
    for key, value in whole_state.items():
        assert torch.equal(resumed_state[key], value), key
    # A finished selection resumed once more: nothing is measured, the same genotype.
    lines = []
    again = search(**PT, out=str(out), resume=True, log=lines.append)
    assert again.genotype == result.genotype and _decided(lines) == []


ARGV = ["--dataset", "digits", "--layout", "N,R,N", "--channels", "4", "--steps", "2", "--multiplier", "2",
        "--batch-size", "16", "--epochs", "1", "--max-steps", "1", "--device", "cpu", "--no-progress",
        "--order", "first", "--ops", OPS]


def test_the_command_line_runs_the_selection(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ARGV + ["--out", str(out), "--selection", "pt", "--selection-interval", "0", "--selection-batches", "1"]
    assert search_main(argv) == 0
    records = _records(out)
    assert len(records) == DECISIONS and all(r["images"] == 16 for r in records)
    genotype = Genotype.load(out / "genotype.json")
    assert genotype == _genotype_from_records(records, genotype)
    entry = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert entry["config"]["selection_interval"] == 0 and entry["config"]["selection_batches"] == 1
    capsys.readouterr()
    # The selection's settings are result-defining: a resume with others is refused.
    assert search_main(ARGV + ["--out", str(out), "--selection", "pt", "--resume"]) == 2
    assert "selection_interval: checkpoint 0 vs now 5" in capsys.readouterr().err


def test_the_darts_pt_preset_is_the_originals():
    """sota/cnn/train_search.py:37-56 (batch 64, lr 0.025 -> 0.001, 50 epochs, Adam 3e-4, weight decay 1e-3),
    nasbench201/architect_ig.py:9-11, 20-21 (betas (0.5, 0.999), first order), exp_scripts/darts-proj-sota.sh:35
    (--proj_intv 5)."""
    c = SearchConfig(method="darts-pt").checked()
    assert (c.batch_size, c.lr, c.lr_min, c.epochs, c.arch_lr, c.arch_weight_decay, c.arch_beta1, c.order) == (
        64, 0.025, 0.001, 50, 3e-4, 1e-3, 0.5, "first")
    assert (c.selection, c.selection_interval, c.selection_batches) == ("pt", 5, None) and DEFAULT_INTERVAL == 5
    # Turning the preset's selection off drops its interval; any search may select by perturbation.
    c = SearchConfig(method="darts-pt", selection="alpha").checked()
    assert (c.selection, c.selection_interval) == ("alpha", None) and not c.methods()
    c = SearchConfig(selection="pt").checked()
    assert (c.order, c.selection_interval) == ("second", 5)


@pytest.mark.parametrize("kw, needle", [
    (dict(selection="magnitude"), "selection must be 'alpha' .* or 'pt'"),
    (dict(selection="PT"), "selection must be"),
    (dict(selection_interval=3), "selection-interval sets DARTS-PT's selection: it needs --selection pt"),
    (dict(selection_batches=2), "selection-batches .* needs --selection pt"),
    (dict(selection="pt", selection_interval=-1), "selection-interval must be a non-negative integer"),
    (dict(selection="pt", selection_interval=True), "selection-interval must be a non-negative integer"),
    (dict(selection="pt", selection_batches=0), "selection-batches must be a positive integer"),
    (dict(selection="pt", sample_paths=2, order="first"), "path sampling .* use one of the two"),
])
def test_bad_settings_are_one_line_errors(kw, needle):
    with pytest.raises(FastDartsError, match=needle) as e:
        SearchConfig(**kw).checked()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--selection", "magnitude"], "selection must be 'alpha'"),
    (["--selection-interval", "2"], "it needs --selection pt"),
    (["--selection", "pt", "--selection-interval", "-1"], "must not be negative"),
    (["--selection", "pt", "--selection-batches", "0"], "selection-batches"),
])
def test_bad_flags_are_one_line_errors(argv, needle, tmp_path, capsys):
    assert needle in search_cli_error(ARGV + ["--out", str(tmp_path / "x")] + argv, capsys)


def test_a_damaged_selection_checkpoint_is_one_line(whole, tmp_path):
    import shutil

    root = whole[0]
    out = tmp_path / "copy"
    shutil.copytree(root / "pt", out)
    state = torch.load(out / "selection.pt", weights_only=True)
    state["records"][2]["edge"] = (state["records"][2]["edge"] + 1) % 5
    torch.save(state, out / "selection.pt")
    with pytest.raises(FastDartsError, match=r"selection.pt is a damaged fastdarts file: its decision 3 is not"):
        search(**PT, out=str(out), resume=True, log=_quiet)


# ---------------------------------------------------------------- on top of other methods

COMPOSED = {
    # DARTS-PT on SDARTS-RS, as exp_scripts/sdarts-rs-proj-sota.sh runs it.
    "sdarts-rs": dict(method="sdarts-rs"),
    # Stages whose edges hold fewer ops (P-DARTS), and edge scales (PC-DARTS' edge normalisation).
    "p-darts": dict(method="p-darts", layout=None, stages="3:4,3:3", skip_dropout="0.0,0.5", arch_warmup_epochs=0),
    "pc-darts": dict(method="pc-darts", partial_channels=2, arch_warmup_epochs=0, batch_size=16),
}


@pytest.mark.parametrize("name", COMPOSED)
def test_the_selection_composes_with_other_methods(name, tmp_path):
    settings = dict(PT, **COMPOSED[name])
    result = search(**settings, out=str(tmp_path / "whole"), log=_quiet)
    records = _records(tmp_path / "whole")
    assert len(records) == DECISIONS
    for r in records:
        if r["kind"] == "op":  # the last stage's ops of the edge, 'none' left out
            assert r["candidates"] == [o for o in result.model.edge_ops[r["cell"]][r["edge"]] if o != "none"]
    assert result.genotype == _genotype_from_records(records, result.genotype)
    if name != "sdarts-rs":
        return
    # Interrupted after the first fine-tuning (decision 3 follows it), resumed: the same decisions.
    def stop_after_third(line):
        if line.startswith("DARTS-PT 3/"):
            raise Stop

    with pytest.raises(Stop):
        search(**settings, out=str(tmp_path / "resumed"), log=stop_after_third)
    resumed = search(**settings, out=str(tmp_path / "resumed"), resume=True, log=_quiet)
    assert _records(tmp_path / "resumed") == records
    assert resumed.genotype == result.genotype


# ---------------------------------------------------------------- two ranks

def _pt_ranks(rank, root):
    result = search(**PT, out=root, log=print)
    return dict(genotype=result.genotype.to_dict(),
                state={k: v.detach().clone() for k, v in result.model.state_dict().items()})


def test_two_ranks_select_the_same_cells(tmp_path):
    codes, results = spawn_ranks(tmp_path, _pt_ranks, str(tmp_path / "run"), wait_s=1800)
    assert codes == [0, 0], [r and r["stderr"][-3000:] for r in results]
    a, b = results
    assert a["genotype"] == b["genotype"]
    for key, value in a["state"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, b["state"][key]), key
    records = _records(tmp_path / "run")
    assert len(records) == DECISIONS and all(r["images"] == 16 for r in records)  # both halves counted
    assert Genotype.from_dict(a["genotype"]) == _genotype_from_records(records, Genotype.from_dict(a["genotype"]))
    assert "DARTS-PT 12/12" in a["stdout"] and b["stdout"] == ""
    assert not list((tmp_path / "run").glob("*.tmp"))
