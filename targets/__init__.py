"""Target descriptions (npu16 parameters, simulator, cost model; CPU/ARM). Built by the
npu16 and CPU issues; nothing here yet."""
