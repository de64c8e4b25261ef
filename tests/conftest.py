import os

import pytest
import torch
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes share the cores, and both torch's OpenMP pool and TVM's runtime
    # pool spin while they wait: each process gets its share of the cores
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("TVM_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)
else:
    torch.set_num_threads(2)

GIB_PER_WORKER = 10       # peak resident memory of one test process over the whole suite, with room


@pytest.hookimpl(optionalhook=True)        # a hook of pytest-xdist (absent under -p no:xdist)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one test process per core, no more than the memory
    holds (GIB_PER_WORKER each); PYTEST_XDIST_AUTO_NUM_WORKERS overrides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cores = len(os.sched_getaffinity(0))
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return max(1, min(cores, int(mem_gib // GIB_PER_WORKER)))


# Modules whose tests take longest in all (the --durations of a CI run), longest first. With
# several processes (--dist loadscope, each module whole in one process, no reordering) they
# start first, so that the many short modules even out the end instead of one long module
# running alone at the end.
LONGEST_MODULES = ("tests/waps_tvm/test_transformer.py", "tests/waps_tvm/test_model_coverage.py",
                   "tests/waps_tvm/test_compile.py", "tests/targets/test_aarch64.py",
                   "tests/relay_passes/test_op_conformance.py", "tests/waps_tvm/test_channels_last.py")


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_module():
    """Each test process lives through many modules: after each, collect cycles and hand the
    allocator's free pages back to the system (glibc's malloc_trim), so that two processes'
    peaks, not their histories, share the machine's memory."""
    yield
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):             # not glibc
        pass


def pytest_collection_modifyitems(config, items):
    rank = {m: i for i, m in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))     # stable: order kept within


class TinyResNet(nn.Module):
    """Stem, one residual unit with a downsample, a plain residual unit, pool, fc."""

    def __init__(self, c=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.a1 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, stride=2), nn.BatchNorm2d(2 * c))
        self.b1 = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2), nn.BatchNorm2d(2 * c), nn.ReLU6(),
                                nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c), nn.BatchNorm2d(2 * c))
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.a1(x) + self.down(x))
        x = x + self.b1(x)  # residual add with no ReLU after
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TinyMobileNet(nn.Module):
    """Inverted residual blocks of every kind the expand-depthwise fusion meets: a 3×3
    depthwise at stride 1 and at stride 2, a 5×5 one, a dilated one (each after a pointwise
    expansion to a multiple of 16 channels: fused), and a 40-channel expansion (not fused);
    the first block's projection feeds a residual add (16 channels: a residual-adds pair)."""

    def __init__(self):
        super().__init__()
        def cbn(c_in, c_out, k, stride=1, groups=1, dilation=1):
            return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, padding=dilation * (k // 2), dilation=dilation,
                                           groups=groups, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6())
        self.stem = cbn(3, 16, 3)
        self.e1, self.d1 = cbn(16, 64, 1), cbn(64, 64, 3, groups=64)
        self.p1 = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.e2, self.d2 = cbn(16, 96, 1), cbn(96, 96, 3, 2, groups=96)
        self.p2 = nn.Sequential(nn.Conv2d(96, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.e3, self.d3 = cbn(32, 48, 1), cbn(48, 48, 5, groups=48)
        self.e4, self.d4 = cbn(48, 64, 1), cbn(64, 64, 3, groups=64, dilation=2)
        self.e5, self.d5 = cbn(64, 40, 1), cbn(40, 40, 3, groups=40)
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.p1(self.d1(self.e1(x)))
        x = self.p2(self.d2(self.e2(x)))
        x = self.d4(self.e4(self.d3(self.e3(x))))
        return self.fc(self.d5(self.e5(x)).mean((2, 3)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def tiny_resnet():
    torch.manual_seed(0)
    return randomize_bn(TinyResNet())


@pytest.fixture(scope="session")
def tiny_artifact():
    """A briefly calibrated TinyResNet artifact (W4A4) with scattered WAPS groups."""
    from tests.compile_helpers import calibrated, scramble_groups
    torch.manual_seed(0)
    art = calibrated(randomize_bn(TinyResNet()), (1, 16, 16))
    return scramble_groups(art, seed=1)
