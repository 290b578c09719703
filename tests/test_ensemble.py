"""Vectorized groups train each member exactly as a plain PyTorch loop trains it alone."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

from izitorch.datasets import digits
from izitorch.ensemble import StackedOptimizer, VectorGroup, group_slots, standalone
from izitorch.errors import IzitorchError
from izitorch.models import MLP, SmallCNN
from izitorch.state import Slot

ATOL = 1e-5
K = 4
EPOCHS = 3
_DATA = digits(limit=300).tensors
# A fixed batch order: 10 batches of 30 per epoch, the same for the group and the plain loops.
BATCHES = [(_DATA[0][i : i + 30], _DATA[1][i : i + 30]) for i in range(0, 300, 30)]


def make_slot(
    name: str,
    seed: int,
    model_factory: Callable[[], nn.Module],
    optimizer_factory: Callable,
    scheduler_factory: Callable | None = None,
    criterion: nn.Module | None = None,
) -> Slot:
    torch.manual_seed(seed)
    model = model_factory()
    optimizer = optimizer_factory(model.parameters())
    scheduler = scheduler_factory(optimizer) if scheduler_factory else None
    slot = Slot(name, None, model, criterion or nn.CrossEntropyLoss(), optimizer, scheduler)
    slot.snapshot_initial_state()
    return slot


def twin_slots(model_factory, optimizer_factories, scheduler_factories=None) -> tuple[list[Slot], list[Slot]]:
    """Two identical sets of slots (same seeds, same hyper-parameters): one per training style."""
    scheduler_factories = scheduler_factories or [None] * len(optimizer_factories)
    return tuple(
        [make_slot(f"m{k}", 100 + k, model_factory, opt, sched) for k, (opt, sched) in enumerate(zip(optimizer_factories, scheduler_factories))]
        for _ in range(2)
    )


def train_plain(slots: list[Slot], epochs: int = EPOCHS, active: Callable | None = None, clip: float | None = None) -> None:
    """The reference: each model stepped alone by its own torch optimizer."""
    step = 0
    for _ in range(epochs):
        for x, y in BATCHES:
            for k, slot in enumerate(slots):
                slot.model.train()
                slot.optimizer.zero_grad()
                slot.criterion(slot.model(x), y).backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_value_(slot.model.parameters(), clip)
                if active is None or active(step)[k]:
                    slot.optimizer.step()
            step += 1
        for slot in slots:
            if slot.scheduler is not None:
                slot.scheduler.step()


def train_group(group: VectorGroup, epochs: int = EPOCHS, active: Callable | None = None, clip: float | None = None) -> None:
    step = 0
    for _ in range(epochs):
        for x, y in BATCHES:
            group.train(True)
            group.zero_grad()
            group.backward(group.losses(group.forward(x), y))
            if clip is not None:
                for k in range(len(group)):
                    for grad in group.member_grads(k):
                        grad.clamp_(-clip, clip)
            group.step(None if active is None else torch.tensor(active(step)))
            step += 1
        for slot in group.slots:
            if slot.scheduler is not None:
                slot.scheduler.step()


def max_state_diff(a: object, b: object) -> float:
    """Largest difference between two nested states; structure and non-tensor values must match."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (sorted(map(str, a)), sorted(map(str, b)))
        return max([max_state_diff(a[k], b[k]) for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        return max([max_state_diff(x, y) for x, y in zip(a, b)], default=0.0)
    assert a == b, (a, b)
    return 0.0


def max_slot_diff(left: list[Slot], right: list[Slot]) -> tuple[float, float]:
    weights = max(max_state_diff(a.model.state_dict(), b.model.state_dict()) for a, b in zip(left, right))
    optim = max(max_state_diff(a.optimizer.state_dict(), b.optimizer.state_dict()) for a, b in zip(left, right))
    return weights, optim


def mlp() -> nn.Module:
    return MLP(hidden=16)


OPTIMIZERS = {
    "sgd-nesterov": [
        lambda p, k=k: torch.optim.SGD(p, lr=0.05 * (k + 1), momentum=(0.9, 0.5, 0.8, 0.7)[k], nesterov=True, weight_decay=(0.0, 1e-3, 1e-2, 5e-2)[k])
        for k in range(K)
    ],
    "sgd-dampening": [
        lambda p, k=k: torch.optim.SGD(
            p, lr=0.05 * (k + 1), momentum=(0.9, 0.0, 0.5, 0.3)[k], dampening=(0.0, 0.1, 0.2, 0.5)[k], weight_decay=(0.0, 1e-3, 0.0, 1e-2)[k]
        )
        for k in range(K)
    ],
    "adam": [
        lambda p, k=k: torch.optim.Adam(
            p,
            lr=(1e-3, 3e-3, 1e-2, 2e-2)[k],
            betas=((0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.999))[k],
            eps=(1e-8, 1e-6, 1e-8, 1e-4)[k],
            weight_decay=(0.0, 1e-2, 1e-3, 0.1)[k],
        )
        for k in range(K)
    ],
    "adamw": [
        lambda p, k=k: torch.optim.AdamW(
            p, lr=(1e-3, 3e-3, 1e-2, 2e-2)[k], betas=((0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.999))[k], weight_decay=(0.0, 1e-2, 0.1, 0.5)[k]
        )
        for k in range(K)
    ],
    # members that share betas and eps (SGD: momentum, dampening) take torch's fused kernels
    # (CPU); their lrs may differ
    "adam-sweep": [lambda p, k=k: torch.optim.Adam(p, lr=(1e-3, 3e-3, 1e-2, 2e-2)[k], betas=(0.8, 0.99)) for k in range(K)],
    "adam-shared-l2": [lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, eps=1e-6) for _ in range(K)],
    "adamw-sweep": [lambda p, k=k: torch.optim.AdamW(p, lr=(1e-3, 3e-3, 1e-2, 2e-2)[k], weight_decay=(0.0, 1e-2, 0.1, 0.5)[k]) for k in range(K)],
    "sgd-sweep": [lambda p, k=k: torch.optim.SGD(p, lr=0.02 * (k + 1), momentum=0.9, nesterov=True) for k in range(K)],
    "sgd-shared-l2": [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.1, weight_decay=1e-2) for _ in range(K)],
    "sgd-plain-sweep": [lambda p, k=k: torch.optim.SGD(p, lr=0.05 * (k + 1)) for k in range(K)],
}
FUSED = {"adam-sweep", "adam-shared-l2", "adamw-sweep", "sgd-sweep", "sgd-shared-l2", "sgd-plain-sweep"}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_group_matches_sequential_training(kind: str) -> None:
    plain, grouped = twin_slots(mlp, OPTIMIZERS[kind])
    assert max_state_diff(plain[0].model.state_dict(), plain[1].model.state_dict()) > 0.01  # different initial weights
    group = VectorGroup(grouped)
    train_plain(plain)
    train_group(group)
    assert (group.optimizer._fused is not None) == (kind in FUSED)
    weights, optim = max_slot_diff(plain, grouped)
    assert weights < ATOL and optim < ATOL
    moved = max_state_diff(plain[0].model.state_dict(), make_slot("x", 100, mlp, OPTIMIZERS[kind][0]).model.state_dict())
    assert moved > 0.01  # it did train


