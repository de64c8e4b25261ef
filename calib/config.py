"""Calibration configuration: one typed record, validated once."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from calib.device import check_conv_dtype, check_device_name
from calib.errors import ConfigError
from calib.numerics import group_scale
from calib.product_groups import GROUP_PROBS
from calib.quantizers import CODE_BITS, FLOAT_BITS

METHODS = ("rtn", "adaround", "brecq", "waps", "qdrop", "qdrop+waps")
WEIGHT_BITS = CODE_BITS
ACT_BITS = (*CODE_BITS, FLOAT_BITS)
# how a channel concatenation meets its inputs' codes (bench/results/cat_quant.md):
# "shared": the cat and the values it joins share one quantizer, so it only moves codes;
# "rescale": each keeps its own and the cat requantizes them to its scale (a second rounding)
CAT_QUANTS = ("shared", "rescale")


def default_gammas(g: int) -> tuple[float, ...]:
    """The paper's (1, 1−2^−4, 1+2^−4) extended by (1 ∓ 2^−3, 1 ∓ 2^−2, …) for g > 3."""
    seq = [1.0] + [1.0 + sign * 2.0 ** -n for n in (4, 3, 2, 1) for sign in (-1, 1)]
    if not 1 <= g <= len(seq):
        raise ConfigError(f"--groups {g}: choose between 1 and {len(seq)}")
    return tuple(seq[:g])


@dataclass
class CalibConfig:
    wbits: int = 4
    abits: int = 4
    method: str = "waps"
    cwac: bool = False
    iters: int = 3000              # per block (bench/results/iterations.md); BRECQ/QDrop use 20k
    batch: int = 32
    samples: int = 1024
    seed: int = 0
    first_last_bits: int = 8       # weights of the first and last layer, input and logits codes
    residual_bits: int = 8         # codes of tensors read only by residual adds
    attn_bits: int | None = None   # codes of attention (Q, K, V, scores, probabilities, context); None: abits
    gammas: tuple[float, ...] = (1.0, 1.0 - 2**-4, 1.0 + 2**-4)
    tile: int = 16
    lr_round: float | None = None  # AdaRound V (Adam); None: 1e-3·20000/iters, at most 1e-2
    lr_groups: float = 1e-2        # WAPS logits R: higher than V so groups settle in few iterations
    lr_affine: float = 1e-3        # γ^z, φ^z
    lr_act: float = 4e-5           # activation steps, cosine decay
    lam: float | None = None       # λ_r = λ_g; None: 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    harden_at: float = 0.8         # fraction of iterations after which groups are fixed
    drop_prob: float = 0.5         # QDrop
    group_prob: str = "softmax"    # eq. 15: softmax, or "sigmoid" as printed (bench/results/eq15.md)
    progress: bool = True
    device: str = "auto"           # auto | cpu | cuda[:N]; auto: CUDA when available
    # conv/linear products of the reconstruction loop: auto | float32 | bfloat16 (autocast;
    # quantizers and losses stay float32); auto: bfloat16 where the device runs it natively
    # (calib/device.uses_bf16; accuracy bench/results/bf16.md, speed calib_speed.md)
    conv_dtype: str = "auto"
    cat_quant: str = "shared"      # CAT_QUANTS
    # float cached activations larger than this (GB) live in memory-mapped temporary files
    # (calib/spill.py; same values, pageable); None: 1/16 of RAM; 0: every float one
    spill_gb: float | None = None
    spill_dir: str | None = None   # where spill files go (unlinked at once); None: the temp dir
    # per-layer γ^G overriding ``gammas`` ((1.0,): no groups), e.g. chosen by the hardware-aware
    # group search (calib/group_search.py) under ``npu_budget`` (a fraction of the NPU cycles)
    layer_gammas: dict[str, tuple[float, ...]] = field(default_factory=dict)
    npu_budget: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return len(self.gammas)

    @property
    def uses_waps(self) -> bool:
        return self.method in ("waps", "qdrop+waps")

    @property
    def uses_qdrop(self) -> bool:
        return self.method in ("qdrop", "qdrop+waps")

    @property
    def blockwise(self) -> bool:
        return self.method != "adaround"

    @property
    def round_lr(self) -> float:
        """BRECQ's 1e-3 assumes 20k iterations; fewer iterations get a proportionally
        larger step (capped) so V can still travel from its start to a decision."""
        if self.lr_round is not None:
            return self.lr_round
        return min(1e-2, 1e-3 * 20000 / max(self.iters, 1))

    @property
    def regulariser_weight(self) -> float:
        return 0.01 if self.lam is None else self.lam

    def validate(self) -> "CalibConfig":
        if self.method not in METHODS:
            raise ConfigError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.wbits not in WEIGHT_BITS:
            raise ConfigError(f"--wbits {self.wbits}: weight bits must be one of {WEIGHT_BITS}")
        if self.abits not in ACT_BITS:
            raise ConfigError(f"--abits {self.abits}: activation bits must be one of {ACT_BITS}")
        if self.first_last_bits not in WEIGHT_BITS or self.residual_bits not in CODE_BITS:
            raise ConfigError(f"first/last and residual bits must be one of {CODE_BITS}")
        if self.attn_bits is not None and self.attn_bits not in ACT_BITS[:-1]:
            raise ConfigError(f"--attn-bits {self.attn_bits}: attention bits must be one of {ACT_BITS[:-1]}")
        check_conv_dtype(self.conv_dtype)
        if self.iters < 0 or self.batch < 1 or self.samples < 1:
            raise ConfigError("--iters must be ≥ 0, --batch and --samples ≥ 1")
        if not 1 <= len(self.gammas) <= 8:
            raise ConfigError("between 1 and 8 group scales are supported")
        for g in self.gammas:
            group_scale(g)
        for name, gs in self.layer_gammas.items():
            if not 1 <= len(gs) <= 8:
                raise ConfigError(f"layer {name}: between 1 and 8 group scales are supported")
            for g in gs:
                group_scale(g)
        if self.npu_budget is not None and not self.npu_budget >= 0:
            raise ConfigError(f"--npu-budget {self.npu_budget * 100:g} %: must be ≥ 0")
        if self.tile < 1:
            raise ConfigError("--tile must be ≥ 1")
        if self.group_prob not in GROUP_PROBS:
            raise ConfigError(f"--group-prob {self.group_prob}: choose one of {', '.join(GROUP_PROBS)}")
        if not 0 <= self.drop_prob <= 1:
            raise ConfigError("drop probability must be in [0, 1]")
        if self.cat_quant not in CAT_QUANTS:
            raise ConfigError(f"--cat-quant {self.cat_quant}: choose one of {', '.join(CAT_QUANTS)}")
        if self.spill_gb is not None and not self.spill_gb >= 0:
            raise ConfigError(f"spill threshold {self.spill_gb} GB: must be ≥ 0")
        check_device_name(self.device)
        return self

    def to_json(self) -> dict:
        """The recipe, as the artifact records it: how it was run (progress bars, device,
        where cached activations were kept) is not part of what was computed."""
        d = asdict(self)
        for how in ("progress", "device", "spill_gb", "spill_dir"):
            d.pop(how)
        return d
