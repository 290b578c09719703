"""Vectorized members' checkpoints built from one copy of the group (izitorch/ensemble/snapshots.py).

The reference is the member's checkpoint copied tensor by tensor at the same moment
(``izitorch.plugins.checkpoint.checkpoint``, as every lone model's is): the built one must be the
same dict, key for key and in the same order, with the same tensors, each owning its memory,
however the group trains after the moment.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from izitorch.ensemble import VectorGroup
from izitorch.ensemble.snapshots import Template
from izitorch.models import SmallCNN
from izitorch.plugins.checkpoint import Moment, checkpoint

from test_ensemble import OPTIMIZERS, mlp, train_group, twin_slots


def assert_same(built, reference, where: str = "checkpoint") -> None:
    """Equal types, keys in the same order, values, tensors (dtype, shape, values) that own their memory."""
    assert type(built) is type(reference), where
    if isinstance(reference, torch.Tensor):
        assert built.device == reference.device == torch.device("cpu"), where
        assert built.dtype == reference.dtype and built.shape == reference.shape and torch.equal(built, reference), where
        assert built.untyped_storage().nbytes() == built.nbytes, f"{where}: a view of a larger tensor"
    elif isinstance(reference, dict):
        assert list(built) == list(reference), where
        assert getattr(built, "_metadata", None) == getattr(reference, "_metadata", None), where
        for key in reference:
            assert_same(built[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, (list, tuple)):
        assert len(built) == len(reference), where
        for index, (a, b) in enumerate(zip(built, reference)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert built == reference, where


def fold_of(group: VectorGroup):
    """What Moment reads of a fold: its cohort's stacks (one vector stack here)."""
    stack = SimpleNamespace(vectorized=True, members=list(group.slots), group=group)
    return SimpleNamespace(cohort=SimpleNamespace(stacks=[stack]), slots=list(group.slots))


SCHEDULERS = [lambda o, k=k: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5 + 0.1 * k) for k in range(4)]


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd-dampening", "sgd-plain-sweep", "adam-sweep"])
@pytest.mark.parametrize("factory", [mlp, lambda: SmallCNN(batch_norm=True, channels=4)], ids=["mlp", "cnn-bn"])
def test_a_built_checkpoint_is_the_one_copied_at_its_moment(kind, factory):
    _, slots = twin_slots(factory, OPTIMIZERS[kind], SCHEDULERS)
    group = VectorGroup(slots)
    train_group(group, epochs=1, active=lambda step: [True, True, True, False])  # the last member never steps: no state
    moment = Moment(fold_of(group), {})
    references = [checkpoint(slot, 1) for slot in slots]
    builds = [moment.checkpoint(slot, 1)[0] for slot in slots]
    train_group(group, epochs=1)  # the weights, moments, lr and steps move on: the builds keep the moment's
    for k, (build, reference) in enumerate(zip(builds, references)):
        assert_same(build(), reference, f"member {k}")
    assert references[3]["optimizer"]["state"] == {} and references[0]["optimizer"]["state"] or kind == "sgd-plain-sweep"


def test_a_built_checkpoint_loads_into_a_lone_model_and_optimizer():
    _, slots = twin_slots(mlp, OPTIMIZERS["adam"])
    group = VectorGroup(slots)
    train_group(group, epochs=1)
    build, size = Moment(fold_of(group), {}).checkpoint(slots[2], 1)
    buffer = io.BytesIO()
    torch.save(build(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model = mlp()
    model.load_state_dict(saved["state_dict"])
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(saved["optimizer"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), slots[2].model.state_dict().values()))
    assert optimizer.param_groups[0]["lr"] == slots[2].optimizer.param_groups[0]["lr"]
    assert size == sum(t.nbytes for t in (*saved["state_dict"].values(), *(v for s in saved["optimizer"]["state"].values() for v in s.values())))


class WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def forward(self, x):
        return self.layer(x)

    def get_extra_state(self):
        return {"note": "kept"}

    def set_extra_state(self, state) -> None:
        pass


def test_a_member_whose_state_holds_more_is_copied_as_a_lone_models_is():
    _, slots = twin_slots(WithExtraState, OPTIMIZERS["adam"])
    group = VectorGroup(slots)
    assert Template.of(group) is None
    train_group(group, epochs=1)
    moment = Moment(fold_of(group), {})
    build, _ = moment.checkpoint(slots[1], 1)
    assert moment.templates == {id(group): None}
    reference = checkpoint(slots[1], 1)
    assert_same(build(), reference)
    assert build()["state_dict"]["_extra_state"] == {"note": "kept"}


def test_a_member_whose_optimizer_state_dict_has_hooks_is_copied_whole():
    _, slots = twin_slots(mlp, OPTIMIZERS["adam"])
    slots[2].optimizer.register_state_dict_post_hook(lambda optimizer, state: state.update(note="added"))
    group = VectorGroup(slots)
    train_group(group, epochs=1)
    moment = Moment(fold_of(group), {})
    build, _ = moment.checkpoint(slots[2], 1)
    assert moment.templates == {id(group): None}
    assert build()["optimizer"]["note"] == "added"
