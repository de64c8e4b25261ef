"""QuantizeGraph: structure of the integer program and its numerics against fake-quant."""
import numpy as np
import pytest
import torch

from calib.artifact import TensorQuant
from calib.errors import UnsupportedOpError
from calib.fakequant import build_fake_quant
from relay_passes import reference
from relay_passes.program import emit, parse
from tests.relay_passes.helpers import assert_same
from waps_tvm.frontend import to_program


def test_structure(tiny_artifact):
    prog = to_program(tiny_artifact, 2)
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
    prog = to_program(tiny_artifact, 64)
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fq = build_fake_quant(tiny_artifact)(x).numpy()
    deq, codes = reference.run(prog, x.numpy())
    out = prog.ops[-1].attrs
    fq_codes = np.round(fq / out.scale) + out.zero_point
    # the integer program differs from fake-quant only by rounding: codes within 2 LSB,
    # and top-1 agrees almost everywhere
    assert np.abs(fq_codes - codes).max() <= 2
    assert (fq.argmax(1) == deq.argmax(1)).mean() >= 0.95


def test_llvm_equals_reference(tiny_artifact):
    prog = to_program(tiny_artifact, 2)
    assert_same(prog, np.random.default_rng(0).normal(size=(2, 1, 16, 16)).astype("float32"))


def _one_conv_artifact(tail_op: str | None = None):
    """input [2, 4, 4] → 1×1 conv (3 outputs, weights 1·0.5, relu) [→ a node of ``tail_op``]."""
    from calib.artifact import LayerRecord, TensorQuant, WapsArtifact
    from calib.graph import Graph, Node
    nodes = [Node("x", "input", [], {"shape": [2, 4, 4]}, shape=(2, 4, 4)),
             Node("conv", "conv2d", ["x"], {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1,
                                            "act": "relu"}, source="features.0", shape=(3, 4, 4))]
    if tail_op:
        nodes.append(Node("tail", tail_op, ["conv"], {}, source="features.1", shape=(3, 4, 4)))
    rec = LayerRecord(wbits=4, unit_size=1, w_codes=np.ones((3, 2, 1, 1), np.int8), w_scale=np.full(3, 0.5, np.float32),
                      bias=np.zeros(3, np.float32), gamma_z=np.ones(3, np.float32), phi_z=np.zeros(3, np.float32))
    quant = {"x": TensorQuant(8, 0.1, 8), "conv": TensorQuant(4, 0.1, 0)}
    return WapsArtifact(Graph(nodes, nodes[-1].name), {"conv": rec}, quant, {})


@pytest.mark.parametrize("op,match", [("sigmoid", r"operation sigmoid at tail \(features.1\) has no integer"),
                                      ("upsample", r"operation upsample at tail \(features.1\) has no integer")])
def test_unsupported_op_is_named_with_its_place(op, match):
    with pytest.raises(UnsupportedOpError, match=match):
        to_program(_one_conv_artifact(op), 1)


@pytest.mark.parametrize("op", ["relu", "relu6"])
def test_standalone_relu_is_a_table_clamping_the_codes(op):
    art = _one_conv_artifact(op)
    art.quant["conv"] = TensorQuant(8, 0.05, 100)              # a signed range: the clamp matters
    prog = to_program(art, 1)
    table = next(o for o in prog.ops if o.kind == "table").params["table"].astype(int)
    codes = np.arange(256)
    want = np.maximum(codes, 100) if op == "relu" else np.clip(codes, 100, 100 + 120)
    np.testing.assert_array_equal(table, want)


def test_supported_small_module_matches_hand_computation():
    prog = to_program(_one_conv_artifact(), 1)
    x = np.full((1, 2, 4, 4), 0.3, np.float32)              # code 11 (z 8 + 3)
    deq, codes = reference.run(prog, x)
    # acc = Σ w(x̄−z) = 2·1·3 = 6; α′ = 0.5·0.1/0.1 = 0.5 → 3
    assert (codes == 3).all() and np.allclose(deq, 0.3)


def test_layer_without_calibration_record_is_named():
    from calib.errors import ArtifactError
    art = _one_conv_artifact()
    art.layers.clear()
    with pytest.raises(ArtifactError, match=r"no parameters for layer conv \(features.0\)"):
        to_program(art, 1)
