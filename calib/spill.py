"""Large cached float activations in memory-mapped files, so the kernel can page them out.

A float frontier tensor of ResNet-50's layer1 at 224×224 is 3.2 MB per sample, 3.3 GB
at 1024 samples; several are alive at once. ``Spill.empty`` returns such a tensor
backed by a shared mapping of a temporary file instead of anonymous memory: the
values are the same bits (plain float32 storage), but clean pages can be dropped and
dirty ones written back under memory pressure rather than exhausting RAM.

Each file is unlinked as soon as it is mapped: the mapping keeps it alive until the
tensor is freed, and nothing is left on disk whatever way the process ends (error,
Ctrl-C, kill -9).
"""
from __future__ import annotations

import os
import tempfile
from math import prod

import torch

from calib.errors import ConfigError

AUTO_FRACTION = 16  # default threshold: 1/16 of physical memory per tensor


def physical_memory() -> int:
    """Bytes of RAM of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Spill:
    """Allocates cached activations: in files when larger than ``threshold`` bytes and on
    the CPU, else in memory. ``directory``: where the (at once unlinked) files go."""

    def __init__(self, threshold: int, directory: str | os.PathLike | None = None):
        self.threshold = threshold
        self.directory = os.fspath(directory) if directory is not None else tempfile.gettempdir()
        self.files = 0   # tensors spilled so far
        self.bytes = 0

    @classmethod
    def from_config(cls, spill_gb: float | None, directory: str | None = None) -> "Spill":
        threshold = physical_memory() // AUTO_FRACTION if spill_gb is None else spill_gb * 2**30
        if directory is not None and not os.path.isdir(directory):
            raise ConfigError(f"spill directory {directory} does not exist")
        return cls(int(min(threshold, 2**62)), directory)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape``/``dtype`` on ``device``."""
        numel = prod(shape)
        size = numel * torch.empty((), dtype=dtype).element_size()
        if torch.device(device).type != "cpu" or size <= self.threshold or numel == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        fd, path = tempfile.mkstemp(prefix="waps-spill-", suffix=".bin", dir=self.directory)
        try:
            os.close(fd)
            t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.unlink(path)
        self.files += 1
        self.bytes += size
        return t.view(shape)


IN_MEMORY = Spill(2**62)  # never spills