@pytest.mark.parametrize("kind", ["adamw-sweep", "sgd-sweep"])
def test_the_fused_and_elementwise_steps_agree(kind: str, monkeypatch) -> None:
    fused, elementwise = twin_slots(mlp, OPTIMIZERS[kind])
    fused_group = VectorGroup(fused)
    monkeypatch.setattr(StackedOptimizer, "use_fused", False)
    elementwise_group = VectorGroup(elementwise)
    assert fused_group.optimizer._fused is not None and elementwise_group.optimizer._fused is None
    train_group(fused_group, epochs=1)
    train_group(elementwise_group, epochs=1)
    assert max(max_slot_diff(fused, elementwise)) < 1e-6


# SmallCNN's convolution biases feed BatchNorm, so their true gradient is zero and what the
# backward computes is rounding noise (~1e-8) that differs between the batched and the plain
# kernels. Adam divides it by sqrt(v) + eps and turns it into steps of size lr when eps is tiny:
# with eps >= 1e-2 the noise stays noise and the comparison is meaningful.
BN_OPTIMIZERS = {
    "adam": [
        lambda p, k=k: torch.optim.Adam(
            p,
            lr=(1e-3, 3e-3, 1e-2, 2e-2)[k],
            betas=((0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.999))[k],
            eps=(1e-2, 2e-2, 1e-2, 5e-2)[k],
            weight_decay=(0.0, 1e-2, 1e-3, 0.1)[k],
        )
        for k in range(K)
    ],
    "sgd-nesterov": OPTIMIZERS["sgd-nesterov"],
}


