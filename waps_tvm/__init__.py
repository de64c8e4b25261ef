"""waps-tvm: WAPS-Quant calibration and TVM compilation for integer-only inference.

Public API (see README): :func:`waps_tvm.api.quantize`, :func:`waps_tvm.api.load_artifact`,
:func:`waps_tvm.api.evaluate`.
"""
__version__ = "0.1.0"
