"""gather_and_enqueue_ on two gloo ranks: identical queues on both, equal to one process
enqueueing the concatenated global batches (rank order) with the reference, and no
FutureWarning from the collective (torch 2.14 deprecates all_gather_into_tensor)."""

import warnings

import torch

from fastmoco.engine.distributed import launch
from fastmoco.ops.distributed import gather_and_enqueue_, world
from fastmoco.ops.enqueue import extension_op
from fastmoco.ops.reference import enqueue_reference

K, C = 11, 3
LOCAL_BATCHES = [2, 5, 1, 3, 4, 2]  # global 4, 10, 2, 6, 8, 4: wraps, never K % B == 0


def keys_of(rank: int, step: int, B: int) -> torch.Tensor:
    """Distinct keys per rank and step, so a row from the wrong rank or step shows."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(B, C, generator=gen)


# One spawn for both paths (starting two processes costs far more than the enqueues).
BACKENDS = ["torch"] + (["cuda"] if extension_op() is not None else [])


def enqueue_on_every_rank(out_dir: str) -> None:
    rank, world_size = world()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for backend in BACKENDS:
            queue = torch.full((K, C), float("nan"))  # poison: unwritten rows stay NaN
            ptr = torch.zeros(1, dtype=torch.long)
            for step, B in enumerate(LOCAL_BATCHES):
                gather_and_enqueue_(queue, ptr, keys_of(rank, step, B), backend=backend)
            torch.save({"queue": queue, "ptr": ptr}, f"{out_dir}/{backend}_r{rank}.pt")
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    torch.save(deprecated, f"{out_dir}/warnings_r{rank}.pt")


def test_two_ranks_hold_identical_queues(tmp_path):
    """backend "torch" always, "cuda" (the extension's CPU kernel) when it is built."""
    launch(enqueue_on_every_rank, (str(tmp_path),), nprocs=2, device="cpu")
    want = torch.full((K, C), float("nan"))
    want_ptr = torch.zeros(1, dtype=torch.long)
    for step, B in enumerate(LOCAL_BATCHES):
        global_keys = torch.cat([keys_of(rank, step, B) for rank in range(2)])
        enqueue_reference(want, want_ptr, global_keys)
    assert not want.isnan().any()  # the sequence fills the whole queue
    assert int(want_ptr) == (2 * sum(LOCAL_BATCHES)) % K
    for backend in BACKENDS:
        r0 = torch.load(tmp_path / f"{backend}_r0.pt")
        r1 = torch.load(tmp_path / f"{backend}_r1.pt")
        assert torch.equal(r0["queue"], r1["queue"]), backend
        assert torch.equal(r0["ptr"], r1["ptr"]), backend
        assert torch.equal(r0["queue"], want), backend
        assert torch.equal(r0["ptr"], want_ptr), backend
    for rank in range(2):  # torch 2.14 deprecates all_gather_into_tensor on every rank
        assert torch.load(tmp_path / f"warnings_r{rank}.pt") == []


def test_one_process_is_a_plain_enqueue():
    queue, ptr = torch.zeros(5, 2), torch.tensor([4])
    gather_and_enqueue_(queue, ptr, torch.ones(2, 2))
    assert queue[4].eq(1).all() and queue[0].eq(1).all() and int(ptr) == 1
