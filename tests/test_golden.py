"""Golden results of today's searches, for the redesign that makes methods
plug-ins (issue 23): it must change no result.

Each case is a short seeded CPU search on tiny settings, run in float64 on one
thread; ``tests/golden/searches.json`` holds what the code of the commit that
wrote it computed: the final architecture parameters, statistics of the
weights, the genotype and the figures of every ``metrics.jsonl`` line. A
search checkpoint and a training checkpoint written by that code
(``tests/golden/*.pt``, interrupted after their first epoch) must still
resume to the uninterrupted runs' results, and the trained weights evaluate.

Numbers are compared to float64 rounding (relative 1e-9, absolute 1e-12),
not bit for bit: other machines sum in other orders (training, whose loss is
taken in float32 by design, to 1e-5; the figures computed in float32 by
design, to float32 rounding: the α figures the loop logs, from a float32
copy of α, and the validation loss, taken like training's on float32
logits; another CPU's vectorised exp and log differ in their last bit). In float64 Adam's ε
(1e-8) dwarfs that rounding, so it cannot flip a normalised step as float32's
can. Regenerate (only when a change of results is intended, and say so in the
commit): ``python tests/test_golden.py``.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parent / "golden"
SEARCHES = GOLDEN / "searches.json"
RTOL, ATOL = 1e-9, 1e-12

BASE = dict(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, batch_size=16,
            epochs=2, max_steps=2, device="cpu", progress=False, seed=5)
# Methods whose presets wait for α (warm-up epochs) are run without the wait, so α moves in two epochs.
PDARTS = dict(method="p-darts", layout=None, stages="3:8,3:5,3:3", epochs=1, arch_warmup_epochs=0)
CASES = {
    **{f"darts-{order}-{backend}": dict(order=order, backend=backend)
       for order in ("first", "second") for backend in ("reference", "checkpoint", "fused")},
    "darts-second-fused-recompute-cell": dict(order="second", backend="fused", recompute="cell"),
    "darts-second-reference-recompute-cell": dict(order="second", backend="reference", recompute="cell"),
    "pc-darts-fused": dict(method="pc-darts", channels=8, arch_warmup_epochs=0),
    "pc-darts-reference": dict(method="pc-darts", channels=8, arch_warmup_epochs=0, backend="reference"),
    # The schedule of the fixture (an α step before every weight step; issue 24 gave the preset the original's).
    "proxyless-fused": dict(method="proxyless", arch_warmup_epochs=0, arch_every=1, arch_after_weights=False),
    "proxyless-reference": dict(method="proxyless", arch_warmup_epochs=0, arch_every=1, arch_after_weights=False,
                                backend="reference"),
    "p-darts-fused": dict(PDARTS),
    "p-darts-skip-dropout-max-skip": dict(PDARTS, skip_dropout="0.1,0.4,0.7", max_skip=1, backend="reference"),
    "early-stop-stable": dict(order="first", early_stop="stable:1", epochs=4),
    "early-stop-skip": dict(order="first", early_stop="skip:1", epochs=3),
    "aux-skip-first": dict(order="first", aux_skip=True),
    "aux-skip-second-fused": dict(order="second", aux_skip=True),
    "pc-darts+early-stop": dict(method="pc-darts", channels=8, arch_warmup_epochs=0, early_stop="stable:1",
                                epochs=3),
    "p-darts+aux-skip": dict(PDARTS, aux_skip=True, skip_dropout="0.0,0.3,0.6"),
}
# Figures computed in float32 by design (the α figures from a float32 copy of α, for logs and plots;
# the validation loss on float32 logits): float32 rounding, which another CPU's vectorised exp/log
# changes in the last bit (seen on a clean clone: the fixture's machine against an AVX2-only one).
FLOAT32_FIGURES = ("alpha_entropy", "alphas", "betas", "val_loss")
FLOAT32_RTOL = 1e-6
# The figures of a metrics.jsonl line that the code computes (not its timing or its labels).
FIGURES = ("epoch", "lr", "train_loss", "train_acc", "arch_step", "arch_loss", "val_loss", "val_acc",
           "alpha_entropy", "genotype", "alphas", "betas", "skip_connects", "alpha_rank_tau",
           "rank_unchanged_epochs", "stopped", "stage", "stage_epoch", "cells", "ops_per_edge", "edge_ops",
           "next_edge_ops", "skip_dropout", "aux_skip_weight")


@contextlib.contextmanager
def float64_one_thread():
    """Searches in float64 on one thread: the model (default dtype) and the
    batches (the loader's uint8 -> float conversion) in float64."""
    import fastdarts.data.loader as loader

    dtype, threads, to_float = torch.get_default_dtype(), torch.get_num_threads(), loader.to_float
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    loader.to_float = lambda images: images.to(torch.float64).div_(255.0)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        loader.to_float = to_float


def _quiet(_):
    pass


def summary(result) -> dict:
    """What a search computed: α (and β), weight statistics, genotype, per-epoch figures."""
    model = result.model
    arch = [p.detach().tolist() for p in model.arch_parameters()]
    weights = [p.detach() for p in model.weight_parameters()]
    buffers = [b.detach().double() for name, b in model.named_buffers() if not name.endswith("num_batches_tracked")]
    stats = dict(count=sum(w.numel() for w in weights), sum=sum(w.sum().item() for w in weights),
                 sum_sq=sum((w * w).sum().item() for w in weights),
                 abs_sum=sum(w.abs().sum().item() for w in weights),
                 buffer_sum=sum(b.sum().item() for b in buffers))
    metrics = [{k: entry[k] for k in FIGURES if k in entry} for entry in result.history]
    return dict(arch=arch, weights=stats, genotype=result.genotype.to_dict(), metrics=metrics)


def run_case(name: str, out: Path) -> dict:
    from fastdarts import search

    with float64_one_thread():
        return summary(search(**{**BASE, **CASES[name]}, out=str(out), log=_quiet))


def assert_close(ours, theirs, where="", rtol=RTOL) -> None:
    """Equal structure, strings and booleans exactly, numbers to float64 rounding (``rtol``)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and sorted(ours) == sorted(theirs), (where, sorted(ours), sorted(theirs))
        for key in theirs:
            assert_close(ours[key], theirs[key], f"{where}.{key}",
                         max(rtol, FLOAT32_RTOL) if key in FLOAT32_FIGURES else rtol)
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a, b, f"{where}[{i}]", rtol)
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        assert isinstance(ours, (int, float)) and math.isclose(ours, theirs, rel_tol=rtol, abs_tol=ATOL), \
            (where, ours, theirs)
    else:
        assert ours == theirs, (where, ours, theirs)


def _golden() -> dict:
    return json.loads(SEARCHES.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_search_matches_the_golden_result(name, tmp_path):
    expected = _golden()["searches"][name]
    ours = json.loads(json.dumps(run_case(name, tmp_path / name)))  # the same JSON round trip as the fixture
    assert ours["genotype"] == expected["genotype"]
    assert_close(ours, expected, name)


def test_every_case_has_a_golden_result():
    assert sorted(_golden()["searches"]) == sorted(CASES)
    for entry in _golden()["searches"].values():
        assert entry["metrics"] and any(abs(a) > 1e-3 for cell in entry["arch"] for row in cell for a in row)


# ---------------------------------------------------------------- old checkpoints

RESUMED_SEARCH = dict(BASE, order="second", epochs=2)
TRAIN = dict(genotype="DARTS_V2", dataset="digits", layers=3, channels=4, batch_size=32, epochs=2, max_steps=2,
             auxiliary=False, device="cpu", progress=False, seed=5)
# Training takes its loss in float32 whatever the forward runs in (train_step): its figures carry
# float32 rounding, which the order of sums on another machine may change in the last digits.
TRAIN_RTOL = 1e-5


class _Stop(Exception):
    pass


def _stop_after_first_epoch(entry):
    raise _Stop


@pytest.mark.slow
def test_a_search_checkpoint_of_that_code_resumes_to_its_result(tmp_path):
    from fastdarts import search

    out = tmp_path / "search"
    out.mkdir()
    shutil.copy(GOLDEN / "search_checkpoint.pt", out / "checkpoint.pt")
    with float64_one_thread():
        result = search(**RESUMED_SEARCH, out=str(out), resume=True, log=_quiet)
    assert_close(json.loads(json.dumps(summary(result))), _golden()["resumed_search"], "resumed_search")


@pytest.mark.slow
def test_a_training_checkpoint_of_that_code_resumes_and_evaluates(tmp_path):
    from fastdarts import train
    from fastdarts.evaluate import evaluate_checkpoint

    out = tmp_path / "train"
    out.mkdir()
    shutil.copy(GOLDEN / "train_checkpoint.pt", out / "checkpoint.pt")
    with float64_one_thread():
        result = train(**TRAIN, out=str(out), resume=True, log=_quiet)
        evaluated = evaluate_checkpoint(out / "last.pt", device="cpu", max_steps=2)
    expected = _golden()["resumed_train"]
    assert_close([{k: h[k] for k in ("train_loss", "test_loss", "test_acc")} for h in result.history],
                 expected["history"], "resumed_train", TRAIN_RTOL)
    assert_close({k: evaluated[k] for k in ("loss", "top1", "top5", "parameters")}, expected["evaluated"],
                 "evaluated", TRAIN_RTOL)


# ---------------------------------------------------------------- writing the fixture

def write_golden(folder: Path) -> None:
    """Run every case with this code and write the fixture (and the two checkpoints)."""
    import subprocess
    import tempfile

    from fastdarts import search, train
    from fastdarts.evaluate import evaluate_checkpoint

    folder.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        searches = {}
        for name in CASES:
            print(f"golden: {name}", flush=True)
            searches[name] = run_case(name, tmp / name)
        with float64_one_thread():
            whole = summary(search(**RESUMED_SEARCH, out=str(tmp / "whole"), log=_quiet))
            with contextlib.suppress(_Stop):
                search(**RESUMED_SEARCH, out=str(tmp / "cut"), log=_quiet, on_epoch_end=_stop_after_first_epoch)
            shutil.copy(tmp / "cut" / "checkpoint.pt", folder / "search_checkpoint.pt")
            trained = train(**TRAIN, out=str(tmp / "train"), log=_quiet)
            evaluated = evaluate_checkpoint(tmp / "train" / "last.pt", device="cpu", max_steps=2)
            with contextlib.suppress(_Stop):
                train(**TRAIN, out=str(tmp / "train_cut"), log=_quiet, on_epoch_end=_stop_after_first_epoch)
            shutil.copy(tmp / "train_cut" / "checkpoint.pt", folder / "train_checkpoint.pt")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=folder).stdout.strip()
    document = dict(
        written_by=f"tests/test_golden.py at commit {commit} (float64, one thread, torch {torch.__version__})",
        searches=searches, resumed_search=whole,
        resumed_train=dict(history=[{k: h[k] for k in ("train_loss", "test_loss", "test_acc")}
                                    for h in trained.history],
                           evaluated={k: evaluated[k] for k in ("loss", "top1", "top5", "parameters")}))
    SEARCHES.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    print(f"wrote {SEARCHES}, {folder / 'search_checkpoint.pt'}, {folder / 'train_checkpoint.pt'}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    write_golden(GOLDEN)
