"""``[run] distributed = "data"``: every model trained on every rank, each rank on its shard.

Every rank builds the whole run (the same seeds, the same splits) and trains every stack; what
differs is the data each one sees:

- **Training**: the split is sharded by a seeded ``DistributedSampler`` (``set_epoch`` every
  epoch, from the fold's epoch, so a resumed run draws the same order); a ``[data] sampler``
  is drawn in full on every rank with the same seed and dealt out (:class:`DealtSampler`). Both
  pad the split to a multiple of the world size, so every rank has the same number of batches.
  ``batch_size`` is the batch of one process: the step's batch is ``world * batch_size``.
- **Gradients**: a lone model trains through ``DistributedDataParallel``; a vectorized group,
  whose gradients already lie in one flat tensor, averages that tensor with one all-reduce
  before its optimizer step (the reduction DDP makes, with the group's single bucket).
- **The NaN policy** reads the losses summed over the ranks, and a signal any rank received
  travels in the same all-reduce, so every rank skips, stops, raises or is interrupted at the
  same step and the ranks never part ways; each epoch's stop decisions are rank 0's
  (:func:`follow_rank_0`), each fold starts from rank 0's weights.
- **Evaluation** is sharded without padding (rank ``r`` takes samples ``r, r + world, ...``),
  and each metric's accumulators are merged over the ranks (``merge``) before anything reads
  them: every sample of the validation and test sets is counted once, and every rank sees the
  same scores, so early stopping, the best epoch and the schedulers decide alike everywhere.
  The final test's per-sample predictions are gathered back into the test set's order.

Rank 0 alone writes files (:func:`izitorch.io.discarding` on the others); its resume state
records the world size, and a resume needs the same one (:func:`check_world`).
"""

from __future__ import annotations

import datetime
import io
import math
import signal
from typing import Any

import torch
from torch.utils.data import DistributedSampler, RandomSampler, Sampler

from izitorch.distributed import Ranks
from izitorch.errors import IzitorchError, ManifestError, TrainingError, error_text, first_line
from izitorch.guard import Interrupted

#: How long a rank waits in a step's collective (gradients, the NaN check): a rank that died
#: stops the others after this long even when no launcher stops them.
STEP_TIMEOUT = datetime.timedelta(minutes=30)
#: What a rank adds to the step's all-reduce for the signal it received (a sum tells whether any
#: rank had a SIGTERM, with fewer than 1024 ranks).
STOP_CODES = {signal.SIGINT: 1.0, signal.SIGTERM: 1024.0}


def active(ranks: Ranks) -> bool:
    return ranks.strategy == "data"


def step_group(ranks: Ranks, device: torch.device) -> Ranks:
    """``ranks`` with the group its training steps communicate in (``nccl`` on CUDA, else
    ``gloo``) and the ``gloo`` group its objects travel in (metric accumulators, decisions), both
    timing out after :data:`STEP_TIMEOUT`. Every rank calls this together."""
    import attrs
    import torch.distributed as dist

    objects = dist.new_group(backend="gloo", timeout=STEP_TIMEOUT)
    steps = dist.new_group(backend="nccl", timeout=STEP_TIMEOUT) if device.type == "cuda" else objects
    return attrs.evolve(ranks, steps=steps, objects=objects)


def eval_share(indices: Any, ranks: Ranks) -> Any:
    """This rank's samples of an evaluation split: every ``world``-th from its rank, no padding."""
    return indices[ranks.rank :: ranks.world]


def train_sampler(subset: Any, sampler: Sampler | None, seed: int, shuffle: bool, ranks: Ranks) -> Sampler:
    """This rank's sampler of a training split (see the module docstring)."""
    if sampler is None or isinstance(sampler, RandomSampler):
        return DistributedSampler(subset, num_replicas=ranks.world, rank=ranks.rank, shuffle=shuffle, seed=seed, drop_last=False)
    return DealtSampler(sampler, ranks)


class DealtSampler(Sampler):
    """A sampler drawn in full on every rank (the same generator, the same seed), padded to a
    multiple of the world size with its first positions as ``DistributedSampler`` pads, and
    dealt out: rank ``r`` takes positions ``r, r + world, ...``."""

    def __init__(self, sampler: Any, ranks: Ranks) -> None:
        self.sampler, self.rank, self.world = sampler, ranks.rank, ranks.world

    @property
    def generator(self) -> torch.Generator | None:
        """The dealt sampler's generator (the resume state carries it)."""
        return getattr(self.sampler, "generator", None)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.world)

    def __iter__(self):
        order = list(self.sampler)
        total = len(self) * self.world  # from len(): every rank takes len(self), whatever the sampler yields
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        return iter(order[self.rank :: self.world])


