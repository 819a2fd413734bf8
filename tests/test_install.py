"""Installs that do not abort: the compiled extension is optional (setup.py)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WARNING = "fastdarts: WARNING:"

# Imported from the target folder only: the test venv's editable install of
# fastdarts adds a meta-path finder that would otherwise supply fastdarts._C
# from the checkout.
IMPORT_CHECK = textwrap.dedent("""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    import torch
    import fastdarts
    from fastdarts.kernels.backend import kernel_backend
    print(fastdarts.__file__)
    assert "fastdarts._C" not in sys.modules, sys.modules["fastdarts._C"]
    backends = fastdarts.available_backends()
    assert "cpp" not in backends and backends[-1] == "ref", backends
    assert kernel_backend(torch.device("cpu")) == "ref"
    net = fastdarts.SearchNetwork(C=4, num_classes=5, layout="N,R,N", ops="darts", steps=2, multiplier=2,
                                  stem_multiplier=1, in_channels=3)
    net.loss(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in net.arch_parameters())
    print("OK", backends)
""")


def _load_setup():
    # setup.py calls setup() only as __main__, so importing it just defines the helpers.
    spec = importlib.util.spec_from_file_location("fastdarts_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_install_with_failing_compiler_runs_on_ref_kernels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "csrc", src / "csrc", ignore=skip)
    shutil.copytree(ROOT / "fastdarts", src / "fastdarts", ignore=skip)
    site = tmp_path / "site"
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    for name in ("FASTDARTS_NO_EXTENSION", "FASTDARTS_FORCE_CUDA", "FASTDARTS_BACKEND"):
        env.pop(name, None)
    # -v: pip shows the build's output (and so the warning line) only when verbose.
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
                           "--target", str(site), str(src)], env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    warnings = [line.strip() for line in out.splitlines() if WARNING in line]
    assert len(warnings) == 1, out[-4000:]
    assert "WITHOUT the compiled extension" in warnings[0]
    assert not list(site.glob("fastdarts/_C*")), "a failed build left an extension behind"

    env = {k: v for k, v in os.environ.items() if k != "FASTDARTS_BACKEND"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert Path(run.stdout.splitlines()[0]).resolve().is_relative_to(site.resolve())
    assert "OK" in run.stdout


FALLBACK_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension
    spec = importlib.util.spec_from_file_location("fastdarts_setup", sys.argv[1])
    fastdarts_setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fastdarts_setup)
    first, fallback, note = sys.argv[2], sys.argv[3], sys.argv[4] or None
    fallbacks = [CppExtension("pkg._C", [fallback])] if fallback else []
    cmd = fastdarts_setup._optional_build_ext(BuildExtension.with_options(use_ninja=True), fallbacks, note,
                                              strict=False)
    setup(name="pkg", packages=["pkg"], ext_modules=[CppExtension("pkg._C", [first])],
          cmdclass={"build_ext": cmd}, script_args=["build_ext", "--inplace"])
""")


@pytest.mark.slow
def test_failed_build_falls_back_then_builds_nothing(tmp_path):
    """The build_ext of setup.py as a failing CUDA build would use it: the
    first extension fails, the fallback is built in place (-e); when that fails
    too, nothing is left, not even an older in-place build. A CUDA build skipped
    up front (``note``) is reported the same way."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "broken.cpp").write_text("#error deliberately broken\n")
    (tmp_path / "good.cpp").write_text(
        "#include <Python.h>\n"
        "static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, \"_C\", nullptr, -1, nullptr};\n"
        "PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&def); }\n")
    (tmp_path / "script.py").write_text(FALLBACK_SCRIPT)

    def build(first, fallback, note=""):
        proc = subprocess.run([sys.executable, "script.py", str(ROOT / "setup.py"), first, fallback, note],
                              cwd=tmp_path, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        return [line for line in out.splitlines() if line.startswith(WARNING)], list((tmp_path / "pkg").glob("_C*"))

    warnings, built = build("broken.cpp", "good.cpp")
    assert len(warnings) == 1 and "CPU kernels only" in warnings[0], warnings
    assert len(built) == 1
    subprocess.run([sys.executable, "-c", "import pkg._C"], cwd=tmp_path, check=True)

    warnings, built = build("broken.cpp", "broken.cpp")
    assert len(warnings) == 1 and "WITHOUT the compiled extension" in warnings[0], warnings
    assert built == []
    assert not list((tmp_path / "build").rglob("_C*.so"))

    warnings, built = build("good.cpp", "", note="nvcc 13.0 does not match torch's CUDA 12.8")
    assert len(warnings) == 1 and "CPU kernels only" in warnings[0] and "nvcc 13.0" in warnings[0], warnings
    assert len(built) == 1
    warnings, built = build("good.cpp", "")
    assert warnings == [] and len(built) == 1


def test_cuda_decision():
    decide = _load_setup().cuda_decision
    cuda_home = "/usr/local/cuda"
    # CPU torch: nothing to build for CUDA, nothing to warn about.
    assert decide("2.13.0+cpu", None, None, None, force=False, no_cuda=False) == (False, None)
    # Matching major version (minor differences are torch's warning, not ours).
    assert decide("2.11.0", "12.8", cuda_home, "12.4", force=False, no_cuda=False) == (True, None)
    # FASTDARTS_NO_CUDA: CPU kernels only, silently.
    assert decide("2.11.0", "12.8", cuda_home, "12.8", force=False, no_cuda=True) == (False, None)
    # Mismatched major version or no nvcc: CPU kernels only, with the reason.
    with_cuda, why = decide("2.11.0", "12.8", cuda_home, "13.0", force=False, no_cuda=False)
    assert not with_cuda and "nvcc 13.0" in why and "12.8" in why
    with_cuda, why = decide("2.11.0", "12.8", None, None, force=False, no_cuda=False)
    assert not with_cuda and "no nvcc" in why
    # FASTDARTS_FORCE_CUDA is an explicit request: what would skip CUDA is an error.
    with pytest.raises(RuntimeError, match="needs a CUDA build of torch"):
        decide("2.13.0+cpu", None, None, None, force=True, no_cuda=False)
    with pytest.raises(RuntimeError, match="does not match"):
        decide("2.11.0", "12.8", cuda_home, "13.0", force=True, no_cuda=False)
    with pytest.raises(RuntimeError, match="contradict"):
        decide("2.11.0", "12.8", cuda_home, "12.8", force=True, no_cuda=True)


def test_nvcc_version(tmp_path):
    nvcc_version = _load_setup().nvcc_version
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    assert nvcc_version(str(tmp_path)) == "12.4"
    assert nvcc_version(str(tmp_path / "missing")) is None
    assert nvcc_version(None) is None
