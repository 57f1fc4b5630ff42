"""The step benchmark's rows say when they are not to be believed (experiments/step_bench.py):
a row whose fused kernel failed and fell back timed the torch path, not the kernel."""

import pytest
import torch

from fastmoco.experiments import step_bench
from fastmoco.experiments.step_bench import CPU_SIZES, SPREAD_LIMIT


@pytest.mark.parametrize("failed_during_the_row", [False, True])
def test_a_row_after_a_kernel_fallback_is_flagged(monkeypatch, failed_during_the_row):
    before = {"nt_xent": {("cpu", "float32"): "an earlier row's failure"}}
    after = dict(before)
    if failed_during_the_row:
        after["info_nce"] = {("cpu", "bfloat16"): "CompilationError"}
    calls = iter([before, after])
    monkeypatch.setattr(step_bench, "kernel_failures", lambda: next(calls))
    torch.manual_seed(0)
    row = step_bench.fastmoco_row(
        CPU_SIZES[0], torch.device("cpu"), K=256, queue_dtype="fp32", graph=False,
        steps=2, warmup=1,
    )  # fmt: skip
    row.update(floor_share=0.5, spread=0.0)  # a quiet machine: only the fallback can flag
    assert row["fell_back"] == (["info_nce"] if failed_during_the_row else [])
    doubt = step_bench._doubt(row)
    assert doubt == ("fell back to torch: info_nce" if failed_during_the_row else "")


def test_noisy_and_impossible_rows_are_flagged():
    row = dict(row="fastmoco eager", fell_back=[], spread=0.0, floor_share=0.5)
    assert step_bench._doubt(row) == ""
    assert "spread" in step_bench._doubt({**row, "spread": SPREAD_LIMIT + 0.1})
    assert "faster than the networks" in step_bench._doubt({**row, "floor_share": 1.2})
    assert step_bench._doubt({**row, "row": "networks only (floor)", "floor_share": 1.0}) == ""
