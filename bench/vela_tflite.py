"""Build a full-int8 TFLite model from a bench/vela_describe.py description.

Runs in the Vela venv (TensorFlow, no torch, no project imports):

    /work/vela-venv/bin/python bench/vela_tflite.py DESC_DIR/graph.json OUT.tflite [--samples 8] [--seed 0]

Layout: torch NCHW → TF NHWC. Conv weights [m, c/g, kh, kw] → Conv2D kernel [kh, kw, c/g, m];
depthwise (groups = c, m = c·mult) → DepthwiseConv2D kernel [kh, kw, c, mult]; linear
[m, c] → Dense kernel [c, m]; a flatten of a C×H×W tensor (H·W > 1) first permutes NHWC back
to NCHW so the Dense sees torch's feature order. Torch's explicit conv/pool padding becomes a
ZeroPadding2D followed by a 'valid' layer (exact: TFLite 'same' padding is asymmetric).
Every Keras layer is named ``<node>__<role>`` (role: op, pad, sum, nchw; see layer_name), so
the TFLite tensor names, which carry the layer names, can be matched back to graph nodes;
``--ops OUT.json`` lists each TFLite operator's index, builtin type and output tensor names.

When the description folder holds ``reference.npz`` (x: a torch input, y: the torch model's
output), the float Keras model must reproduce y (float_check), else exit 2.

Quantization: TFLiteConverter with a representative dataset of ``--samples`` standard-normal
inputs (seeded), int8 weights (per channel), int8 activations, int8 model input and output.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

OPS = ("input", "conv2d", "linear", "add", "relu", "relu6", "max_pool2d", "avg_pool2d", "global_avg_pool",
       "flatten", "cat", "pad")


ROLES = ("op", "pad", "sum", "nchw")


def layer_name(node: str, role: str = "op") -> str:
    """The Keras layer name of ``node``'s layer in ``role`` (bench/vela_report.node_of reverses it)."""
    assert role in ROLES
    return f"{node}__{role}"


class TranslationError(Exception):
    """A description node with no TFLite translation (message names the node)."""


def conv_kernel(weight: np.ndarray, groups: int) -> tuple[str, np.ndarray]:
    """('conv', [kh, kw, c/g, m]) or, for depthwise (one input channel per group),
    ('depthwise', [kh, kw, c, m/c]): torch output channel i·mult + j is input i's j-th filter."""
    m, cg, kh, kw = weight.shape
    if groups > 1 and cg == 1:
        mult = m // groups
        return "depthwise", weight.reshape(groups, mult, kh, kw).transpose(2, 3, 0, 1)
    return "conv", weight.transpose(2, 3, 1, 0)


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """torch linear [m, c] → Dense kernel [c, m]."""
    return weight.T


def build_keras(desc: dict, weights: dict):
    """The Keras functional model of ``desc`` (NHWC input, float32); checks every output shape."""
    import keras
    from keras import layers

    nodes = desc["nodes"]
    bad = [f"{n['name']}: op {n['op']}" for n in nodes if n["op"] not in OPS]
    if bad:
        raise TranslationError("no TFLite translation for: " + "; ".join(bad))
    env: dict = {}
    shape: dict[str, list[int]] = {}
    model_input = None
    for n in nodes:
        name, op, a = n["name"], n["op"], n["attrs"]
        xs = [env[i] for i in n["inputs"]]
        if op == "input":
            c, h, w = n["shape"]
            model_input = keras.Input((h, w, c), batch_size=1, name=layer_name(name))
            y = model_input
        elif op == "conv2d":
            y = _pad(xs[0], a["padding"], name)
            kind, kernel = conv_kernel(weights[f"{name}.weight"], int(a["groups"]))
            bias = weights[f"{name}.bias"]
            kh, kw = kernel.shape[:2]
            common = dict(kernel_size=(kh, kw), strides=tuple(a["stride"]), dilation_rate=tuple(a["dilation"]),
                          padding="valid", use_bias=True, name=layer_name(name), activation=_act(a.get("act")))
            if kind == "depthwise":
                layer = layers.DepthwiseConv2D(depth_multiplier=kernel.shape[3], **common)
            else:
                layer = layers.Conv2D(filters=kernel.shape[3], groups=int(a["groups"]), **common)
            y = layer(y)
            layer.set_weights([kernel, bias])
        elif op == "linear":
            layer = layers.Dense(weights[f"{name}.weight"].shape[0], activation=_act(a.get("act")),
                                 name=layer_name(name))
            y = layer(xs[0])
            layer.set_weights([dense_kernel(weights[f"{name}.weight"]), weights[f"{name}.bias"]])
        elif op == "add":
            y = layers.Add(name=layer_name(name, "sum" if a.get("act") else "op"))(xs)
            if a.get("act"):
                y = _act_layer(a["act"], name)(y)
        elif op in ("relu", "relu6"):
            y = _act_layer(op, name)(xs[0])
        elif op == "max_pool2d":
            y = layers.MaxPooling2D(tuple(a["kernel"]), tuple(a["stride"]), "valid",
                                    name=layer_name(name))(_pad(xs[0], a["padding"], name))
        elif op == "avg_pool2d":
            y = layers.AveragePooling2D(tuple(a["kernel"]), tuple(a["stride"]), "valid",
                                        name=layer_name(name))(_pad(xs[0], a["padding"], name))
        elif op == "global_avg_pool":
            y = layers.GlobalAveragePooling2D(keepdims=True, name=layer_name(name))(xs[0])
        elif op == "flatten":
            src = shape[n["inputs"][0]]
            x = xs[0]
            if len(src) == 3 and src[1] * src[2] > 1:  # torch flattens C, H, W in that order
                x = layers.Permute((3, 1, 2), name=layer_name(name, "nchw"))(x)
            y = layers.Flatten(name=layer_name(name))(x)
        elif op == "cat":
            y = layers.Concatenate(axis=-1, name=layer_name(name))(xs)
        elif op == "pad":
            t, l, b, r = a["pads"]
            if a.get("value", 0.0) != 0.0:
                raise TranslationError(f"{name}: pad value {a['value']}")
            y = layers.ZeroPadding2D(((t, b), (l, r)), name=layer_name(name))(xs[0])
        env[name] = y
        shape[name] = list(n["shape"])
        got = _torch_shape(y)
        if got != list(n["shape"]):
            raise TranslationError(f"{name} ({op}): Keras output shape {got} != graph shape {n['shape']}")
    return keras.Model(model_input, env[desc["output"]], name=desc.get("model") or "model")