@pytest.mark.parametrize("kind", list(BN_OPTIMIZERS))
def test_batch_norm_running_stats_are_per_member(kind: str) -> None:
    factory = lambda: SmallCNN(batch_norm=True, channels=4)  # noqa: E731
    plain, grouped = twin_slots(factory, BN_OPTIMIZERS[kind])
    group = VectorGroup(grouped)
    train_plain(plain, epochs=2)
    train_group(group, epochs=2)
    weights, optim = max_slot_diff(plain, grouped)
    assert weights < ATOL and optim < ATOL
    stats = [slot.model.features[1].running_mean for slot in grouped]
    assert (stats[0] - stats[1]).abs().max() > 1e-3  # per member, not shared
    assert int(grouped[2].model.features[1].num_batches_tracked) == 2 * len(BATCHES)
    # the member's module buffers are views of the stacked buffers the group updates
    assert grouped[1].model.features[1].running_var.data_ptr() == group.buffers["features.1.running_var"][1].data_ptr()
    # evaluation mode uses each member's own running statistics
    group.train(False)
    x = BATCHES[0][0]
    with torch.no_grad():
        outputs = group.forward(x)
        for k, slot in enumerate(plain):
            slot.model.eval()
            assert torch.allclose(outputs[k], slot.model(x), atol=ATOL)


# adam-shared-l2 starts on the fused kernel (one lr) and leaves it when the lrs part (L2 decay)
@pytest.mark.parametrize("kind, fused_at_end", [("adam", False), ("adam-sweep", True), ("adam-shared-l2", False)])
def test_each_member_scheduler_drives_its_own_lr(kind: str, fused_at_end: bool) -> None:
    schedulers = [lambda o, k=k: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=(0.5, 0.9, 0.1, 1.0)[k]) for k in range(K)]
    plain, grouped = twin_slots(mlp, OPTIMIZERS[kind], schedulers)
    group = VectorGroup(grouped)
    assert (group.optimizer._fused is not None) == (kind in FUSED)
    train_plain(plain)
    train_group(group)
    assert (group.optimizer._fused is not None) == fused_at_end
    weights, optim = max_slot_diff(plain, grouped)
    assert weights < ATOL and optim < ATOL
    assert grouped[2].optimizer.param_groups[0]["lr"] == pytest.approx(grouped[2].optimizer.defaults["lr"] * 0.1**EPOCHS)


def test_dropout_masks_differ_per_member() -> None:
    factory = lambda: MLP(hidden=16, dropout=0.5)  # noqa: E731
    slots = [make_slot(f"d{k}", 7, factory, lambda p: torch.optim.SGD(p, lr=0.1)) for k in range(2)]  # identical weights
    group = VectorGroup(slots)
    x = BATCHES[0][0]
    group.train(True)
    out = group.forward(x)
    assert out.shape == (2, 30, 10)
    assert (out[0] - out[1]).abs().max() > 1e-3
    group.train(False)
    out = group.forward(x)
    assert torch.equal(out[0], out[1])
    assert torch.allclose(out[0], slots[0].model(x), atol=1e-6)


