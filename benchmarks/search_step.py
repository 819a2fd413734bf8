"""Peak memory and time of one full DARTS search step, per mixed-op backend.

A search step is what ``fastdarts-search`` does per batch: the architecture
step (first or second order) and then the weight step. Each backend runs in a
fresh process with the same configuration, one after the other in this run,
so the ratios compare like with like.

Peak memory is that of the first step of a fresh process, above the
baseline taken after the model, the optimisers and the data are built (it
includes the SGD momentum buffers the first step allocates, about |w|):
- cuda: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated``;
- cpu: the peak resident set (VmHWM, reset through /proc/self/clear_refs)
  minus the resident set at the baseline. Only a fresh process gives a
  meaningful figure: memory freed by a step stays resident in the C heap,
  so the peak of a later step above its baseline says little.
The step time is the median of ``--repeat`` steps after ``--warmup`` more.

    python benchmarks/search_step.py --device cpu --order second --batch-size 64 --layers 8
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ("reference", "checkpoint")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class _Memory:
    """Peak memory above a baseline, on either device."""

    def __init__(self, device):
        self.device = device

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.base = _rss_bytes("VmRSS")

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _rss_bytes("VmHWM") - self.base


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(args) -> dict:
    """Runs in its own process: build, warm up, measure one backend."""
    import torch

    from fastdarts import Architect, EXTENDED_OPS, SearchNetwork, resolve_ops
    from fastdarts.search_loop import search_step

    torch.manual_seed(0)
    device = torch.device(args.device)
    ops = EXTENDED_OPS[: int(args.ops)] if args.ops.isdigit() else resolve_ops(args.ops)
    model = SearchNetwork(C=args.channels, num_classes=10, layers=args.layers, ops=ops,
                          backend=args.backend).to(device)
    sgd = torch.optim.SGD(model.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    architect = Architect(model, sgd, order=args.order)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    # Pixel values do not change time or memory; random batches keep the benchmark offline.
    batches = [(torch.randn(shape, device=device), torch.randint(0, 10, (args.batch_size,), device=device))
               for _ in range(2)]

    memory = _Memory(device)
    memory.reset()
    search_step(model, architect, sgd, batches[0], batches[1], 5.0)
    peak = memory.peak()
    for _ in range(args.warmup):
        search_step(model, architect, sgd, batches[0], batches[1], 5.0)
    times = []
    for _ in range(args.repeat):
        _sync(device)
        start = time.perf_counter()
        search_step(model, architect, sgd, batches[0], batches[1], 5.0)
        _sync(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return dict(backend=args.backend, order=args.order, num_ops=len(ops), peak_memory_bytes=peak,
                step_seconds=step, images_per_second=args.batch_size / step)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    p.add_argument("--ops", default="8", help="a count (first N of the extended list) or an op-set/op names")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--order", default="second", help="first, second, or both")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timed steps; the median is reported")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch

    orders = ("first", "second") if args.order == "both" else (args.order,)
    results = []
    for order in orders:
        for backend in args.backends.split(","):
            cmd = [sys.executable, __file__, "--worker", "--backend", backend, "--order", order]
            for flag in ("device", "ops", "channels", "layers", "batch_size", "image_size", "warmup", "repeat"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"{backend}/{order} failed (exit {proc.returncode})")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    config = dict(channels=args.channels, layers=args.layers, batch_size=args.batch_size,
                  image_size=args.image_size, ops=args.ops, warmup=args.warmup, repeat=args.repeat)
    report = dict(device=device_name(args.device), torch=torch.__version__, config=config, results=results)
    print(f"device: {report['device']}, torch {report['torch']}")
    print(f"config: {config}")
    print(f"{'order':<7} {'backend':<11} {'ops':>3} {'peak MiB':>9} {'step s':>8} {'img/s':>7} "
          f"{'mem/ref':>8} {'time/ref':>9}")
    for r in results:
        ref = next((x for x in results if x["order"] == r["order"] and x["backend"] == "reference"), None)
        mem = f"{r['peak_memory_bytes'] / ref['peak_memory_bytes']:.3f}" if ref else "-"
        tim = f"{r['step_seconds'] / ref['step_seconds']:.3f}" if ref else "-"
        print(f"{r['order']:<7} {r['backend']:<11} {r['num_ops']:>3} {r['peak_memory_bytes'] / 2**20:>9.1f} "
              f"{r['step_seconds']:>8.3f} {r['images_per_second']:>7.1f} {mem:>8} {tim:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
