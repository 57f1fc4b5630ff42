"""The step's intra-op threads on a CPU: all cores first, then the cores the workers leave,
the faster kept (fastmoco/engine/cpu_threads.py). Step times are simulated by a clock."""

import pytest
import torch

from fastmoco.engine import cpu_threads
from fastmoco.engine.cpu_threads import BUSY_SHARE, SKIP_STEPS, WINDOW_STEPS, ThreadTuner


@pytest.fixture
def clock(monkeypatch):
    """A wall clock that advances by the per-step time of the current thread count, and a
    CPU clock by that time x threads x busy (busy < BUSY_SHARE: the workers took cores)."""
    state = {"now": 0.0, "cpu": 0.0, "busy": 0.6, "per_step": {}}
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads.time, "perf_counter", lambda: state["now"])
    monkeypatch.setattr(cpu_threads.time, "process_time", lambda: state["cpu"])
    yield state
    torch.set_num_threads(threads)


def run(tuner, clock, steps):
    lines = []
    for _ in range(steps):
        per_step = clock["per_step"][torch.get_num_threads()]
        clock["now"] += per_step
        clock["cpu"] += per_step * torch.get_num_threads() * clock["busy"]
        line = tuner.step_done()
        if line is not None:
            lines.append(line)
    return lines


def test_fewer_threads_are_kept_when_they_step_faster(clock):
    torch.set_num_threads(2)
    clock["per_step"] = {2: 0.20, 1: 0.14}  # the demo: the worker needed its core
    tuner = ThreadTuner(2, 1)
    lines = run(tuner, clock, SKIP_STEPS + 2 * WINDOW_STEPS + 5)
    assert torch.get_num_threads() == 1 and tuner.done
    assert len(lines) == 1 and "1 intra-op thread(s) from here (1.43x faster" in lines[0]


@pytest.mark.parametrize("split_per_step", [0.40, 0.198])  # slower; faster within MARGIN
def test_all_cores_are_kept_otherwise(clock, split_per_step):
    torch.set_num_threads(2)
    clock["per_step"] = {2: 0.20, 1: split_per_step}
    tuner = ThreadTuner(2, 1)
    assert run(tuner, clock, SKIP_STEPS + 2 * WINDOW_STEPS + 5) == []
    assert torch.get_num_threads() == 2 and tuner.done


def test_the_threads_change_at_fixed_steps(clock):
    """The trial starts after SKIP_STEPS + WINDOW_STEPS steps and the decision falls one
    window later, whatever the step times: runs that decide alike are bit-identical."""
    for per_step in (0.01, 5.0):
        torch.set_num_threads(4)
        clock["per_step"] = {4: per_step, 3: per_step / 2}
        tuner = ThreadTuner(4, 1)
        run(tuner, clock, SKIP_STEPS + WINDOW_STEPS - 1)
        assert torch.get_num_threads() == 4
        run(tuner, clock, 1)
        assert torch.get_num_threads() == 3 and not tuner.done  # the trial
        run(tuner, clock, WINDOW_STEPS)
        assert torch.get_num_threads() == 3 and tuner.done


def test_an_epoch_start_restarts_the_window(clock):
    """The first batch of an epoch (the loader restarting) is not timed into a window."""
    torch.set_num_threads(2)
    clock["per_step"] = {2: 0.2, 1: 0.1}
    tuner = ThreadTuner(2, 1)
    run(tuner, clock, SKIP_STEPS + WINDOW_STEPS - 1)
    tuner.epoch_start()
    clock["now"] += 100.0  # a long restart
    run(tuner, clock, WINDOW_STEPS)  # the restart + a window less one step
    assert len(tuner.trials) == 0
    run(tuner, clock, 1)
    assert tuner.trials == [pytest.approx(0.2)]


@pytest.mark.parametrize("threads, workers", [(2, 0), (1, 1)])
def test_nothing_to_choose(clock, threads, workers):
    tuner = ThreadTuner(threads, workers)
    assert tuner.done and tuner.step_done() is None


def test_threads_that_had_their_cores_are_not_tried_lower(clock):
    """A ResNet-18 on 2 cores with one light worker: the step's threads ran ~all of the
    window, so no trial of fewer threads costs it half-speed steps."""
    torch.set_num_threads(2)
    clock["per_step"] = {2: 3.0, 1: 1.0}  # fewer would even be faster: not tried
    clock["busy"] = BUSY_SHARE + 0.05
    tuner = ThreadTuner(2, 1)
    assert run(tuner, clock, SKIP_STEPS + WINDOW_STEPS) == []
    assert tuner.done and torch.get_num_threads() == 2 and len(tuner.trials) == 1