def set_epoch(loader: Any, epoch: int) -> None:
    """Give a training loader's ``DistributedSampler`` the epoch it draws for."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def batches_per_rank(samples: int, run: Any) -> int:
    """How many training batches each rank takes from a split of ``samples``."""
    world = run.ranks.world if active(run.ranks) else 1
    return math.ceil(math.ceil(samples / world) / run.config.run.batch_size)


def agree(losses: torch.Tensor, stop_flag: Any, ranks: Ranks) -> tuple[list[float], int | None]:
    """Each member's loss summed over the ranks (non-finite if it is on any rank) and the signal
    some rank received by now (SIGTERM if any rank had one, else SIGINT), in one all-reduce and
    one read: every rank applies the NaN policy and stops at the same step."""
    import torch.distributed as dist

    own = stop_flag.signum if stop_flag is not None else None
    code = 0.0 if own is None else STOP_CODES.get(own, STOP_CODES[signal.SIGTERM])
    packed = torch.cat([losses.detach().float().reshape(-1), losses.new_full((1,), code, dtype=torch.float32)])  # a new tensor
    collective(lambda: dist.all_reduce(packed, group=ranks.steps), stop_flag)
    values = packed.tolist()
    codes = values.pop()
    if own is not None or codes == 0:
        return values, own
    return values, signal.SIGTERM if codes >= STOP_CODES[signal.SIGTERM] else signal.SIGINT


def average(tensor: torch.Tensor, ranks: Ranks) -> None:
    """``tensor`` replaced by its mean over the ranks, in place."""
    import torch.distributed as dist

    collective(lambda: dist.all_reduce(tensor, group=ranks.steps))
    tensor.div_(ranks.world)


def from_rank_0(tensors: list[torch.Tensor], ranks: Ranks) -> None:
    """Rank 0's values of ``tensors`` (buffers: batch-norm statistics) on every rank, in place."""
    import torch.distributed as dist

    for tensor in tensors:
        collective(lambda tensor=tensor: dist.broadcast(tensor, src=0, group=ranks.steps))


def collective(call: Any, stop_flag: Any = None) -> Any:
    """Run a collective; a peer gone (killed, failed, timed out) is one line, not gloo's or
    NCCL's text, which names a socket rather than a rank, or the interruption this rank received
    meanwhile (a launcher stops every rank: a peer may leave first)."""
    try:
        return call()
    except RuntimeError as error:
        if stop_flag is not None and stop_flag.signum is not None:
            raise Interrupted(stop_flag.signum, "interrupted") from None
        raise TrainingError(
            "the ranks lost each other in the middle of a step: another rank stopped (torchrun's summary names it) or the connection failed "
            f"({first_line(error)}); every finished epoch is saved: run again with --resume"
        ) from None


