"""Build script for the compiled extension ``fastdarts._C``; metadata lives in
pyproject.toml.

``fastdarts._C`` holds the C++ CPU kernels (csrc/*.cpp) and, when a CUDA build
of torch and a matching nvcc are present, the CUDA kernels (csrc/cuda/*.cu). It
is built against the torch already installed, so install with
``pip install --no-build-isolation -e .`` (or without ``-e``). Without torch at
build time (pip's default isolated build) the package installs as pure Python:
the reference and Triton kernels need no extension.

The extension is optional: an nvcc whose major version differs from torch's
CUDA, or a CUDA compile that fails, falls back to the CPU kernels only; a C++
compiler that is missing or fails gives no extension. The install still
succeeds and says what it left out in one line starting with ``fastdarts:``
(pip shows build output with ``-v``); ``fastdarts.available_backends()``
reports what the installation can run.

Environment:
  FASTDARTS_NO_EXTENSION=1  build no extension
  FASTDARTS_NO_CUDA=1       build the CPU kernels only, even with a CUDA torch and nvcc
  FASTDARTS_FORCE_CUDA=1    build the CUDA kernels even if no GPU is visible; an
                            explicit request, so no CUDA torch, no (matching) nvcc or
                            a failing compile is an error instead of a fallback
  TORCH_CUDA_ARCH_LIST      GPU architectures; default "8.0;9.0+PTX" when no GPU is
                            visible (PTX lets newer GPUs JIT the kernels)
  MAX_JOBS                  parallel compile jobs (honoured by torch's BuildExtension)
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100/H200, and PTX for newer GPUs


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def nvcc_version(cuda_home: str | None) -> str | None:
    """``major.minor`` of ``cuda_home/bin/nvcc``, or None if it does not run."""
    if not cuda_home:
        return None
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_decision(torch_version: str, torch_cuda: str | None, cuda_home: str | None, nvcc: str | None,
                  force: bool, no_cuda: bool) -> tuple[bool, str | None]:
    """Whether to compile the CUDA kernels and, when a CUDA build is skipped
    that could have been wanted, why. ``nvcc`` is ``nvcc_version(cuda_home)``.
    FASTDARTS_FORCE_CUDA is an explicit request: what would skip CUDA raises."""
    if force and no_cuda:
        raise RuntimeError("fastdarts: FASTDARTS_FORCE_CUDA=1 and FASTDARTS_NO_CUDA=1 contradict each other")
    if no_cuda:
        return False, None
    if torch_cuda is None:
        if force:
            raise RuntimeError(f"fastdarts: FASTDARTS_FORCE_CUDA=1 needs a CUDA build of torch; this one is "
                               f"{torch_version}")
        return False, None  # CPU (or ROCm) torch: CUDA kernels could not run anyway
    if cuda_home is None or nvcc is None:
        why = (f"torch is built with CUDA {torch_cuda} but no nvcc was found (set CUDA_HOME)" if cuda_home is None
               else f"torch is built with CUDA {torch_cuda} but {cuda_home}/bin/nvcc --version did not run")
    elif nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        # torch's BuildExtension raises on this too; deciding here names the reason and skips the attempt.
        why = f"nvcc {nvcc} ({cuda_home}) does not match torch's CUDA {torch_cuda} (major version)"
    else:
        return True, None
    if force:
        raise RuntimeError(f"fastdarts: FASTDARTS_FORCE_CUDA=1 but {why}")
    return False, why


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _optional_build_ext(base, fallbacks: list, note: str | None, strict: bool):
    """``base`` (torch's BuildExtension) that tries ``self.extensions``, then
    each of ``fallbacks``, and builds nothing if all fail, printing one
    ``fastdarts:`` line about whatever it left out. ``strict`` re-raises."""

    class OptionalBuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            # setuptools annotates each extension it is given (_full_name, _needs_stub, ...);
            # the fallbacks have the same name, so the same annotations.
            for ext in fallbacks if self.extensions else ():
                for key, value in vars(self.extensions[0]).items():
                    if key.startswith("_") and not hasattr(ext, key):
                        setattr(ext, key, value)

        def run(self):
            inplace = self.inplace  # setuptools' run() clears it and restores it only on success
            candidates = list(self.extensions) + list(fallbacks)
            errors = []
            built = None
            for ext in candidates:
                self.extensions = self.distribution.ext_modules = [ext]
                self.compiler = None  # a fresh compiler: BuildExtension wraps the one it is given
                self.inplace = inplace
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001  (compiler missing/failing, nvcc check, ...)
                    self.inplace = inplace
                    if strict:
                        raise
                    errors.append(exc)
                    self._remove_output(ext, inplace=False)  # no half-built .so in build/
                    continue
                built = ext
                break
            self.inplace = inplace
            if built is None:
                # A stale in-place .so (-e) would claim kernels that this install does not have.
                for ext in candidates:
                    self._remove_output(ext, inplace=inplace)
                self.extensions = self.distribution.ext_modules = []
                why = "; ".join(filter(None, [note, f"the build failed ({_one_line(errors[-1])})"]))
                self._say(f"installed WITHOUT the compiled extension fastdarts._C: {why}; kernels run on Triton "
                          "or plain PyTorch (see fastdarts.available_backends())")
            elif built is not candidates[0] or note:
                why = note or f"the CUDA build failed ({_one_line(errors[-1])})"
                self._say(f"built fastdarts._C with the CPU kernels only, no CUDA kernels: {why}")

        def _remove_output(self, ext, inplace: bool) -> None:
            old, self.inplace = self.inplace, inplace
            try:
                path = self.get_ext_fullpath(ext.name)
            finally:
                self.inplace = old
            if os.path.exists(path):
                os.remove(path)

        @staticmethod
        def _say(line: str) -> None:
            # The one line, last in the build log (pip shows it with -v).
            sys.stdout.flush()
            print(f"fastdarts: WARNING: {line}", file=sys.stderr, flush=True)

    return OptionalBuildExt


def _extension_kwargs() -> dict:
    if _flag("FASTDARTS_NO_EXTENSION"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        warnings.warn(f"fastdarts: torch is not importable at build time ({exc}); building no C++/CUDA "
                      "extension. For the compiled kernels install torch first, then "
                      "`pip install --no-build-isolation .`", stacklevel=1)
        return {}

    # Relative paths: setuptools wants them, and they keep the build reproducible.
    def sources(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    cpp_sources = sources("csrc/*.cpp")
    # nvcc_check.cu is the compile-only check of check_compile.sh, not part of the extension.
    cuda_sources = [p for p in sources("csrc/cuda/*.cu") if os.path.basename(p) != "nvcc_check.cu"]
    force_cuda = _flag("FASTDARTS_FORCE_CUDA")
    with_cuda, note = cuda_decision(torch.__version__, torch.version.cuda, CUDA_HOME,
                                    nvcc_version(CUDA_HOME) if torch.version.cuda else None,
                                    force_cuda, _flag("FASTDARTS_NO_CUDA"))

    cxx_flags = ["-O3"]
    link_flags = []
    if "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is header code: without -fopenmp its `#pragma omp`
        # is ignored and every CPU kernel silently runs on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cpu_extension = CppExtension("fastdarts._C", cpp_sources, extra_compile_args={"cxx": list(cxx_flags)},
                                 extra_link_args=list(link_flags))
    extensions = [cpu_extension]
    if with_cuda:
        # With a visible GPU torch builds for it; the default list is for builds without one.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        extensions.insert(0, CUDAExtension(
            "fastdarts._C",
            cpp_sources + cuda_sources,
            define_macros=[("FASTDARTS_WITH_CUDA", None)],
            extra_compile_args={"cxx": list(cxx_flags), "nvcc": ["-O3"]},
            extra_link_args=list(link_flags),
        ))
    # BuildExtension compiles with ninja when it is installed, MAX_JOBS jobs at a time.
    build_ext = _optional_build_ext(BuildExtension.with_options(use_ninja=True), extensions[1:], note,
                                    strict=force_cuda)
    return {"ext_modules": extensions[:1], "cmdclass": {"build_ext": build_ext}}


# Guarded so that tests can import the helpers above; pip and `python setup.py`
# run this file as __main__.
if __name__ == "__main__":
    setup(**_extension_kwargs())
