"""How lspt-bench measures: one timer, one sync, interleaved rounds, spreads, verdicts, memory probes.

Every figure the benchmarks print comes from here, so a CPU row and a GPU row, the encoder table
and the step microbenchmark are timed the same way:

- `Timer` reads one clock around `inner` calls (CUDA events between two synchronisations on a GPU,
  `time.perf_counter` or a caller-chosen clock on the CPU) and returns seconds per call.
- `interleaved_rounds` runs every candidate once per round, round after round, so whatever else
  the machine does lands on all of them alike; the order rotates each round so no candidate always
  runs right after the same neighbour.
- `summarize` gives the median and the spread (quartiles, min, max); `per_round_ratios` divides two
  candidates round by round (a drift of the machine's speed cancels); `verdict` says met / missed /
  inconclusive from a ratio's spread.
- `MemoryProbe`: peak memory over a region (GPU max_memory_allocated; CPU peak RSS).
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

# Spread used for verdicts and error bars: the interquartile range of the rounds. min and max are
# recorded too; with a handful of rounds one disturbed round should not decide a verdict alone.
MIN_ROUNDS_FOR_VERDICT = 3


def sync(device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize(device)


class Timer:
    """Seconds per call of `fn`: one clock read around `inner` back-to-back calls.

    On a GPU the interval is measured with CUDA events after a synchronisation, so queued work of
    an earlier call is not billed to this one; `inner` > 1 amortises the launch and event overhead
    of short calls."""

    def __init__(self, device: str = "cpu", clock: Callable[[], float] = time.perf_counter):
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")
        self.clock = clock

    def __call__(self, fn: Callable, inner: int = 1) -> float:
        if self.cuda:
            import torch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync(self.device)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            sync(self.device)
            return start.elapsed_time(end) / 1e3 / inner
        t0 = self.clock()
        for _ in range(inner):
            fn()
        return (self.clock() - t0) / inner

    def calibrate(self, fn: Callable, min_s: float, max_inner: int = 10_000) -> int:
        """How many calls one sample needs to last at least `min_s` (1 for calls that long)."""
        per_call = max(self(fn), 1e-9)
        return max(1, min(max_inner, int(min_s / per_call) + 1)) if per_call < min_s else 1


def interleaved_rounds(callables: dict[str, Callable], rounds: int, warmup: int = 1,
                       timer: Timer | None = None, inner: dict[str, int] | None = None,
                       progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """Time every callable once per round for `rounds` rounds (after `warmup` untimed calls each).

    Returns ({name: [seconds per call, one per round]}, {name: error message}) - a callable that
    raises is reported and dropped, the others go on."""
    timer = timer or Timer()
    inner = inner or {}
    errors: dict[str, str] = {}
    live = dict(callables)
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
            sync(timer.device)
        except Exception as exc:  # noqa: BLE001 - reported in its row, the others still run
            errors[name] = short_error(exc)
            del live[name]
    times: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            if name not in live:
                continue
            try:
                times[name].append(timer(live[name], inner.get(name, 1)))
            except Exception as exc:  # noqa: BLE001
                errors[name] = short_error(exc)
                del live[name]
                times.pop(name, None)
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
    return times, errors


def summarize(values) -> dict | None:
    """Median, quartiles, min, max and count of a list of samples (None when empty)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return dict(median=statistics.median(vals), q1=q1, q3=q3, min=vals[0], max=vals[-1], n=len(vals))


def per_round_ratios(num: list[float], den: list[float]) -> list[float]:
    """num[r] / den[r] for the rounds both have (same round = same state of the machine)."""
    return [a / b for a, b in zip(num, den) if a is not None and b]


def verdict(summary: dict | None, limit: float, higher_is_better: bool = False,
            min_rounds: int = MIN_ROUNDS_FOR_VERDICT) -> str:
    """'met' / 'missed' / 'inconclusive' for `value <= limit` (or >= with higher_is_better).

    Inconclusive when the spread (quartiles) straddles the limit, or when there are too few rounds
    to have a spread at all."""
    if summary is None:
        return "inconclusive"
    if summary["n"] < min_rounds:
        return "inconclusive"
    lo, hi = summary["q1"], summary["q3"]
    if higher_is_better:
        return "met" if lo >= limit else "missed" if hi < limit else "inconclusive"
    return "met" if hi <= limit else "missed" if lo > limit else "inconclusive"


def fmt_spread(s: dict | None, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    """'1.2345 [1.2000-1.3000]': median [q1-q3]."""
    if not s:
        return "-"
    f = lambda v: f"{v * scale:.{digits}f}"  # noqa: E731
    if s["n"] == 1:
        return f(s["median"]) + unit
    return f"{f(s['median'])}{unit} [{f(s['q1'])}-{f(s['q3'])}]"


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:limit]


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    try:
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024
    except Exception:  # pragma: no cover
        return None


class MemoryProbe:
    """Peak memory over a region of code, the way this benchmark reports it.

    GPU: peak = torch.cuda.max_memory_allocated() over the region (reset at `start`), i.e. all the
    allocated memory, weights included. CPU: peak = the process's peak RSS over the region (VmHWM,
    reset at `start` through /proc/self/clear_refs) minus its RSS when the probe was made (make it
    before the model is built). `step_memory_gb` is the peak minus the usage at `start`."""

    def __init__(self, device: str):
        import torch
        self.torch, self.cuda, self.device = torch, str(device).startswith("cuda"), str(device)
        self.base = self._current()
        self.pre = None
        self.reset_ok = True

    def _current(self):
        if self.cuda:
            sync(self.device)
            return self.torch.cuda.memory_allocated(self.device)
        return current_rss_bytes()

    def start(self) -> None:
        self.pre = self._current()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.reset_ok = reset_peak_rss()

    def stop(self) -> dict:
        if self.cuda:
            sync(self.device)
            peak = self.torch.cuda.max_memory_allocated(self.device)
            return dict(peak_memory_gb=peak / 1e9, step_memory_gb=(peak - self.pre) / 1e9,
                        memory_kind="torch.cuda.max_memory_allocated")
        peak = peak_rss_bytes()
        if peak is None or self.base is None:
            return dict(peak_memory_gb=None, step_memory_gb=None, memory_kind="unavailable (no /proc)")
        return dict(peak_memory_gb=(peak - self.base) / 1e9,
                    step_memory_gb=None if self.pre is None else (peak - self.pre) / 1e9,
                    memory_kind="peak RSS - RSS before the model was built"
                                + ("" if self.reset_ok else " (peak not resettable: since process start)"))
