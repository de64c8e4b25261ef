"""The numeric core's three renderings agree bit for bit on edge values: NumPy
(calib/numerics.py), TVM (relay_passes/numeric_tvm.py, as TIR and as Relax ops) and C
(targets/waps_numeric.h, compiled with gcc)."""
import ctypes
import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import tvm
from hypothesis import given, settings, strategies as st
from tvm import relax, te

from calib import numerics as nx
from calib.numerics import GroupScale
from relay_passes import numeric_tvm as nt
from relay_passes.attrs import AddAttrs
from targets.c_source import NUMERIC_H, inline_source
from tests.compile_helpers import compile_c_wrapper

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
COUNT = 48

_WRAPPERS = r"""
void t_group_term(const int32_t *acc, int count, int sigma, int n, int frac, int32_t *out) {
  for (int i = 0; i < count; ++i) out[i] = waps_group_term(acc[i], sigma, n, frac);
}
void t_output_code(const int32_t *acc, const int32_t *mult, const int32_t *shift, int count, int32_t z_out,
                   int32_t lo, int32_t hi, int64_t *out) {
  for (int i = 0; i < count; ++i) out[i] = waps_output_code(acc[i], mult[i], shift[i], z_out, lo, hi);
}
void t_add_rescale(const uint8_t *a, const uint8_t *b, int count, int za, int64_t ka, int zb, int64_t kb, int t,
                   int64_t *out) {
  for (int i = 0; i < count; ++i) out[i] = waps_add_rescale(a[i], za, ka, b[i], zb, kb, t);
}
void t_isqrt(const int64_t *v, int count, int64_t *out) {
  for (int i = 0; i < count; ++i) out[i] = waps_isqrt64(v[i]);
}
void t_layer_norm_code(const int64_t *y, const int64_t *d, const int32_t *g, const int32_t *b, int count, int p, int k,
                       int32_t z_out, int32_t lo, int32_t hi, int64_t *out) {
  for (int i = 0; i < count; ++i) out[i] = waps_layer_norm_code(y[i], d[i], g[i], b[i], p, k, z_out, lo, hi);
}
void t_softmax_code(const int64_t *e, const int64_t *total, int count, int64_t mult, int k, int32_t z_out, int32_t lo,
                    int32_t hi, int64_t *out) {
  for (int i = 0; i < count; ++i) out[i] = waps_softmax_code(e[i], total[i], mult, k, z_out, lo, hi);
}
void t_table(const uint8_t *table, const uint8_t *codes, int count, uint8_t *out) {
  for (int i = 0; i < count; ++i) out[i] = waps_table(table, codes[i]);
}
"""


@pytest.fixture(scope="module")
def clib(tmp_path_factory):
    return compile_c_wrapper(inline_source(NUMERIC_H) + _WRAPPERS, tmp_path_factory.mktemp("numeric"))

def _p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _run_tir(func, *arrays, out_dtype: str):
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    args = [tvm.runtime.tensor(a) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(arrays[0].shape, out_dtype))
    lib["main"](*args, out)
    return out.numpy()


@functools.lru_cache(maxsize=None)
def _tir_group_term(scale: GroupScale, frac: int):
    acc = te.placeholder((COUNT,), "int32", "acc")
    out = te.compute((COUNT,), lambda i: nt.group_term(nt.TIR, acc[i], scale, frac), name="out")
    return te.create_prim_func([acc, out])


@functools.lru_cache(maxsize=None)
def _relax_merge_output(scales: tuple[GroupScale, ...], frac: int, z_out: int, lo: int, hi: int):
    """A Relax function (accs [g, COUNT] int32, M, R, S [COUNT] int64) → output codes int64."""
    bb = relax.BlockBuilder()
    accs = relax.Var("accs", relax.TensorType((len(scales), COUNT), "int32"))
    tabs = [relax.Var(n, relax.TensorType((COUNT,), "int64")) for n in ("m", "r", "s")]
    with bb.function("main", [accs, *tabs]):
        with bb.dataflow():
            ar = nt.RelaxArith(bb)
            parts = {p: bb.emit(relax.op.squeeze(bb.emit(relax.op.strided_slice(accs, [0], [p], [p + 1])), [0]))
                     for p in range(len(scales))}
            total = nt.merge_groups(ar, relax.const(0, "int32"), parts, list(scales), frac)
            out = bb.emit_output(nt.output_code(ar, total, *tabs, z_out, lo, hi, "int64"))
        bb.emit_func_output(out)
    ex = relax.build(bb.get(), target="llvm")
    return ex


