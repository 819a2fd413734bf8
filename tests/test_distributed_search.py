"""The search over two processes (gloo on the CPU, SPEC §10): explicit
all-reduces of the architect's and the weight step's gradients.

Spawned ranks (file rendezvous, one thread each, ``spawn_ranks`` of
helpers.py) run search steps and whole searches; the
single-process statement they are compared with is two replicas of the
supernet stepped in two threads of this process, each on its shard, whose
gradients are averaged where the issue says (the weights' train gradient
before the virtual step, ∇w'L_val before ε, the architecture gradient, the
weight gradient before clipping). Once through ``torchrun`` with the real
``fastdarts-search``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fastdarts import Architect, distributed
from fastdarts.cli import search_main
from fastdarts.search_loop import search, search_step
from helpers import error_line, spawn_ranks, tiny_net

REPO = Path(__file__).resolve().parents[1]
COMBOS = [(order, backend) for order in ("first", "second") for backend in ("reference", "fused")]
STEPS, BATCH = 2, 8


@pytest.fixture(autouse=True)
def _one_thread_per_rank(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _batches():
    """(train, val) global batches of every step, the same in every process."""
    g = torch.Generator().manual_seed(5)
    return [tuple((torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, 5, (BATCH,), generator=g))
                  for _ in range(2)) for _ in range(STEPS)]


def _shard(batch, rank, world=2):
    x, y = batch
    n = len(y) // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _setup(backend, order, grad_reduce):
    torch.manual_seed(3)
    net = tiny_net(backend=backend)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    return net, sgd, Architect(net, sgd, order=order, lr=0.01, grad_reduce=grad_reduce)


def _steps(net, sgd, architect, rank):
    for train, val in _batches():
        search_step(net, architect, sgd, _shard(train, rank), _shard(val, rank), grad_clip=0.5)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _search_steps(rank):
    """Each combination's state after STEPS distributed steps on this rank's shards."""
    return dict(states={combo: _steps(*_setup(combo[1], combo[0], distributed.all_reduce_mean_), rank)
                        for combo in COMBOS})


def _threaded_replicas(order, backend):
    """The single-process statement: two replicas, one per shard, in two threads; a barrier
    averages each gradient list of the pair. Returns both replicas' states."""
    barrier = threading.Barrier(2)
    shared: dict[int, list] = {}

    def averaging(rank):
        def reduce(tensors):
            shared[rank] = tensors
            barrier.wait()
            if rank == 0:
                for a, b in zip(shared[0], shared[1]):
                    if a is not None:
                        mean = (a + b) / 2
                        a.copy_(mean)
                        b.copy_(mean)
            barrier.wait()
        return reduce

    replicas = [_setup(backend, order, averaging(rank)) for rank in range(2)]
    states = [None, None]

    def run(rank):
        states[rank] = _steps(*replicas[rank], rank)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return states


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    codes, results = spawn_ranks(tmp_path_factory.mktemp("steps"), _search_steps)
    assert codes == [0, 0], [r and r["stderr"] for r in results]
    return [r["states"] for r in results]


