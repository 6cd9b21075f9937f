"""A CPU-side stand-in for `torch.cuda.set_sync_debug_mode("error")`: fails on any tensor-to-Python conversion
(the operations that wait for an accelerator) while it is armed.

The sampling loops may convert before and after their loop and the model may do as it likes, so a test arms the
guard around the loop's own code only: `guard.model(fn)` disarms it while the model runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


class HostSyncGuard:
    def __init__(self) -> None:
        self.armed = False
        self.conversions: list[str] = []

    def model(self, fn: Callable) -> Callable:
        """``fn`` run with the guard disarmed, re-armed when it returns (the loop's own code runs in between)."""

        def unguarded(*args, **kwargs):
            self.armed = False
            try:
                return fn(*args, **kwargs)
            finally:
                self.armed = True

        return unguarded


@contextmanager
def host_sync_guard() -> Iterator[HostSyncGuard]:
    guard = HostSyncGuard()
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def guarded(name: str, original: Callable) -> Callable:
        def method(self, *args, **kwargs):
            if guard.armed:
                guard.armed = False  # report once, and let the assertion's own formatting convert freely
                raise AssertionError(f"Tensor.{name}() inside the sampling loop: a host synchronisation on an accelerator")
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, guarded(name, original))
    try:
        yield guard
    finally:
        guard.armed = False
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
