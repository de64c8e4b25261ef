"""QuantizeGraph: structure of the integer program and its numerics against fake-quant."""
import numpy as np
import pytest
import torch
from tvm import relax

from calib.errors import UnsupportedOpError
from calib.fakequant import build_fake_quant
from relay_passes import reference
from relay_passes.program import emit, parse
from relay_passes.quantize import CompileError, quantize_graph
from tests.relay_passes.helpers import assert_same
from waps_tvm.frontend import quant_spec, to_relax


def test_structure(tiny_artifact):
    prog = quantize_graph(to_relax(tiny_artifact, 2), quant_spec(tiny_artifact))
    kinds = [o.kind for o in prog.ops]
    assert kinds[0] == "quantize" and kinds[-1] == "dequantize"
    assert kinds.count("conv2d") == 6 and kinds.count("linear") == 1 and kinds.count("add") == 2
    assert "sum_pool2d" in kinds and "flatten" in kinds
    assert not any(k in kinds for k in ("relu", "clip"))           # activations became clamps
    assert prog[prog.outputs[1]].dtype == "uint8"
    for o in prog.ops[1:-1]:                                           # integer only inside
        assert o.dtype in ("uint8", "int32")
    # parse(emit(p)) is the identity on the program
    again = parse(emit(prog))
    assert [o.kind for o in again.ops] == kinds
    for a, b in zip(prog.ops, again.ops):
        assert a.attrs == b.attrs and a.params.keys() == b.params.keys()
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])


def test_agrees_with_fake_quant(tiny_artifact):
    prog = quantize_graph(to_relax(tiny_artifact, 64), quant_spec(tiny_artifact))
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fq = build_fake_quant(tiny_artifact)(x).numpy()
    deq, codes = reference.run(prog, x.numpy())
    out = prog.ops[-1].attrs
    fq_codes = np.round(fq / out["scale"]) + out["zero_point"]
    # the integer program differs from fake-quant only by rounding: codes within 2 LSB,
    # and top-1 agrees almost everywhere
    assert np.abs(fq_codes - codes).max() <= 2
    assert (fq.argmax(1) == deq.argmax(1)).mean() >= 0.95


def test_llvm_equals_reference(tiny_artifact):
    prog = quantize_graph(to_relax(tiny_artifact, 2), quant_spec(tiny_artifact))
    assert_same(prog, np.random.default_rng(0).normal(size=(2, 1, 16, 16)).astype("float32"))


def _float_module(extra_op):
    """conv → bias → relu → <extra_op> as a float Relax module, plus a matching spec."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 4, 4), "float32"))
    w = np.ones((3, 2, 1, 1), np.float32) * 0.5
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w)))
            y = bb.emit(relax.op.add(y, relax.const(np.zeros((1, 3, 1, 1), np.float32))))
            y = bb.emit(relax.op.nn.relu(y))
            y = bb.emit_output(extra_op(y))
        bb.emit_func_output(y)
    from relay_passes.quantize import LayerQuant, QuantSpec, TensorCodes
    layer = LayerQuant("conv2d", "features.0 (conv)", np.ones((3, 2, 1, 1), np.int8), np.full(3, 0.5, np.float32),
                       np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros(3, np.float32), None, act="relu",
                       out=TensorCodes(0.1, 0, 15))
    return bb.get(), QuantSpec(TensorCodes(0.1, 8, 255), [layer], [])


def test_unsupported_op_is_named_with_its_place():
    mod, spec = _float_module(relax.op.sigmoid)
    with pytest.raises(UnsupportedOpError, match=r"sigmoid after features.0 \(conv\)"):
        quantize_graph(mod, spec)


def test_supported_small_module_matches_hand_computation():
    mod, spec = _float_module(lambda y: y)
    prog = quantize_graph(mod, spec)
    x = np.full((1, 2, 4, 4), 0.3, np.float32)              # code 11 (z 8 + 3)
    deq, codes = reference.run(prog, x)
    # acc = Σ w(x̄−z) = 2·1·3 = 6; α′ = 0.5·0.1/0.1 = 0.5 → 3
    assert (codes == 3).all() and np.allclose(deq, 0.3)


def test_mismatched_weights_are_rejected():
    mod, spec = _float_module(lambda y: y)
    spec.layers[0].w_codes = spec.layers[0].w_codes * 2
    with pytest.raises(CompileError, match="weights differ"):
        quantize_graph(mod, spec)
