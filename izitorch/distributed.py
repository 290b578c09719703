"""Runs launched by ``torchrun``: the process group, this process's rank, and how the ranks agree.

``torchrun --nproc_per_node=N -m izitorch run m.toml`` starts N processes with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and a rendezvous (``MASTER_ADDR``/``MASTER_PORT``, or torchrun's
``--rdzv_*`` flags across nodes) in their environment. Each process joins PyTorch's process
group (``nccl`` on CUDA, ``gloo`` on the CPU), takes the GPU of its ``LOCAL_RANK`` and trains its
share of the run (:mod:`izitorch.spread` for ``[run] distributed = "models"``, every model on its
shard of the data for ``"data"``, :mod:`izitorch.sharding`). Rank 0 alone
holds ``res_dir``'s lock, prepares the folder, prints the console and writes the run-level
files; under ``"models"`` the others write their models' files beside it (under ``"data"``
nothing), and every rank reads the resume states there, so ``res_dir`` must be on a file system
every rank sees (one machine, or a shared file system across nodes).

Coordination goes through a ``gloo`` group of its own (CPU objects, polled while waiting so that
a signal still stops a rank that waits for the others): once after rank 0 prepared ``res_dir``,
once when every rank has finished its share. Under ``"models"`` training itself does not
communicate; under ``"data"`` every step does, in a group of its own (:mod:`izitorch.sharding`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import attrs

from izitorch.errors import IzitorchError, ManifestError, TrainingError, first_line
from izitorch.ownership import LOCK_NAME

if TYPE_CHECKING:
    import torch

#: How long a rank waits for the others at a meeting point before it gives up: the end of the
#: run may wait for a rank that trains for days, so only a dead rank should reach it, and
#: torchrun stops the others as soon as one fails.
MEETING_TIMEOUT = datetime.timedelta(days=30)

T = TypeVar("T")


@attrs.frozen
class Ranks:
    """This process's place in the run: rank 0 of 1 outside torchrun (``strategy`` None)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str | None = None  # under torchrun: "auto" until the run knows its units, then "models" or "data"
    group: Any = attrs.field(default=None, eq=False, repr=False)  # the gloo group the ranks meet in
    steps: Any = attrs.field(default=None, eq=False, repr=False)  # distributed = "data": the group training steps communicate in
    objects: Any = attrs.field(default=None, eq=False, repr=False)  # ... and the gloo group they exchange objects in (metrics, decisions)

    @property
    def main(self) -> bool:
        """Whether this process prints the console and writes the run-level files."""
        return self.rank == 0

    @property
    def launched(self) -> bool:
        return self.strategy is not None


