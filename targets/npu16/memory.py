"""On-chip memory of npu16: how a conv/linear is striped to fit its SRAM buffers.

The one definition of the stripe plan; the lowering writes it into the stream's registers
(STRIPE_ROWS, STRIPE_TILES, W_RESIDENT), the simulator executes it and counts the bytes it
moves, and the cost model (cost.py) predicts the same bytes from the same plan.

Buffers (params.NPU16): weights ``sram_weight_kib``, activations ``sram_act_kib``; with
``double_buffer`` each stripe may use half of a buffer (the other half takes the next
stripe's DMA while this one computes), else all of it.

A layer runs as row stripes × weight stripes, per sample:
    weight stripe   K output tiles (of one conv group) whose weights fit the weight buffer:
                    K = min(OT, ⌊usable / tile weights⌋); one tile's weights are
                    kh·kw·Σ_p T_p·T² int8 (depthwise: T·kh·kw; im2col, first_layer.py: IT·T²)
    row stripe      R output rows whose input rows (all input channels, the halo of the
                    kernel included) and output rows (K tiles of T channels) fit the
                    activation buffer: R = the largest with
                    rows_in(R)·C·W·in_bytes + R·OW·K·T·out_bytes ≤ usable,
                    rows_in(R) = min(H, (R − 1)·sh + (kh − 1)·dh + 1)
Loop order, per sample, whichever moves the data in fewer DMA cycles (``dma_cycles``; rows
first on a tie):
    rows first      row stripe (its input rows fetched once) → weight stripe (fetched per
                    row stripe unless the whole layer's weights fit the usable buffer:
                    ``resident``, fetched once per layer)
    weights first   weight stripe (fetched once per sample, or once when resident) → row
                    stripe (its input rows fetched again for every weight stripe): better
                    when weights come from slow memory (flash) and feature maps from fast
Row stripe s covers output rows [s·R, min(OH, (s+1)·R))
and fetches the input rows it reads, [max(0, oy0·sh − ph), min(H, (oy1 − 1)·sh − ph + (kh − 1)·dh + 1)):
a layer that fits moves its input once (rows no output reads, e.g. the last row of a
stride-2 1×1 conv of an even H, are not fetched) and a striped one re-reads its halo rows.
A layer for which one output row of one tile, or one tile's weights, does not fit is not
run on the NPU (``SramTooSmall``).

A matmul (``matmul_plan``) runs per sample and head: the head's stationary operand (b's K×M
codes, read into the array's tiles) stays in the activation buffer while stripes of R positions
of a (K codes each) come in and their outputs (M codes each) go out, R = the largest ≤ P with
K·M + R·(K + M) ≤ usable; every byte crosses the DMA once, so only the stripe count and the
SRAM peak depend on R.

A softmax or layer norm (``row_plan``; the row unit) runs per sample on stripes of R positions:
their codes of every channel (C·in_bytes each) come in and stay while the unit makes its passes
over them, and their outputs (C codes each) go out; R = the largest ≤ P with
R·C·(in_bytes + 1) ≤ usable. Every byte crosses the DMA once.

Cascading (``keeps``; chains of codegen/npu16/cascade.py): the intermediate between two ops
of a chain stays in the activation buffer, instead of a DMA store and load through host
memory, when the whole activation buffer (both halves) holds it next to what each op still
stripes through the buffer: the producer writes its output straight into the kept tensor and
needs its input rows (``StripePlan.act_in_sram``; or its own kept input, already there);
the consumer reads the kept tensor and needs its output rows (``act_sram − act_in_sram``).
An op that streams (add, pool) needs none.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from targets.npu16.params import NPU16


class SramTooSmall(ValueError):
    """One stripe of the smallest size does not fit a buffer; the message says which."""


@dataclass(frozen=True)
class StripePlan:
    rows: int            # R: output rows per row stripe
    tiles: int           # K: output tiles per weight stripe (within one conv group)
    resident: bool       # every weight fits the usable weight buffer: fetched once per layer
    row_stripes: int     # ⌈OH / R⌉
    weight_stripes: int  # conv groups × ⌈OT / K⌉
    weights_first: bool = False   # loop order: weight stripes outside row stripes
    weight_sram: int = 0          # peak bytes of the weight buffer (both halves when double-buffered)
    act_sram: int = 0             # peak bytes of the activation buffer (input rows + output rows)
    act_in_sram: int = 0          # of act_sram: the input rows' part (the output rows': act_sram − it)

    def weight_fetches(self, n: int) -> int:
        """How many times the layer's weights cross the DMA for ``n`` samples."""
        return 1 if self.resident else n * (1 if self.weights_first else self.row_stripes)

    def input_fetches(self) -> int:
        """How many times each row stripe's input rows cross the DMA, per sample."""
        return self.weight_stripes if self.weights_first else 1


