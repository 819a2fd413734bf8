import functools
import inspect
import os
import re
from pathlib import Path

# Triton kernels run on the CPU through Triton's interpreter when there is no
# GPU. The variable must be set before triton is first imported, so here, before
# anything imports fastdarts (torch itself does not import triton).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32(request):
    """Exactness tests compare fp32 results within ~1e-5 of their scale: on
    Ampere/Hopper cuDNN's default TF32 convolutions (10-bit mantissa) would
    decide the outcome instead of the code under test. TF32 is off for every
    test; tests marked ``tf32`` switch it on and use a TF32 tolerance."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    tf32 = request.node.get_closest_marker("tf32") is not None
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue().strip().splitlines()


def cli_error(main, argv, prog) -> str:
    """``main(argv)`` must fail with exit status 2 and one line ``prog: error: ...`` on stderr; returns it."""
    code, err = run_cli(main, argv)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), (code, err)
    return err[0]


def tiny_net(**kw):
    """A supernet small enough for a test to run in well under a second."""
    from fastdarts import SearchNetwork

    args = dict(C=4, num_classes=5, layout="N,R,N", ops="darts", steps=2, multiplier=2, stem_multiplier=1,
                in_channels=3, backend="reference")
    args.update(kw)
    return SearchNetwork(**args)


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


# ---------------------------------------------------------------- the fast tier
# `python -m pytest -m "not slow"` leaves out whatever runs a whole job: a search, a training run,
# a rank run, a CLI command that does one of them, a subprocess (torchrun, pip, the README's
# commands). A rule, not hand-marking: a test is slow when its own code or that of a fixture it
# uses calls one of these, or when its module is about such runs as a whole.
_WHOLE_JOB = re.compile(r"(?<![\w.])(search|train|rank|search_main|train_main|rank_main|pipeline_main|"
                        r"eval_main|evaluate_checkpoint|run_case|_spawn|_torchrun|torchrun)\(|subprocess\.")
_SLOW_MODULES = {"test_distributed_search", "test_distributed_train", "test_install", "test_readme",
                 "test_full_disk", "test_golden"}


_NAME_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\(")


@functools.lru_cache(maxsize=None)
def _calls_a_whole_job(func, depth: int = 3) -> bool:
    """Whether ``func``, or a function of the test modules that it calls (``depth`` calls deep), runs a job."""
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    if _WHOLE_JOB.search(source):
        return True
    if depth == 0:
        return False
    scope = getattr(func, "__globals__", {})
    for name in set(_NAME_CALL.findall(source)):
        helper = scope.get(name)
        if inspect.isfunction(helper) and helper is not func and "tests" in Path(helper.__code__.co_filename).parts:
            if _calls_a_whole_job(helper, depth - 1):
                return True
    return False


def _runs_a_whole_job(item) -> bool:
    if item.module.__name__.rsplit(".", 1)[-1] in _SLOW_MODULES:
        return True
    funcs = [item.function] + [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    return any(_calls_a_whole_job(f) for f in funcs)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, pytest.Function) and not item.get_closest_marker("slow") and _runs_a_whole_job(item):
            item.add_marker(pytest.mark.slow)
