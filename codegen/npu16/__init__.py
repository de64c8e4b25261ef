"""npu16 codegen: weights in 16×16 tiles (tiling.py) and instruction streams for the
integer ops (the BYOC wrapper builds on these)."""
