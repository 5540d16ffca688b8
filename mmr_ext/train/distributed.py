"""Distributed context of a training run: ranks, devices and threads under ``torchrun``, the
collectives the loop uses, and the per-rank RNG states saved in checkpoints (see
:mod:`mmr_ext.train` for how the processes share the work)."""
from __future__ import annotations

import gc
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .checkpoint import CheckpointError

__all__ = ["Dist", "setup_distributed", "rng_state", "restore_rng_state"]


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, its ``device``, and
    whether it created the process group (``owns_group``, then :meth:`close` destroys it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks (moved to the device for NCCL), returned on t's device."""
        import torch.distributed as dist
        work = t.to(self.device)
        dist.all_reduce(work)
        return work.to(t.device)

    def close(self, error: Optional[BaseException] = None) -> None:
        """Destroy the process group if this run created it (idempotent); ``error``: the exception
        ending the run, whose traceback's frames are cleared (their locals hold the DDP wrapper).

        The backend (gloo: its worker threads and TCP pairs) is freed by the last reference to the
        group, not by ``destroy_process_group`` itself; a ``DistributedDataParallel`` wrapper holds
        one through reference cycles, hence the collection. Left to interpreter shutdown, the
        backend's threads are stopped while the interpreter is torn down, which can abort the
        process at exit (``terminate called without an active exception``)."""
        if self.owns_group:
            import torch.distributed as dist
            self.owns_group = False
            if error is not None:
                traceback.clear_frames(error.__traceback__)
            if dist.is_initialized():
                dist.destroy_process_group()
            gc.collect()


def setup_distributed(device: str, threads: Optional[int]) -> Dist:
    """The context from the ``torchrun`` environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``): picks the device (``"auto"``: CUDA if available), sets the CPU threads
    and initialises the process group (NCCL on CUDA, else gloo) unless one exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if world <= 1:
        if threads is not None:
            torch.set_num_threads(threads)
        return Dist(device=dev)

    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    owns = False
    if not dist.is_initialized():
        _import_group_defaults()
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    d = Dist(rank, world, local_rank, dev, owns)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        d.close()
        raise RuntimeError("torch.distributed is initialised with a different rank/world size than "
                           "the RANK/WORLD_SIZE environment variables")
    return d


def _import_group_defaults() -> None:
    """Imports, before the process group exists, the torch modules that bind ``group.WORLD`` as a
    default argument when first imported (``torch.distributed.nn.functional``: ``def
    broadcast(tensor, src, group=group.WORLD)``; ``DistributedDataParallel`` imports it through
    ``torch._dynamo``). Imported after ``init_process_group`` they would keep the group, and its
    gloo threads, alive past ``destroy_process_group`` until interpreter shutdown."""
    import torch.distributed.nn.functional  # noqa: F401


def rng_state(loader_gen: torch.Generator, attack_gen: torch.Generator, d: Dist) -> Dict[str, Any]:
    """The RNG states to checkpoint: torch's CPU (and CUDA) state, the data-loader generator and
    the attack generator of every rank (gathered: a collective, so every rank must call it)."""
    attack = attack_gen.get_state()
    if d.world > 1:
        import torch.distributed as dist
        gathered: List[Any] = [None] * d.world
        dist.all_gather_object(gathered, attack.cpu())
        attack_states = gathered
    else:
        attack_states = [attack.cpu()]
    state = {"torch": torch.get_rng_state(), "loader": loader_gen.get_state(), "attack": attack_states}
    if torch.cuda.is_available() and d.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(d.device).cpu()
    return state


def restore_rng_state(state: Dict[str, Any], loader_gen: torch.Generator, attack_gen: torch.Generator,
                      d: Dist, path) -> None:
    """Sets the generators from :func:`rng_state`'s ``state``; this rank's attack generator only
    when the world size is unchanged. Raises :class:`CheckpointError` naming ``path``."""
    try:
        torch.set_rng_state(state["torch"])
        loader_gen.set_state(state["loader"])
        attack = state["attack"]
        if len(attack) == d.world:
            attack_gen.set_state(attack[d.rank].to(attack_gen.get_state().device))
        if "cuda" in state and d.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], d.device)
    except (KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint '{path}': invalid RNG state ({exc})") from exc
