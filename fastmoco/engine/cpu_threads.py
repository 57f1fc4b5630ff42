"""On a CPU, how many intra-op threads the step gets, chosen by timing the run itself.

The cores of a rank are shared by the step's intra-op threads and the loader workers.
Which split is faster depends on the run, and by a lot. A CIFAR-stem ResNet-18 at batch
128 computes for seconds a step while its one worker augments the next batch in a tenth
of that: giving the worker a core of its own halved the step's threads for a core that
mostly waited (17.2 img/s, 0.60x lightly's loop on 2 cores; all cores to the step: 1.00x,
bench/pair_lightly.py). The demo's tiny network steps about as fast as its worker
augments; there a second step thread preempts the worker and is preempted by it
(an intra-op thread preempted mid-operator stalls its siblings at the operator's end), and
the demo ran 25 % slower with it (bench/RESULTS.md).

So the trainer measures: data.loader.cpu_plan starts the step with all of the rank's
cores and a window of steps is timed, with the CPU time this process used in it. When
the step's threads had their cores (CPU time at least BUSY_SHARE of threads x wall), the
workers are not in their way and nothing changes: a ResNet-18 pays nothing for the
check. Otherwise a second window runs with the cores the workers leave, and the faster
(by more than MARGIN) is kept for the rest of the run; a line says so when the threads
change. One decision per run, by each rank for its own cores; nothing of it is saved, so
a resumed run decides again. Without workers there is nothing to choose. The threads
change at fixed steps, so two runs that decide alike are bit-identical; a close call can
go either way, so --cpu-threads N fixes the count for runs that must repeat.
"""

import time

import torch

SKIP_STEPS = 3  # the first steps: workers starting, caches and allocator warming
# Windows of a fixed number of steps, so the threads change at the same steps in every
# run (a run with the same decision is bit-identical); short, since the trial of fewer
# threads costs a ResNet-18 on 2 cores a window of half-speed steps
WINDOW_STEPS = 4
MARGIN = 0.03  # fewer threads must be this much faster per step to be kept
BUSY_SHARE = 0.85  # the step's threads ran this share of the window: they had their cores


class ThreadTuner:
    """tuner.step_done() after each step; it calls torch.set_num_threads itself and
    returns a line to print when it settled on fewer threads, else None."""

    def __init__(self, threads: int, workers: int):
        self.threads, self.workers = threads, workers
        self.split = max(threads - workers, 1)  # the step's threads when workers get cores
        self.done = workers == 0 or self.split == threads
        self.seen = 0
        self.trials: list[float] = []  # seconds per step: all cores, then split
        self._restart()

    def _restart(self) -> None:
        self.steps, self.t0, self.cpu0 = 0, time.perf_counter(), time.process_time()

    def epoch_start(self) -> None:
        """An epoch's first batch waits for the loader's restart: not the run's rate."""
        if not self.done:
            self.steps = -1

    def step_done(self) -> str | None:
        if self.done:
            return None
        self.seen += 1
        if self.seen <= SKIP_STEPS or self.steps < 0:
            self._restart()
            return None
        self.steps += 1
        if self.steps < WINDOW_STEPS:
            return None
        wall = time.perf_counter() - self.t0
        self.trials.append(wall / self.steps)
        if len(self.trials) == 1:
            if time.process_time() - self.cpu0 >= BUSY_SHARE * self.threads * wall:
                self.done = True  # the threads had their cores: the workers mostly wait
                return None
            torch.set_num_threads(self.split)
            self._restart()
            return None
        self.done = True
        every, split = self.trials
        if split < every * (1 - MARGIN):
            return (
                f"cpu: {self.split} intra-op thread(s) from here ({every / split:.2f}x faster "
                f"per step than {self.threads}: the {self.workers} loader worker(s) needed "
                "their cores)"
            )
        torch.set_num_threads(self.threads)
        return None
