"""P-DARTS' progressive search (SPEC §8; ``methods/progressive.py``): stage
parsing, op dropping, the skip-connection limit and the dropout schedule
against values worked out by hand and an independent statement of the
original's switch-based procedure; supernets whose edges hold different ops
against a full supernet on every backend; the staged loop, its resume and
its bad input."""
import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from fastdarts import SearchNetwork
from fastdarts.errors import FastDartsError
from fastdarts.genotype import derive_genotype, num_edges
from fastdarts.methods import method_preset
from fastdarts.methods.progressive import (Progressive, max_skip_selector, set_skip_dropout, drop_ops, limit_skip_connects, parse_rates, parse_stages,
                                           skip_dropout_rate)
from fastdarts.mixed_op import MixedOp
from fastdarts.ops import DARTS_OPS
from fastdarts.search_loop import SearchConfig, load_search, search
from fastdarts.visualize import plot_alpha_history
from helpers import search_cli_error, tiny_net

BACKENDS = ["reference", "checkpoint", "fused"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quiet(_):
    pass


# -- stages, rates, schedules ---------------------------------------------------

def test_parse_stages():
    stages = parse_stages("5:8,11:5,17:3", 8)
    assert [(s.cells, s.ops) for s in stages] == [(5, 8), (11, 5), (17, 3)]
    assert [(s.cells, s.ops) for s in parse_stages(" 20:8 ", 8)] == [(20, 8)]


@pytest.mark.parametrize("spec, needle", [
    ("5-8", "malformed stages"), ("5:8,11", "malformed stages"), ("a:b", "malformed stages"), ("", "malformed"),
    ("0:8", "at least 1 cell"), ("5:0", "at least 1 cell"),
    ("5:5,11:3", "the first stage must hold every op of the op set (8), got 5"),
    ("5:9", "the first stage must hold every op"),
    ("5:8,11:8", "must fall from stage to stage (5:8 then 11:8)"),
    ("5:8,11:5,17:6", "must fall from stage to stage (11:5 then 17:6)"),
    ("5:8,11:5,17:1", "a later stage (17:1) must hold at least 2 ops per edge"),
])
def test_bad_stages(spec, needle):
    with pytest.raises(FastDartsError, match=re.escape(needle)):
        parse_stages(spec, 8)


def test_parse_rates():
    assert parse_rates("0.0,0.4,0.7", 3) == (0.0, 0.4, 0.7)
    assert parse_rates(None, 2) == (0.0, 0.0)
    for spec, needle in (("0.1,0.2", "gives 2 rate(s) for 3 stage(s)"), ("0,0.4,1.0", "in [0, 1)"),
                         ("x,y,z", "malformed skip-dropout")):
        with pytest.raises(FastDartsError, match=re.escape(needle)):
            parse_rates(spec, 3)


def test_skip_dropout_schedule_by_hand():
    # The original: p0·(E − e − 1)/E in the epochs without architecture step, then p0·exp(−0.2·(e − w)).
    assert skip_dropout_rate(0.4, 0, 25, 10) == pytest.approx(0.4 * 24 / 25)
    assert skip_dropout_rate(0.4, 9, 25, 10) == pytest.approx(0.24)
    assert skip_dropout_rate(0.4, 10, 25, 10) == pytest.approx(0.4)
    assert skip_dropout_rate(0.7, 12, 25, 10) == pytest.approx(0.7 * math.exp(-0.4))
    assert skip_dropout_rate(0.7, 24, 25, 10) == pytest.approx(0.7 * math.exp(-2.8))
    assert skip_dropout_rate(0.0, 3, 25, 10) == 0.0


# -- dropping ops between stages ------------------------------------------------

FULL = tuple(DARTS_OPS)


def test_drop_ops_by_hand():
    row = [0.05, 0.2, 0.1, 0.3, 0.15, 0.08, 0.07, 0.05]
    other = [0.3, 0.01, 0.02, 0.03, 0.04, 0.2, 0.2, 0.2]
    edge_ops = {"normal": (FULL, FULL), "reduce": (FULL, FULL)}
    kept = drop_ops(edge_ops, {"normal": [row, other], "reduce": [other, row]}, 5)
    # Row: the three smallest are 0.05 (none), 0.05 (dil_conv_5x5; a tie, so the earlier op goes first), 0.07.
    assert kept["normal"][0] == ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5")
    # `none` is kept when strong, outside the last stage.
    assert kept["normal"][1] == ("none", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "sep_conv_3x3")[:1] + \
        ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
    assert kept["reduce"] == (kept["normal"][1], kept["normal"][0])

    three = ("none", "skip_connect", "sep_conv_3x3")
    last = {"normal": (three,), "reduce": (three,)}
    weights = {"normal": [[0.5, 0.3, 0.2]], "reduce": [[0.1, 0.3, 0.6]]}
    # After the last stage `none` goes first, however strong, then the weakest.
    assert drop_ops(last, weights, 1, none_first=True) == {"normal": (("skip_connect",),),
                                                           "reduce": (("sep_conv_3x3",),)}
    assert drop_ops(last, weights, 1) == {"normal": (("none",),), "reduce": (("sep_conv_3x3",),)}


# -- the skip-connection limit ----------------------------------------------------

THREE = ("none", "skip_connect", "sep_conv_3x3")
# steps=2: node 0 has edges 0 (from c_{k-2}) and 1 (c_{k-1}); node 1 edges 2, 3, 4 (from node 0).
HAND = [[0.1, 0.6, 0.3], [0.1, 0.5, 0.4], [0.2, 0.7, 0.1], [0.1, 0.2, 0.65], [0.5, 0.3, 0.2]]


@pytest.mark.parametrize("max_skip, expected", [
    (3, (("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_3x3", 1))),
    # The weakest chosen skip (edge 1, 0.5) goes: edge 1 takes sep_conv_3x3 (0.4).
    (2, (("skip_connect", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1))),
    # Then edge 0's (0.6): node 0 keeps both edges, now sep convs, the stronger (edge 1, 0.4) first.
    (1, (("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1))),
    # Then edge 2's (0.7): edge 2 falls to 0.1 and node 1 takes edge 4, whose skip (0.3) beats its
    # sep conv (0.2); that skip goes too, and edge 4 keeps its sep conv (0.2 > edge 2's 0.1).
    (0, (("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2))),
])
def test_skip_limit_by_hand(max_skip, expected):
    assert limit_skip_connects(HAND, [THREE] * 5, 2, max_skip) == expected


def _original_skip_limit(probs, edge_ops, max_skip, steps=4):
    """An independent statement of P-DARTS' final-cell procedure, with its
    switches: zero `none`; keep one op per edge (drop `none`, then the weakest
    by repeated argmin); keep per node the 2 edges of largest max weight (a
    stable ascending sort, the last two); while the cell has more skips than
    allowed, zero the weakest chosen skip's weight and repeat."""
    import numpy as np

    probs = np.array(probs, dtype=np.float64)
    for i, ops in enumerate(edge_ops):
        if "none" in ops:
            probs[i][ops.index("none")] = 0

    def keep_one(i):
        w, ops = probs[i].copy(), edge_ops[i]
        dropped = {ops.index("none")} if "none" in ops else set()
        for k in dropped:
            w[k] = 2.0
        while len(dropped) < len(ops) - 1:
            k = int(np.argmin(w))
            dropped.add(k)
            w[k] = 2.0
        return next(k for k in range(len(ops)) if k not in dropped)

    def parse():
        chosen, start = {}, 0
        for node in range(steps):
            n = 2 + node
            strength = [max(probs[start + j]) for j in range(n)]
            order = sorted(range(n), key=lambda j: strength[j])
            for j in order[-2:]:
                chosen[start + j] = keep_one(start + j)
            start += n
        return chosen

    chosen = parse()
    while sum(edge_ops[e][k] == "skip_connect" for e, k in chosen.items()) > max_skip:
        skips = [(probs[e][k], e, k) for e, k in sorted(chosen.items()) if edge_ops[e][k] == "skip_connect"]
        _, e, k = min(skips, key=lambda t: t[0])
        probs[e][k] = 0.0
        chosen = parse()
    cells, start = [], 0
    for node in range(steps):
        cells.append({(edge_ops[e][k], e - start) for e, k in chosen.items() if start <= e < start + 2 + node})
        start += 2 + node
    return cells


def test_skip_limit_agrees_with_the_original_procedure():
    rng = random.Random(0)
    checked = 0
    for trial in range(300):
        edge_ops = [tuple(sorted(rng.sample(FULL, 3), key=FULL.index)) for _ in range(14)]
        edge_ops = [ops if any(o != "none" for o in ops) else ("none", "skip_connect", "sep_conv_3x3")
                    for ops in edge_ops]
        # Skip connections frequent and strong, so the limit has work to do.
        edge_ops = [ops if "skip_connect" in ops or rng.random() < 0.3 else
                    tuple(sorted(set(ops[:2]) | {"skip_connect"}, key=FULL.index)) for ops in edge_ops]
        probs = [[rng.random() * (3 if op == "skip_connect" else 1) for op in ops] for ops in edge_ops]
        for max_skip in (0, 1, 2):
            gene = limit_skip_connects(probs, edge_ops, 4, max_skip)
            ours = [set(gene[2 * n: 2 * n + 2]) for n in range(4)]
            assert ours == _original_skip_limit(probs, edge_ops, max_skip), (trial, max_skip)
            assert sum(op == "skip_connect" for op, _ in gene) <= max_skip
            checked += 1
    assert checked == 900


def test_the_original_procedure_comparison_can_fail():
    # Zeroing the strongest skip instead of the weakest gives another cell on the hand example.
    assert _original_skip_limit(HAND, [THREE] * 5, 2, steps=2) == [{("skip_connect", 0), ("sep_conv_3x3", 1)},
                                                                    {("skip_connect", 0), ("sep_conv_3x3", 1)}]
    assert limit_skip_connects(HAND, [THREE] * 5, 2, 2) != (
        ("sep_conv_3x3", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_3x3", 1))


def test_derive_genotype_with_edge_ops_and_max_skip():
    edge_ops = {"normal": [THREE] * 5, "reduce": [("max_pool_3x3", "skip_connect", "dil_conv_3x3")] * 5}
    alpha = torch.tensor(HAND).log()
    reduce = torch.tensor(HAND[:3] + [[0.3, 0.4, 0.3]] + HAND[4:]).log()
    g = derive_genotype(alpha, reduce, DARTS_OPS, steps=2, multiplier=2, edge_ops=edge_ops)
    assert g.normal == (("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_3x3", 1))
    # The reduction cell's columns are its own ops: column 0 is max_pool (not `none`), so edge 4
    # (from node 0) is as strong as 0.5 and beats edge 3 (0.4).
    assert g.reduce == (("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("max_pool_3x3", 2))
    limited = derive_genotype(alpha, reduce, DARTS_OPS, steps=2, multiplier=2, edge_ops=edge_ops,
                              select_cell=max_skip_selector(1))
    assert limited.normal == limit_skip_connects(torch.softmax(alpha, -1).tolist(), [THREE] * 5, 2, 1)
    assert limited.reduce == g.reduce  # the limit is the normal cell's only
    with pytest.raises(FastDartsError, match=r"has shape \(5, 8\), expected \(5, 3\)"):
        derive_genotype(torch.zeros(5, 8), alpha, DARTS_OPS, steps=2, multiplier=2, edge_ops=edge_ops)
    with pytest.raises(FastDartsError, match="max-skip must be a non-negative integer"):
        derive_genotype(alpha, alpha, DARTS_OPS, steps=2, multiplier=2, edge_ops=edge_ops,
                        select_cell=max_skip_selector(-1))


# -- supernets whose edges hold different ops ------------------------------------

def _edge_ops(steps, width, seed):
    rng = random.Random(seed)

    def one():
        ops = tuple(sorted(rng.sample(FULL, width), key=FULL.index))
        return ops if any(o != "none" for o in ops) else one()
    return {cell: [one() for _ in range(num_edges(steps))] for cell in ("normal", "reduce")}


_OP_PARAM = re.compile(r"cells\.(\d+)\.edges\.(\d+)\.ops\.(\d+)\.(.*)")


def _full_twin(sub: SearchNetwork) -> tuple[SearchNetwork, dict[str, str]]:
    """A supernet holding every op on every edge with the sub-network's
    weights, and α = −inf where the sub-network's edge lacks the op: softmax
    over the held ops is then exactly the sub-network's, and the missing ops
    contribute 0. Returns the twin and the map sub name -> twin name."""
    full = tiny_net(backend="reference").double()
    names = {}
    for name in sub.state_dict():
        m = _OP_PARAM.fullmatch(name)
        if m:
            c, e, k, rest = int(m[1]), int(m[2]), int(m[3]), m[4]
            cell = "reduce" if sub.cells[c].reduction else "normal"
            names[name] = f"cells.{c}.edges.{e}.ops.{FULL.index(sub.edge_ops[cell][e][k])}.{rest}"
        elif not name.startswith("alpha"):
            names[name] = name
    state = full.state_dict()
    sub_state = sub.state_dict()
    with torch.no_grad():
        for ours, theirs in names.items():
            state[theirs].copy_(sub_state[ours])
        for cell in ("normal", "reduce"):
            a = torch.full((num_edges(2), len(FULL)), -math.inf, dtype=torch.float64)
            for e, ops in enumerate(sub.edge_ops[cell]):
                for k, op in enumerate(ops):
                    a[e, FULL.index(op)] = getattr(sub, f"alpha_{cell}")[e, k]
            getattr(full, f"alpha_{cell}").copy_(a)
    return full, names


def _loss_and_grads(net, x, y):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(net(x), y)
    params = dict(net.named_parameters())
    grads = torch.autograd.grad(loss, [x] + list(params.values()))
    return loss.detach(), grads[0], dict(zip(params, grads[1:]))


def _close(a, b, tol=1e-11):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() <= tol * scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width, recompute, partial", [(3, "edge", 1), (5, "edge", 1), (3, "cell", 1),
                                                        (3, "edge", 2)])
def test_edges_holding_different_ops_match_a_full_supernet(backend, width, recompute, partial):
    torch.manual_seed(3)
    edge_ops = _edge_ops(2, width, seed=width)
    sub = tiny_net(backend=backend, edge_ops=edge_ops, recompute=recompute, partial_channels=partial).double()
    with torch.no_grad():
        for a in sub.arch_parameters():
            a.normal_(0, 0.5)
    assert sub.alpha_normal.shape == (num_edges(2), width)
    for cell in sub.cells:
        ops = sub.edge_ops["reduce" if cell.reduction else "normal"]
        assert [e.op_names for e in cell.edges] == [tuple(o) for o in ops]
    if partial == 1:
        full, names = _full_twin(sub)
    else:  # PC-DARTS edges: compare with the same sub-network on `reference`
        full = tiny_net(backend="reference", edge_ops=edge_ops, partial_channels=partial).double()
        full.load_state_dict(sub.state_dict())
        names = {n: n for n in sub.state_dict()}
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    loss, gx, grads = _loss_and_grads(sub, x, y)
    loss_f, gx_f, grads_f = _loss_and_grads(full, x, y)
    assert abs(loss.item() - loss_f.item()) <= 1e-12 * abs(loss_f.item())
    assert _close(gx, gx_f)
    for name, g in grads.items():
        if name.startswith("alpha"):
            cell = name.split("_")[1]
            if partial == 1:
                cols = [[FULL.index(op) for op in ops] for ops in sub.edge_ops[cell]]
                g_f = torch.stack([grads_f[name][e, c] for e, c in enumerate(cols)])
            else:
                g_f = grads_f[name]
            assert _close(g, g_f), name
        else:
            assert _close(g, grads_f[names[name]]), name
    full_buffers = dict(full.named_buffers())
    for name, buf in sub.named_buffers():
        if "running" in name:
            assert _close(buf, full_buffers[names[name]]), name


def test_the_full_twin_comparison_can_fail():
    torch.manual_seed(3)
    edge_ops = _edge_ops(2, 3, seed=3)
    sub = tiny_net(edge_ops=edge_ops).double()
    full, _ = _full_twin(sub)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    # Give the twin's first normal edge another of the ops it lacks: the loss moves.
    e0 = edge_ops["normal"][0]
    missing = next(k for k, op in enumerate(FULL) if op not in e0 and op != "none")
    with torch.no_grad():
        full.alpha_normal[0, missing] = 0.0
    assert abs(F.cross_entropy(sub(x), y).item() - F.cross_entropy(full(x), y).item()) > 1e-6


@pytest.mark.parametrize("bad, needle", [
    ({"normal": [("none",)] * 5, "reduce": [("none",)] * 5}, "holds only 'none'"),
    ({"normal": [("skip_connect", "none")] * 5, "reduce": [("skip_connect",)] * 5}, "op-set order"),
    ({"normal": [("skip_connect", "sep_conv_3x3")] * 4 + [("skip_connect",)],
      "reduce": [("skip_connect",)] * 5}, "holds 1 ops, other edges 2"),
    ({"normal": [("skip_connect",)] * 4, "reduce": [("skip_connect",)] * 5}, "must hold 5 op lists"),
    ({"normal": [("conv_3x3",)] * 5, "reduce": [("skip_connect",)] * 5}, "not in the op set"),
])
def test_bad_edge_ops(bad, needle):
    with pytest.raises(FastDartsError, match=re.escape(needle)):
        tiny_net(edge_ops=bad)


# -- skip dropout --------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_dropout_on_one_edge_is_the_original_term(backend):
    ops = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
    torch.manual_seed(0)
    edge = MixedOp(4, 1, ops, backend, terms=[Progressive(None)]).double()
    edge.skip_dropout = 0.5
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(4, dtype=torch.float64), 0).requires_grad_(True)
    torch.manual_seed(7)
    y = edge(x, w)
    torch.manual_seed(7)  # the one draw of the edge: the skip's dropout mask
    expected = sum(wk * (F.dropout(x, 0.5) if op == "skip_connect" else edge.ops[k](x))
                   for k, (wk, op) in enumerate(zip(w, ops)))
    assert _close(y, expected)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w], dy)
    grads_e = torch.autograd.grad(expected, [x, w], dy)
    for g, ge in zip(grads, grads_e):
        assert _close(g, ge)
    # Really dropped: half the skip's entries are gone.
    torch.manual_seed(7)
    assert not torch.allclose(edge(x, w), sum(wk * edge.ops[k](x) for k, wk in enumerate(w)))
    # No dropout in eval mode, on stride-2 edges (a FactorizedReduce there), or when off (no draw at all).
    edge.eval()
    assert _close(edge(x, w), sum(wk * edge.ops[k](x) for k, wk in enumerate(w)))
    edge.train()
    assert MixedOp(4, 2, ops, backend, terms=[Progressive(None)]).skip_index is None
    edge.skip_dropout = None
    state = torch.get_rng_state()
    edge(x, w)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("recompute, partial", [("edge", 1), ("cell", 1), ("edge", 2)])
def test_skip_dropout_is_the_same_on_every_backend(recompute, partial):
    ops = {cell: [("none", "skip_connect", "sep_conv_3x3")] * num_edges(2) for cell in ("normal", "reduce")}
    results = []
    for backend in BACKENDS:
        torch.manual_seed(4)
        net = tiny_net(backend=backend, edge_ops=ops, recompute=recompute, partial_channels=partial,
                       skip_dropout=0.5).double()
        set_skip_dropout(net, 0.5)
        x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
        torch.manual_seed(11)
        results.append(_loss_and_grads(net, x, y))
    torch.manual_seed(4)
    plain = tiny_net(edge_ops=ops, partial_channels=partial).double()
    torch.manual_seed(11)
    plain_loss = _loss_and_grads(plain, x, y)[0]
    assert abs(plain_loss.item() - results[0][0].item()) > 1e-6  # the dropout does something
    ref_loss, ref_gx, ref_grads = results[0]
    for loss, gx, grads in results[1:]:
        assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
        assert _close(gx, ref_gx)
        for name, g in grads.items():
            assert _close(g, ref_grads[name]), name


# -- the staged search loop -------------------------------------------------------

TINY = dict(dataset="digits", steps=2, multiplier=2, channels=4, batch_size=16, max_steps=2, epochs=2,
            order="first", arch_warmup_epochs=1, device="cpu", progress=False)
STAGED = dict(TINY, method="p-darts", stages="3:8,3:5,3:3", skip_dropout="0.0,0.4,0.7", max_skip=1)


def _lists(edge_ops):
    """Edge op lists as JSON has them."""
    return {cell: [list(ops) for ops in lists] for cell, lists in edge_ops.items()}


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_preset():
    c = SearchConfig(method="p-darts").checked()
    assert (c.stages, c.skip_dropout, c.max_skip, c.epochs, c.batch_size, c.lr, c.lr_min, c.arch_lr, c.order,
            c.arch_warmup_epochs, c.arch_grad_clip) == ("5:8,11:5,17:3", "0.0,0.4,0.7", 2, 25, 96, 0.025, 0.0, 6e-4,
                                                        "first", 10, 5.0)
    assert SearchConfig().checked().arch_grad_clip is None  # DARTS does not clip α's gradient
    assert c.stage_layouts() == [("N,R,N,R,N", 8), ("N,N,N,R,N,N,N,R,N,N,N", 5),
                                 ("N,N,N,N,N,R,N,N,N,N,N,R,N,N,N,N,N", 3)]
    assert method_preset("darts").get("stages") is None  # a preset names only what it sets


def test_staged_search_drops_ops_between_stages(tmp_path):
    result = search(out=str(tmp_path / "run"), log=_quiet, **STAGED)
    h = _metrics(tmp_path / "run")
    assert [(m["epoch"], m["stage"], m["stage_epoch"], m["cells"], m["ops_per_edge"]) for m in h] == [
        (1, 1, 1, 3, 8), (2, 1, 2, 3, 8), (3, 2, 1, 3, 5), (4, 2, 2, 3, 5), (5, 3, 1, 3, 3), (6, 3, 2, 3, 3)]
    assert [m["arch_step"] for m in h] == [False, True] * 3  # the warm-up restarts with every stage
    assert [m["lr"] for m in h] == [0.025, 0.0125] * 3      # so does the cosine schedule
    # Stage 1 has no dropout (p0 = 0: none drawn); then p0·(E − e − 1)/E in the warm-up epoch, p0 after.
    assert [m["skip_dropout"] for m in h] == [None, None, pytest.approx(0.2), pytest.approx(0.4),
                                              pytest.approx(0.35), pytest.approx(0.7)]
    for end, nxt, keep in ((h[1], h[2], 5), (h[3], h[4], 3)):
        assert end["next_edge_ops"] == _lists(drop_ops(end["edge_ops"], end["alphas"], keep))
        assert nxt["edge_ops"] == end["next_edge_ops"]
        assert all(len(ops) == keep for c in ("normal", "reduce") for ops in nxt["edge_ops"][c])
    assert "next_edge_ops" not in h[5]
    net = result.model
    assert net.alpha_normal.shape == (num_edges(2), 3) and len(net.cells) == 3
    assert net.edge_ops == {c: tuple(tuple(o) for o in v) for c, v in h[5]["edge_ops"].items()}
    # Each stage's α is drawn afresh (1e-3·randn), not carried over: after the new stage's warm-up
    # epoch (α untouched), its weights are not the previous stage's restricted to the kept ops.
    for end, nxt in ((h[1], h[2]), (h[3], h[4])):
        carried = []
        for w, ops, kept in zip(end["alphas"]["normal"], end["edge_ops"]["normal"], nxt["edge_ops"]["normal"]):
            row = [w[ops.index(op)] for op in kept]
            carried.append([v / sum(row) for v in row])
        assert max(abs(a - b) for r, q in zip(carried, nxt["alphas"]["normal"]) for a, b in zip(r, q)) > 1e-6
        assert nxt["alpha_entropy"]["normal"] == pytest.approx(math.log(len(kept)), abs=1e-4)
    assert result.genotype == net.genotype(final=True)  # limited: at most max_skip=1
    assert result.genotype == derive_genotype(net.alpha_normal, net.alpha_reduce, net.op_names, net.steps,
                                              net.multiplier, edge_ops=net.edge_ops, select_cell=max_skip_selector(1))
    assert sum(op == "skip_connect" for op, _ in result.genotype.normal) <= 1
    for k in (1, 2, 3):
        assert (tmp_path / "run" / f"alphas_stage{k}.png").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "genotype.json").read_text()) == result.genotype.to_dict()
    # load_search rebuilds the last stage's supernet.
    config, _, loaded = load_search(tmp_path / "run")
    assert config.stages == "3:8,3:5,3:3" and loaded.edge_ops == net.edge_ops
    for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


def test_one_stage_is_a_plain_search(tmp_path):
    staged = search(out=str(tmp_path / "staged"), stages="3:8", log=_quiet, **TINY)
    plain = search(out=str(tmp_path / "plain"), layout="N,R,R", log=_quiet, **TINY)
    for (name, a), b in zip(staged.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert staged.genotype == plain.genotype


@pytest.mark.parametrize("stop_after", [2, 3])  # at a stage's end; inside stage 2 (dropout drawn)
def test_resume_inside_and_between_stages(tmp_path, stop_after):
    whole = search(out=str(tmp_path / "whole"), log=_quiet, **STAGED)

    class Interrupt(Exception):
        pass

    def stop(entry):
        if entry["epoch"] == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        search(out=str(tmp_path / "split"), log=_quiet, on_epoch_end=stop, **STAGED)
    logs = []
    split = search(out=str(tmp_path / "split"), resume=True, log=logs.append, **STAGED)
    assert any("resumed from" in line and f"after epoch {stop_after}" in line for line in logs)
    for (name, a), b in zip(whole.model.state_dict().items(), split.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [m["alphas"] for m in _metrics(tmp_path / "whole")] == [m["alphas"] for m in _metrics(tmp_path / "split")]
    assert whole.genotype == split.genotype
    # A finished run resumed again does nothing.
    again = search(out=str(tmp_path / "split"), resume=True, log=_quiet, **STAGED)
    assert len(again.history) == 6


def test_early_stop_ends_a_stage(tmp_path, monkeypatch):
    # Scripted: the normal cell "holds" 0, 3, 0, 3... skip connections: skip:2 stops each stage in its 2nd epoch.
    import fastdarts.search_loop as search_module

    counts = iter([0, 3] * 4)
    monkeypatch.setattr(search_module, "skip_connects", lambda genotype: next(counts))
    result = search(out=str(tmp_path / "run"), log=_quiet, early_stop="skip:2",
                    **dict(STAGED, stages="3:8,3:5", skip_dropout="0,0", epochs=3))
    h = _metrics(tmp_path / "run")
    assert [(m["stage"], m["stage_epoch"], bool(m["stopped"])) for m in h] == [(1, 1, False), (1, 2, True),
                                                                               (2, 1, False), (2, 2, True)]
    assert "next_edge_ops" in h[1] and result.stopped and "skip:2" in result.stopped


def test_warm_up_epochs_do_not_count_as_a_stable_ranking(tmp_path):
    # α rests in the warm-up epoch: its unchanged ranking is no evidence, so stable:1 does not fire there.
    search(out=str(tmp_path / "run"), log=_quiet, early_stop="stable:1", **dict(TINY, epochs=2, layout="N,R,N"))
    h = _metrics(tmp_path / "run")
    assert [m["arch_step"] for m in h] == [False, True] and h[0]["rank_unchanged_epochs"] == 0
    assert h[0]["stopped"] is None


def test_the_architecture_gradient_is_clipped_as_p_darts_does():
    from fastdarts import Architect

    torch.manual_seed(0)
    net = tiny_net()
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    unclipped = Architect(net, sgd, order="first").arch_gradients(x, y, x, y)[0]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in unclipped]))
    architect = Architect(net, sgd, order="first", grad_clip=float(norm) / 4)
    architect.step(x, y, x, y)
    clipped = torch.linalg.vector_norm(torch.cat([a.grad.flatten() for a in net.arch_parameters()]))
    assert clipped == pytest.approx(float(norm) / 4, rel=1e-5)


def test_second_order_sees_the_same_dropout_masks_at_w_plus_and_w_minus(monkeypatch):
    """The finite difference (g⁺ − g⁻)/2ε must differ only by the weights: each pass
    draws the skip-dropout masks afresh, so w⁻ replays the masks w⁺ drew."""
    import fastdarts.methods.progressive as mixed_op_module  # the skip dropout is drawn there
    from fastdarts import Architect

    masks = []
    real_dropout = mixed_op_module.F.dropout

    class Recording:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def dropout(x, p, training=True):
            out = real_dropout(x, p, training=training)
            masks.append(out == 0)
            return out

    monkeypatch.setattr(mixed_op_module, "F", Recording())
    ops = {cell: [("none", "skip_connect", "sep_conv_3x3")] * num_edges(2) for cell in ("normal", "reduce")}
    torch.manual_seed(0)
    net = tiny_net(edge_ops=ops, skip_dropout=0.5)
    set_skip_dropout(net, 0.5)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    Architect(net, sgd, order="second").arch_gradients(x, y, x, y)
    per_pass = len(masks) // 4  # train (virtual step), validation, w⁺, w⁻
    assert per_pass > 0 and len(masks) == 4 * per_pass
    plus, minus = masks[2 * per_pass:3 * per_pass], masks[3 * per_pass:]
    assert all(torch.equal(a, b) for a, b in zip(plus, minus))
    assert not all(torch.equal(a, b) for a, b in zip(masks[:per_pass], plus))  # other passes: fresh masks


@pytest.mark.parametrize("extra", [dict(partial_channels=2, edge_norm=True), dict(sample_paths=2),
                                   dict(aux_skip=True), dict(backend="checkpoint", recompute="cell")])
def test_stages_with_the_other_methods(tmp_path, extra):
    result = search(out=str(tmp_path / "run"), log=_quiet, **dict(STAGED, stages="3:8,3:3", skip_dropout="0.0,0.5",
                                                                  **extra))
    h = _metrics(tmp_path / "run")
    assert [m["ops_per_edge"] for m in h] == [8, 8, 3, 3]
    assert result.model.alpha_normal.shape[1] == 3


def test_deep_stage_without_pruning_runs(tmp_path):
    # The evaluation network's 20 cells with all 8 ops, on the fused backend.
    result = search(out=str(tmp_path / "run"), log=_quiet, stages="20:8",
                    **dict(TINY, channels=2, batch_size=8, max_steps=1, epochs=1, arch_warmup_epochs=0,
                           backend="fused"))
    assert len(result.model.cells) == 20 and result.model.alpha_normal.shape == (num_edges(2), 8)


def test_alpha_history_picture_with_edge_ops(tmp_path):
    edge_ops = _edge_ops(2, 3, seed=1)
    rows = {c: [[1 / 3] * 3] * num_edges(2) for c in ("normal", "reduce")}
    path = plot_alpha_history([rows, rows], DARTS_OPS, 2, tmp_path / "a.png", edge_ops=edge_ops)
    assert path.stat().st_size > 0
    with pytest.raises(FastDartsError, match=r"expected \(5, 3\)"):
        plot_alpha_history([{c: [[0.125] * 8] * 5 for c in ("normal", "reduce")}], DARTS_OPS, 2,
                           tmp_path / "b.png", edge_ops=edge_ops)


# -- bad input through the CLI --------------------------------------------------

# CIFAR-10 in a folder that does not exist: any check that waited for the data would fail there instead.
CLI = ["--method", "p-darts", "--data", "/nonexistent/cifar", "--channels", "4", "--no-progress"]


@pytest.mark.parametrize("argv, needles", [
    (["--stages", "5-8"], ["malformed stages '5-8'", "CELLS:OPS"]),
    (["--stages", "5:8,11"], ["malformed stages"]),
    (["--stages", "5:5,11:3"], ["first stage must hold every op of the op set (8), got 5"]),
    (["--stages", "5:8,11:9"], ["ops kept per edge must fall"]),
    (["--stages", "5:8,11:5"], ["preset's skip-dropout 0.0,0.4,0.7", "give --skip-dropout with 2 rate(s)"]),
    (["--stages", "5:8,11:5", "--skip-dropout", "0.1"], ["skip-dropout '0.1' gives 1 rate(s) for 2 stage(s)"]),
    (["--skip-dropout", "0.0,0.4,1.2"], ["in [0, 1)"]),
    (["--method", "darts", "--skip-dropout", "0.1"], ["needs --stages"]),
    (["--layout", "N,R,N"], ["--stages sets each stage's cells; drop --layout"]),
    (["--stages", "5:8,5:2", "--skip-dropout", "0,0", "--sample-paths", "2"], ["sample-paths 2 needs more ops"]),
    (["--max-skip", "-1"], ["--max-skip", "must not be negative"]),
    (["--epochs", "10"], ["arch-warmup-epochs 10 covers every one of the 10 epochs of a stage"]),
    (["--early-stop", "often"], ["unknown early-stop criterion"]),
    (["--ops", "none"], ["only 'none'"]),
])
def test_cli_bad_input(tmp_path, capsys, argv, needles):
    out = tmp_path / "out"
    line = search_cli_error(CLI + argv + ["--out", str(out)], capsys)
    for needle in needles:
        assert needle in line, line
    assert not out.exists()
