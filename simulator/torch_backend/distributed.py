"""The global batch under ``torch.distributed`` (SPEC section 7).

Robust aggregations weigh every sample by a function of *all* the losses of the
batch (a softmax, a mean, a variance). Under data parallelism each process holds
a shard; :class:`GlobalBatch` gathers the detached per-sample losses of every
shard so that each process computes the weights of the concatenated batch, and
it tells how to scale a local loss so that DDP's gradient *averaging* yields the
gradient of the concatenated-batch objective:

    DDP gradient = (1 / W) sum_r grad(local_r),   local_r = W * sum_{i in shard r} c_i l_i
                 = sum_{i in global batch} c_i grad l_i.

Without an initialised process group (or with ``group=False``) everything is
the single-process identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["GlobalBatch"]


@dataclass
class GlobalBatch:
    """Collective operations over the processes of a data-parallel group.

    Parameters
    ----------
    group : ProcessGroup, None or False
        ``None``: the default group when ``torch.distributed`` is initialised,
        else a single process; ``False``: always a single process.
    """

    group: object = None

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return (self.group is not False and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self._group) > 1)

    @property
    def _group(self):
        return None if self.group in (None, False) else self.group

    @property
    def world_size(self) -> int:
        """Number of processes (1 when not distributed)."""
        return dist.get_world_size(self._group) if self.active else 1

    @property
    def rank(self) -> int:
        """Rank of this process in the group (0 when not distributed)."""
        return dist.get_rank(self._group) if self.active else 0

    def gather(self, local: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """Concatenate the detached 1-D ``local`` tensors of all ranks (rank order).

        Shards may differ in length. Returns the global tensor and the slice of
        it that holds this rank's entries.
        """
        local = local.detach()
        if not self.active:
            return local, slice(0, local.shape[0])
        n = torch.tensor([local.shape[0]], device=local.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n, group=self._group)
        sizes = [int(s.item()) for s in sizes]
        biggest = max(sizes)
        padded = torch.zeros(biggest, dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self._group)
        full = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
        start = sum(sizes[: self.rank])
        return full, slice(start, start + local.shape[0])

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """All-reduced sum of a detached tensor."""
        value = value.detach().clone()
        if self.active:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self._group)
        return value

    def max(self, value: torch.Tensor) -> torch.Tensor:
        """All-reduced maximum of a detached tensor."""
        value = value.detach().clone()
        if self.active:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group)
        return value
