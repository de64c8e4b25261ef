"""Host fallback time (targets/npu16/host_cost.py): per-kind counts, the roofline, the host's
config keys, and the report's host columns and totals on a program with host ops."""
import json
from pathlib import Path

import numpy as np
import pytest

from targets.npu16.host_cost import (HOST_COSTS, constant_cost, dequantize_cost, host_row, layer_norm_cost,
                                     quantize_cost, softmax_cost, view_cost)
from targets.npu16.params import DEFAULT, Host, NpuConfigError, from_config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"


def test_softmax_counts_by_hand():
    # 1 sample, 2 heads of 4 keys, 3 query positions: 24 codes in 6 rows of 4
    c = softmax_cost(elems=24, rows=6, table_entries=256)
    assert c.ops == 10 * 24 + 2 * 6 and c.divisions == 24           # one 64-bit division per output
    assert (c.read_bytes, c.write_bytes) == (24 + 4 * 256, 24)        # the codes and the int32 exp table
    h = Host(clock_mhz=1000.0, ops_per_cycle=2.0, bytes_per_cycle=4.0, div_ops=20)
    assert c.work(h) == 252 + 24 * 20 and c.cycles(h) == (252 + 480) // 2 == 366
    assert c.bound(h) == "compute" and c.time_us(h) == pytest.approx(0.366)


def test_layer_norm_counts_by_hand():
    # 197 positions of 768 channels (a ViT-B/16 encoder's norm)
    c = layer_norm_cost(elems=197 * 768, positions=197, channels=768)
    assert c.ops == 14 * 197 * 768 + 13 * 197
    assert c.divisions == 197 * 768 + 2 * 197                         # per output; ÷C and the root per position
    assert (c.read_bytes, c.write_bytes) == (197 * 768 + 8 * 768, 197 * 768)
    assert c.cycles(DEFAULT.host) == c.ops + 20 * c.divisions          # 1 op per cycle, compute-bound


def test_roofline_takes_the_slower_of_ops_and_bytes():
    q = quantize_cost(1000)                                           # float32 in, uint8 out
    assert (q.ops, q.read_bytes, q.write_bytes) == (7000, 4000, 1000)
    assert q.cycles(Host(bytes_per_cycle=4.0)) == 7000 and q.bound(Host()) == "compute"
    slow = Host(bytes_per_cycle=0.5)                                  # 5000 bytes at 0.5 B/cycle
    assert q.cycles(slow) == 10000 and q.bound(slow) == "memory"
    d = dequantize_cost(10, in_bytes=4)                               # an int32 pooled output
    assert (d.ops, d.read_bytes, d.write_bytes) == (30, 40, 40)


def test_views_cost_nothing_and_copies_cost_their_bytes():
    v = view_cost(4096)
    assert v.cycles(DEFAULT.host) == 0 and v.bound(DEFAULT.host) == "none" and "view" in v.note
    copy = view_cost(4096, contiguous=False)
    assert copy.ops == 0 and copy.cycles(DEFAULT.host) == 2 * 4096 // 4 and copy.bound(DEFAULT.host) == "memory"
    k = constant_cost(2 * 16 * 4 * 4)
    assert k.ops == 0 and k.read_bytes == k.write_bytes == 512


def test_host_row_keeps_its_query_and_recosts_for_another_host():
    row = host_row("softmax", {"elems": 24, "rows": 6}, Host())
    assert row["query"] == {"fn": "softmax", "args": {"elems": 24, "rows": 6}}
    half = host_row(**row["query"], host=Host(clock_mhz=600.0))
    assert half["cycles"] == row["cycles"] and half["time_us"] == pytest.approx(2 * row["time_us"])
    assert set(HOST_COSTS) == {"softmax", "layer_norm", "quantize", "dequantize", "view", "constant", "kernel"}
    with pytest.raises(ValueError, match="no host cost"):
        host_row("conv2d", {}, Host())