def _acc_bound(scale: GroupScale, frac: int) -> int:
    """Largest |acc| whose group term stays in int32 (the overflow proof's domain)."""
    return (I32_MAX - 1) // ((1 << frac) * 2)


def _edge_accs(bound: int, n: int) -> list[int]:
    ties = [k * (1 << n) + (1 << (n - 1)) if n else k for k in (-3, -1, 0, 2)]   # exact halves after the shift
    return [v for v in [0, 1, -1, bound, -bound, bound - 1, -bound + 1, *ties] if -bound <= v <= bound]


@settings(max_examples=25, deadline=None)
@given(sigma=st.sampled_from([-1, 0, 1]), n=st.sampled_from([1, 2, 4, 15]), frac=st.sampled_from([0, 3, 16]),
       data=st.data())
def test_group_term_numpy_tir_c(clib, sigma, n, frac, data):
    scale = GroupScale(sigma, n if sigma else 0)
    bound = _acc_bound(scale, frac)
    edges = _edge_accs(bound, scale.n)
    rest = data.draw(st.lists(st.integers(-bound, bound), min_size=COUNT - len(edges), max_size=COUNT - len(edges)))
    acc = np.array(edges + rest, np.int32)
    want = nx.group_term(acc, scale, frac)
    assert want.min() >= I32_MIN and want.max() <= I32_MAX
    got_c = np.zeros(COUNT, np.int32)
    clib.t_group_term(_p(acc), COUNT, sigma, scale.n, frac, _p(got_c))
    np.testing.assert_array_equal(got_c, want)
    np.testing.assert_array_equal(_run_tir(_tir_group_term(scale, frac), acc, out_dtype="int32"), want)
    if scale.sigma and nx.group_factor(scale, frac) is not None:   # the one-multiply form is the same rule
        np.testing.assert_array_equal(acc.astype(np.int64) * nx.group_factor(scale, frac), want)


def test_group_term_by_channel_tables_matches_numpy():
    rng = np.random.default_rng(0)
    sig = rng.integers(-1, 2, COUNT).astype(np.int32)
    n = rng.integers(1, 16, COUNT).astype(np.int32)
    frac = 3
    acc = rng.integers(-(2**26), 2**26, COUNT).astype(np.int32)
    acc[:4] = [0, 1, -1, -(1 << 10) - (1 << 9)]
    A, SG, NS = (te.placeholder((COUNT,), "int32", k) for k in ("acc", "sig", "n"))
    out = te.compute((COUNT,), lambda i: nt.group_term_by(nt.TIR, A[i], SG[i], NS[i], frac), name="out")
    got = _run_tir(te.create_prim_func([A, SG, NS, out]), acc, sig, n, out_dtype="int32")
    want = [nx.group_term(np.array([a]), GroupScale(int(s), int(k)), frac)[0] for a, s, k in zip(acc, sig, n)]
    np.testing.assert_array_equal(got, want)


@functools.lru_cache(maxsize=None)
def _tir_output_code(z_out: int, lo: int, hi: int, narrow: bool):
    acc = te.placeholder((COUNT,), "int32", "acc")
    M, R, S = (te.placeholder((COUNT,), "int64", k) for k in ("m", "r", "s"))
    out = te.compute((COUNT,), lambda i: nt.output_code(nt.TIR, acc[i], M[i], R[i], S[i], z_out, lo, hi, "int64",
                                                           narrow), name="out")
    return te.create_prim_func([acc, M, R, S, out])


_Z_LO_HI = [(0, 0, 255), (7, 7, 15), (128, 0, 255), (3, 0, 2**31 - 1)]


