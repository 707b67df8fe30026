"""The one timer the bench scripts share: median milliseconds of a call, CUDA events on a GPU."""

import statistics
import time

import torch


def median_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of one call of fn() after `warmup` untimed calls.

    On CUDA each call is bracketed by events and synchronised, so the time is the GPU's, not the
    launch's; elsewhere it is wall time.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)
