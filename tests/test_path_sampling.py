"""ProxylessNAS-style path sampling (``sample_paths=N``) against its definition:
mit-han-lab/proxylessnas, search/modules/mix_op.py (MixedEdge: binarize,
set_arch_param_grad, rescale_updated_arch_param; MODE 'two', generalised to N)."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastdarts import DARTS_OPS, Architect, FastDartsError, SearchConfig, search
from fastdarts.cli import search_main
from fastdarts.methods.path_sampling import PathSampler
from fastdarts.mixed_op import MixedOp
from helpers import tiny_net

OPS = list(DARTS_OPS)
NONE = OPS.index("none")
BACKENDS = ["reference", "fused"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: more threads only add overhead (and stall badly on a
    busy machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _op(name):
    return OPS.index(name)


def _close(actual, expected, rel=1e-5, msg=None):
    """fp32 agreement within ~1e-5 of the expected tensor's scale (the fused tests' rule)."""
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=msg)


def _formula(g, q, involved, num_ops):
    """∂L/∂α_i = Σ_j g_j q_j (δ_ij − q_i) over the involved ops, zero elsewhere."""
    expected = torch.zeros(num_ops, dtype=torch.float64)
    for a, i in enumerate(involved):
        expected[i] = sum(g[b] * q[b] * ((1.0 if a == b else 0.0) - q[a]) for b in range(len(involved)))
    return expected.float()


def _record_samples(net):
    """Wrap the net's sampler so that every ``sample`` return is kept."""
    sampler, real = net.path_sampler, net.path_sampler.sample
    calls = []

    def sample(alphas, mode):
        out = real(alphas, mode)
        calls.append((mode, [(w.detach().clone(), paths) for w, paths in out]))
        return out

    sampler.sample = sample
    return calls