def exchange(value: Any, ranks: Ranks, device: torch.device, stop_flag: Any = None) -> list[Any]:
    """Every rank's ``value``, in rank order, on this rank's ``device`` (through the gloo group
    of objects; CUDA tensors are mapped to this rank's GPU)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * ranks.world
    collective(lambda: dist.all_gather_object(gathered, packed(value), group=ranks.objects), stop_flag)
    return [unpacked(data, device) for data in gathered]


def packed(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def unpacked(data: bytes, device: torch.device) -> Any:
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def follow_rank_0(fold: Any, ranks: Ranks, stop_flag: Any = None) -> None:
    """Rank 0's decisions of the epoch on every rank: whether the fold stops and which models
    stopped. Scores are merged, but a plugin may decide on what differs between ranks (a time
    budget); the ranks must go on alike."""
    import torch.distributed as dist

    decisions = [(fold.stop_reason, [slot.stopped for slot in fold.slots])]
    collective(lambda: dist.broadcast_object_list(decisions, src=0, group=ranks.objects), stop_flag)
    fold.stop_reason, stopped = decisions[0]
    for slot, reason in zip(fold.slots, stopped):
        slot.stopped = reason


def from_rank_0_weights(stacks: list[Any], ranks: Ranks) -> None:
    """Every model's weights and buffers as rank 0 holds them, on every rank (once a fold's
    models are reset or restored: a model built with unseeded randomness starts alike)."""
    tensors = [t for stack in stacks for slot in stack.members for t in (*slot.model.parameters(), *slot.model.buffers())]
    with torch.no_grad():
        from_rank_0([t.data for t in tensors], ranks)


def merge_meters(meters: list[Any], ranks: Ranks, device: torch.device, stop_flag: Any = None) -> None:
    """Each metric's accumulators as if one process had counted every rank's samples: rank 0's,
    merged with rank 1's, then rank 2's... in that order on every rank, so that every rank
    computes bit for bit the same values."""
    # an accumulator's attributes travel, not the object: its class may be made at run time (top-k)
    mine = []
    for reported in meters:
        try:
            mine.append(packed(vars(reported.meter)))
        except Exception as error:
            raise TrainingError(
                f'metric "{reported.name}": its accumulator cannot be sent to the other ranks ({error_text(error)}); keep tensors and plain values in it'
            ) from None
    states = exchange(mine, ranks, torch.device("cpu"), stop_flag)
    for index, reported in enumerate(meters):
        kind = type(reported.meter)
        merged = rebuilt(kind, unpacked(states[0][index], device))
        for other in states[1:]:
            try:
                merged.merge(rebuilt(kind, unpacked(other[index], device)))
            except IzitorchError:
                raise
            except Exception as error:
                raise TrainingError(f'metric "{reported.name}": merge raised {error_text(error)}') from None
        reported.meter = merged


def rebuilt(kind: type, attributes: dict[str, Any]) -> Any:
    """An accumulator of class ``kind`` holding ``attributes`` (another rank's)."""
    meter = object.__new__(kind)
    vars(meter).update(attributes)
    return meter


def gather_predictions(recorded: list[dict[str, Any]], ranks: Ranks, stop_flag: Any = None) -> list[dict[str, Any]]:
    """The final test's per-sample predictions of every rank, back in the test set's order
    (rank ``r`` holds samples ``r, r + world, ...``)."""
    parts = exchange(recorded, ranks, torch.device("cpu"), stop_flag)
    nothing = {key: torch.empty(0, dtype=torch.long) for key in ("target", "predicted")}  # a rank without test samples
    gathered = []
    for k in range(len(recorded)):
        found = [part[k].get("predictions") for part in parts]
        if all(piece is None for piece in found):
            gathered.append({})
            continue
        pieces = [nothing if piece is None else piece for piece in found]
        total = sum(len(piece["target"]) for piece in pieces)
        merged = {}
        for key in ("target", "predicted"):
            values = torch.empty(total, dtype=pieces[0][key].dtype)
            for rank, piece in enumerate(pieces):
                values[rank :: ranks.world] = piece[key]
            merged[key] = values
        gathered.append({"predictions": merged})
    return gathered


def check_metrics(factories: dict[str, Any]) -> None:
    """Refuse, in one line, a metric whose accumulators cannot be merged over the ranks (no
    ``merge``, or a ``merge_problem()`` that names one)."""
    for name, factory in factories.items():
        problem = None
        if not hasattr(factory, "names") or not callable(getattr(factory, "merge", None)):
            problem = "its accumulator has no merge(other) method"
        elif callable(getattr(factory, "merge_problem", None)):
            problem = factory.merge_problem()
        if problem:
            raise ManifestError(
                f'metric "{name}" cannot be merged over the ranks ({problem}), and distributed = "data" counts each rank\'s samples apart: '
                'give it merge(), disable the plugin that registers it, or use distributed = "models"',
                "run.distributed",
            )


def check_world(state: dict, ranks: Ranks, source: str) -> None:
    """A data-parallel run resumes with the world size it was trained with; another run does not
    resume data-parallel."""
    saved, now = state.get("data_parallel"), ranks.world if active(ranks) else None
    if saved == now:
        return
    if saved is None:
        how = 'this run was trained in one process, not with distributed = "data"; resume it as it ran: without torchrun'
    else:
        how = f'this run was trained data-parallel on {saved} processes; resume it with torchrun and {saved} processes in all (distributed = "data")'
    raise IzitorchError(f"cannot resume: {how}", "run.distributed", source)
