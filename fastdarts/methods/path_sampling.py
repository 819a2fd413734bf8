"""ProxylessNAS' path sampling (Cai et al., ICLR 2019; SPEC §8).

``SearchNetwork(sample_paths=N)`` (``--sample-paths N``) evaluates each edge on sampled ops only:

- weight step (α frozen): one op per edge drawn from p = softmax(α), computed
  alone (the original's ``MODE = None``);
- architecture step (α requires grad): the original's ``two`` mode for N=2,
  generalised to N: N ops drawn from p without replacement, q = softmax of
  their α, one made active by a draw from q (binary gate 1), the others
  inactive (gate 0, output detached). The gates are a straight-through
  one-hot of q, so autograd gives the original's
  ``∂L/∂α_i = Σ_j g_j q_j (δ_ij − q_i)`` with g_j = ⟨dy, o_j(x)⟩.
  ``after_arch_update`` then undoes the update of edges whose active op is
  ``none`` (the original sets their gradient to None), redoes the others'
  Adam step with each edge's own step count (the original has one
  parameter, so one count, per edge: a skipped edge's count stays) and shifts the N
  updated α of every edge by one offset so that their log-sum-exp is
  unchanged (the original's ``rescale_updated_arch_param``);
- evaluation (eval mode): each edge's strongest op (argmax α), as the
  original's ``set_chosen_op_active``.

Draws come from a CPU generator seeded by (seed, epoch) at the start of each
epoch (``start_epoch``), so a resumed run draws the same paths. Choosing
which ops to launch needs the probabilities on the host: one small
device-to-host copy per forward, the one host read a sampled step makes (so
path sampling cannot be captured as a CUDA graph).

First order only: the second-order virtual step differentiates a sampled
network whose paths change between its passes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import FastDartsError
from ..method import Option, SearchMethod, register_method
from ..mixed_op_checkpoint import PATHS_UNSUPPORTED
from ..size_check import heaviest_ops


class _StraightThroughOneHot(torch.autograd.Function):
    """Forward: the one-hot gates (exactly 0 and 1; column 0 active).
    Backward: the gate gradient passed to q unchanged."""

    @staticmethod
    def forward(ctx, q):
        gates = torch.zeros_like(q)
        gates[..., 0] = 1
        return gates

    @staticmethod
    def backward(ctx, grad):
        return grad


def check_sample_paths(n, num_ops: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= num_ops - 1:
        raise FastDartsError(f"sample-paths must be in 1..{num_ops - 1} (the number of ops minus one), got {n!r}")
    return n


class PathSampler:
    """The sampled paths of every edge of both cell types, per forward."""

    def __init__(self, num_paths: int):
        self.num_paths = num_paths
        self.generator = torch.Generator().manual_seed(0)
        self.last_arch_sample: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def start_epoch(self, seed: int, epoch: int) -> None:
        """Seed the draws of ``epoch`` (0-based) from (seed, epoch)."""
        self.generator.manual_seed((seed * 1_000_003 + epoch) % 2 ** 63)

    # -- sampling -----------------------------------------------------------
    def sample(self, alphas: list[torch.Tensor], mode: str) -> list[tuple[torch.Tensor, tuple]]:
        """Per α (one per cell type): (weights [edges, paths], paths per edge).

        mode: ``weight`` (one op from p, weight 1), ``arch`` (gated paths,
        weights differentiable in α) or ``chosen`` (argmax, weight 1)."""
        if alphas[0].device.type == "meta":
            raise FastDartsError("path sampling chooses the ops to run on the host from α's values, which a "
                                 "meta tensor does not have")
        with torch.no_grad():
            host = torch.stack([a.detach().float() for a in alphas]).cpu()  # the one host read
        out = []
        self.last_arch_sample = [] if mode == "arch" else None
        for alpha, a in zip(alphas, host):
            edges = a.shape[0]
            if mode == "chosen":
                paths = [(int(k),) for k in a.argmax(-1)]
            elif mode == "weight":
                probs = F.softmax(a, dim=-1)
                paths = [(int(k),) for k in torch.multinomial(probs, 1, generator=self.generator)[:, 0]]
            else:
                out.append(self._arch_sample(alpha, a))
                continue
            ones = torch.ones(edges, 1, dtype=alpha.dtype, device=alpha.device)
            out.append((ones, tuple(paths)))
        return out

    def _arch_sample(self, alpha: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        n = self.num_paths
        drawn = torch.multinomial(F.softmax(a, dim=-1), n, replacement=False, generator=self.generator)
        q_host = F.softmax(a.gather(1, drawn), dim=-1)
        active = torch.multinomial(q_host, 1, generator=self.generator)[:, 0]
        # Active path first: its gate is column 0.
        order = [[int(c)] + [j for j in range(n) if j != int(c)] for c in active]
        involved = drawn.gather(1, torch.tensor(order))
        index = involved.to(alpha.device)
        q = F.softmax(alpha.gather(1, index), dim=-1)
        gates = _StraightThroughOneHot.apply(q)
        self.last_arch_sample.append((index, involved[:, 0]))
        return gates, tuple(tuple(int(k) for k in row) for row in involved)

    # -- after the Adam step on α ----------------------------------------------
    def snapshot(self, alphas: list[torch.Tensor], optimizer: torch.optim.Optimizer):
        """What ``after_arch_update`` needs: α and its Adam moments before the step."""
        if self.last_arch_sample is None:
            raise FastDartsError("path sampling: no architecture sample to update (call the model with α "
                                 "requiring grad first)")
        with torch.no_grad():
            return [(a.detach().clone(), {k: v.clone() for k, v in optimizer.state.get(a, {}).items()
                                          if isinstance(v, torch.Tensor) and v.shape == a.shape})
                    for a in alphas]

    @torch.no_grad()
    def after_arch_update(self, alphas: list[torch.Tensor], optimizer: torch.optim.Optimizer, saved,
                          none_index: list[list[int]]) -> None:
        """``none_index``: per α, per edge, the column of `none` (-1: none there)."""
        group = optimizer.param_groups[0]
        for alpha, (old, old_state), (index, active), nones in zip(alphas, saved, self.last_arch_sample, none_index):
            state = optimizer.state[alpha]
            # Edges whose active op is `none` are not updated (the original's grad = None).
            skipped = (active == torch.tensor(nones)).to(alpha.device)
            keep = skipped.unsqueeze(1)
            if any(k >= 0 for k in nones):  # decided on the host lists: no read of a device value
                alpha.copy_(torch.where(keep, old, alpha))
                # Adam's moments too (zeros where the step created them).
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == alpha.shape:
                        before = old_state.get(key)
                        value.copy_(torch.where(keep, torch.zeros_like(value) if before is None else before, value))
            self._per_edge_bias_correction(alpha, old, state, skipped, group)
            # Shift the updated paths so that log Σ exp over them is unchanged.
            offset = torch.logsumexp(alpha.gather(1, index), -1) - torch.logsumexp(old.gather(1, index), -1)
            alpha.scatter_(1, index, alpha.gather(1, index) - offset.unsqueeze(1))
        self.last_arch_sample = None

    @staticmethod
    def _per_edge_bias_correction(alpha: torch.Tensor, old: torch.Tensor, state: dict, skipped: torch.Tensor,
                                  group: dict) -> None:
        """Redo the updated edges' Adam step with each edge's own step count.

        The original has one α parameter per edge, so an edge whose gradient
        is None (skipped) does not advance its Adam step count; α here is one
        (edges, ops) tensor with one count, which would make the first update
        after k skips up to √(k+1) too large. Each edge's count lives in the
        optimiser's state (``edge_steps``, checkpointed with it); the moments
        Adam just computed do not depend on the count, only the bias
        correction does: α_e = old_e − lr/(1−β1^t_e) · m_e / (√v_e/√(1−β2^t_e) + ε),
        Adam's own arithmetic."""
        if group.get("amsgrad") or group.get("maximize") or group.get("capturable"):
            raise FastDartsError("path sampling's per-edge Adam step counts need plain Adam (no amsgrad, "
                                 "maximize or capturable)")
        counts = state.get("edge_steps")  # α's shape (so it loads as Adam's moments do): each row its edge's count
        if counts is None:  # the first update (or a checkpoint written before per-edge counts: its global count)
            counts = torch.full_like(alpha, float(state["step"]) - 1.0)
        counts = counts + (~skipped).to(alpha.dtype).unsqueeze(1)
        state["edge_steps"] = counts
        steps = counts[:, 0].to(torch.float64)
        beta1, beta2 = group["betas"]
        t = steps.clamp_min(1.0)  # a never-updated edge keeps its old α below, whatever its count
        bias1 = 1 - beta1 ** t
        bias2_sqrt = (1 - beta2 ** t).sqrt()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        step_size = (group["lr"] / bias1).to(alpha.dtype).unsqueeze(1)
        denom = (v.sqrt() / bias2_sqrt.to(alpha.dtype).unsqueeze(1)).add_(group["eps"])
        updated = old - step_size * m / denom
        alpha.copy_(torch.where(skipped.unsqueeze(1), alpha, updated))