@pytest.mark.parametrize("kind", ["adam", "adamw-sweep", "sgd-dampening", "sgd-sweep"])
def test_inactive_members_are_not_updated(kind: str) -> None:
    def active(step: int) -> list[bool]:
        return [True, not 3 <= step < 7, step >= 2, step % 4 != 1]

    plain, grouped = twin_slots(mlp, OPTIMIZERS[kind])
    group = VectorGroup(grouped)
    train_plain(plain, epochs=1, active=active)
    train_group(group, epochs=1, active=active)
    weights, optim = max_slot_diff(plain, grouped)
    assert weights < ATOL and optim < ATOL

    # a NaN gradient in an inactive row changes nothing, and does not leak into the others
    before = [standalone(s.model.state_dict()) for s in grouped], [standalone(s.optimizer.state_dict()) for s in grouped]
    group.zero_grad()
    group.backward(group.losses(group.forward(BATCHES[0][0]), BATCHES[0][1]))
    group.member_grads(1)[0].fill_(float("nan"))
    group.step(torch.tensor([False, False, True, False]))
    for k in (0, 1, 3):
        assert max_state_diff(before[0][k], grouped[k].model.state_dict()) == 0.0
        assert max_state_diff(before[1][k], grouped[k].optimizer.state_dict()) == 0.0
    assert torch.isfinite(group.flat).all()
    assert max_state_diff(before[0][2], grouped[2].model.state_dict()) > 0


def test_member_grads_are_views_for_per_member_clipping() -> None:
    plain, grouped = twin_slots(mlp, OPTIMIZERS["sgd-nesterov"])
    group = VectorGroup(grouped)
    group.zero_grad()
    group.backward(group.losses(group.forward(BATCHES[0][0]), BATCHES[0][1]))
    grads = group.member_grads(2)
    assert [g.data_ptr() for g in grads] == [g.data_ptr() for g in grouped[2].grads()]  # Slot.grads() too
    grads[0].clamp_(-1e-4, 1e-4)
    assert group.params[group.param_names[0]].grad[2].abs().max() <= 1e-4
    assert group.params[group.param_names[0]].grad[1].abs().max() > 1e-4  # only member 2 clipped
    group.zero_grad()

    train_plain(plain, epochs=1, clip=0.02)
    train_group(group, epochs=1, clip=0.02)
    weights, optim = max_slot_diff(plain, grouped)
    assert weights < ATOL and optim < ATOL


def test_member_modules_are_views_of_the_group() -> None:
    _, grouped = twin_slots(mlp, OPTIMIZERS["adam"])
    group = VectorGroup(grouped)
    train_group(group, epochs=1)
    x = BATCHES[0][0]
    with torch.no_grad():
        outputs = group.forward(x)
    state = grouped[1].model.state_dict()
    assert torch.equal(state["net.0.weight"], group.params["net.0.weight"][1])
    fresh = mlp()  # a member's state dict loads into a fresh instance and computes the same
    fresh.load_state_dict(standalone(state))
    assert torch.allclose(fresh(x), outputs[1], atol=1e-6)
    # loading into the member writes into the stacked tensors, in place
    other = mlp().state_dict()
    grouped[1].model.load_state_dict(other)
    assert torch.equal(group.params["net.2.bias"][1], other["net.2.bias"])
    assert not torch.equal(group.params["net.2.bias"][0], other["net.2.bias"])
    # standalone() copies own their memory: a checkpoint holds one member, not the group
    saved = standalone(grouped[1].optimizer.state_dict())
    exp_avg = saved["state"][0]["exp_avg"]
    assert exp_avg.untyped_storage().nbytes() == exp_avg.numel() * exp_avg.element_size()


def test_reset_and_resume_through_sync() -> None:
    plain, grouped = twin_slots(mlp, OPTIMIZERS["adamw"])
    group = VectorGroup(grouped)
    train_group(group, epochs=1)
    for slot in grouped:  # as at the start of the next fold
        slot.reset()
    group.sync_from_members()
    assert all(not slot.optimizer.state for slot in grouped)
    train_plain(plain)
    train_group(group)
    weights, optim = max_slot_diff(plain, grouped)
    assert weights < ATOL and optim < ATOL

    # resume: saved member states loaded back, then sync, continue as if never interrupted
    saved = [(standalone(s.model.state_dict()), standalone(s.optimizer.state_dict())) for s in grouped]
    train_group(group, epochs=1)
    reference = [(standalone(s.model.state_dict()), standalone(s.optimizer.state_dict())) for s in grouped]
    for slot, (model_state, optimizer_state) in zip(grouped, saved):
        slot.model.load_state_dict(model_state)
        slot.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    group.sync_from_members()
    train_group(group, epochs=1)
    for slot, (model_state, optimizer_state) in zip(grouped, reference):
        assert max_state_diff(model_state, slot.model.state_dict()) < 1e-6
        assert max_state_diff(optimizer_state, slot.optimizer.state_dict()) < 1e-6
    train_plain(plain, epochs=1)
    assert max(max_slot_diff(plain, grouped)) < ATOL


