#!/usr/bin/env bash
# The sdist is complete: build it, build a wheel FROM IT against the installed
# torch, install the wheel into a separate folder and import it from there
# (not from the checkout) with the compiled CPU kernels. Artefacts stay in a
# temporary folder. Usage: [PYTHON=python] .ci/check_sdist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
work=$(mktemp -d)
# setuptools writes fastdarts.egg-info into the checkout for the sdist: remove it
# again unless it was there before.
egg_info=$PWD/fastdarts.egg-info
if [ -e "$egg_info" ]; then egg_info=; fi
trap 'rm -rf "$work" ${egg_info:+"$egg_info"}' EXIT

echo "check_sdist: [1/4] sdist"
"$PYTHON" -m build --sdist --no-isolation --outdir "$work/dist" . >"$work/sdist.log" 2>&1 \
  || { tail -n 40 "$work/sdist.log"; exit 1; }
sdist=$(echo "$work"/dist/fastdarts-*.tar.gz)
# The CPU build below compiles no .cu file, so check the CUDA sources by name.
listing=$(tar -tzf "$sdist")
for f in setup.py pyproject.toml MANIFEST.in README.md CMakeLists.txt \
         csrc/bn_accumulate.h csrc/bn_accumulate.cpp csrc/pool3x3.cpp \
         csrc/cuda/bn_accumulate.cu csrc/cuda/bn_accumulate_kernels.cuh csrc/cuda/nvcc_check.cu; do
  grep -qx "fastdarts-[^/]*/$f" <<<"$listing" || { echo "check_sdist: $f is missing from $(basename "$sdist")"; exit 1; }
done
if grep -E '\.so$|__pycache__' <<<"$listing"; then echo "check_sdist: build artefacts in the sdist"; exit 1; fi

echo "check_sdist: [2/4] wheel from $(basename "$sdist")"
# -v so that the log has the build's output, the `fastdarts:` line included.
"$PYTHON" -m pip wheel -v --no-build-isolation --no-deps --wheel-dir "$work/wheels" "$sdist" >"$work/wheel.log" 2>&1 \
  || { tail -n 60 "$work/wheel.log"; exit 1; }
grep "fastdarts: WARNING" "$work/wheel.log" || true

echo "check_sdist: [3/4] install into a separate folder"
"$PYTHON" -m pip install -q --no-deps --target "$work/site" "$work"/wheels/fastdarts-*.whl

echo "check_sdist: [4/4] import from there"
cd "$work"
PYTHONPATH="$work/site" "$PYTHON" - "$work/site" <<'PY'
import os
import sys

# An editable install of the checkout (CI's venv has one) adds a meta-path
# finder that would supply modules missing from the target: drop it.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
site = os.path.realpath(sys.argv[1])
import fastdarts
from fastdarts.kernels import extension

assert extension.HAS_EXTENSION, f"the wheel's fastdarts._C does not import: {extension.EXTENSION_ERROR}"
for module in (fastdarts, sys.modules["fastdarts._C"]):
    path = os.path.realpath(module.__file__)
    assert path.startswith(site + os.sep), f"{module.__name__} comes from {path}, not from {site}"
backends = fastdarts.available_backends()
assert "cpp" in backends, backends
print(f"check_sdist: OK ({fastdarts.__file__}; backends {backends})")
PY
