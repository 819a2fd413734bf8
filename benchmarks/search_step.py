"""Peak memory and time of one full DARTS search step, per mixed-op backend
(and per search method: ``--methods darts,pc-darts,proxyless``).

A search step is what ``fastdarts-search`` does per batch: the architecture
step (first or second order) and then the weight step. Each backend runs in a
fresh process with the same configuration, one after the other in this run,
so the ratios compare like with like.

Peak memory is that of the first full-size step of a fresh process, above
the baseline taken after the model, the optimisers and the data are built
and after one warm-up step on a tiny batch (``--warmup-batch``, 2 images):
that step pays the process's one-time costs (code pages of the backward
kernels touched for the first time, thread pools, oneDNN caches, the SGD
momentum buffers), which are not memory of the step and would otherwise
weigh most on the leanest backend. Then:
- cuda: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated``;
- cpu: the peak resident set (VmHWM, reset through /proc/self/clear_refs)
  minus the resident set at the baseline. Only a fresh process gives a
  meaningful figure: memory freed by a step stays resident in the C heap,
  so the peak of a later step above its baseline says little.
The step time is the median of ``--repeat`` steps after ``--warmup`` more.
``--rounds N`` runs the whole list of measurements N times, round-robin,
each in a fresh process, and reports per row the median over the rounds
(JSON ``step_seconds_rounds``, ``peak_memory_bytes_rounds``: every round's):
this machine's speed drifts by up to a third over minutes, and round-robin
spreads a drift over every backend instead of the one measured during it.
``load_average`` (column ``load``) is the machine's 1-minute load average
at the end of a measurement: above the number of threads, other processes
competed for the cores and the step time means little.
``aten_ops_per_step`` (column ``aten ops``) is the number of ATen (and
fastdarts) ops one step dispatches, counted on the CPU after the
measurements (``op_count.py``, which also lists the most frequent ones;
``--no-op-count`` skips it).

``--methods`` (default ``darts``) measures each search method with every
backend: the supernet takes the method options its preset sets
(``fastdarts.methods.METHOD_PRESETS``; pc-darts: ``partial_channels=4``,
``edge_norm=True``; proxyless: ``sample_paths=2``; sdarts-adv: its 7-step
attack in every weight step...), set to epoch 0 of the preset's run by
``model.start_epoch`` (path sampling's draws, the methods' schedules), and
the architect its Adam settings; the order, batch and network size stay
those of the command line. A step is ``search_loop.search_step``: the
methods' hooks of the weight step included. Combinations a method refuses
are skipped and listed with its reason (JSON ``skipped``): e.g. path
sampling has no ``checkpoint`` backend and no second-order step. The column
``method`` and the ratios ``mem/darts``, ``time/darts`` (to DARTS on the
same backend, order and recompute mode) appear when more than one method
is measured.

    python benchmarks/search_step.py --device cpu --order second --batch-size 64 --layers 8
    # step time against reference, three rounds round-robin (issue 11 §4's time target)
    python benchmarks/search_step.py --device cpu --order second --channels 16 --layers 5 --batch-size 32 --backends reference,fused --recompute edge,cell --repeat 2 --rounds 3 --no-op-count
    # memory against the number of candidate ops (4..10 of the extended list), with a plot
    python benchmarks/search_step.py --sweep-ops --plot sweep.png --json sweep.json --repeat 1 --warmup 0
    # GPU: the largest batch each backend fits, and its images/s there
    python benchmarks/search_step.py --device cuda --find-max-batch --batch-size 64
    # the search methods (first order: the order of PC-DARTS and ProxylessNAS)
    python benchmarks/search_step.py --device cpu --order first --layers 5 --batch-size 32 \
        --methods darts,pc-darts,proxyless
    # memory against depth (P-DARTS' 5, 11, 17 cells and the evaluation network's 20, all 8 ops),
    # and the largest depth each backend fits in a budget (a straight line through the points)
    python benchmarks/search_step.py --cells 5,11,17,20 --budget-gib 16 --order first --batch-size 32

``--cells`` runs each depth as its own measurement (JSON field ``layers``
per row; ratios compare rows of the same depth); ``--budget-gib`` then fits
peak = a + b·cells per backend by least squares over the measured depths and
reports the deepest supernet whose fitted peak stays within the budget
(JSON ``depth_budget``): an extrapolation, labelled as such.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ("reference", "checkpoint", "fused")
# The presets whose step runs on one supernet (p-darts' is a run of several; darts-pt's step is darts').
METHODS = ("darts", "pc-darts", "proxyless", "darts-", "sdarts-rs", "sdarts-adv", "beta-darts", "fair-darts")
# Preset options that are not the step's: stages and what happens between or after epochs.
NOT_STEP_OPTIONS = ("stages", "skip_dropout", "max_skip", "early_stop", "selection")


def method_network_options(method: str) -> dict:
    """The method options a preset sets (the rest of it is the loop's: lr, batch, epochs...)."""
    from fastdarts.method import method_options
    from fastdarts.methods import method_preset

    preset = method_preset(method)
    return {k: preset[k] for k in method_options() if k in preset and k not in NOT_STEP_OPTIONS}


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


def skip_reason(method: str, backend: str, order: str) -> str | None:
    """Why this combination does not exist (None: it does): what the method's ``incompatible`` refuses."""
    from fastdarts import FastDartsError, SearchConfig

    try:
        SearchConfig(method=method, backend=backend, order=order, dataset="digits").checked()
    except FastDartsError as e:
        return str(e)
    return None


def build_search(backend: str, order: str, ops: str, channels: int, layers: int, batch_size: int,
                 image_size: int, device, recompute: str = "edge", method: str = "darts"):
    """The benchmark's configuration: ``(model, sgd, architect, [train_batch, val_batch])``.

    ``method``: the supernet options and the architect's Adam settings of
    that method's preset; with path sampling, the draws of epoch 0 of seed 0."""
    import torch

    from fastdarts import Architect, EXTENDED_OPS, SearchNetwork, resolve_ops
    from fastdarts.cuda_graph import DeviceLrSGD
    from fastdarts.methods import method_preset

    torch.manual_seed(0)
    device = torch.device(device)
    preset = method_preset(method)
    op_names = EXTENDED_OPS[: int(ops)] if ops.isdigit() else resolve_ops(ops)
    model = SearchNetwork(C=channels, num_classes=10, layers=layers, ops=op_names, backend=backend,
                          recompute=recompute, **method_network_options(method)).to(device)
    # Epoch 0 of the preset's run: seeds path sampling's draws, sets the epoch's schedules (a method's weights).
    model.start_epoch(0, 0, preset["epochs"], 0)
    # torch's SGD with a float lr (DeviceLrSGD defers to it); --cuda-graph moves the lr to the device.
    sgd = DeviceLrSGD(model.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    architect = Architect(model, sgd, order=order, lr=preset["arch_lr"], weight_decay=preset["arch_weight_decay"],
                          betas=(preset["arch_beta1"], 0.999))
    shape = (batch_size, 3, image_size, image_size)
    # Pixel values do not change time or memory; random batches keep the benchmark offline.
    batches = [(torch.randn(shape, device=device), torch.randint(0, 10, (batch_size,), device=device))
               for _ in range(2)]
    return model, sgd, architect, batches


def aten_ops_per_step(args, model, sgd, architect, batches) -> int:
    """The ops dispatched by one search step, counted on the CPU (op_count.py).

    After the measurements, so the counting mode's overhead touches neither
    memory nor time. On the CPU: one more step of the measured objects, which
    are warmed up. On CUDA: a CPU copy of the configuration, warmed up by one
    step, because the optimisers and the gradient clipping dispatch
    ``_foreach_*`` ops on CUDA tensors where they loop over the parameters on
    CPU ones; the model's ops are the same on both. The copy runs a batch of
    ``--warmup-batch`` images (2 if 0): the count does not depend on the
    batch size, and a full batch on the CPU would take long.
    """
    from op_count import count_step

    from fastdarts.search_loop import search_step

    if args.device != "cpu":
        batch = min(args.batch_size, args.warmup_batch or 2)
        model, sgd, architect, batches = build_search(args.backend, args.order, args.ops, args.channels,
                                                      args.layers, batch, args.image_size, "cpu", args.recompute,
                                                      args.method)
        search_step(model, architect, sgd, batches[0], batches[1], 5.0)
    return sum(count_step(model, architect, sgd, batches[0], batches[1], 5.0).values())


def worker(args) -> dict:
    """Runs in its own process: build, warm up, measure one backend."""
    import torch

    from fastdarts.search_loop import search_step

    device = torch.device(args.device)
    model, sgd, architect, batches = build_search(args.backend, args.order, args.ops, args.channels, args.layers,
                                                  args.batch_size, args.image_size, device, args.recompute,
                                                  args.method)
    ops = model.op_names

    if args.warmup_batch:
        small = [(b[0][: args.warmup_batch], b[1][: args.warmup_batch]) for b in batches]
        search_step(model, architect, sgd, small[0], small[1], 5.0)
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
    graph = graph_measurement(args, model, sgd, architect, batches, memory) if args.cuda_graph else {}
    aten_ops = aten_ops_per_step(args, model, sgd, architect, batches) if args.op_count else None
    return dict(method=args.method, backend=args.backend, recompute=args.recompute, order=args.order, num_ops=len(ops),
                batch_size=args.batch_size, layers=args.layers,
                peak_memory_bytes=peak,
                step_seconds=step, images_per_second=args.batch_size / step, aten_ops_per_step=aten_ops, **graph,
                # Other processes on the machine skew the times (and the fused kernels' OpenMP threads most).
                load_average=_load_average())


def graph_measurement(args, model, sgd, architect, batches, memory) -> dict:
    """The same step as a CUDA graph (``--cuda-graph``), after the eager
    measurements, on the same objects: peak memory of the warm-up, capture
    and first replay (above the same kind of baseline), and the median
    replay time. A capture that fails is recorded (``graph_error``), not fatal."""
    from fastdarts.cuda_graph import GraphedStep, adam_capturable, hold_lr_on_device
    from fastdarts.search_loop import search_step

    hold_lr_on_device(sgd, True)
    adam_capturable(architect.optimizer, True)
    graphed = GraphedStep(lambda x, y, xv, yv: search_step(model, architect, sgd, (x, y), (xv, yv), 5.0))
    inputs = (*batches[0], *batches[1])
    try:
        memory.reset()
        for _ in range(graphed.warmup + 1):  # eager warm-up, then capture + first replay
            graphed(*inputs)
        peak = memory.peak()
        for _ in range(args.warmup):
            graphed(*inputs)
        times = []
        for _ in range(args.repeat):
            _sync(memory.device)
            start = time.perf_counter()
            graphed(*inputs)
            _sync(memory.device)
            times.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        return dict(graph_error=f"{type(e).__name__}: {e}"[:500])
    finally:
        graphed.close()
    step = statistics.median(times)
    return dict(graph_step_seconds=step, graph_images_per_second=args.batch_size / step,
                graph_peak_memory_bytes=peak)


def _load_average() -> float | None:
    """The 1-minute load average at the end of the measurement (None where unknown)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


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


def _run_worker(args, backend: str, order: str, ops: str, batch_size: int | None = None,
                oom_ok: bool = False, recompute: str = "edge", method: str = "darts",
                layers: int | None = None) -> dict | None:
    """One measurement in a fresh process; None if it ran out of memory and
    ``oom_ok`` (the batch does not fit)."""
    cmd = [sys.executable, __file__, "--worker", "--backend", backend, "--order", order, "--ops", ops,
           "--batch-size", str(batch_size or args.batch_size), "--recompute", recompute, "--method", method,
           "--layers", str(layers or args.layers)]
    for flag in ("device", "channels", "image_size", "warmup", "repeat", "warmup_batch"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if not args.op_count:
        cmd.append("--no-op-count")
    if args.cuda_graph:
        cmd.append("--cuda-graph")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if oom_ok and "out of memory" in proc.stderr.lower():
            return None
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"{method}/{backend}/{recompute}/{order}/{ops} ops failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Per-process figures that --rounds reports as medians over the rounds.
_ROUND_FIGURES = ("step_seconds", "peak_memory_bytes", "graph_step_seconds", "graph_peak_memory_bytes")


def merge_rounds(rows: list[dict]) -> dict:
    """One measurement repeated in several rounds (fresh processes) as one
    row: the median of each figure, every round's value in ``<figure>_rounds``,
    the highest load average of any round."""
    merged = dict(rows[0])
    if len(rows) == 1:
        return merged
    for key in _ROUND_FIGURES:
        values = [r.get(key) for r in rows]
        if all(isinstance(v, (int, float)) for v in values):
            merged[key] = statistics.median(values)
            merged[f"{key}_rounds"] = values
    merged["images_per_second"] = merged["batch_size"] / merged["step_seconds"]
    if "graph_step_seconds" in merged:
        merged["graph_images_per_second"] = merged["batch_size"] / merged["graph_step_seconds"]
    loads = [r["load_average"] for r in rows if r.get("load_average") is not None]
    merged["load_average"] = max(loads) if loads else None
    merged["rounds"] = len(rows)
    return merged


def find_max_batch(args, backend: str, order: str, recompute: str = "edge", method: str = "darts") -> dict:
    """The largest batch (to within 1/8) whose full search step fits: double
    from --batch-size until a step runs out of memory, then bisect; at most
    --max-batch-cap (JSON ``max_batch_capped``: the cap fits, the limit is higher)."""
    fits, best, too_big = 0, None, None
    batch = args.batch_size
    cap = args.max_batch_cap
    while too_big is None:
        if cap is not None and batch > cap:
            if fits < cap:
                batch = cap
            else:
                return dict(best, max_batch_size=fits, max_batch_capped=True)
        result = _run_worker(args, backend, order, args.ops, batch, oom_ok=True, recompute=recompute,
                             method=method)
        if result is None:
            too_big = batch
        else:
            fits, best, batch = batch, result, batch * 2
        if fits == 0 and too_big is not None:
            raise SystemExit(f"{method}/{backend}/{order}: even batch {batch} does not fit; lower --batch-size")
    while too_big - fits > max(1, fits // 8):
        batch = (fits + too_big) // 2
        result = _run_worker(args, backend, order, args.ops, batch, oom_ok=True, recompute=recompute,
                             method=method)
        if result is None:
            too_big = batch
        else:
            fits, best = batch, result
    return dict(best, max_batch_size=fits)


def _method(r: dict) -> str:
    return r.get("method", "darts")  # absent from JSON written before the methods


def _same_setting(x: dict, r: dict) -> bool:
    """Same order, op count and depth (rows written before ``layers`` was recorded share one)."""
    return x["order"] == r["order"] and x["num_ops"] == r["num_ops"] and x.get("layers") == r.get("layers")


def _ratio(results: list[dict], r: dict, baseline: str, key: str) -> str:
    """r's ``key`` over the ``baseline`` backend's (recompute "edge") of the same method, order, ops and depth."""
    base = next((x for x in results if _same_setting(x, r)
                 and _method(x) == _method(r) and x["backend"] == baseline
                 and x.get("recompute", "edge") == "edge"), None)
    return f"{r[key] / base[key]:.3f}" if base else "-"


def _ratio_to_darts(results: list[dict], r: dict, key: str) -> str:
    """r's ``key`` over DARTS' on the same backend, recompute mode, order, ops and depth."""
    base = next((x for x in results if _same_setting(x, r)
                 and _method(x) == "darts" and x["backend"] == r["backend"]
                 and x.get("recompute", "edge") == r.get("recompute", "edge")), None)
    return f"{r[key] / base[key]:.3f}" if base else "-"


def print_table(results: list[dict], skipped: list[dict] = ()) -> None:
    methods = len({_method(r) for r in results}) > 1 or any(_method(r) != "darts" for r in results)
    print(f"{'method':<10} " * methods
          + f"{'order':<7} {'backend':<11} {'recomp':<6} {'cells':>5} {'ops':>3} {'peak MiB':>9} {'step s':>8} {'img/s':>7} {'aten ops':>8} "
          f"{'mem/ref':>8} {'mem/ckpt':>9} {'time/ref':>9} {'time/ckpt':>10}"
          + f" {'mem/darts':>9} {'time/darts':>10}" * methods + f" {'load':>5}")
    for r in results:
        aten_ops = r.get("aten_ops_per_step")  # absent from older JSON, None with --no-op-count
        print(f"{_method(r):<10} " * methods
              + f"{r['order']:<7} {r['backend']:<11} {r.get('recompute', 'edge'):<6} {r.get('layers', '-'):>5} "
              f"{r['num_ops']:>3} "
              f"{r['peak_memory_bytes'] / 2**20:>9.1f} "
              f"{r['step_seconds']:>8.3f} {r['images_per_second']:>7.1f} "
              f"{'-' if aten_ops is None else aten_ops:>8} "
              f"{_ratio(results, r, 'reference', 'peak_memory_bytes'):>8} "
              f"{_ratio(results, r, 'checkpoint', 'peak_memory_bytes'):>9} "
              f"{_ratio(results, r, 'reference', 'step_seconds'):>9} "
              f"{_ratio(results, r, 'checkpoint', 'step_seconds'):>10}"
              + (f" {_ratio_to_darts(results, r, 'peak_memory_bytes'):>9} "
                 f"{_ratio_to_darts(results, r, 'step_seconds'):>10}" if methods else "")
              + (f" {r['load_average']:>5.2f}" if r.get("load_average") is not None else f" {'-':>5}"))
    graphed = [r for r in results if "graph_step_seconds" in r or "graph_error" in r]
    if graphed:
        print("CUDA graph (same steps replayed; speed-up over eager reference of the same order):")
        print(f"{'order':<7} {'backend':<11} {'recomp':<6} {'graph s':>8} {'img/s':>8} {'peak MiB':>9} "
              f"{'vs own eager':>12} {'vs ref eager':>12}")
        for r in graphed:
            if "graph_error" in r:
                print(f"{r['order']:<7} {r['backend']:<11} {r.get('recompute', 'edge'):<6} capture failed: "
                      f"{r['graph_error']}")
                continue
            ref = next((x for x in results if _same_setting(x, r) and _method(x) == _method(r)
                        and x["backend"] == "reference" and x.get("recompute", "edge") == "edge"), None)
            print(f"{r['order']:<7} {r['backend']:<11} {r.get('recompute', 'edge'):<6} "
                  f"{r['graph_step_seconds']:>8.4f} {r['graph_images_per_second']:>8.1f} "
                  f"{r['graph_peak_memory_bytes'] / 2**20:>9.1f} "
                  f"{r['step_seconds'] / r['graph_step_seconds']:>11.2f}x "
                  + (f"{ref['step_seconds'] / r['graph_step_seconds']:>11.2f}x" if ref else f"{'-':>12}"))
    for s in skipped:
        print(f"skipped: {s['method']} / {s['backend']} / {s['order']} order: {s['reason']}")


def print_growth(results: list[dict]) -> None:
    """Peak-memory growth from the fewest to the most ops, per backend."""
    for method, order in dict.fromkeys((_method(r), r["order"]) for r in results):
        growth = {}
        for backend in dict.fromkeys(r["backend"] for r in results):
            rows = sorted((r for r in results if _method(r) == method and r["order"] == order
                           and r["backend"] == backend), key=lambda r: r["num_ops"])
            if not rows:
                continue
            growth[backend] = rows[-1]["peak_memory_bytes"] - rows[0]["peak_memory_bytes"]
            name = f"{method} {order}" if method != "darts" else order
            print(f"{name} {backend}: {rows[0]['num_ops']} -> {rows[-1]['num_ops']} ops, peak grows by "
                  f"{growth[backend] / 2**20:.1f} MiB", end="")
            ref = growth.get("reference")
            print(f" ({growth[backend] / ref:.3f} of the reference's growth)" if ref else "")


def depth_budget(results: list[dict], budget_bytes: float) -> list[dict]:
    """Per method, order and backend: peak = a + b·cells fitted by least squares
    over the measured depths, and the deepest supernet whose fitted peak is
    within ``budget_bytes`` (an extrapolation beyond the measured depths)."""
    out = []
    def key_of(r: dict) -> tuple:
        return _method(r), r["order"], r["backend"], r.get("recompute", "edge"), r["num_ops"]

    for key in dict.fromkeys(map(key_of, results)):
        rows = [r for r in results if key_of(r) == key]
        xs = [r["layers"] for r in rows]
        ys = [r["peak_memory_bytes"] for r in rows]
        if len(set(xs)) < 2:
            continue
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        intercept = my - slope * mx
        deepest = int((budget_bytes - intercept) // slope) if slope > 0 else None
        if deepest is not None and deepest < 1:
            deepest = 0  # not even one cell fits
        out.append(dict(method=key[0], order=key[1], backend=key[2], recompute=key[3], num_ops=key[4],
                        bytes_per_cell=slope, intercept_bytes=intercept, budget_bytes=budget_bytes,
                        deepest_within_budget=deepest, measured_cells=xs))
    return out


def plot_sweep(results: list[dict], path: str, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for method, order in dict.fromkeys((_method(r), r["order"]) for r in results):
        for backend in dict.fromkeys(r["backend"] for r in results):
            rows = sorted((r for r in results if _method(r) == method and r["order"] == order
                           and r["backend"] == backend), key=lambda r: r["num_ops"])
            if not rows:
                continue
            label = f"{backend} ({order} order)" if method == "darts" else f"{method} {backend} ({order} order)"
            ax.plot([r["num_ops"] for r in rows], [r["peak_memory_bytes"] / 2**20 for r in rows],
                    marker="o", label=label)
    ax.set_xlabel("candidate ops |O| (first N of the extended list)")
    ax.set_ylabel("peak memory of one search step (MiB)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    p.add_argument("--methods", default="darts",
                   help=f"comma-separated search methods ({', '.join(METHODS)}), each measured with every backend "
                        "that it runs on")
    p.add_argument("--recompute", default="edge",
                   help="comma-separated recompute modes (edge, cell), each measured with every backend")
    p.add_argument("--ops", default="8", help="a count 4..10 (first N of the extended list) or an op-set/op names")
    p.add_argument("--sweep-ops", action="store_true", help="run every op count 4..10 (memory against |O|)")
    p.add_argument("--max-batch-cap", type=int, default=None,
                   help="with --find-max-batch: stop at this batch (bounds the time of the search)")
    p.add_argument("--find-max-batch", action="store_true",
                   help="(GPU) the largest batch each backend fits, starting from --batch-size")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--cells", help="comma-separated depths, each measured (replaces --layers), e.g. 5,11,17,20")
    p.add_argument("--budget-gib", type=float, help="with --cells: the deepest supernet each backend fits in this")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--order", default="second", help="first, second, or both")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timed steps; the median is reported")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every measurement this many times, round-robin, each in a fresh process; report "
                        "the medians (a drift of the machine's speed then falls on every backend alike)")
    p.add_argument("--warmup-batch", type=int, default=2,
                   help="images in the warm-up step before the memory baseline (0: none)")
    p.add_argument("--no-op-count", dest="op_count", action="store_false",
                   help="skip counting the ops dispatched per step (aten_ops_per_step)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time each step replayed as a CUDA graph (cuda only; JSON graph_* fields)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="with --sweep-ops: write the memory plot (PNG) here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--method", default="darts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ops.isdigit() and not 4 <= int(args.ops) <= 10:
        p.error(f"--ops count must be between 4 and 10, got {args.ops}")
    methods = args.methods.split(",")
    unknown = [m for m in methods + [args.method] if m not in METHODS]
    if unknown:
        p.error(f"unknown method {', '.join(unknown)}; known: {', '.join(METHODS)}")

    if args.cuda_graph and not args.device.startswith("cuda"):
        p.error("--cuda-graph needs --device cuda")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch

    orders = ("first", "second") if args.order == "both" else (args.order,)
    op_counts = [str(n) for n in range(4, 11)] if args.sweep_ops else [args.ops]
    modes = args.recompute.split(",")
    depths = [int(c) for c in args.cells.split(",")] if args.cells else [args.layers]
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.rounds > 1 and args.find_max_batch:
        p.error("--rounds does not combine with --find-max-batch (a bisection of fresh processes already)")
    if args.cells and args.find_max_batch:
        p.error("--cells does not combine with --find-max-batch (which searches the batch at --layers)")
    if args.budget_gib is not None and len(depths) < 2:
        p.error("--budget-gib needs --cells with at least two depths")
    runs, skipped = [], []  # in the table's order: method, order, ops, recompute, backend
    for method in methods:
        for order in orders:
            for backend in args.backends.split(","):
                reason = skip_reason(method, backend, order)
                if reason is not None:
                    skipped.append(dict(method=method, backend=backend, order=order, reason=reason))
            for cells in depths:
                for ops in op_counts:
                    for mode in modes:
                        runs += [(method, order, ops, mode, backend, cells) for backend in args.backends.split(",")
                                 if skip_reason(method, backend, order) is None]
    if args.find_max_batch:
        results = [find_max_batch(args, backend, order, mode, method) for method, order, _, mode, backend, _ in runs]
    else:
        rounds = [[_run_worker(args, backend, order, ops, recompute=mode, method=method, layers=cells)
                   for method, order, ops, mode, backend, cells in runs] for _ in range(args.rounds)]
        results = [merge_rounds([r[i] for r in rounds]) for i in range(len(runs))]

    config = dict(channels=args.channels, layers=",".join(map(str, depths)), batch_size=args.batch_size,
                  image_size=args.image_size, ops=",".join(op_counts), warmup=args.warmup, repeat=args.repeat,
                  rounds=args.rounds,
                  warmup_batch=args.warmup_batch, aten_ops_counted_on="cpu", methods=methods)
    from fastdarts.kernels.backend import kernel_backend

    kernels = kernel_backend(torch.device(args.device))
    report = dict(device=device_name(args.device), torch=torch.__version__, kernels=kernels, config=config,
                  results=results, skipped=skipped)
    print(f"device: {report['device']}, torch {report['torch']}, fused kernels: {kernels}")
    print(f"config: {config}")
    print_table(results, skipped)
    if args.find_max_batch:
        for r in results:
            capped = " (the cap; more may fit)" if r.get("max_batch_capped") else ""
            print(f"{r['method']} {r['order']} {r['backend']}: largest batch that fits {r['max_batch_size']}{capped}, "
                  f"{r['images_per_second']:.1f} images/s there")
    if args.budget_gib is not None:
        report["depth_budget"] = depth_budget(results, args.budget_gib * 2**30)
        for d in report["depth_budget"]:
            print(f"{d['method']} {d['order']} {d['backend']} ({d['recompute']}, {d['num_ops']} ops): "
                  f"{d['bytes_per_cell'] / 2**20:.1f} MiB per cell "
                  f"(fit over {d['measured_cells']} cells); deepest within {args.budget_gib:g} GiB: "
                  f"{d['deepest_within_budget']} cells (extrapolated)")
    if args.sweep_ops:
        print_growth(results)
        if args.plot:
            plot_sweep(results, args.plot, f"{report['device']}, C={args.channels}, {args.layers} cells, "
                                           f"batch {args.batch_size}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