@settings(max_examples=20, deadline=None)
@given(zlh=st.sampled_from(_Z_LO_HI), narrow=st.booleans(), data=st.data())
def test_output_code_numpy_tir_c(clib, zlh, narrow, data):
    z_out, lo, hi = zlh
    ints = st.integers(I32_MIN, I32_MAX)
    acc = np.array([I32_MIN, I32_MAX, 0, -1, 1, 1 << 30, -(1 << 30)]
                   + data.draw(st.lists(ints, min_size=COUNT - 7, max_size=COUNT - 7)), np.int64)
    mult = np.array(data.draw(st.lists(st.one_of(st.just(2**30), st.just(2**31 - 1), st.just(0),
                                                  st.integers(2**30, 2**31 - 1)), min_size=COUNT, max_size=COUNT)))
    low = 0 if narrow else -30
    shift = np.array(data.draw(st.lists(st.one_of(st.sampled_from([low, 31]), st.integers(low, 31)),
                                        min_size=COUNT, max_size=COUNT)))
    # ties: acc·M exactly half an output step (M = 2^30, S = 31 + s → acc = 2^(s+1)·(k + 1/2))
    acc[7], mult[7], shift[7] = 3 << 4, 2**30, 4
    acc[8], mult[8], shift[8] = -(3 << 4), 2**30, 4
    want = nx.output_codes(acc, mult, shift, z_out, lo, hi)
    got_c = np.zeros(COUNT, np.int64)
    clib.t_output_code(_p(acc.astype(np.int32)), _p(mult.astype(np.int32)), _p(shift.astype(np.int32)), COUNT,
                       z_out, lo, hi, _p(got_c))
    np.testing.assert_array_equal(got_c, want)
    Mt, R, S = nx.requant_tables(mult, shift)
    got_tir = _run_tir(_tir_output_code(z_out, lo, hi, narrow), acc.astype(np.int32), Mt, R, S, out_dtype="int64")
    np.testing.assert_array_equal(got_tir, want)


@settings(max_examples=10, deadline=None)
@given(sigma=st.lists(st.sampled_from([-1, 0, 1]), min_size=3, max_size=3),
       n=st.lists(st.sampled_from([1, 4, 15]), min_size=3, max_size=3), frac=st.sampled_from([0, 4]),
       data=st.data())
def test_merge_and_output_code_as_relax_ops(sigma, n, frac, data):
    scales = tuple(GroupScale(s, k if s else 0) for s, k in zip(sigma, n))
    bound = (I32_MAX // 8) >> frac
    accs = np.array(data.draw(st.lists(st.lists(st.integers(-bound, bound), min_size=COUNT, max_size=COUNT),
                                       min_size=3, max_size=3)), np.int32)
    accs[:, 0] = [bound, -bound, 0]
    mult = np.full(COUNT, 2**30 + 12345, np.int64)
    shift = np.array(data.draw(st.lists(st.integers(0, 20), min_size=COUNT, max_size=COUNT)), np.int64)
    want = nx.output_codes(nx.merge_groups(list(accs), list(scales), frac), mult, shift, 5, 0, 255)
    vm = relax.VirtualMachine(_relax_merge_output(scales, frac, 5, 0, 255), tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (accs, *nx.requant_tables(mult, shift)))).numpy()
    np.testing.assert_array_equal(got, want)


@settings(max_examples=25, deadline=None)
@given(za=st.integers(0, 255), zb=st.integers(0, 255), ka=st.integers(1, 2**30), kb=st.integers(1, 2**30),
       t=st.integers(1, 30), data=st.data())
def test_add_rescale_numpy_tir_relax_c(clib, za, zb, ka, kb, t, data):
    codes = st.lists(st.integers(0, 255), min_size=COUNT, max_size=COUNT)
    a = np.array(data.draw(codes), np.uint8)
    b = np.array(data.draw(codes), np.uint8)
    a[:2], b[:2] = [0, 255], [255, 0]
    want = nx.add_rescale(a, za, ka, b, zb, kb, t)
    got_c = np.zeros(COUNT, np.int64)
    clib.t_add_rescale(_p(a), _p(b), COUNT, za, ctypes.c_int64(ka), zb, ctypes.c_int64(kb), t, _p(got_c))
    np.testing.assert_array_equal(got_c, want)
    attrs = AddAttrs(za=za, ka=ka, zb=zb, kb=kb, t=t, z_out=0, lo=-(2**62), hi=2**62)
    A, B = te.placeholder((COUNT,), "uint8", "a"), te.placeholder((COUNT,), "uint8", "b")
    out = te.compute((COUNT,), lambda i: nt.residual_add(nt.TIR, A[i], B[i], attrs, "int64"), name="out")
    np.testing.assert_array_equal(_run_tir(te.create_prim_func([A, B, out]), a, b, out_dtype="int64"), want)


