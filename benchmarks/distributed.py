"""A search step over 1 and 2 processes (gloo on the CPU, one thread per rank):
step time, images/s and the bytes the explicit all-reduces send per step.

Each world size runs in fresh processes with a file rendezvous, the same
configuration and the same global batch (split evenly among the ranks), so
the two rows compare like with like. ``bytes_all_reduced`` counts the
payload of ``fastdarts.distributed``'s all-reduces (the architect's and the
weight step's gradients), per rank and step; at world size 1 nothing is
reduced (column ``-``).

The search's all-reduce volume per step is a property of the supernet, not
of the machine: ``--estimate`` prints it for the paper's setting (C=16, 8
cells, 8 ops; second order: the weights' gradient three times and α's once)
and sets it against a ring all-reduce over 8 GPUs on NVLink and on
InfiniBand, as an estimate from nominal bandwidths (no GPU measured here).

    python benchmarks/distributed.py --order first --channels 8 --layers 5 --batch-size 32 --json out.json
    python benchmarks/distributed.py --estimate
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Nominal per-direction bandwidths (bytes/s) for the estimate: NVLink 4 on an H100/H200 SXM board
# (900 GB/s both directions), one InfiniBand NDR port (400 Gb/s).
LINKS = {"NVLink (H100/H200 SXM, 450 GB/s per direction)": 450e9, "InfiniBand NDR (400 Gb/s)": 50e9}


def _rank_main(rank: int, world: int, rendezvous: str, args: argparse.Namespace, result: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from fastdarts import Architect, SearchNetwork, distributed
    from fastdarts.search_loop import search_step

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    net = SearchNetwork(C=args.channels, num_classes=10, layers=args.layers, backend=args.backend)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    architect = Architect(net, sgd, order=args.order, grad_reduce=distributed.all_reduce_mean_ if world > 1 else None)
    per_rank = distributed.per_rank_batch(args.batch_size, world)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch_size,),
                                                                                   generator=g)) for _ in range(2)]
    shard = [(x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]) for x, y in batches]
    for _ in range(args.warmup):
        search_step(net, architect, sgd, shard[0], shard[1], 5.0)
    times, reduced = [], []
    for _ in range(args.repeat):
        distributed.reset_bytes_all_reduced()
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        search_step(net, architect, sgd, shard[0], shard[1], 5.0)
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
        reduced.append(distributed.bytes_all_reduced())
    if rank == 0:
        step = statistics.median(times)
        Path(result).write_text(json.dumps(dict(
            world_size=world, order=args.order, backend=args.backend, batch_size=args.batch_size,
            per_rank_batch=per_rank, step_seconds=step, images_per_second=args.batch_size / step,
            bytes_all_reduced_per_step=reduced[-1] if world > 1 else None,
            weight_parameters=sum(p.numel() for p in net.weight_parameters()),
            arch_parameters=sum(p.numel() for p in net.arch_parameters()))))
    if world > 1:
        dist.destroy_process_group()


def measure(args: argparse.Namespace, world: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = f"{tmp}/result.json"
        mp.spawn(_rank_main, args=(world, f"{tmp}/rendezvous", args, result), nprocs=world, join=True)
        return json.loads(Path(result).read_text())


def estimate() -> dict:
    """All-reduce volume per step at the paper's setting and a ring all-reduce's time over 8 GPUs."""
    from fastdarts import SearchNetwork

    net = SearchNetwork(C=16, num_classes=10, layers=8)
    weights = sum(p.numel() for p in net.weight_parameters()) * 4
    alphas = sum(p.numel() for p in net.arch_parameters()) * 4
    volume = {"first": weights + alphas, "second": 3 * weights + alphas}
    ranks = 8
    out = dict(weight_gradient_bytes=weights, alpha_gradient_bytes=alphas, bytes_per_step=volume, ranks=ranks,
               seconds={})
    for order, nbytes in volume.items():
        # A ring all-reduce sends (and receives) 2(N−1)/N of the payload per rank.
        sent = 2 * (ranks - 1) / ranks * nbytes
        out["seconds"][order] = {link: sent / bandwidth for link, bandwidth in LINKS.items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--order", default="first", choices=["first", "second"])
    p.add_argument("--backend", default="fused")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--estimate", action="store_true", help="only the all-reduce estimate at the paper's setting")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    report = dict(estimate=estimate())
    e = report["estimate"]
    print(f"paper's setting (C=16, 8 cells, 8 ops): weight gradient {e['weight_gradient_bytes'] / 2**20:.2f} MiB, "
          f"α gradient {e['alpha_gradient_bytes']} B")
    for order, nbytes in e["bytes_per_step"].items():
        times = ", ".join(f"{link}: {s * 1e3:.3f} ms" for link, s in e["seconds"][order].items())
        print(f"  {order} order: {nbytes / 2**20:.2f} MiB all-reduced per step; ring over 8 GPUs (estimate): {times}")
    if not args.estimate:
        rows = [measure(args, int(w)) for w in args.worlds.split(",")]
        report["results"] = rows
        print(f"{'world':>5} {'order':<6} {'backend':<9} {'batch/rank':>10} {'step s':>8} {'img/s':>7} "
              f"{'reduced MiB/step':>17}")
        for r in rows:
            reduced = r["bytes_all_reduced_per_step"]
            print(f"{r['world_size']:>5} {r['order']:<6} {r['backend']:<9} {r['per_rank_batch']:>10} "
                  f"{r['step_seconds']:>8.3f} {r['images_per_second']:>7.1f} "
                  f"{'-' if reduced is None else f'{reduced / 2**20:.3f}':>17}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
