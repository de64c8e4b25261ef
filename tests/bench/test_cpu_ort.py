"""bench/cpu_ort.py's MAC count and bench/cpu_peak.py's microbenchmark (issue 17 item 1)."""
from __future__ import annotations

import math
import platform
import shutil
import subprocess

import pytest
import torch

from bench import cpu_peak
from bench.cpu_ort import bits
from waps_tvm.report import program_macs
from calib.errors import ConfigError


class Tiny(torch.nn.Module):
    """conv 3→8 3×3 pad 1 on 8×8, ReLU, depthwise 3×3 stride 2 pad 1, linear 128→10."""
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.dw(torch.relu(self.conv(x)))), 1))


@pytest.mark.parametrize("form", ["split", "fast"])
def test_program_macs_match_a_hand_count(form):
    from tests.compile_helpers import calibrated
    from waps_tvm.compiler import lower_artifact
    torch.manual_seed(0)
    art = calibrated(Tiny(), (3, 8, 8), wbits=8, abits=8, iters=0, samples=4)
    conv = 8 * 8 * 8 * (3 * 3 * 3)       # output elements × (input channels × kernel)
    dw = 8 * 4 * 4 * (1 * 3 * 3)         # depthwise: one input channel per output
    fc = 10 * 128
    assert program_macs(lower_artifact(art, 1, form).program) == conv + dw + fc == 16256


def test_unknown_precision_is_a_config_error():
    assert bits("W8A8") == (8, 8)
    with pytest.raises(ConfigError, match="W5A5"):
        bits("W5A5")


@pytest.fixture(scope="module")
def dot():
    try:
        return cpu_peak.host_dot()
    except cpu_peak.PeakError as e:
        pytest.skip(str(e))


def test_microbenchmark_is_throughput_bound(dot, tmp_path):
    """The timed loop holds ACCUMULATORS dot-product instructions on independent registers and
    nothing spilled to memory: the compiler kept the shape the peak derivation assumes."""
    if shutil.which("objdump") is None:
        pytest.skip("no objdump")
    exe = cpu_peak.compile_bench(dot, tmp_path)
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(exe)], capture_output=True, text=True).stdout
    mnemonic = "vpdpbusd" if dot is cpu_peak.VNNI else "sdot"
    lines = [ln for ln in asm.splitlines() if f"\t{mnemonic}" in ln]
    assert len(lines) == cpu_peak.ACCUMULATORS
    assert len({ln.split(",")[-1].strip() for ln in lines}) == cpu_peak.ACCUMULATORS   # distinct accumulators
    out = subprocess.run([str(exe), "1000", "1"], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == 1000 * cpu_peak.ACCUMULATORS


def test_peak_is_positive_and_finite(dot, tmp_path):
    peak = cpu_peak.measure(seconds=0.02, repeats=1)
    assert peak.macs_per_instruction == dot.macs
    assert math.isfinite(peak.peak_gmacs) and peak.peak_gmacs > 0
    best = max(peak.single_core_instr_per_s, peak.all_core_instr_per_s_per_core)     # per core
    assert peak.per_core_instr_per_s == best
    assert peak.peak_gmacs == pytest.approx(best * dot.macs * peak.cores / 1e9)
    if peak.clock_ghz:
        ipc = best / 1e9 / peak.clock_ghz
        assert peak.peak_gmacs == pytest.approx(ipc * dot.macs * peak.clock_ghz * peak.cores)
        assert 0.05 < peak.single_core_instr_per_cycle < 8          # a real core's issue width
    cpu_peak.write(peak, tmp_path)
    assert "GMAC/s" in (tmp_path / "cpu_peak.md").read_text()


def test_host_dot_follows_the_machine(monkeypatch):
    monkeypatch.setattr(cpu_peak, "_cpuinfo", lambda: "flags\t: fpu avx512f avx512_vnni\n")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert cpu_peak.host_dot() is cpu_peak.VNNI
    monkeypatch.setattr(cpu_peak, "_cpuinfo", lambda: "Features\t: fp asimd asimddp\n")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu_peak.host_dot() is cpu_peak.SDOT
    monkeypatch.setattr(cpu_peak, "_cpuinfo", lambda: "flags\t: fpu avx2\n")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with pytest.raises(cpu_peak.PeakError, match="no int8 dot-product"):
        cpu_peak.host_dot()
