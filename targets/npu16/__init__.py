"""npu16: a virtual 16×16-MAC edge NPU as data (params.py) and its cost model (cost.py).

The instruction set, codegen and bit-exact simulator build on these (issue 4)."""