def launched_by_torchrun() -> bool:
    """Whether the environment is a torchrun worker's (torchrun sets these three for every worker)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def rank_label() -> str:
    """``"rank N: "`` in a torchrun worker other than rank 0 (its error lines then say whose they
    are, as torchrun mixes every worker's output), else nothing."""
    rank = os.environ.get("RANK", "0") if launched_by_torchrun() else "0"
    return f"rank {rank}: " if rank.isdigit() and int(rank) else ""


def from_environment() -> Ranks:
    """The ranks torchrun gave this process (strategy still ``"auto"``), or a single process."""
    if not launched_by_torchrun():
        return Ranks()
    try:
        rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise IzitorchError("RANK, WORLD_SIZE and LOCAL_RANK must be integers: launch with torchrun, which sets them") from None
    return Ranks(rank, world, local, strategy="auto")


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """Each process on a node takes the GPU of its ``LOCAL_RANK`` (a CPU run stays on the CPU)."""
    if not ranks.launched or device.type != "cuda":
        return device
    import torch

    if ranks.local_rank >= torch.cuda.device_count():
        raise ManifestError(
            f"LOCAL_RANK {ranks.local_rank} has no GPU: {torch.cuda.device_count()} visible; start at most as many processes per node as GPUs",
            "run.device",
        )
    device = torch.device("cuda", ranks.local_rank)
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[Ranks]:
    """Join torchrun's process group for the block (``nccl`` for CUDA, ``gloo`` on the CPU) and
    give ``ranks`` the gloo group the ranks meet in; nothing outside torchrun."""
    if not ranks.launched:
        yield ranks
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=MEETING_TIMEOUT, **({"device_id": device} if device.type == "cuda" else {}))
        meeting = dist.new_group(backend="gloo", timeout=MEETING_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    except (RuntimeError, ValueError) as error:
        raise IzitorchError(f"cannot join torchrun's process group ({backend}): {first_line(error)}; check torchrun's rendezvous flags") from None
    try:
        yield attrs.evolve(ranks, group=meeting)
    finally:
        with contextlib.suppress(Exception):  # a peer already gone: nothing left to tear down
            dist.destroy_process_group()


def main_first(ranks: Ranks, prepare: Callable[[], T]) -> T:
    """``prepare()`` on rank 0 alone, then its value on every rank. A failure there is raised on
    every rank (one line, the same exit code), so that no rank trains for a run that cannot be."""
    if not ranks.launched:
        return prepare()
    import torch.distributed as dist

    outcome: list[Any] = [None]
    failure: IzitorchError | None = None
    if ranks.main:
        try:
            outcome = [("done", prepare())]
        except IzitorchError as error:
            failure, outcome = error, [("failed", str(error), error.exit_code)]
    dist.broadcast_object_list(outcome, src=0, group=ranks.group)
    if failure is not None:
        raise failure
    if outcome[0][0] == "failed":
        _, text, code = outcome[0]
        error = IzitorchError(f"rank 0 could not start the run: {text}")
        error.locatable = False
        error.exit_code = code
        raise error
    return outcome[0][1]


def lock_text(res_dir: Path) -> str:
    """What rank 0's lock in ``res_dir`` holds (its pid, host and start time)."""
    try:
        return (res_dir / LOCK_NAME).read_text()
    except OSError:
        return ""


def check_shared_res_dir(res_dir: Path, rank0_lock: str, ranks: Ranks) -> None:
    """Refuse, before training, a rank that does not see the ``res_dir`` rank 0 locked: on
    another node without a shared file system its files would land in a folder of its own, and
    rank 0 would miss them only at the end of the run."""
    if lock_text(res_dir) != rank0_lock:
        raise ManifestError(
            f'res_dir "{res_dir}" seen from rank {ranks.rank} (on {socket.gethostname()}) is not the folder rank 0 locked: every process writes its '
            "models' files there, so under torchrun res_dir must be on a file system that every node shares",
            "run.res_dir",
        )


def wait_for_everyone(ranks: Ranks, stop_flag: Any) -> None:
    """Return once every rank reached this point (each has finished its share and its files are on
    disk). A signal meanwhile stops the wait as it stops training (:class:`~izitorch.guard.Interrupted`)."""
    if not ranks.launched:
        return
    import torch.distributed as dist

    from izitorch.guard import Interrupted

    work = dist.barrier(group=ranks.group, async_op=True)
    while not work.is_completed():
        if stop_flag is not None and stop_flag.signum is not None:
            raise Interrupted(stop_flag.signum, "interrupted")
        time.sleep(0.05)
    try:
        work.wait()
    except RuntimeError:  # gloo's text names a socket, not a rank: torchrun's summary names it
        raise TrainingError(
            "another rank stopped before it finished its share (torchrun's summary names it); every finished epoch is saved: run again with --resume"
        ) from None


def check_same_run(ranks: Ranks, parts: dict[str, str]) -> None:
    """Refuse, on every rank at once, a run that some rank built otherwise than rank 0 (another
    manifest, other data, a split drawn without a seed): its models would train on other samples
    than the ones rank 0 records, or its steps would not match rank 0's. ``parts`` describes what
    this rank built (a fingerprint per part, the same text for the same run)."""
    if not ranks.launched:
        return
    import torch.distributed as dist

    every: list[Any] = [None] * ranks.world
    dist.all_gather_object(every, parts, group=ranks.group)
    for rank, theirs in enumerate(every):
        differs = next((name for name, value in every[0].items() if theirs.get(name) != value), None)
        if differs is not None:
            raise IzitorchError(
                f"rank {rank} built another run than rank 0 ({differs} differs): every process must read the same manifest, data and code; "
                "on several nodes, check that each node has the same copy"
            )


def resolve_strategy(ranks: Ranks, setting: str, units: int) -> Ranks:
    """``distributed = "auto"``: spread models when there is at least one unit of work per rank."""
    if not ranks.launched:
        return ranks
    strategy = setting if setting != "auto" else ("models" if units >= ranks.world else "data")
    return attrs.evolve(ranks, strategy=strategy)


def spread(costs: list[float], world: int) -> list[list[int]]:
    """The units of work (their indices) each rank trains: the most costly first, each to the rank
    with the least work so far (ties to the lowest rank, then the unit's order). Every rank
    computes the same shares from the same manifest: no communication needed."""
    loads = [0.0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += costs[index]
    return [sorted(share) for share in shares]
