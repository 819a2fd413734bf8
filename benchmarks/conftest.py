"""For ``pytest benchmarks --benchmark-only`` (the kernel micro-benchmarks).

Unlike tests/conftest.py this never sets TRITON_INTERPRET: without a GPU the
Triton kernels are not benchmarked at all (test_kernels.py). The end of the
run prints each kernel's median as a multiple of its ``ref``'s.

glibc's malloc is told to keep what is freed (``mallopt``): by default it
hands 4-8 MiB blocks (one feature map here) back to the OS and takes them
again on the next call, page faults included, or not, depending on what ran
before in the process. The same ``ref`` kernel then measured 0.13 ms or 4.8 ms
on the same number of elements, depending on the order of the benchmarks.
With the memory kept, a kernel's time is its own work and allocations.
"""
import collections
import ctypes
import sys

import pytest
import torch


def _keep_freed_memory() -> bool:
    """No trimming of the heap, and blocks up to 32 MiB (the most glibc
    allows) from the heap rather than fresh mmaps. False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


KEEP_FREED_MEMORY = _keep_freed_memory()

# report group -> implementation -> median seconds
_MEDIANS: dict[str, dict[str, float]] = collections.defaultdict(dict)


@pytest.fixture
def kernel_medians():
    return _MEDIANS


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark's hook: no error where it is not installed
def pytest_benchmark_update_machine_info(config, machine_info):
    from fastdarts.kernels.backend import available_backends

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["fastdarts_kernel_backends"] = available_backends()
    machine_info["malloc_keeps_freed_memory"] = KEEP_FREED_MEMORY
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()


def pytest_terminal_summary(terminalreporter):
    rows = [(group, impl, t, impls["ref"]) for group, impls in _MEDIANS.items() if "ref" in impls
            for impl, t in impls.items() if impl != "ref"]
    if not rows:
        return
    width = max(len(r[0]) for r in rows)
    terminalreporter.section("kernel median / ref median")
    terminalreporter.write_line(f"{'group':<{width}} {'impl':<7} {'median ms':>10} {'ref ms':>10} {'impl/ref':>9}")
    for group, impl, t, ref in rows:
        terminalreporter.write_line(f"{group:<{width}} {impl:<7} {t * 1e3:>10.3f} {ref * 1e3:>10.3f} {t / ref:>9.3f}")