def test_group_slots_partitions_and_explains() -> None:
    adam = lambda lr: lambda p: torch.optim.Adam(p, lr=lr)  # noqa: E731
    slots = [
        make_slot("mlp_a", 1, mlp, adam(1e-3)),
        make_slot("mlp_b", 2, mlp, adam(1e-2)),
        make_slot("mlp32", 3, lambda: MLP(hidden=32), adam(1e-3)),
        make_slot("cnn", 4, lambda: SmallCNN(channels=4), lambda p: torch.optim.RMSprop(p, lr=1e-3)),
        make_slot("cnn_sgd", 5, lambda: SmallCNN(channels=8), lambda p: torch.optim.SGD(p, lr=0.1)),
        make_slot("cnn_adam", 6, lambda: SmallCNN(channels=8), adam(1e-3)),
        make_slot("mlp_drop", 7, lambda: MLP(hidden=16, dropout=0.2), adam(1e-3)),
        make_slot("mlp_smooth", 8, mlp, adam(1e-3), criterion=nn.CrossEntropyLoss(label_smoothing=0.1)),
    ]
    groups, sequential, reasons = group_slots(slots)
    assert [g.names for g in groups] == [["mlp_a", "mlp_b"]]
    assert [s.name for s in sequential] == ["mlp32", "cnn", "cnn_sgd", "cnn_adam", "mlp_drop", "mlp_smooth"]
    assert len(reasons) == len(sequential)
    by_name = dict(zip([s.name for s in sequential], reasons))
    assert by_name["mlp32"] == "mlp32: no other model with the same architecture"
    assert by_name["cnn"] == "cnn: optimizer RMSprop is not vectorized (SGD, Adam, AdamW are)"
    assert "optimizer SGD differs from cnn_adam's Adam" in by_name["cnn_sgd"]
    assert "optimizer Adam differs from cnn_sgd's SGD" in by_name["cnn_adam"]
    assert by_name["mlp_drop"].startswith("mlp_drop: no other")  # dropout rate is part of the architecture
    assert "criterion CrossEntropyLoss is configured unlike" in by_name["mlp_smooth"]

    # same architecture, SGD and Adam, two of each: two separate groups
    pairs = [make_slot(f"{kind}{i}", i, mlp, (lambda p: torch.optim.SGD(p, lr=0.1)) if kind == "s" else adam(1e-3)) for kind in "sa" for i in range(2)]
    groups, sequential, reasons = group_slots(pairs)
    assert [g.names for g in groups] == [["s0", "s1"], ["a0", "a1"]] and not sequential and not reasons


def test_a_sweep_of_sixteen_learning_rates_is_one_group() -> None:
    lrs = torch.logspace(-4, -1, 16).tolist()
    make = lambda: [make_slot(f"lr{i}", 0, mlp, lambda p, lr=lr: torch.optim.Adam(p, lr=lr)) for i, lr in enumerate(lrs)]  # noqa: E731
    slots, plain = make(), make()
    groups, sequential, reasons = group_slots(slots)
    assert len(groups) == 1 and len(groups[0]) == 16 and not sequential and not reasons
    train_group(groups[0], epochs=1)
    train_plain(plain, epochs=1)
    assert max(max_slot_diff(plain, slots)) < ATOL


@pytest.mark.parametrize(
    "criterion, target",
    [
        (nn.CrossEntropyLoss(), BATCHES[0][1]),
        (nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.2), BATCHES[0][1]),
        (nn.CrossEntropyLoss(ignore_index=3), BATCHES[0][1]),
        (nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2, 10)), BATCHES[0][1]),  # falls back to vmap
        (nn.MSELoss(), torch.randn(30, 10)),
        (nn.L1Loss(reduction="sum"), torch.randn(30, 10)),
        (nn.SmoothL1Loss(), torch.randn(30, 10)),  # falls back to vmap
    ],
)
def test_losses_equal_each_member_criterion(criterion: nn.Module, target: torch.Tensor) -> None:
    slots = [make_slot(f"c{k}", k, mlp, lambda p: torch.optim.SGD(p, lr=0.1), criterion=copy.deepcopy(criterion)) for k in range(3)]
    group = VectorGroup(slots)
    x = BATCHES[0][0]
    losses = group.losses(group.forward(x), target)
    assert losses.shape == (3,)
    for k, slot in enumerate(slots):
        assert torch.allclose(losses[k], slot.criterion(slot.model(x), target), atol=1e-6)