def _manual_forward(net, x, ops_per_type):
    """The supernet computed by hand with one op per edge (``ops_per_type[reduction]``:
    an op index per edge), i.e. what a sampled forward must equal."""
    s0 = s1 = net.stem(x)
    for cell in net.cells:
        ks = ops_per_type[cell.reduction]
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        offset = 0
        for _ in range(cell.steps):
            s = sum(cell.edges[offset + j].ops[ks[offset + j]](h) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        s0, s1 = s1, torch.cat(states[-cell.multiplier:], dim=1)
    return net.classifier(net.global_pooling(s1).flatten(1))


def _sampled_net(backend="reference", seed=1, **kw):
    torch.manual_seed(seed)
    net = tiny_net(backend=backend, sample_paths=kw.pop("sample_paths", 2), **kw)
    with torch.no_grad():  # clearly non-uniform α, so that q and p are far from 1/N
        for a in net.arch_parameters():
            a.copy_(torch.randn_like(a))
    return net


def _batch(n=4, hw=8):
    return torch.randn(n, 3, hw, hw), torch.randint(0, 5, (n,))


# -- 1. the architecture gradient of one edge ------------------------------------

EDGE_CASES = [
    ("sep_conv_3x3", "max_pool_3x3"),
    ("skip_connect", "dil_conv_3x3"),
    ("avg_pool_3x3", "skip_connect"),
    ("none", "sep_conv_5x5"),
    ("dil_conv_5x5", "none"),
    ("sep_conv_3x3", "skip_connect", "avg_pool_3x3"),  # N=3, the generalisation
]


def _edge_check(backend, stride, involved, alpha, gates):
    """Run one edge on ``involved`` with ``gates`` (active first; ``alpha``: the
    leaf they come from, one edge's row) and check the value, the α gradient
    against the formula, and that the inactive ops give no gradient to x or to
    their weights."""
    torch.manual_seed(5)
    C = 4
    edge = MixedOp(C, stride, OPS, backend)
    x = torch.randn(4, C, 8, 8, requires_grad=True)
    with torch.no_grad():
        outs = [edge.ops[k](x) for k in involved]  # o_k(x), each op alone (training mode: batch statistics)
    dy = torch.randn_like(outs[0])
    y = edge(x, gates, involved)
    active = involved[0]

    # The value is the active op's output alone: gate 1 and gates 0, exactly.
    alone = edge(x.detach(), torch.ones(1), (active,))
    assert torch.equal(y.detach(), alone)
    if backend == "reference":
        assert torch.equal(y.detach(), outs[0])
    else:
        _close(y.detach(), outs[0])

    (y * dy).sum().backward()
    g = [float((dy.double() * o.detach().double()).sum()) for o in outs]
    q = F.softmax(alpha.detach().double().reshape(-1)[list(involved)], -1).tolist()
    expected = _formula(g, q, involved, len(OPS))
    assert alpha.grad is not None
    grad = alpha.grad.reshape(-1)
    _close(grad, expected)
    others = [i for i in range(len(OPS)) if i not in involved]
    assert torch.equal(grad[others], torch.zeros(len(others)))
    assert expected.abs().max() > 1e-3  # a gradient that a wrong formula would miss

    # x and the active op's weights get what the active op alone gives them.
    x_alone = x.detach().clone().requires_grad_(True)
    active_params = list(edge.ops[active].parameters())
    grads_alone = torch.autograd.grad((edge.ops[active](x_alone) * dy).sum(), [x_alone] + active_params,
                                      allow_unused=True)
    if active == NONE:
        assert grads_alone[0] is None or not grads_alone[0].any()
        assert not x.grad.any()
    else:
        _close(x.grad, grads_alone[0], msg="x")
    for p, ga in zip(active_params, grads_alone[1:]):
        _close(p.grad, ga, msg="active op weight")
    for k in involved[1:]:
        for p in edge.ops[k].parameters():
            if backend == "reference":
                assert p.grad is None  # detached output
            else:
                assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p)), "inactive op got a gradient"
    # Ops that were not drawn are not even computed.
    for k in others:
        assert all(p.grad is None for p in edge.ops[k].parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("names", EDGE_CASES, ids="-".join)
def test_edge_gradient_matches_the_proxyless_formula(backend, stride, names):
    involved = tuple(_op(n) for n in names)
    alpha = torch.tensor([0.3, -0.8, 0.5, 1.1, -0.2, 0.7, -1.0, 0.1], requires_grad=True)
    # The gates as the original builds them: binary in the forward, the gate
    # gradient ⟨dy, o_k⟩ passed to q = softmax(α_involved) (written here
    # independently of the package: one-hot + q − q.detach()).
    q = F.softmax(alpha[list(involved)], -1)
    one_hot = torch.zeros(len(involved))
    one_hot[0] = 1
    gates = one_hot + (q - q.detach())
    assert torch.equal(gates.detach(), one_hot)
    _edge_check(backend, stride, involved, alpha, gates)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_paths", [2, 3])
def test_sampler_gates_give_the_formula(backend, num_paths):
    """The sampler's own gates (a draw, active first) on one edge."""
    alpha = torch.tensor([[0.3, -0.8, 0.5, 1.1, -0.2, 0.7, -1.0, 0.1]], requires_grad=True)
    sampler = PathSampler(num_paths)
    seen_active = set()
    for epoch in range(4):
        sampler.start_epoch(7, epoch)
        alpha.grad = None
        [(gates, paths)] = sampler.sample([alpha], "arch")
        involved = paths[0]
        assert len(involved) == num_paths == len(set(involved)) and gates.shape == (1, num_paths)
        assert gates[0, 0].item() == 1 and not gates[0, 1:].any()
        index, active = sampler.last_arch_sample[0]
        assert index[0].tolist() == list(involved) and int(active[0]) == involved[0]
        seen_active.add(involved[0])
        _edge_check(backend, 1, involved, alpha, gates[0])
    assert len(seen_active) > 1


# -- 2. the forward value in each mode ------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_arch_mode_forward_is_the_active_ops_only(backend):
    net = _sampled_net(backend)
    calls = _record_samples(net)
    x, y = _batch()
    net.start_epoch(0, 0)
    out = net(x)  # training mode, grad on, α requires grad: the architecture step's forward
    assert [mode for mode, _ in calls] == ["arch"]
    active = {}
    for reduction, (gates, paths) in enumerate(calls[0][1]):
        assert gates.shape == (len(paths), 2)
        assert torch.equal(gates[:, 0], torch.ones(len(paths))) and not gates[:, 1:].any()
        assert all(len(set(p)) == 2 for p in paths)
        active[bool(reduction)] = [p[0] for p in paths]
    assert len({k for ks in active.values() for k in ks}) > 2  # various ops, not one everywhere
    expected = _manual_forward(net, x, active)
    if backend == "reference":
        assert torch.equal(out, expected)
    else:
        _close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_mode_forward_runs_the_sampled_op_only(backend):
    net = _sampled_net(backend)
    calls = _record_samples(net)
    x, y = _batch()
    net.start_epoch(0, 0)

    def stats():
        return {name: b.clone() for name, b in net.named_buffers() if "running_mean" in name}

    before = stats()
    for a in net.arch_parameters():
        a.requires_grad_(False)  # the weight step's forward (as search_step's frozen(α))
    out = net(x)
    after = stats()
    assert [mode for mode, _ in calls] == ["weight"]
    sampled = {}
    for reduction, (weights, paths) in enumerate(calls[0][1]):
        assert torch.equal(weights, torch.ones(len(paths), 1)) and all(len(p) == 1 for p in paths)
        sampled[bool(reduction)] = [p[0] for p in paths]
    assert len({k for ks in sampled.values() for k in ks}) > 2

    # Only the sampled op of each edge ran: exactly its BatchNorms moved.
    moved_ops = set()
    for name in before:
        if ".edges." in name and not torch.equal(before[name], after[name]):
            parts = name.split(".")
            moved_ops.add((int(parts[1]), int(parts[3]), int(parts[5])))  # cells.i.edges.e.ops.k....
    expected_ops = set()
    for i, cell in enumerate(net.cells):
        for e, k in enumerate(sampled[cell.reduction]):
            if any("running_mean" in n for n, _ in cell.edges[e].ops[k].named_buffers()):
                expected_ops.add((i, e, k))
    assert moved_ops == expected_ops and expected_ops

    expected = _manual_forward(net, x, sampled)
    if backend == "reference":
        assert torch.equal(out, expected)
    else:
        _close(out, expected)


# -- 3. sampling frequencies --------------------------------------------------

DRAWS = 20000


def test_weight_mode_frequencies_follow_softmax_alpha():
    row = torch.tensor([0.5, -0.3, 0.1, 1.0, -1.0, 0.3, 0.0, -0.5])
    sampler = PathSampler(2)
    sampler.start_epoch(3, 0)
    [(weights, paths)] = sampler.sample([row.repeat(DRAWS, 1)], "weight")
    counts = torch.bincount(torch.tensor([p[0] for p in paths]), minlength=len(OPS)).double()
    freq = counts / DRAWS
    p = F.softmax(row.double(), -1)
    tolerance = 0.015  # > 4 standard deviations of every frequency
    assert (freq - p).abs().max() < tolerance
    # The same draws would fail a uniform sampler or one following softmax(2α).
    assert (freq - 1 / len(OPS)).abs().max() > 2 * tolerance
    assert (freq - F.softmax(2 * row.double(), -1)).abs().max() > 2 * tolerance


def _without_replacement(p, n):
    """{ordered draw: probability} of n ops drawn from p sequentially, each in
    proportion to the probabilities of the ops left."""
    out = {}
    for seq in itertools.permutations(range(len(p)), n):
        prob, left = 1.0, 1.0
        for k in seq:
            prob *= p[k] / left
            left -= p[k]
        out[seq] = prob
    return out


@pytest.mark.parametrize("num_paths", [2, 3])
def test_arch_mode_frequencies_are_the_two_stage_draw(num_paths):
    """N ops without replacement from p, then the active one from q = softmax of their α."""
    row = torch.tensor([1.5, -1.0, 0.2, 0.8, -0.5, 0.0, 1.0, -1.5], dtype=torch.float64)
    p = F.softmax(row, -1).tolist()
    pair = {}        # P(active = a, the others = set)
    for seq, prob in _without_replacement(p, num_paths).items():
        total = sum(p[k] for k in seq)
        for a in seq:
            key = (a, frozenset(seq) - {a})
            pair[key] = pair.get(key, 0.0) + prob * p[a] / total
    assert abs(sum(pair.values()) - 1) < 1e-12
    active_p = torch.zeros(len(OPS), dtype=torch.float64)
    for (a, _), prob in pair.items():
        active_p[a] += prob

    sampler = PathSampler(num_paths)
    sampler.start_epoch(3, 0)
    alpha = row.float().repeat(DRAWS, 1).requires_grad_(True)
    [(gates, paths)] = sampler.sample([alpha], "arch")
    assert all(len(set(ks)) == num_paths for ks in paths)
    active = torch.tensor([ks[0] for ks in paths])
    freq = torch.bincount(active, minlength=len(OPS)).double() / DRAWS
    tolerance = 0.015
    assert (freq - active_p).abs().max() < tolerance
    # The active op is not simply the first op drawn, nor drawn from p directly.
    assert (freq - torch.tensor(p, dtype=torch.float64)).abs().max() > 2 * tolerance
    first_drawn = torch.zeros(len(OPS), dtype=torch.float64)
    for seq, prob in _without_replacement(p, num_paths).items():
        first_drawn[seq[0]] += prob
    assert (freq - first_drawn).abs().max() > 2 * tolerance

    if num_paths == 2:  # the joint law of (active, inactive): 56 cells
        joint = {}
        for ks in paths:
            joint[(ks[0], frozenset(ks[1:]))] = joint.get((ks[0], frozenset(ks[1:])), 0) + 1
        dev = max(abs(joint.get(key, 0) / DRAWS - prob) for key, prob in pair.items())
        assert dev < 0.006 and set(joint) <= set(pair)
        # A uniform choice of the active op within the pair would be visibly off.
        uniform_active = {}
        for seq, prob in _without_replacement(p, 2).items():
            for a in seq:
                key = (a, frozenset(seq) - {a})
                uniform_active[key] = uniform_active.get(key, 0) + prob / 2
        assert max(abs(joint.get(key, 0) / DRAWS - prob) for key, prob in uniform_active.items()) > 0.012


# -- 4. seeding --------------------------------------------------------------

def test_draws_are_seeded_by_seed_and_epoch_only():
    net = _sampled_net()
    alphas = [net.alpha_normal, net.alpha_reduce]

    def draws(seed, epoch, global_seed):
        """Paths of both cell types: a weight step, an architecture step, a weight step."""
        torch.manual_seed(global_seed)  # the global RNG does not matter
        net.start_epoch(seed, epoch)
        return [[paths for _, paths in net.path_sampler.sample(alphas, mode)] for mode in ("weight", "arch", "weight")]

    first = draws(2, 0, 0)
    assert draws(2, 0, 123) == first
    assert draws(2, 1, 0) != first
    assert draws(3, 0, 0) != first
    assert first[0] != first[2]  # the draws go on from step to step within an epoch
    # A forward through the network draws the same as the sampler does.
    calls = _record_samples(net)
    net.start_epoch(2, 0)
    with torch.no_grad():
        net(_batch()[0])
    assert calls[0][0] == "weight" and [paths for _, paths in calls[0][1]] == first[0]


# -- 5. after the Adam step ---------------------------------------------------

class _OriginalEdges:
    """The original's architecture update, stated from its code: one α Parameter
    per edge (search/modules/mix_op.py:57, ``AP_path_alpha``) and one Adam over
    all of them (nas_manager.py:576-579); an edge whose active op is a zero op
    gets ``grad = None`` (mix_op.py:212-214), so Adam leaves it, its moments and
    its step count alone; after the step the involved ops are shifted by
    log(Σ exp new / Σ exp old) (mix_op.py:239-252)."""

    def __init__(self, alphas, lr, betas, wd):
        self.rows = [[a[e].detach().clone().requires_grad_(True) for e in range(a.shape[0])] for a in alphas]
        self.adam = torch.optim.Adam([r for rows in self.rows for r in rows], lr=lr, betas=betas, weight_decay=wd)

    @torch.no_grad()
    def step(self, grads, samples):
        for rows, grad in zip(self.rows, grads):
            for e, row in enumerate(rows):
                row.grad = grad[e].clone()
        for rows, (index, active) in zip(self.rows, samples):
            for e, row in enumerate(rows):
                if int(active[e]) == NONE:
                    row.grad = None
        old = [[row.detach().clone() for row in rows] for rows in self.rows]
        self.adam.step()
        for rows, before, (index, active) in zip(self.rows, old, samples):
            for e, row in enumerate(rows):
                if int(active[e]) == NONE:
                    continue
                inv = index[e].tolist()
                offset = math.log(sum(math.exp(row[i]) for i in inv) / sum(math.exp(before[e][i]) for i in inv))
                row[inv] -= offset

    def alphas(self):
        return [torch.stack([row.detach() for row in rows]) for rows in self.rows]


def test_arch_update_is_the_originals_per_edge_adam():
    """Over several steps, with `none` active on some edges in some steps (their
    Adam step count stays behind), α equals the original's per-edge update
    (float64, to rounding): without per-edge counts the first update after k
    skips is up to √(k+1) too large."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        net = tiny_net(sample_paths=2)
        with torch.no_grad():
            for a in net.arch_parameters():  # `none` often drawn on even edges, seldom on odd ones
                a.copy_(0.3 * torch.randn_like(a))
                a[0::2, NONE] = 1.0
                a[1::2, NONE] = -3.0
        sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9)
        lr, betas, wd = 0.01, (0.0, 0.999), 1e-3
        architect = Architect(net, sgd, order="first", lr=lr, betas=betas, weight_decay=wd)
        original = _OriginalEdges(net.arch_parameters(), lr, betas, wd)
        captured = []
        real_before = net.before_arch_update

        def before(optimizer):
            captured.append(([(i.clone(), a.clone()) for i, a in net.path_sampler.last_arch_sample],
                             [a.grad.clone() for a in net.arch_parameters()]))
            return real_before(optimizer)

        net.before_arch_update = before
        net.start_epoch(2, 0)
        skipped_then_updated = 0
        history = []
        for _ in range(6):
            x, y = _batch(8)
            architect.step(x, y, x, y)
            samples, grads = captured[-1]
            original.step(grads, samples)
            history.append([(active == NONE).tolist() for _, active in samples])
            for ours, theirs in zip(net.arch_parameters(), original.alphas()):
                torch.testing.assert_close(ours.detach(), theirs, rtol=1e-12, atol=1e-13)
        for cell in range(2):
            for e in range(len(history[0][cell])):
                flags = [h[cell][e] for h in history]
                skipped_then_updated += any(flags[i] and not flags[j] for i in range(6) for j in range(i + 1, 6))
        assert skipped_then_updated > 0  # some edge's count did fall behind the global one
    finally:
        torch.set_default_dtype(dtype)


# -- 6. fused against reference ------------------------------------------------

def _all_grads(net, x, y, params):
    x = x.clone().requires_grad_(True)
    loss = net.loss(x, y)
    grads = torch.autograd.grad(loss, [x] + params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip([x] + params, grads)]


@pytest.mark.parametrize("mode", ["arch", "weight"])
def test_fused_matches_reference_with_the_same_draws(mode):
    ref = _sampled_net("reference", seed=4)
    fused = _sampled_net("reference", seed=4)
    fused.load_state_dict(ref.state_dict())
    fused.set_backend("fused")
    x, y = _batch(4, 7)
    results, draws = [], []
    for net in (ref, fused):
        calls = _record_samples(net)
        net.start_epoch(5, 1)
        if mode == "weight":
            for a in net.arch_parameters():
                a.requires_grad_(False)
        params = [p for p in net.parameters() if p.requires_grad]
        results.append(_all_grads(net, x, y, params))
        draws.append([paths for _, paths in calls[0][1]])
        assert calls[0][0] == mode
    assert draws[0] == draws[1]
    (loss_r, grads_r), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=0)
    names = ["x"] + [n for n, p in ref.named_parameters() if p.requires_grad]
    assert (mode == "arch") == ("alpha_normal" in names)
    for name, gr, gf in zip(names, grads_r, grads_f):
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item(), msg=name)
    if mode == "arch":
        assert grads_r[names.index("alpha_normal")].abs().max() > 0


def test_cell_recompute_gives_the_same_sampled_gradients():
    edge_net = _sampled_net("reference", seed=4)
    cell_net = _sampled_net("reference", seed=4, recompute="cell")
    x, y = _batch()
    results = []
    for net in (edge_net, cell_net):
        net.start_epoch(1, 0)
        results.append(_all_grads(net, x, y, list(net.parameters())))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for gc, ge in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5 * ge.abs().max().item())


# -- 7. the search loop ----------------------------------------------------------

# No warm-up, and an α step after every 2nd batch (the preset's 13 epochs and every 5th are a 50-epoch run's).
PROXYLESS = dict(method="proxyless", dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2,
                 multiplier=2, batch_size=16, max_steps=2, epochs=2, device="cpu", progress=False,
                 arch_warmup_epochs=0, arch_every=2)


def test_proxyless_search_resumes_exactly(tmp_path, monkeypatch):
    import fastdarts.visualize as visualize

    # The pictures are not what is tested here, and drawing them is most of the time.
    monkeypatch.setattr(visualize, "plot_genotype", lambda genotype, out: [])
    monkeypatch.setattr(visualize, "plot_alpha_history", lambda *args, **kwargs: None)
    quiet = lambda _: None  # noqa: E731
    whole = search(out=str(tmp_path / "whole"), log=quiet, **PROXYLESS)

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(entry):
        if entry["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        search(out=str(tmp_path / "split"), log=quiet, on_epoch_end=stop_after_first_epoch, **PROXYLESS)
    resumed = search(out=str(tmp_path / "split"), resume=True, log=quiet, **PROXYLESS)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for x_, y_ in zip(whole.model.arch_parameters(), resumed.model.arch_parameters()):
        assert torch.equal(x_, y_)

    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for m in lines:
        assert m["method"] == "proxyless"
        c = m["config"]
        assert c["sample_paths"] == 2 and c["order"] == "first"
        assert c["arch_lr"] == 1e-3 and c["arch_weight_decay"] == 0.0
    assert lines[0]["alphas"] != lines[1]["alphas"]  # the architecture steps moved α
    assert whole.model.path_sampler.num_paths == 2


# -- 8. bad input --------------------------------------------------------------

TINY_CLI = ["--dataset", "digits", "--layout", "N,R,N", "--channels", "4", "--steps", "2", "--multiplier", "2",
            "--batch-size", "16", "--max-steps", "1", "--epochs", "1", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("extra, needle", [
    (["--sample-paths", "0"], "must be a positive integer"),
    (["--sample-paths", "8"], "sample-paths must be in 1..7"),
    (["--method", "proxyless", "--order", "second"], "first-order"),
    (["--method", "darts", "--sample-paths", "2"], "first-order"),
    (["--method", "proxyless", "--backend", "checkpoint"], "checkpoint backend"),
])
def test_cli_refuses_bad_path_sampling(tmp_path, capsys, extra, needle):
    out = tmp_path / "o"
    try:
        code = search_main(TINY_CLI + extra + ["--out", str(out)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fastdarts-search: error: ") and needle in err[0], err
    assert not out.exists()


def test_api_refuses_bad_path_sampling():
    with pytest.raises(FastDartsError, match="checkpoint backend"):
        tiny_net(sample_paths=2, backend="checkpoint")
    with pytest.raises(FastDartsError, match="checkpoint backend"):
        tiny_net(sample_paths=2).set_backend("checkpoint")
    for bad in (8, -1, True, 1.5):
        with pytest.raises(FastDartsError, match="sample-paths must be in 1..7"):
            tiny_net(sample_paths=bad)
    net = tiny_net(sample_paths=2)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.1)
    with pytest.raises(ValueError, match="first-order"):
        Architect(net, sgd, order="second")
    Architect(net, sgd, order="first")
    with pytest.raises(FastDartsError, match="first-order"):
        SearchConfig(method="proxyless", order="second").checked()
    with pytest.raises(FastDartsError, match="checkpoint backend"):
        SearchConfig(method="proxyless", backend="checkpoint").checked()
    edge = MixedOp(3, 1, OPS, "checkpoint")
    with pytest.raises(FastDartsError, match="checkpoint backend"):
        edge(torch.randn(2, 3, 4, 4), torch.ones(1), (3,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_device_is_a_clear_error(backend):
    net = tiny_net(sample_paths=2, backend=backend).to("meta")
    with pytest.raises(FastDartsError, match="meta"):
        net(torch.randn(2, 3, 8, 8, device="meta"))


# -- 9. evaluation ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_runs_the_argmax_ops(backend):
    net = _sampled_net(backend, seed=6)
    x, y = _batch()
    net.start_epoch(0, 0)
    with torch.no_grad():
        net(x)  # a training forward, so that the running statistics are not the initial ones
    net.eval()
    state = net.path_sampler.generator.get_state()
    calls = _record_samples(net)
    out = net(x)  # grad enabled and α requiring grad: eval mode still takes the argmax
    assert [mode for mode, _ in calls] == ["chosen"]
    assert torch.equal(net.path_sampler.generator.get_state(), state)  # no draw
    argmax = {False: net.alpha_normal.argmax(-1).tolist(), True: net.alpha_reduce.argmax(-1).tolist()}
    for reduction, (weights, paths) in enumerate(calls[0][1]):
        assert [p[0] for p in paths] == argmax[bool(reduction)] and torch.equal(weights, torch.ones(len(paths), 1))
    assert len({k for ks in argmax.values() for k in ks}) > 2
    with torch.no_grad():
        expected = _manual_forward(net, x, argmax)
    if backend == "reference":
        assert torch.equal(out, expected)
    else:
        _close(out, expected)
    assert out.grad_fn is not None
    out.sum().backward()
    assert net.alpha_normal.grad is None  # the chosen ops are not gated by α