def _torch_shape(t) -> list[int]:
    s = [int(d) for d in t.shape[1:]]
    return [s[2], s[0], s[1]] if len(s) == 3 else s


def _pad(x, padding, name):
    from keras import layers
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return layers.ZeroPadding2D(((ph, ph), (pw, pw)), name=layer_name(name, "pad"))(x)


def _act(act):
    if act is None:
        return None
    if act == "relu":
        return "relu"
    if act == "relu6":
        return "relu6"
    raise TranslationError(f"activation {act}")


def _act_layer(act, name):
    from keras import layers
    if act == "relu":
        return layers.ReLU(name=layer_name(name))
    if act == "relu6":
        return layers.ReLU(max_value=6.0, name=layer_name(name))
    raise TranslationError(f"{name}: activation {act}")


def to_tflite(model, samples: int, seed: int) -> bytes:
    """Full-int8 TFLite flatbuffer (int8 input and output) calibrated on random inputs."""
    import tensorflow as tf

    shape = [1, *[int(d) for d in model.inputs[0].shape[1:]]]
    rng = np.random.default_rng(seed)

    def representative():
        for _ in range(samples):
            yield [rng.standard_normal(shape).astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return conv.convert()


def tflite_ops(buf: bytes) -> list[dict]:
    """Operators of the first subgraph: index, builtin name, output tensor names, and whether an
    output is a model output (the converter names those ``StatefulPartitionedCall…``)."""
    from ethosu.vela.tflite.BuiltinOperator import BuiltinOperator
    from ethosu.vela.tflite.Model import Model

    names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
    m = Model.GetRootAsModel(buf, 0)
    sg = m.Subgraphs(0)
    outs = {sg.Outputs(j) for j in range(sg.OutputsLength())}
    rows = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = m.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        tensors = [op.Outputs(j) for j in range(op.OutputsLength())]
        rows.append({"index": i, "op": names.get(builtin, str(builtin)),
                     "outputs": [sg.Tensors(t).Name().decode() for t in tensors],
                     "model_output": any(t in outs for t in tensors)})
    return rows


def float_check(model, reference: Path, tolerance: float = 1e-3) -> dict:
    """Run the float Keras model on the reference input (torch NCHW, ``x``) and compare with the
    torch model's output ``y``: {max_abs_err, max_abs_ref, rel}; raises TranslationError when
    rel = max_abs_err / max_abs_ref exceeds ``tolerance`` (a layout or padding mistake)."""
    with np.load(reference) as z:
        x, y = z["x"], z["y"]
    got = np.asarray(model(x.transpose(0, 2, 3, 1), training=False))
    if got.ndim == 4:
        got = got.transpose(0, 3, 1, 2)
    err, ref = float(np.abs(got - y).max()), float(np.abs(y).max())
    out = {"max_abs_err": err, "max_abs_ref": ref, "rel": err / ref if ref else err}
    if out["rel"] > tolerance:
        raise TranslationError(f"the Keras model differs from torch: max |err| {err:.3g} vs max |y| {ref:.3g}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("desc", type=Path, help="graph.json written by bench/vela_describe.py")
    p.add_argument("out", type=Path, help="the .tflite to write")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", type=Path, help="also write the TFLite operator list here (JSON)")
    args = p.parse_args(argv)
    desc = json.loads(args.desc.read_text())
    with np.load(args.desc.parent / desc["weights"]) as z:
        weights = {k: z[k] for k in z.files}
    reference = args.desc.parent / "reference.npz"
    try:
        model = build_keras(desc, weights)
        if reference.exists():
            check = float_check(model, reference)
            (args.desc.parent / "float_check.json").write_text(json.dumps(check))
    except TranslationError as e:
        print(f"vela_tflite: error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buf = to_tflite(model, args.samples, args.seed)
    args.out.write_bytes(buf)
    if args.ops:
        args.ops.write_text(json.dumps(tflite_ops(buf), indent=1))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
