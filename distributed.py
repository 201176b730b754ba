"""Data parallelism over processes: `torchrun --nproc-per-node K cli.py train ...`.

Every process holds the whole model and walks the same steps with the same public
randomness. Only the forward passes are split:
- the pool's micro-batches are dealt round-robin (micro-batch b goes to rank b mod K), so
  each example's loss is computed in exactly the micro-batch a single process would use;
- each rank writes its losses into a zero vector of the pool's size and one all-reduce
  (sum) assembles the full vector. Adding zeros is exact, so every rank holds the same
  bits as a single-process run would.
The secret randomness lives on rank 0 only: the release rule runs there, and its outputs
(the releases, the DP minibatch, whether the MI budget is spent) are broadcast. Every rank
then applies the same update. Rank 0 writes the run folder.

Backends: NCCL on GPUs (each rank on cuda:LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Sharding:
    """This process's place among `world` data-parallel processes."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    def combine(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum the per-rank partial vectors (each entry is non-zero on exactly one rank)."""
        backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        total = partial.to(backend_device).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(partial.device)

    def from_main(self, compute):
        """Run `compute` on rank 0 and return its result on every rank."""
        holder = [compute() if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> Sharding | None:
    """Join the process group that torchrun set up, or return None for a single process."""
    if not launched_by_torchrun():
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Sharding(rank=dist.get_rank(), world=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


class RankZeroRule:
    """A release rule that runs on rank 0 and broadcasts what it decides to the other ranks.

    Deterministic parts (clipping, the privacy report, the state) are read from the local
    copy; everything that touches the secret generator or the posterior comes from rank 0.
    """

    def __init__(self, rule, sharding: Sharding):
        self.rule = rule
        self.sharding = sharding

    def __getattr__(self, name):
        return getattr(self.rule, name)

    def sample_rows(self, pool_size: int):
        return self.sharding.from_main(lambda: self.rule.sample_rows(pool_size))

    def release_step(self, inputs):
        return self.sharding.from_main(lambda: self.rule.release_step(inputs))

    def exhausted(self) -> bool:
        return self.sharding.from_main(self.rule.exhausted)

    def privacy(self) -> dict:
        return self.sharding.from_main(self.rule.privacy)

    @property
    def mi_spent(self):
        return self.rule.mi_spent
