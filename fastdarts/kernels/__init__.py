"""Kernels of the fused mixed operation: plain-PyTorch references, Triton
kernels and the compiled extension, behind one interface (``backend.py``)."""
