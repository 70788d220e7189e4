"""lspt_kernels.bench.measure / targets: interleaved rounds, spreads, per-round ratios, verdicts."""
import pytest

from lspt_kernels.bench import Timer, interleaved_rounds, per_round_ratios, summarize, verdict
from lspt_kernels.bench.env import load_warning
from lspt_kernels.bench.targets import FLOOR_TARGET, TARGET_TIME_SLACK, add_comparisons, evaluate_targets


class VirtualMachine:
    """A clock and callables whose cost is `work x slowdown(round)`: a machine whose speed drifts."""

    def __init__(self):
        self.now = 0.0
        self.calls = 0
        self.order = []

    def clock(self):
        return self.now

    def fn(self, name, work, slowdown):
        def call():
            self.order.append(name)
            self.now += work * slowdown(self.calls)
            self.calls += 1
        return call


def test_per_round_ratios_cancel_a_drift_of_the_machine():
    vm = VirtualMachine()
    slow = lambda i: 1.0 if i < 12 else 3.0            # noqa: E731 - another job starts halfway
    fns = {"gapt": vm.fn("gapt", 1.0, slow), "lspt": vm.fn("lspt", 1.1, slow)}
    times, errors = interleaved_rounds(fns, rounds=10, warmup=1, timer=Timer("cpu", vm.clock))
    assert not errors and len(times["gapt"]) == len(times["lspt"]) == 10
    raw = summarize(times["lspt"])
    assert raw["max"] / raw["min"] > 2.5                     # the raw times drift...
    ratio = summarize(per_round_ratios(times["lspt"], times["gapt"]))
    # ...the per-round ratio does not, except in the one round where the drift began
    assert ratio["median"] == pytest.approx(1.1) and ratio["q1"] == pytest.approx(1.1)
    assert ratio["q3"] == pytest.approx(1.1)


def test_rounds_rotate_the_order_and_a_failing_callable_is_dropped():
    vm = VirtualMachine()
    state = {"n": 0}

    def flaky():
        state["n"] += 1
        if state["n"] > 2:
            raise RuntimeError("boom")

    fns = {"a": vm.fn("a", 1, lambda i: 1), "b": vm.fn("b", 1, lambda i: 1), "c": flaky}
    times, errors = interleaved_rounds(fns, rounds=3, warmup=1, timer=Timer("cpu", vm.clock))
    assert errors == {"c": "RuntimeError: boom"} and set(times) == {"a", "b"}
    assert vm.order[2:] == ["a", "b", "b", "a", "a", "b"]     # after warm-up: a b / (c fails) b a / a b


def test_summarize_and_verdicts():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert summarize([]) is None
    assert verdict(summarize([0.90, 0.95, 0.97]), 1.0) == "met"
    assert verdict(summarize([1.05, 1.10, 1.20]), 1.0) == "missed"
    assert verdict(summarize([0.95, 1.00, 1.05, 1.10]), 1.0) == "inconclusive"   # straddles the limit
    assert verdict(summarize([0.5]), 1.0) == "inconclusive"                      # no spread with one round
    assert verdict(summarize([3.5, 4.0, 4.2]), 3.0, higher_is_better=True) == "met"
    assert verdict(summarize([2.0, 2.5, 2.7]), 3.0, higher_is_better=True) == "missed"
    assert verdict(None, 1.0) == "inconclusive"


def _row(method, train, mem, **kw):
    from lspt_kernels.bench.targets import put_summary
    r = dict(method=method, model="m", batch_size=4, num_prompts=10, dtype="fp32", device="cpu", status="ok",
             peak_memory_gb=mem, tokens=207, train_s_all=train, **kw)
    put_summary(r, "train_s", summarize(train))
    return r


def test_targets_use_per_round_ratios_and_say_inconclusive():
    rows = [_row("vpt-deep", [1.0, 2.0, 1.0, 2.0, 1.0], 1.0), _row("gapt", [1.0, 2.0, 1.0, 2.0, 1.0], 1.0),
            _row("lspt-fused", [1.03, 2.06, 1.03, 2.06, 1.03], 1.005, backend="cpu"),
            _row("lspt-reference", [1.0, 2.2, 1.0, 2.2, 1.0], 1.0, backend="reference")]
    add_comparisons(rows)
    fused = rows[2]
    assert fused["train_s_vs_gapt"] == pytest.approx(1.03) and fused["train_s_vs_gapt_q3"] == pytest.approx(1.03)
    t = {x["target"]: x for x in evaluate_targets(rows)}
    vs_vpt = t[FLOOR_TARGET]
    assert vs_vpt["verdict"] == "met" and vs_vpt["limit"] == pytest.approx(1 + 10 / 414 + TARGET_TIME_SLACK)
    assert t["LSPT-fused peak memory <= GaPT x 1.01"]["verdict"] == "met"
    assert t["LSPT-fused train step <= LSPT-reference"]["verdict"] == "inconclusive"   # 1.03 vs 0.94 by round


def test_load_warning_only_when_the_load_moved():
    assert load_warning([0.1, 0.1, 0.1], [0.2, 0.1, 0.1]) is None
    assert "changed during the run" in load_warning([0.1, 0.1, 0.1], [5.0, 1.0, 0.5])
    assert load_warning(None, [1.0, 1.0, 1.0]) is None