def test_forward_leaves_stopped_members_buffers_alone() -> None:
    factory = lambda: SmallCNN(batch_norm=True, channels=4)  # noqa: E731
    slots = [make_slot(f"b{k}", k, factory, lambda p: torch.optim.SGD(p, lr=0.1)) for k in range(3)]
    group = VectorGroup(slots)
    before = [standalone(slot.model.state_dict()) for slot in slots]
    group.train(True)
    group.forward(BATCHES[0][0], active=torch.tensor([True, False, True]))
    assert max_state_diff(before[1], slots[1].model.state_dict()) == 0.0  # a stopped model is not run
    assert int(slots[0].model.features[1].num_batches_tracked) == 1
    assert max_state_diff(before[2], slots[2].model.state_dict()) > 0


def test_models_with_hooks_are_not_grouped() -> None:
    slots = [make_slot(f"h{k}", k, mlp, lambda p: torch.optim.Adam(p)) for k in range(3)]
    slots[2].model.net[0].register_forward_hook(lambda module, args, output: None)
    groups, sequential, reasons = group_slots(slots)
    assert [g.names for g in groups] == [["h0", "h1"]]
    assert reasons == ["h2: module 'net.0' has hooks (_forward_hooks)"]
    with pytest.raises(IzitorchError, match="h2 cannot be vectorized"):
        VectorGroup(slots[1:])


# -- the batched-matmul forward of plain Linear stacks ------------------------------------------


