"""Build script. Metadata lives in pyproject.toml.

The compiled extension (C++ CPU kernels, CUDA kernels when a CUDA torch and
nvcc are present) is added here by the fused-kernel work; until then the
package is pure Python.
"""
from setuptools import setup

setup()
