"""Regenerate tests/bench/data/vela_tiny/ (needs the Vela venv; run from the repository root):

    .venv/bin/python -m tests.bench.make_vela_fixture [--vela-python /work/vela-venv/bin/python]

TinyNet at 32×32 through bench/vela.py's pipeline, with ``--ignore-ops AVERAGE_POOL_2D`` so the
output also shows an operator that Vela leaves on the CPU. Keeps the text outputs only.
"""
import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from bench.vela import DEFAULT_PYTHON, compile_graph, reference_pair
from calib.capture import capture, export_module
from calib.fold_bn import fold_batch_norm
from calib.fuse import fuse_activations
from tests.bench.vela_tiny import TinyNet

DATA = Path(__file__).resolve().parent / "data" / "vela_tiny"
KEEP = ("graph.json", "float_check.json", "tflite_ops.json", "vela_stdout.txt", "vela_version.txt",
        "vela/tiny_per-layer.csv", "vela/tiny_debug.xml", "vela/tiny_summary_Ethos_U55_High_End_Embedded.csv")


def tiny_net():
    torch.manual_seed(0)
    return TinyNet().eval()


def tiny_graph():
    return fuse_activations(fold_batch_norm(capture(export_module(tiny_net(), (3, 32, 32)))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vela-python", type=Path, default=DEFAULT_PYTHON)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        work = Path(tmp)
        compile_graph(tiny_graph(), "tiny", args.vela_python, work, vela_args=("--ignore-ops", "AVERAGE_POOL_2D"),
                      reference=reference_pair(tiny_net(), (3, 32, 32), 0))
        for rel in KEEP:
            (DATA / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / rel, DATA / rel)
    print(DATA)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
