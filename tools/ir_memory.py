"""Peak memory of folding an onnx_ir model in place: a torch ONNXProgram and an onnx_ir.Model loaded with
external data, each with about 100 MB of weights (python tools/ir_memory.py).

Prints the weights' size and, for each object, the peak resident memory above the level before the
fold (sampled every millisecond in a thread), tracemalloc's peak (Python and NumPy allocations;
protobuf's own arena is not traced) and what stays resident after it (glibc trimmed)."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import tracemalloc

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import onnxfold  # noqa: E402

MB = 1 << 20


class Net(torch.nn.Module):
    """Seven 3x3 Conv(512->512)+BN blocks (7 x 9 MiB of float32 weights) and a Linear(512->16384) + BN1d
    (32 MiB): about 100 MiB in all, every weight folded."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 512, 1)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(512, 512, 3, padding=1, bias=False), torch.nn.BatchNorm2d(512))
            for _ in range(7))
        self.fc = torch.nn.Linear(512, 16384)
        self.bn = torch.nn.BatchNorm1d(16384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for block in self.blocks:
            y = torch.relu(block(y))
        return self.bn(self.fc(y.mean((2, 3))))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def retained(base: int) -> float:
    """Resident memory above ``base`` once glibc has returned freed memory (malloc_trim)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return (rss() - base) / MB


def peak_during(fn) -> tuple[float, float, float]:
    base = rss()
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    t.start()
    tracemalloc.start()
    try:
        fn()
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        done.set()
        t.join()
    peak[0] = max(peak[0], rss())
    return (peak[0] - base) / MB, traced / MB, retained(base)


def main() -> None:
    import onnx_ir as ir

    torch.manual_seed(0)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    weights = sum(p.numel() * p.element_size() for p in net.state_dict().values()) / MB
    x = torch.randn(1, 3, 8, 8)
    program = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
    assert program is not None
    print(f"weights {weights:.0f} MiB")
    peak, traced, kept = peak_during(lambda: onnxfold.fold_model(program))
    print(f"ONNXProgram: peak RSS +{peak:.0f} MiB, tracemalloc peak {traced:.0f} MiB, retained +{kept:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        exported = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
        assert exported is not None
        ir.save(exported.model, os.path.join(tmp, "m.onnx"), external_data="m.onnx.data")
        del exported
        model = ir.load(os.path.join(tmp, "m.onnx"))
        peak, traced, kept = peak_during(lambda: onnxfold.fold_model(model))
        print(f"onnx_ir.Model with external data: peak RSS +{peak:.0f} MiB, tracemalloc peak {traced:.0f} MiB, "
              f"retained +{kept:.0f} MiB")


if __name__ == "__main__":
    main()