def test_host_config_keys():
    npu = from_config({"host": {"clock_mhz": 600, "div_ops": 4}})
    assert npu.host == Host(clock_mhz=600, div_ops=4) and npu.to_config()["host"]["bytes_per_cycle"] == 4.0
    assert from_config(npu.to_config()) == npu
    for path in sorted(CONFIGS.glob("*.json")):                        # configs without host keys: the default
        assert load_config(path).host == Host()
    with pytest.raises(NpuConfigError, match="host must be an object with keys among"):
        from_config({"host": {"mhz": 1}})
    with pytest.raises(NpuConfigError, match="host.ops_per_cycle must be a positive number"):
        from_config({"host": {"ops_per_cycle": 0}})
    with pytest.raises(NpuConfigError, match="host.div_ops"):
        from_config({"host": {"div_ops": 1.5}})


def _report(kind: str, npu=DEFAULT):
    from codegen.npu16.byoc import placement
    from relay_passes.opset import KINDS
    from relay_passes.pipeline import lower
    from waps_tvm import report
    prog = lower(KINDS[kind].example(np.random.default_rng(0)), "split").program
    return prog, report.build(prog, placement(None, npu, prog), "npu16", npu)


def test_report_gives_host_ops_host_time_apart_from_the_npu():
    """A softmax program: quantize and dequantize get host cycles and time (not npu16 columns),
    the softmaxes run on the NPU's row unit; the totals are the NPU's time, the host's and their
    sum. A softmax that falls back (int32 codes, a position larger than the SRAM) has a host model."""
    from targets.npu16.report import host_query
    from waps_tvm import report
    prog, rep = _report("softmax")
    host = [r for r in rep["ops"] if r["target"] != "npu16"]
    assert {r["kind"] for r in host} == {"quantize", "dequantize"}
    for r in host:
        assert "npu16" not in r and r["host"]["cycles"] > 0 and r["reason"]
    sm = next(r for r in rep["ops"] if r["kind"] == "softmax")
    assert sm["target"] == "npu16" and sm["npu16"]["query"]["fn"] == "row" and "host" not in sm
    op = prog[sm["op"]]
    n, c, h, w = prog.shape_of(op.inputs[0])
    assert host_query(prog, op) == ("softmax", {"elems": n * c * h * w, "rows": n * op.attrs.groups * h * w,
                                                "in_bytes": 1, "out_bytes": 1, "table_entries": op.params["exp"].size})
    t = rep["totals"]
    assert t["host_time_us"] > 0 and t["host_time_us"] == pytest.approx(sum(r["host"]["time_us"] for r in host))
    assert t["npu_time_us"] == pytest.approx(sum(r["npu16"]["time_us"] for r in rep["ops"] if "npu16" in r))
    assert t["total_time_us"] == pytest.approx(t["npu_time_us"] + t["host_time_us"])
    assert t["host_share"] == pytest.approx(t["host_time_us"] / t["total_time_us"])
    assert t["cycles"] == sum(r["npu16"]["cycles"] for r in rep["ops"] if "npu16" in r)     # no host cycles mixed in
    md = report.markdown(rep)
    assert "| host cycles | host µs |" in md and "Time per batch: NPU" in md and "on the host" in md
    csv_head = report.csv_text(rep).splitlines()[0]
    assert csv_head.endswith("host_ops,host_bytes,host_cycles,host_time_us")

    slow = from_config({"host": {"clock_mhz": 600}})                  # half the clock: twice the host time
    again = report.recost(json.loads(json.dumps(rep)), slow)
    assert again["totals"]["host_time_us"] == pytest.approx(2 * t["host_time_us"])
    assert again["totals"]["npu_time_us"] == pytest.approx(t["npu_time_us"])


def test_layer_norm_and_flatten_rows():
    _, rep = _report("layer_norm")
    rows = {r["kind"]: r for r in rep["ops"] if "host" in r}
    from targets.npu16.report import host_query
    assert "layer_norm" not in rows            # on the row unit, int32 sums in too
    assert all(r["target"] == "npu16" for r in rep["ops"] if r["kind"] == "layer_norm")
    prog, _ = _report("layer_norm")
    op = next(o for o in prog.ops if o.kind == "layer_norm")
    kind, args = host_query(prog, op)          # what it would cost where it falls back
    assert host_row(kind, args, Host())["divisions"] > 0 and host_row(kind, args, Host())["bound"] == "compute"
    assert rows["flatten"]["host"]["cycles"] == 0 and rows["flatten"]["host"]["bound"] == "none"
    assert rep["totals"]["host_unmodelled"] == []