def test_code_table_is_exact_fake_quant_of_the_function(clib):
    """A table over the 16 codes of an A4 input equals quantizing fn of each dequantized code."""
    import torch
    s_in, z_in, s_out, z_out = 0.37, 6, 0.05, 20
    table = nx.code_table(lambda x: x * np.clip(x + 3, 0, 6) / 6, s_in, z_in, 15, s_out, z_out, 255)  # hardswish
    x = (torch.arange(16, dtype=torch.float32) - z_in) * s_in
    fq = torch.clamp(torch.round(torch.nn.functional.hardswish(x) / s_out) + z_out, 0, 255).to(torch.uint8)
    np.testing.assert_array_equal(table, fq.numpy())
    codes = np.array([0, 15, 6, 7, 3, 9] * 8, np.uint8)
    got_c = np.zeros(codes.size, np.uint8)
    clib.t_table(_p(table), _p(codes), codes.size, _p(got_c))
    np.testing.assert_array_equal(got_c, nx.apply_table(table, codes))
    T, X = te.placeholder((16,), "uint8", "table"), te.placeholder((codes.size,), "uint8", "x")
    out = te.compute((codes.size,), lambda i: nt.table_lookup(T, X[i]), name="out")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([T, X, out])}), target="llvm")
    res = tvm.runtime.tensor(np.zeros(codes.size, np.uint8))
    lib["main"](tvm.runtime.tensor(table), tvm.runtime.tensor(codes), res)
    np.testing.assert_array_equal(res.numpy(), nx.apply_table(table, codes))


def _isqrt_edges() -> np.ndarray:
    """Perfect squares, their neighbours, the top of the domain and random values below 2^62."""
    roots = np.array([0, 1, 2, 3, 255, 46340, 2**20 + 7, 2**31 - 1], np.int64)
    sq = roots * roots
    rng = np.random.default_rng(3)
    edges = np.concatenate([sq, sq + 1, np.maximum(sq - 1, 0), [2**62 - 1, 2**62 - 2**31],
                            rng.integers(0, 2**62, 40, dtype=np.int64)])
    return edges.astype(np.int64)


def test_isqrt_numpy_tir_c_exact(clib):
    v = _isqrt_edges()
    want = np.array([math.isqrt(int(a)) for a in v], np.int64)
    np.testing.assert_array_equal(nx.isqrt(v), want)
    got_c = np.zeros(v.size, np.int64)
    clib.t_isqrt(_p(v), v.size, _p(got_c))
    np.testing.assert_array_equal(got_c, want)
    V = te.placeholder((v.size,), "int64", "v")
    out = te.compute((v.size,), lambda i: nt.isqrt(V[i]), name="out")
    np.testing.assert_array_equal(_run_tir(te.create_prim_func([V, out]), v, out_dtype="int64"), want)


@settings(max_examples=15, deadline=None)
@given(p=st.integers(0, 8), k=st.integers(0, 24), data=st.data())
def test_layer_norm_code_numpy_tir_c(clib, p, k, data):
    """The output rule in C and TIR against exact rationals: ties (num/den exactly half a code),
    negatives and the int64 bounds. (The NumPy rule is held to float by the test below and to
    every backend by the op conformance test.)"""
    d = np.array(data.draw(st.lists(st.integers(1, 2**31 - 1), min_size=COUNT, max_size=COUNT)), np.int64)
    gb = st.integers(-(2**29 >> 6), 2**29 >> 6)
    g = np.array(data.draw(st.lists(gb, min_size=COUNT, max_size=COUNT)), np.int32)
    b = np.array(data.draw(st.lists(gb, min_size=COUNT, max_size=COUNT)), np.int32)
    y = np.array(data.draw(st.lists(st.integers(-(2**17), 2**17), min_size=COUNT, max_size=COUNT)), np.int64)
    y = np.clip(y, -(d << 5) >> p, (d << 5) >> p)          # |y|·2^p ≤ √C·(D + 1) for C ≤ 1024
    y[0], d[0], g[0], b[0] = 1, 2, 1 << k, 0                # 2^p/2 codes: a tie when p = 0
    want = np.array([_layer_norm_code(*(int(v) for v in t), p, k) for t in zip(y, d, g, b)], np.int64)
    want = np.clip(want + 7, 0, 255)
    got_c = np.zeros(COUNT, np.int64)
    clib.t_layer_norm_code(_p(y), _p(d), _p(g), _p(b), COUNT, p, k, 7, 0, 255, _p(got_c))
    np.testing.assert_array_equal(got_c, want)
    Y, D = te.placeholder((COUNT,), "int64", "y"), te.placeholder((COUNT,), "int64", "d")
    G, B = te.placeholder((COUNT,), "int32", "g"), te.placeholder((COUNT,), "int32", "b")
    out = te.compute((COUNT,), lambda i: nt.layer_norm_code(Y[i], D[i], G[i], B[i], p, k, 7, 0, 255, "int64"),
                     name="out")
    np.testing.assert_array_equal(_run_tir(te.create_prim_func([Y, D, G, B, out]), y, d, g, b, out_dtype="int64"),
                                  want)


