"""Fixtures and the fast-tier rule; the helpers the test modules share are in helpers.py."""
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


@pytest.fixture
def need_extension():
    """The C++ extension's tests (``pytestmark = pytest.mark.usefixtures("need_extension")``):
    skipped when fastdarts._C is not built, unless FASTDARTS_REQUIRE_CPP=1 (CI), which makes
    that a failure."""
    from fastdarts.kernels import extension

    if not extension.HAS_EXTENSION:
        why = (f"fastdarts._C is not built ({extension.EXTENSION_ERROR}); "
               "build it with `pip install --no-build-isolation -e .`")
        if os.environ.get("FASTDARTS_REQUIRE_CPP") == "1":
            pytest.fail(why + " [FASTDARTS_REQUIRE_CPP=1]")
        pytest.skip(why)


# ---------------------------------------------------------------- the fast tier
# `python -m pytest -m "not slow"` leaves out whatever runs a whole job: a search, a training run,
# a rank run, a CLI command that does one of them, a subprocess (torchrun, pip, the README's
# commands). A rule, not hand-marking: a test is slow when its own code or that of a fixture it
# uses calls one of these, or when its module is about such runs as a whole.
_WHOLE_JOB = re.compile(r"(?<![\w.])(search|train|rank|search_main|train_main|rank_main|pipeline_main|"
                        r"eval_main|evaluate_checkpoint|run_case|spawn_ranks|_torchrun|torchrun)\(|subprocess\.")
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