def dma_port_cycles(weight_bytes: int, act_bytes: int, npu: NPU16) -> tuple[int, int]:
    """(weight port, feature-map port) cycles to move ``weight_bytes`` of constants and
    ``act_bytes`` of feature maps: with ``weight_bytes_per_cycle`` set, weights go over their
    own port (e.g. flash) in parallel with the feature maps; else both share the one DMA port
    at dma_bytes_per_cycle (reported as (0, all))."""
    if npu.weight_bytes_per_cycle:
        return -(-weight_bytes // npu.weight_bytes_per_cycle), -(-act_bytes // npu.dma_bytes_per_cycle)
    return 0, -(-(weight_bytes + act_bytes) // npu.dma_bytes_per_cycle)


def dma_cycles(weight_bytes: int, act_bytes: int, npu: NPU16) -> int:
    """Cycles of the DMA: the slower of its ports (dma_port_cycles)."""
    return max(dma_port_cycles(weight_bytes, act_bytes, npu))


def keeps(intermediate: int, producer_in: int, consumer_out: int, npu: NPU16, held: int = 0) -> bool:
    """Whether a chain's intermediate of ``intermediate`` bytes (the whole batch) stays in the
    activation SRAM: with the producer's input (``held`` when that is kept too, else its
    striped input rows ``producer_in``), and with the consumer's striped output rows
    ``consumer_out``, it fits ``sram_act_kib``."""
    cap = npu.sram_act_kib * 1024
    return (held or producer_in) + intermediate <= cap and intermediate + consumer_out <= cap


def usable_bytes(kib: int, npu: NPU16) -> int:
    return kib * 1024 // (2 if npu.double_buffer else 1)


def plan(*, h: int, oh: int, ow: int, kh: int, sh: int, ph: int, dh: int, in_row_bytes: int, tile: int,
         out_tiles: int, conv_groups: int, tile_weight_bytes: int, weight_bytes: int, npu: NPU16) -> StripePlan:
    """The stripes of a layer: ``in_row_bytes`` = one input row of every channel (C·W·bytes per
    code), ``out_tiles`` = OT per conv group, ``tile_weight_bytes`` = one output tile's weights,
    ``weight_bytes`` = all of them (the loop order weighs their re-fetches against the input's)."""
    w_cap, a_cap = usable_bytes(npu.sram_weight_kib, npu), usable_bytes(npu.sram_act_kib, npu)
    if tile_weight_bytes > w_cap:
        raise SramTooSmall(f"one output tile's weights ({tile_weight_bytes} B) exceed the usable weight SRAM "
                           f"({w_cap} B)")
    k = min(out_tiles, w_cap // tile_weight_bytes)
    resident = conv_groups * out_tiles * tile_weight_bytes <= w_cap
    best = 0
    for r in range(1, oh + 1):
        if in_rows(r, h, kh, sh, dh) * in_row_bytes + r * ow * k * tile > a_cap:
            break
        best = r
    if best == 0:
        raise SramTooSmall(f"one output row ({in_rows(1, h, kh, sh, dh) * in_row_bytes + ow * k * tile} B with its "
                           f"input rows) exceeds the usable activation SRAM ({a_cap} B)")
    halves = 2 if npu.double_buffer else 1
    stripe_w = conv_groups * out_tiles * tile_weight_bytes if resident else k * tile_weight_bytes
    stripe_a = in_rows(best, h, kh, sh, dh) * in_row_bytes + best * ow * k * tile
    rows_first = StripePlan(best, k, resident, -(-oh // best), conv_groups * -(-out_tiles // k),
                            weight_sram=stripe_w * (1 if resident else halves), act_sram=stripe_a * halves,
                            act_in_sram=in_rows(best, h, kh, sh, dh) * in_row_bytes * halves)
    weights_first = replace(rows_first, weights_first=True)
    in_bytes = fetched_rows(rows_first, h, oh, kh, sh, ph, dh) * in_row_bytes

    def cycles(p: StripePlan) -> int:              # one sample's weights and input (output is the same)
        return dma_cycles(weight_bytes * p.weight_fetches(1), in_bytes * p.input_fetches(), npu)
    return weights_first if cycles(weights_first) < cycles(rows_first) else rows_first


@dataclass(frozen=True)
class MatmulPlan:
    rows: int            # R: positions per stripe
    stripes: int         # ⌈P / R⌉ per sample and head
    act_sram: int        # peak bytes of the activation buffer (both halves when double-buffered)
    act_in_sram: int     # of it: the stationary operand and the stripe's a codes


def matmul_plan(*, k: int, m: int, positions: int, npu: NPU16) -> MatmulPlan:
    """The stripes of one head's [M × K]·[K × P] product of a matmul (uint8 codes)."""
    cap = usable_bytes(npu.sram_act_kib, npu)
    if k * m + k + m > cap:
        raise SramTooSmall(f"one head's stationary operand and one position ({k * m + k + m} B) exceed the usable "
                           f"activation SRAM ({cap} B)")
    r = max(1, min(positions, (cap - k * m) // (k + m)))
    halves = 2 if npu.double_buffer else 1
    return MatmulPlan(r, -(-positions // r), (k * m + r * (k + m)) * halves, (k * m + r * k) * halves)


@dataclass(frozen=True)
class RowPlan:
    rows: int            # R: positions per stripe
    stripes: int         # ⌈P / R⌉ per sample
    act_sram: int        # peak bytes of the activation buffer (both halves when double-buffered)
    act_in_sram: int     # of it: the stripe's input codes


def row_plan(*, channels: int, positions: int, in_bytes: int, npu: NPU16) -> RowPlan:
    """The stripes of a softmax or layer norm over ``channels`` at each of ``positions`` (one
    sample), input codes of ``in_bytes`` (1, or 4 for int32 pooled sums), uint8 out."""
    cap, per = usable_bytes(npu.sram_act_kib, npu), channels * (in_bytes + 1)
    if per > cap:
        raise SramTooSmall(f"one position's {channels} channels in and out ({per} B) exceed the usable activation "
                           f"SRAM ({cap} B)")
    r = min(positions, cap // per)
    halves = 2 if npu.double_buffer else 1
    return RowPlan(r, -(-positions // r), r * per * halves, r * channels * in_bytes * halves)


def in_rows(r: int, h: int, kh: int, sh: int, dh: int) -> int:
    """Input rows that r consecutive output rows read (at most H)."""
    return min(h, (r - 1) * sh + (kh - 1) * dh + 1)


def fetched_rows(p: StripePlan, h: int, oh: int, kh: int, sh: int, ph: int, dh: int) -> int:
    """Input rows the row stripes read for one sample, summed (halos counted in each stripe;
    ×``p.input_fetches()`` for what the DMA moves)."""
    total = 0
    for s in range(p.row_stripes):
        oy0, oy1 = s * p.rows, min(oh, (s + 1) * p.rows)
        lo, hi = max(0, oy0 * sh - ph), min(h, (oy1 - 1) * sh - ph + (kh - 1) * dh + 1)
        total += max(0, hi - lo)
    return total
