"""Helpers shared by the test modules (plain functions and constants; the
fixtures and the fast-tier rule are in conftest.py).

Test modules import from here (``from helpers import tiny_net``), never from
conftest.py or from one another: pytest puts tests/ on sys.path.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import sys
import time
from pathlib import Path

import torch

# ---------------------------------------------------------------- small networks and runs

def tiny_net(**kw):
    """A supernet small enough for a test to run in well under a second."""
    from fastdarts import SearchNetwork

    args = dict(C=4, num_classes=5, layout="N,R,N", ops="darts", steps=2, multiplier=2, stem_multiplier=1,
                in_channels=3, backend="reference")
    args.update(kw)
    return SearchNetwork(**args)


# Small enough for a CPU test, real enough to exercise both cell types and second order.
TINY_SEARCH = dict(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, batch_size=32,
                   max_steps=3, device="cpu", progress=False)


class Interrupt(Exception):
    """A search cut short on purpose (``stop_after_first_epoch``), to test its resume."""


def stop_after_first_epoch(entry):
    """``on_epoch_end`` that interrupts a search once its first epoch's checkpoint is written."""
    if entry["epoch"] == 1:
        raise Interrupt


def saved_activation_bytes(net, x, y):
    """Bytes autograd keeps for backward during one forward of ``net.loss``
    (each storage once; parameters are the model's own memory, not counted)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net.loss(x, y)
    loss.backward()
    return sum(storages.values())


def loss_and_grads(net, x, y):
    """``net.loss(x, y)`` and its gradients with respect to ``x`` and every parameter of ``net``."""
    x = x.clone().requires_grad_(True)
    loss = net.loss(x, y)
    grads = torch.autograd.grad(loss, [x] + list(net.parameters()))
    return loss.detach(), grads


def assert_functional_call_matches(net, truth, subs):
    """``functional_call(net, subs)`` gives the gradients of ``truth``, a
    reference supernet that holds the substituted weights itself."""
    truth.load_state_dict({**truth.state_dict(), **{k: v.detach() for k, v in subs.items()}})
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(net, subs, (x,)), y)
    grads = torch.autograd.grad(loss, list(subs.values()))
    grads_t = torch.autograd.grad(truth.loss(x, y), list(truth.parameters()))
    for name, g, gt in zip(subs, grads, grads_t):
        torch.testing.assert_close(g, gt, rtol=1e-5, atol=1e-5 * gt.abs().max().item(), msg=name)


# ---------------------------------------------------------------- command lines

def search_cli_error(argv, capsys) -> str:
    """``fastdarts-search argv`` must fail with exit status 2 and one line on
    stderr (argparse's errors included); returns that line."""
    from fastdarts.cli import search_main

    try:
        code = search_main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdarts-search: error: "), err
    return err[0]


def run_cli(main, argv) -> tuple[int, list[str]]:
    """``main(argv)`` of a CLI entry point with its output captured: (exit status, stderr lines)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue().strip().splitlines()


def cli_error(main, argv, prog) -> str:
    """``main(argv)`` must fail with exit status 2 and one line ``prog: error: ...`` on stderr; returns it."""
    code, err = run_cli(main, argv)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), (code, err)
    return err[0]


def error_line(capsys) -> str:
    """The one line a fastdarts command wrote on stderr (captured by ``capsys``)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdarts-"), err
    return err[0]


# ---------------------------------------------------------------- spawning ranks

def _rank_worker(rank, world, rendezvous, result_path, job, args):
    import torch.distributed as torch_dist

    from fastdarts import distributed

    torch.set_num_threads(1)
    # Meet once every rank has imported torch, so a short collective timeout does not
    # count one rank's start-up against the others.
    Path(f"{rendezvous}.ready{rank}").touch()
    while not all(Path(f"{rendezvous}.ready{r}").exists() for r in range(world)):
        time.sleep(0.02)
    torch_dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=distributed.timeout_seconds()))
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = job(rank, *args)
    result.update(stdout=out.getvalue(), stderr=err.getvalue(), seconds=time.perf_counter() - start)
    torch.save(result, result_path)
    torch_dist.destroy_process_group()
    sys.exit(result.get("status", 0))


def spawn_ranks(tmp_path: Path, job, *args, world: int = 2, wait_s: float = 3600,
                after_rank_0_s: float | None = None):
    """Run ``job(rank, *args)`` in ``world`` fresh processes (gloo, file rendezvous, one thread
    each); their exit codes and results (None if none). ``wait_s`` is a hang guard, not a time
    limit; ``after_rank_0_s``: how long the others may outlive rank 0 before they are killed."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    processes = [context.Process(target=_rank_worker, args=(rank, world, str(tmp_path / "rendezvous"),
                                                            str(tmp_path / f"rank{rank}.pt"), job, args))
                 for rank in range(world)]
    for p in processes:
        p.start()
    deadline = time.monotonic() + wait_s
    for rank, p in enumerate(processes):
        p.join(max(0.0, deadline - time.monotonic()))
        if rank == 0 and after_rank_0_s is not None:
            deadline = min(deadline, time.monotonic() + after_rank_0_s)
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
               if (tmp_path / f"rank{rank}.pt").exists() else None for rank in range(world)]
    return [p.exitcode for p in processes], results
