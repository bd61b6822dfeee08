"""Several processes (torchrun / accelerate launch): which users each embeds, and the group they share."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def shard_users(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of the users each process embeds: longest first, each to the process with the least
    text so far (ties to the lower rank), so every process gets about the same work; each shard
    in index order. A pure function of the lengths, so a resumed process finds its shard again."""
    import heapq

    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [(0, r) for r in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, r = heapq.heappop(loads)
        shards[r].append(i)
        heapq.heappush(loads, (load + int(lengths[i]), r))
    return [sorted(s) for s in shards]


class ProcessGroup:
    """The torch.distributed group of a multi-process embed (a no-op for one process).

    Joins the launcher's group (gloo on CPUs, nccl on GPUs) unless one is already set up, and
    leaves it again only if it made it.
    """

    def __init__(self, dist: Any = None, owned: bool = False, device: Any = None):
        self.dist, self.owned, self.device = dist, owned, device

    @classmethod
    def join(cls, ranks: Any, device: Any) -> ProcessGroup:
        if not ranks.distributed:
            return cls()
        import torch.distributed as dist

        owned = False
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                import torch

                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
            owned = True
        return cls(dist, owned, device if dist.get_backend() == "nccl" else None)

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def share(self, obj: dict) -> dict:
        """Process 0's `obj`, on every process."""
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def sum_max(self, tokens: int, seconds: float) -> tuple[int, float]:
        """Tokens of all processes, and the slowest process's loop time."""
        if self.dist is None:
            return tokens, seconds
        import torch

        t = torch.tensor([float(tokens)], dtype=torch.float64, device=self.device)
        s = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        self.dist.all_reduce(s, op=self.dist.ReduceOp.MAX)
        return int(t.item()), float(s.item())

    def leave(self) -> None:
        if self.dist is not None and self.owned:
            self.dist.destroy_process_group()
            self.dist = None