def test_a_machine_without_the_row_unit_runs_softmax_and_layer_norm_on_the_host():
    """row_unit false: lowering says why; compiled and re-costed reports give those ops the
    host time of their host query (the row query's args map onto it exactly)."""
    from codegen.npu16.lower import NotOnNpu, lower_op
    from targets.npu16.report import host_query, query, row_host_query
    from waps_tvm import report
    bare = from_config({"row_unit": False})
    assert bare.row_unit is False and from_config(bare.to_config()) == bare
    for kind in ("softmax", "layer_norm"):
        prog, rep = _report(kind)
        ops = [o for o in prog.ops if o.kind == kind]
        for op in ops:
            assert row_host_query(query(prog, op, DEFAULT).args) == host_query(prog, op)
            with pytest.raises(NotOnNpu, match="no row unit"):
                lower_op(op.kind, op.attrs, [prog.shape_of(i) for i in op.inputs],
                         [prog.dtype_of(i) for i in op.inputs], op.params, bare)
        _, compiled_bare = _report(kind, bare)
        again = report.recost(json.loads(json.dumps(rep)), bare)
        for rows in (compiled_bare["ops"], again["ops"]):
            moved = [r for r in rows if r["kind"] == kind]
            assert len(moved) == len(ops) and all(r["target"] == "llvm" and "npu16" not in r for r in moved)
            for r in moved:
                assert r["host"]["cycles"] == host_row(*host_query(prog, prog[r["op"]]), bare.host)["cycles"] > 0
        assert again["totals"]["host_time_us"] == pytest.approx(compiled_bare["totals"]["host_time_us"])
        assert again["totals"]["host_time_us"] > rep["totals"]["host_time_us"]


def test_every_kind_has_a_host_time_where_it_falls_back():
    """host_query covers every kind of the op set: an op of a kind the NPU runs gets the host
    work of its npu16 cost query's shapes (report.HOST_FROM_NPU), counted as host_cost.py says."""
    from relay_passes.opset import KINDS, is_layer
    from relay_passes.pipeline import lower
    from targets.npu16.host_cost import AVG_POOL_OUT_OPS, ELEMENT_OPS, LAYER_GROUP_OPS, LAYER_OUT_OPS
    from targets.npu16.report import host_query
    seen = set()
    for kind in sorted(KINDS):
        prog = lower(KINDS[kind].example(np.random.default_rng(0)), "split").program
        for op in prog.ops:
            fn, args = host_query(prog, op)
            row = host_row(fn, args, Host())
            assert row["cycles"] >= 0 and (fn == "view" or row["read_bytes"] + row["write_bytes"] > 0), (op.kind, args)
            seen.add(op.kind)
            out = int(np.prod(op.shape))
            if is_layer(op):
                w = op.params["w"]
                groups = op.n_groups if "groups" in op.params else 1
                macs = out * int(np.prod(w.shape[1:]))
                assert args["ops"] == macs + out * (LAYER_OUT_OPS + LAYER_GROUP_OPS * (groups - 1)), op.name
            elif op.kind in ("add", "mul", "table"):
                assert args["ops"] == ELEMENT_OPS["lut" if op.kind == "table" else op.kind] * out
            elif op.kind == "avg_pool2d":
                assert args["ops"] >= AVG_POOL_OUT_OPS * out
            elif op.kind in ("gather", "pad"):
                assert args["ops"] == 0 and row["bound"] == "memory"
    assert seen == set(KINDS)


def test_recost_moves_a_layer_that_no_longer_fits_to_the_host_with_its_time():
    from targets.npu16.report import host_query
    from waps_tvm import report
    prog, rep = _report("conv2d")
    tiny = from_config({"sram_kib": {"weights": 1, "activations": 1}})
    again = report.recost(json.loads(json.dumps(rep)), tiny)
    moved = [r for r in again["ops"] if r["kind"] == "conv2d" and r["target"] == "llvm"]
    assert moved and again["totals"]["host_unmodelled"] == []
    for r in moved:
        assert "does not fit this npu16" in r["reason"]
        assert r["host"]["cycles"] == host_row(*host_query(prog, prog[r["op"]]), tiny.host)["cycles"] > 0
