"""benchmarks/search_step.py: ``--rounds`` merges round-robin repeats of each
measurement into medians, and the script runs end to end on a tiny network."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.append(str(BENCHMARKS))  # after the tests' own modules (both folders have a conftest)

from search_step import merge_rounds  # noqa: E402


def _row(step, peak, load):
    return dict(backend="fused", recompute="cell", order="second", batch_size=8, step_seconds=step,
                images_per_second=8 / step, peak_memory_bytes=peak, aten_ops_per_step=None, load_average=load)


def test_rounds_are_merged_into_medians_with_every_round_kept():
    merged = merge_rounds([_row(2.0, 300, 1.5), _row(4.0, 100, 2.5), _row(3.0, 200, 0.5)])
    assert merged["step_seconds"] == 3.0 and merged["step_seconds_rounds"] == [2.0, 4.0, 3.0]
    assert merged["peak_memory_bytes"] == 200 and merged["peak_memory_bytes_rounds"] == [300, 100, 200]
    assert merged["images_per_second"] == pytest.approx(8 / 3.0)
    assert merged["load_average"] == 2.5 and merged["rounds"] == 3
    # A single round is the row as measured, without round fields.
    assert merge_rounds([_row(2.0, 300, 1.5)]) == _row(2.0, 300, 1.5)


def test_a_failed_graph_capture_in_a_round_leaves_the_graph_figures_unmerged():
    rows = [dict(_row(2.0, 300, 1.0), graph_step_seconds=1.0, graph_peak_memory_bytes=10),
            dict(_row(2.0, 300, 1.0), graph_error="RuntimeError: capture failed")]
    merged = merge_rounds(rows)
    assert "graph_step_seconds_rounds" not in merged and merged["step_seconds_rounds"] == [2.0, 2.0]


@pytest.mark.slow
def test_the_benchmark_runs_round_robin_on_a_tiny_network(tmp_path):
    out = tmp_path / "rounds.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "search_step.py"), "--device", "cpu", "--order", "first",
         "--channels", "4", "--layers", "2", "--batch-size", "4", "--image-size", "8", "--ops", "4",
         "--backends", "reference,fused", "--recompute", "edge", "--warmup", "0", "--repeat", "1",
         "--rounds", "2", "--warmup-batch", "2", "--no-op-count", "--json", str(out)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["config"]["rounds"] == 2
    assert [r["backend"] for r in report["results"]] == ["reference", "fused"]
    for r in report["results"]:
        assert r["rounds"] == 2 and len(r["step_seconds_rounds"]) == 2
        assert all(t > 0 for t in r["step_seconds_rounds"])
        assert r["step_seconds"] == pytest.approx(sum(r["step_seconds_rounds"]) / 2)


def test_rounds_below_one_are_refused():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "search_step.py"), "--rounds", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--rounds must be at least 1, got 0" in proc.stderr


@pytest.mark.parametrize("method", ["darts", "pc-darts", "proxyless", "darts-", "sdarts-rs", "sdarts-adv",
                                    "beta-darts", "fair-darts"])
def test_every_method_of_the_benchmark_takes_its_step(method):
    """``--methods`` builds each preset's supernet and runs the loop's step (the methods' hooks included)."""
    import torch

    from search_step import METHODS, build_search, skip_reason

    from fastdarts.search_loop import search_step

    assert method in METHODS
    assert skip_reason("proxyless", "checkpoint", "first") and skip_reason("proxyless", "fused", "second")
    ran = 0
    for backend in ("reference", "fused"):
        if skip_reason(method, backend, "first"):
            continue
        model, sgd, architect, batches = build_search(backend, "first", "darts", 8 if method == "pc-darts" else 4,
                                                      3, 4, 8, "cpu", method=method)
        before = [a.detach().clone() for a in model.arch_parameters()]
        search_step(model, architect, sgd, batches[0], batches[1], 5.0)
        assert any(not torch.equal(a, b) for a, b in zip(model.arch_parameters(), before))
        ran += 1
    assert ran == 2
