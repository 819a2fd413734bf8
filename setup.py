"""Build script for the compiled extension ``fastdarts._C``; metadata lives in
pyproject.toml.

``fastdarts._C`` holds the C++ CPU kernels (csrc/*.cpp) and, when a CUDA build
of torch and nvcc are present, the CUDA kernels (csrc/cuda/*.cu). It is built
against the torch already installed, so install with
``pip install --no-build-isolation -e .`` (or without ``-e``). Without torch at
build time (pip's default isolated build) the package installs as pure Python:
the reference and Triton kernels need no extension.

Environment:
  FASTDARTS_NO_EXTENSION=1  build no extension
  FASTDARTS_FORCE_CUDA=1    build the CUDA kernels even if no CUDA torch / nvcc was
                            detected (e.g. no GPU visible at build time)
  TORCH_CUDA_ARCH_LIST      GPU architectures; default "8.0;9.0" when no GPU is visible
  MAX_JOBS                  parallel compile jobs (honoured by torch's BuildExtension)
"""
import glob
import os
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


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
    if force_cuda and torch.version.cuda is None:
        raise RuntimeError(f"FASTDARTS_FORCE_CUDA=1 needs a CUDA build of torch; this one is {torch.__version__}")
    with_cuda = force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)

    cxx_flags = ["-O3"]
    link_flags = []
    if "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is header code: without -fopenmp its `#pragma omp`
        # is ignored and every CPU kernel silently runs on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and (force_cuda or not torch.cuda.is_available()):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # A100, H100/H200
        extension = CUDAExtension(
            "fastdarts._C",
            cpp_sources + cuda_sources,
            define_macros=[("FASTDARTS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension("fastdarts._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                                 extra_link_args=link_flags)
    # BuildExtension compiles with ninja when it is installed, MAX_JOBS jobs at a time.
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