class FixedPaths:
    """A stand-in for ``PathSampler`` in the meta forward (the real one reads
    α on the host): every edge runs its ``n`` ops with the most parameters,
    gated by softmax(α) over them, as a sampled architecture pass does."""

    def __init__(self, edge_ops: dict, n: int):
        self.paths = {}
        for cell, lists in edge_ops.items():
            self.paths[cell] = tuple(tuple(ops.index(o) for o in heaviest_ops(ops, n)) for ops in lists)

    def sample(self, alphas, mode):
        out = []
        for alpha, cell in zip(alphas, ("normal", "reduce")):
            paths = self.paths[cell]
            index = torch.tensor(paths, device=alpha.device)
            out.append((F.softmax(alpha.gather(1, index), dim=-1), paths))
        return out


@register_method
class PathSampling(SearchMethod):
    """The op weights of every edge from sampled paths (``PathSampler``), and the update rules of α after Adam."""

    name = "path-sampling"
    options = (Option("sample_paths", 0, "ProxylessNAS: the weight step computes one sampled op per edge, the "
                      "architecture step N (1..ops-1; first order only)", kind="positive_int", metavar="N"),)

    @classmethod
    def check(cls, config, from_preset):
        return dict(sample_paths=check_sample_paths(config.sample_paths, len(config.ops.split(","))))

    @classmethod
    def incompatible(cls, config) -> str | None:
        if config.order == "second":
            return "path sampling (sample-paths) has a first-order architecture step only; use --order first"
        if config.backend == "checkpoint":
            return PATHS_UNSUPPORTED
        fewest = min(ops for _, ops in config.stage_layouts())
        if config.sample_paths >= fewest:
            return (f"sample-paths {config.sample_paths} needs more ops per edge than the last stage's "
                    f"{fewest}")
        if config.cuda_graph:
            return ("--cuda-graph cannot capture path sampling: its paths are drawn on the host every step; "
                    "run without --cuda-graph")
        return None

    def check_network(self, model, C, backend) -> None:
        check_sample_paths(self.config.sample_paths, len(model.edge_ops["normal"][0]))
        if backend == "checkpoint":
            raise FastDartsError(PATHS_UNSUPPORTED)

    def first_order_only(self, model) -> bool:
        return True

    def setup_network(self, model) -> list:
        model.path_sampler = PathSampler(self.config.sample_paths)
        return []

    def op_weights(self, model, alphas):
        mode = ("chosen" if not model.training else
                "arch" if torch.is_grad_enabled() and model.alpha_normal.requires_grad else "weight")
        return model.path_sampler.sample(alphas, mode)

    def network_epoch(self, model, seed, epoch, epochs, stage_epoch) -> None:
        model.path_sampler.start_epoch(seed, epoch)

    def before_arch_update(self, model, optimizer):
        return model.path_sampler.snapshot([model.alpha_normal, model.alpha_reduce], optimizer)

    def after_arch_update(self, model, optimizer, saved) -> None:
        # Per cell type, per edge: the column of `none` (-1: the edge does not hold it).
        none = [[ops.index("none") if "none" in ops else -1 for ops in model.edge_ops[cell]]
                for cell in ("normal", "reduce")]
        model.path_sampler.after_arch_update([model.alpha_normal, model.alpha_reduce], optimizer, saved, none)

    def prepare_size_estimate(self, model) -> None:
        model.path_sampler = FixedPaths(model.edge_ops, self.config.sample_paths)

    def start_run(self, run) -> None:
        if self.config.sample_paths == 1:
            run.log("note: with --sample-paths 1 the architecture gradient Σ_j g_j q_j (δ_ij − q_i) over one path "
                    "is zero, so α moves only by weight decay; ProxylessNAS samples 2")
