"""ATen ops dispatched by one full DARTS search step (architecture step +
weight step, ``fastdarts.search_loop.search_step``), per backend and order.

Every op call that reaches a ``TorchDispatchMode`` is counted once, by its
overload name (``aten.add.Tensor``, ``fastdarts.bn_accumulate.default``, ...):
that is each call that the Python code and the autograd engine dispatch,
after autograd and after the CompositeImplicitAutograd decompositions, the
backward's ops included; the ops a kernel calls inside itself are not. The
count does not depend on the batch size or the image size, only on the
network, the op set, the backend and the order; it is taken after one
warm-up step (the first step also pays one-time work: the kernel-backend
probe, the optimisers' state).

Counted on the CPU. On a GPU the count would differ slightly, not in the
model but in the optimisers and the gradient clipping, which use the
``_foreach_*`` ops on CUDA tensors and a loop over the parameters on CPU ones.

    python benchmarks/op_count.py --backend fused --order first
    python benchmarks/op_count.py --backend fused --order first --method pc-darts
    python benchmarks/op_count.py --backend fused --order second --channels 8 --layers 5 --batch-size 8 --image-size 16

From a test (put ``benchmarks/`` on ``sys.path`` first)::

    from op_count import count_search_step
    counts = count_search_step("fused", "first", channels=8, layers=5, batch_size=8, image_size=16)
    total = sum(counts.values())
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # imported from a test: search_step.py is next to this file
    sys.path.insert(0, _HERE)
from search_step import build_search  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Counts every op call that reaches the mode, by overload name."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_step(model, architect, weight_optimizer, train_batch, val_batch, grad_clip: float = 5.0
               ) -> collections.Counter[str]:
    """The ops of one ``search_step`` on these (already warmed-up) objects."""
    from fastdarts.search_loop import search_step

    with OpCounter() as counter:
        search_step(model, architect, weight_optimizer, train_batch, val_batch, grad_clip)
    return counter.counts


def count_search_step(backend: str = "fused", order: str = "first", ops: str = "8", channels: int = 16,
                      layers: int = 8, batch_size: int = 64, image_size: int = 32, warmup: int = 1,
                      method: str = "darts") -> collections.Counter[str]:
    """Build the configuration of ``benchmarks/search_step.py`` on the CPU
    (with ``method``'s network options), run ``warmup`` steps, and count the
    ops of the next one."""
    model, sgd, architect, batches = build_search(backend, order, ops, channels, layers, batch_size, image_size,
                                                  torch.device("cpu"), method=method)
    from fastdarts.search_loop import search_step

    for _ in range(warmup):
        search_step(model, architect, sgd, batches[0], batches[1], 5.0)
    return count_step(model, architect, sgd, batches[0], batches[1], 5.0)


def format_top(counts: collections.Counter[str], top: int = 15) -> str:
    total = sum(counts.values())
    lines = [f"{'count':>7} {'share':>6}  op"]
    for name, n in counts.most_common(top):
        lines.append(f"{n:>7} {n / total:>6.1%}  {name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="fused", help="reference, checkpoint or fused")
    p.add_argument("--order", default="first", help="first or second")
    p.add_argument("--method", default="darts", help="darts, pc-darts or proxyless (its network options)")
    p.add_argument("--ops", default="8", help="a count 4..10 (first N of the extended list) or an op-set/op names")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="steps before the counted one")
    p.add_argument("--top", type=int, default=15, help="how many of the most frequent ops to list")
    args = p.parse_args(argv)
    counts = count_search_step(args.backend, args.order, args.ops, args.channels, args.layers, args.batch_size,
                               args.image_size, args.warmup, args.method)
    print(f"{args.method}/{args.backend}/{args.order}: {sum(counts.values())} ops dispatched per search step "
          f"({len(counts)} distinct)")
    print(format_top(counts, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