@pytest.mark.parametrize("order, backend", COMBOS)
def test_ranks_hold_identical_weights_and_alpha_equal_to_averaged_shards(stepped, order, backend):
    rank0, rank1 = stepped[0][(order, backend)], stepped[1][(order, backend)]
    expected = _threaded_replicas(order, backend)
    for name, value in rank0.items():
        if "running" in name or "num_batches" in name:
            # BatchNorm statistics are per rank (each saw its own shard), as in the single-process statement.
            assert torch.allclose(value.float(), expected[0][name].float(), rtol=1e-4, atol=1e-5), name
            continue
        assert torch.equal(value, rank1[name]), name  # bit-identical across the ranks
        scale = expected[0][name].abs().max().clamp_min(1e-6)
        assert (value - expected[0][name]).abs().max() <= 1e-4 * scale, name
    # The statement can tell a wrong averaging apart: one replica alone (no averaging) differs.
    torch.manual_seed(3)
    alone = _steps(*_setup(backend, order, None), 0)
    assert not torch.allclose(alone["alpha_normal"], rank0["alpha_normal"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- whole searches

TINY = dict(dataset="digits", layout="N,R,N", steps=2, multiplier=2, channels=4, batch_size=16, epochs=2,
            max_steps=2, device="cpu", progress=False)
METHODS = {
    "darts-second-fused": dict(order="second"),
    "pc-darts": dict(method="pc-darts", partial_channels=2, arch_warmup_epochs=0),
    # No warm-up, an α step after every 2nd batch (after it, as the preset): α moves in 2 steps per epoch.
    "proxyless": dict(method="proxyless", arch_warmup_epochs=0, arch_every=2),
    "p-darts": dict(method="p-darts", layout=None, stages="3:8,3:3", skip_dropout="0.0,0.5", arch_warmup_epochs=1,
                    epochs=2),
    "darts-minus-checkpoint": dict(order="first", aux_skip=True, backend="checkpoint"),
}


def _searches(rank, root):
    out = {}
    for name, options in METHODS.items():
        result = search(out=f"{root}/{name}", log=print, **{**TINY, **options})
        out[name] = dict(state={k: v.detach().clone() for k, v in result.model.state_dict().items()},
                         history=result.history, genotype=result.genotype.to_dict())

    class Stop(Exception):
        pass

    def stop(entry):
        raise Stop

    try:
        search(out=f"{root}/resumed", log=print, on_epoch_end=stop, **TINY, order="first")
    except Stop:
        pass
    resumed = search(out=f"{root}/resumed", resume=True, log=print, **TINY, order="first")
    whole = search(out=f"{root}/whole", log=print, **TINY, order="first")
    out["resume"] = dict(resumed=resumed.model.state_dict(), whole=whole.model.state_dict())
    return dict(searches=out)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("searches")
    codes, results = spawn_ranks(tmp, _searches, str(tmp / "runs"), wait_s=3600)
    assert codes == [0, 0], [r and r["stderr"][-3000:] for r in results]
    return tmp / "runs", results


@pytest.mark.parametrize("name", METHODS)
def test_every_method_searches_with_identical_state_on_both_ranks(searched, name):
    root, results = searched
    a, b = results[0]["searches"][name], results[1]["searches"][name]
    for key, value in a["state"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, b["state"][key]), key
    assert a["genotype"] == b["genotype"]
    # The validation figures are reduced over the ranks: both see the same numbers.
    assert [h["val_acc"] for h in a["history"]] == [h["val_acc"] for h in b["history"]]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    metrics = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    assert all(m["config"]["world_size"] == 2 for m in metrics)
    assert torch.load(root / name / "checkpoint.pt", weights_only=True)["config"]["world_size"] == 2


def test_rank_0_alone_writes_and_prints(searched):
    root, results = searched
    assert "method: darts" in results[0]["stdout"] and results[1]["stdout"] == ""
    assert not list(root.glob("**/*.tmp"))


def test_resume_under_two_ranks_equals_an_uninterrupted_run(searched):
    _, results = searched
    for r in results:
        resumed, whole = r["searches"]["resume"]["resumed"], r["searches"]["resume"]["whole"]
        for key, value in whole.items():
            assert torch.equal(value, resumed[key]), key


def test_resume_with_another_world_size_is_refused(searched, tmp_path, capsys):
    root, _ = searched
    shutil.copytree(root / "resumed", tmp_path / "run")
    argv = ["--dataset", "digits", "--layout", "N,R,N", "--steps", "2", "--multiplier", "2", "--channels", "4",
            "--batch-size", "16", "--epochs", "2", "--max-steps", "2", "--order", "first", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "run"), "--resume"]
    assert search_main(argv) == 2
    line = error_line(capsys)
    assert "world_size: checkpoint 2 vs now 1" in line and "torchrun --nproc_per_node 2" in line


def test_a_global_batch_the_world_does_not_divide_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "launch", None)  # no process group may be set up
    out = tmp_path / "o"
    assert search_main(["--dataset", "digits", "--batch-size", "15", "--out", str(out)]) == 2
    assert error_line(capsys).startswith("fastdarts-search: error: batch-size 15 does not split evenly among 2")
    # A bad configuration is reported once, by rank 0, before any rank waits for the others.
    assert search_main(["--dataset", "digits", "--stages", "5-8", "--out", str(out)]) == 2
    assert "malformed stages" in error_line(capsys)
    monkeypatch.setenv("RANK", "1")
    assert search_main(["--dataset", "digits", "--batch-size", "15", "--out", str(out)]) == 2
    assert capsys.readouterr().err == ""
    assert not out.exists()


def test_torchrun_runs_the_real_command_and_resumes(tmp_path):
    script = shutil.which("fastdarts-search", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if script is None:
        pytest.skip("fastdarts-search is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    args = ["--dataset", "digits", "--layout", "N,R,N", "--steps", "2", "--multiplier", "2", "--channels", "4",
            "--batch-size", "16", "--epochs", "1", "--max-steps", "2", "--order", "first", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "run")]

    def torchrun(extra=()):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", "--no-python", script, *args, *extra], env=env, capture_output=True, text=True)

    first = torchrun()
    assert first.returncode == 0, first.stderr[-3000:]
    assert "distributed: world size 2, backend gloo" in first.stdout
    assert first.stdout.count("method: darts") == 1  # rank 0 alone logs
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["config"]["world_size"] == 2 and len(state["history"]) == 1
    again = torchrun(["--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout


def _killed_rank(rank, root):
    """Rank 1 dies at its third step (epoch 2); rank 0 must stop with RankLost, its epoch-1 checkpoint whole."""
    import fastdarts.search_loop as search_module

    real, calls = search_module.search_step, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:
            os._exit(1)
        return real(*args, **kwargs)

    search_module.search_step = dying
    try:
        search(out=f"{root}/run", log=print, **TINY, order="first")
    except distributed.RankLost as e:
        return dict(lost=str(e), status=3)
    return dict(lost=None)


def test_a_killed_rank_stops_the_other_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "20")
    codes, results = spawn_ranks(tmp_path, _killed_rank, str(tmp_path), wait_s=3600, after_rank_0_s=60)
    assert codes[1] == 1 and codes[0] == 3
    assert "rank 0 of 2 lost contact with the others" in results[0]["lost"]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # whole, from epoch 1
    assert len(state["history"]) == 1 and not list((tmp_path / "run").glob("*.tmp"))