@settings(max_examples=15, deadline=None)
@given(k=st.integers(0, 24), r_bits=st.integers(0, 39), data=st.data())
def test_softmax_code_numpy_tir_c(clib, k, r_bits, data):
    """The softmax's rounded quotient clamp(round_half_up(e·r / (S·2^k)) + z_out) in NumPy, C and
    TIR against exact rationals: ties, e = S (one key), e = 0 and products near 2^60."""
    r = data.draw(st.integers(1, 1 << r_bits))
    e = np.array(data.draw(st.lists(st.integers(0, 1 << nx.EXP_BITS), min_size=COUNT, max_size=COUNT)), np.int64)
    total = e + np.array(data.draw(st.lists(st.integers(1, 2**30), min_size=COUNT, max_size=COUNT)), np.int64)
    e[0], total[0] = 1, 2 * r                               # e·r / (S·2^k) = 2^-(k+1): a tie when k = 0
    e[1], total[1] = 1 << nx.EXP_BITS, 1 << nx.EXP_BITS     # one key: the probability 1
    e[2] = 0
    want = np.array([math.floor(Fraction(int(a) * r, int(b) << k) + Fraction(1, 2)) for a, b in zip(e, total)],
                    np.int64)
    want = np.clip(want + 3, 0, 255)
    np.testing.assert_array_equal(np.clip(nx.round_div(e * r, total << k) + 3, 0, 255), want)
    got_c = np.zeros(COUNT, np.int64)
    clib.t_softmax_code(_p(e), _p(total), COUNT, ctypes.c_int64(r), k, 3, 0, 255, _p(got_c))
    np.testing.assert_array_equal(got_c, want)
    E, S = te.placeholder((COUNT,), "int64", "e"), te.placeholder((COUNT,), "int64", "s")
    out = te.compute((COUNT,), lambda i: nt.softmax_code(E[i], S[i], r, k, 3, 0, 255, "int64"), name="out")
    np.testing.assert_array_equal(_run_tir(te.create_prim_func([E, S, out]), e, total, out_dtype="int64"), want)


def _layer_norm_code(y: int, d: int, g: int, b: int, p: int, k: int) -> int:
    """round_half_up((y·g·2^p + b·D) / (D·2^k)) in exact rationals (Python ints)."""
    from fractions import Fraction
    return math.floor(Fraction(y * g * (1 << p) + b * d, d << k) + Fraction(1, 2))


def test_layer_norm_codes_match_float_layer_norm_within_one_code():
    """The integer layer norm against torch's float layer norm of the dequantized input, quantized
    half to even: at most one code apart, and nearly always equal (A8 input and output)."""
    import torch
    rng = np.random.default_rng(7)
    for c, s_in, s_out, eps in [(768, 0.05, 0.04, 1e-6), (96, 0.1, 0.05, 1e-6), (16, 0.02, 0.03, 1e-5)]:
        x = rng.integers(0, 256, (64, c, 3)).astype(np.int64)
        gamma, beta = rng.normal(1, 0.3, c), rng.normal(0, 0.3, c)
        nc = nx.layer_norm_constants(gamma, beta, eps, s_in, 255, s_out)
        got = nx.layer_norm_codes(x, nc.g, nc.b, nc.p, nc.e, nc.k, 128, 0, 255)
        real = torch.from_numpy(((x - 128) * s_in).astype(np.float32)).movedim(1, -1)
        ref = torch.nn.functional.layer_norm(real, (c,), torch.tensor(gamma, dtype=torch.float32),
                                             torch.tensor(beta, dtype=torch.float32), eps).movedim(-1, 1)
        want = np.clip(np.rint(ref.numpy() / np.float32(s_out)) + 128, 0, 255)
        diff = np.abs(got - want)
        assert diff.max() <= 1, (c, diff.max())
        assert (diff == 0).mean() > 0.97, (c, (diff == 0).mean())
