"""Train the bench CNNs on Fashion-MNIST and save their weights (CPU, 2 threads).

    python -m bench.train_fashion [--models NAME ...] [--epochs N] [--seed S] [--threads T]

Writes bench/weights/{name}.pt (state dicts) and bench/results/train_fashion.json
(test accuracy, epochs, seconds per model).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bench.models import MODELS, WEIGHTS_DIR
from waps_tvm.datasets import NORMALISATION, load_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "train_fashion.json"

# Epochs that reach the accuracy targets (ResNet > 90 %, MobileNetV2 > 89 %, MobileNetV3
# > 88 %) in ~2-3.5 minutes each on 2 free cores (measured: ~26 s and ~42 s per epoch,
# channels_last; MobileNetV3 ~0.7× MobileNetV2's step time on one shared core).
DEFAULT_EPOCHS = {"fashion_resnet": 5, "fashion_mobilenetv2": 5, "fashion_mobilenetv3": 4, "fashion_catnet": 3,
                  "fashion_vit": 10}
BATCH = 128
PAD = 2
# Padding must look like background: 0 in [0, 1] pixels, after normalisation.
_MEAN, _STD = NORMALISATION["fashion-mnist"]
BACKGROUND = -_MEAN / _STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (padding 2) and horizontal flip per sample; x float32 N×C×H×W → same shape."""
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD), value=BACKGROUND)
    dy = torch.randint(0, 2 * PAD + 1, (n, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * PAD + 1, (n, 1, 1), generator=gen)
    rows = (torch.arange(h).view(1, h, 1) + dy).expand(n, h, w)
    cols = (torch.arange(w).view(1, 1, w) + dx).expand(n, h, w)
    flip = torch.rand(n, generator=gen) < 0.5
    # Flipping the column index flips the crop: one gather does both.
    cols = torch.where(flip.view(n, 1, 1), cols.flip(-1), cols)
    batch = torch.arange(n).view(n, 1, 1).expand(n, h, w)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on float32 N×1×28×28 ``x``, int64 ``y``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].contiguous(memory_format=torch.channels_last)
        correct += int((model(xb).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def train_one(
    name: str, epochs: int, seed: int, train: tuple[torch.Tensor, torch.Tensor]
) -> nn.Module:
    """SGD + Nesterov (transformers: AdamW, as ViTs are trained) with a one-cycle learning
    rate, which converges in few epochs."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # channels_last: ~1.6-2× faster convolutions on CPU for these narrow layers.
    model = MODELS[name]().to(memory_format=torch.channels_last)
    x, y = train
    steps = (len(x) + BATCH - 1) // BATCH
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        max_lr = 3e-3
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        max_lr = 0.2
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, epochs=epochs, steps_per_epoch=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        bar = tqdm(range(steps), desc=f"{name} {epoch + 1}/{epochs}", leave=False)
        for s in bar:
            idx = perm[s * BATCH : (s + 1) * BATCH]
            xb = augment(x[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if s % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.to(memory_format=torch.contiguous_format).eval()


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--epochs", type=int, default=None, help="epochs for every model (default: per model)")
    ap.add_argument("--seed", type=int, default=0)
    # 2 matches the target machine; use 1 when another job holds a core: OpenMP threads
    # that must wait for a busy core run ~10x slower than a single thread.
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be at least 1")
    if args.threads < 1:
        ap.error("--threads must be at least 1")

    torch.set_num_threads(args.threads)
    train = load_dataset("fashion-mnist", "calib")
    test = load_dataset("fashion-mnist", "test")
    assert train.y is not None and test.y is not None

    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.models:
        epochs = args.epochs or DEFAULT_EPOCHS[name]
        t0 = time.perf_counter()
        model = train_one(name, epochs, args.seed, (train.x, train.y))
        seconds = time.perf_counter() - t0
        acc = evaluate(model, test.x, test.y)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        _atomic_write(WEIGHTS_DIR / f"{name}.pt", lambda f: torch.save(state, f))
        results[name] = {
            "test_accuracy": round(acc, 4),
            "epochs": epochs,
            "train_seconds": round(seconds, 1),
            "batch_size": BATCH,
            "seed": args.seed,
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(),
        }
        print(f"{name}: test accuracy {acc:.4f} after {epochs} epochs in {seconds:.0f} s", flush=True)
        # Rewrite after each model so a later failure keeps the finished results.
        text = json.dumps(results, indent=2, sort_keys=True) + "\n"
        _atomic_write(RESULTS, lambda f: f.write(text.encode()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
