"""Each kind's typed attributes (relay_passes/attrs.py) and their one JSON form."""
import dataclasses
import json

import numpy as np
import pytest

from calib.numerics import GroupScale
from relay_passes.attrs import ConcatAttrs, ConvAttrs, LinearAttrs, MaxPoolAttrs, PadAttrs, TableAttrs
from relay_passes.opset import KINDS
from relay_passes.program import Op, decode_attrs, emit, encode_attrs, parse


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_example_op_holds_its_kinds_class_and_reads_back(kind):
    prog = KINDS[kind].example(np.random.default_rng(3))
    for op in prog.ops:
        assert type(op.attrs) is KINDS[op.kind].attrs
        assert decode_attrs(op.kind, encode_attrs(op))[0] == op.attrs
    again = parse(emit(prog))
    assert [o.attrs for o in again.ops] == [o.attrs for o in prog.ops]


def test_no_attribute_is_a_schedule_or_call_key():
    for k in KINDS.values():
        assert not {f.name for f in dataclasses.fields(k.attrs)} & {"form", "layout", "dot", "n_inputs"}


def test_layer_json_keeps_parallel_sigma_and_n_lists():
    conv = ConvAttrs(z_in=3, z_out=4, lo=0, hi=255, in_qmax=255, frac=2, layer="c", stride=[2, 2], padding=(1, 1),
                     dilation=(1, 1), conv_groups=1, group_scales=[GroupScale(0, 0), GroupScale(-1, 4)])
    op = Op("conv2d", "c", ["x"], conv)
    assert encode_attrs(op) == (
        '{"conv_groups": 1, "dilation": [1, 1], "frac": 2, "hi": 255, "in_qmax": 255, "layer": "c", "lo": 0, '
        '"n": [0, 4], "n_inputs": 1, "padding": [1, 1], "sigma": [0, -1], "stride": [2, 2], "z_in": 3, "z_out": 4}')
    assert conv.stride == (2, 2) and op.n_groups == 2 and not conv.grouped
    ungrouped = dataclasses.replace(conv, group_scales=())
    assert "sigma" not in ungrouped.to_json() and ungrouped.scales == (GroupScale(0, 0),)


def test_linear_window_is_fixed_and_never_written():
    lin = LinearAttrs(z_in=0, z_out=0, lo=0, hi=255)
    assert (lin.stride, lin.padding, lin.dilation, lin.conv_groups) == ((1, 1), (0, 0), (1, 1), 1)
    assert set(lin.to_json()) == {"z_in", "z_out", "lo", "hi", "in_qmax", "frac"}


def test_optional_keys_are_absent_when_unset():
    pool = MaxPoolAttrs(kernel=(2, 2), stride=(2, 2), padding=(0, 0))
    assert "dilation" not in pool.to_json() and pool.rates == (1, 1)
    assert MaxPoolAttrs.from_json({**pool.to_json(), "dilation": [2, 1]}).rates == (2, 1)
    assert TableAttrs().to_json() == {} and TableAttrs(layer="t").to_json() == {"layer": "t"}


def test_attrs_are_frozen_and_checked_against_the_kind():
    pad = PadAttrs(pads=[1, 2, 3, 4], value=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pad.value = 1
    with pytest.raises(TypeError, match="PadAttrs"):
        Op("table", "t", ["x"], pad)
    with pytest.raises(TypeError, match="value"):
        Op("pad", "p", ["x"])                                   # a pad has required attributes
    op = Op("pad", "p", ["x"], pad)
    copy = op.copy()
    copy.attrs = dataclasses.replace(copy.attrs, value=5)
    assert op.attrs.value == 0 and json.loads(encode_attrs(copy))["value"] == 5


def test_concat_axis_reads_back_and_an_old_program_concats_channels():
    cat = Op("concat", "c", ["a", "b"], ConcatAttrs(zs=(1, 2), ks=(3, 4), t=5, z_out=6, lo=0, hi=255, axis=3))
    assert decode_attrs("concat", encode_attrs(cat))[0].axis == 3
    old = {k: v for k, v in json.loads(encode_attrs(cat)).items() if k != "axis"}
    assert decode_attrs("concat", json.dumps(old))[0].axis == 1