class Wrapped(nn.Module):
    """An MLP behind a custom forward that izitorch cannot read: it must keep the vmap path."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MLP(hidden=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 2.0


@pytest.mark.parametrize(
    "factory",
    [
        lambda: MLP(hidden=16, layers=2),
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Sequential(nn.Linear(12, 12, bias=False), nn.GELU()), nn.Linear(12, 10)),
    ],
)
def test_plain_stacks_take_the_batched_matmul_path_and_match_vmap(factory, monkeypatch) -> None:
    """Outputs and gradients of the baddbmm forward equal those of vmap(functional_call)."""
    slots = [make_slot(f"p{k}", 30 + k, factory, lambda p: torch.optim.SGD(p, lr=0.1)) for k in range(3)]
    group = VectorGroup(slots)
    assert group._plain is not None
    x, y = BATCHES[0]
    calls = []
    real = group._vforward
    monkeypatch.setattr(group, "_vforward", lambda *a: calls.append(1) or real(*a))
    fast = group.forward(x)
    assert calls == []  # the plain path answered
    group.backward(group.losses(fast, y))
    fast_grads = group.flat_grad.clone()
    group.zero_grad()
    monkeypatch.setattr(group, "_plain", None)
    slow = group.forward(x)
    group.backward(group.losses(slow, y))
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grads, group.flat_grad, rtol=1e-5, atol=1e-6)
    for k, slot in enumerate(slots):  # and each member's own module computes the same
        torch.testing.assert_close(fast[k], slot.model(x), rtol=1e-5, atol=1e-6)


def test_other_models_and_inputs_keep_the_vmap_path() -> None:
    for factory in (Wrapped, lambda: SmallCNN(channels=2)):
        slots = [make_slot(f"w{k}", k, factory, lambda p: torch.optim.SGD(p, lr=0.1)) for k in range(2)]
        assert VectorGroup(slots)._plain is None
    slots = [make_slot(f"m{k}", k, lambda: MLP(hidden=8), lambda p: torch.optim.SGD(p, lr=0.1)) for k in range(2)]
    group = VectorGroup(slots)
    assert group._plain is not None
    images = BATCHES[0][0].reshape(30, 1, 8, 8)  # Flatten makes it 2-D: still the plain path
    torch.testing.assert_close(group.forward(images)[1], slots[1].model(images), rtol=1e-5, atol=1e-6)
    assert group._plain(group.params, BATCHES[0][0][0], 2) is None  # a 1-D input: not a batch, vmap decides


@pytest.mark.parametrize(
    "criterion, target",
    [
        (nn.CrossEntropyLoss(), BATCHES[0][1]),
        (nn.CrossEntropyLoss(reduction="sum"), BATCHES[0][1]),
        (nn.CrossEntropyLoss(ignore_index=3), BATCHES[0][1]),
        (nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2, 10), label_smoothing=0.1), BATCHES[0][1]),
        (nn.MSELoss(), torch.randn(30, 10)),
        (nn.L1Loss(reduction="sum"), torch.randn(30, 10)),
    ],
)
def test_masked_losses_equal_each_member_criterion_on_its_own_samples(criterion: nn.Module, target: torch.Tensor) -> None:
    """Parallel folds' loss: member k's criterion over the samples mask[k] selects, nothing else."""
    slots = [make_slot(f"c{k}", k, mlp, lambda p: torch.optim.SGD(p, lr=0.1), criterion=copy.deepcopy(criterion)) for k in range(3)]
    group = VectorGroup(slots)
    x = BATCHES[0][0]
    mask = torch.rand(3, 30, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[2] = False  # a member with no sample in the batch: loss 0
    losses = group.losses(group.forward(x), target, mask)
    for k in range(2):
        expected = slots[k].criterion(slots[k].model(x)[mask[k]], target[mask[k]])
        torch.testing.assert_close(losses[k], expected, rtol=1e-5, atol=1e-6)
    assert losses[2].item() == 0.0
    group.backward(losses)  # the group's own backward (no layout warning)
    assert torch.count_nonzero(group.member_grads(2)[0]) == 0


class FrozenDropoutMLP(MLP):
    """A model whose own ``train`` keeps its dropout off: the group must go through it."""

    def train(self, mode: bool = True) -> "FrozenDropoutMLP":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        return self


@pytest.mark.parametrize("factory", [lambda: MLP(hidden=16, dropout=0.5), lambda: FrozenDropoutMLP(hidden=16, dropout=0.5)])
def test_group_train_sets_every_members_modes_as_model_train_does(factory) -> None:
    _, grouped = twin_slots(factory, OPTIMIZERS["adam"])
    reference = factory()
    group = VectorGroup(grouped)
    for mode in (False, True, False, True):
        group.train(mode)
        reference.train(mode)
        expected = [module.training for module in reference.modules()]
        for slot in grouped:
            assert [module.training for module in slot.model.modules()] == expected
        assert [module.training for module in group._base.modules()] == expected
    with pytest.raises(ValueError, match="expected to be boolean"):
        group.train(0)


def test_a_members_resume_entry_keeps_the_hyper_parameters_that_moved() -> None:
    """Only what moved from the initial snapshot (a slot built without one saves them all)."""
    from izitorch.resume import slot_state

    _, grouped = twin_slots(mlp, OPTIMIZERS["adam"])
    slot = grouped[1]
    assert slot_state(slot, grouped=True)["optimizer"]["param_groups"] == [{}]
    slot.optimizer.param_groups[0]["lr"] = 0.5
    slot.optimizer.param_groups[0]["lr_tensor"] = torch.tensor(0.5)  # a key the snapshot lacks is kept
    saved = slot_state(slot, grouped=True)["optimizer"]["param_groups"]
    assert saved[0].keys() == {"lr", "lr_tensor"} and saved[0]["lr"] == 0.5
    # a tensor hyper-parameter is compared by value: kept once a scheduler changed it in place
    tensor_lr = make_slot("t", 0, mlp, lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01)))
    assert slot_state(tensor_lr, grouped=True)["optimizer"]["param_groups"] == [{}]
    tensor_lr.optimizer.param_groups[0]["lr"].fill_(0.005)
    assert torch.equal(slot_state(tensor_lr, grouped=True)["optimizer"]["param_groups"][0]["lr"], torch.tensor(0.005))
    bare = Slot("bare", None, slot.model, slot.criterion, slot.optimizer)  # never snapshotted
    everything = {k: v for k, v in slot.optimizer.param_groups[0].items() if k != "params"}
    assert slot_state(bare, grouped=True)["optimizer"]["param_groups"][0].keys() == everything.keys()
