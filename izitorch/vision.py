"""torchvision's datasets as izitorch datasets with a given split (the optional ``vision`` extra).

``izitorch.datasets:torchvision_dataset`` builds one split of a torchvision dataset: ``split``
maps to the dataset's own ``train`` flag (CIFAR, MNIST...) or ``split`` argument (SVHN...), and
``transform`` is applied to that split only, so augmentation stays in the training split. Nothing
is downloaded unless ``download = true``. torchvision is imported here only, when called: a
missing or broken torchvision is one line saying what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from typing import Any

import torch
from torch.utils.data import Dataset

from izitorch.errors import IzitorchError, did_you_mean, error_text
from izitorch.references import resolve

INSTALL = 'pip install "izitorch[vision]"'


def import_torchvision() -> Any:
    """``torchvision``, or an ``IzitorchError`` in one line: not installed (install the extra),
    or installed but not loading with this torch (install the torchvision built for it)."""
    try:
        return importlib.import_module("torchvision")
    except Exception as error:  # noqa: BLE001 - a broken build fails with RuntimeError, OSError...
        installed = _installed()
        if not installed:
            raise IzitorchError(f"torchvision is not installed; it is an optional extra: {INSTALL}") from None
        raise IzitorchError(f"torchvision is installed but does not load with this torch ({torch.__version__}): {error_text(error)}; {_advice()}") from None


def _advice() -> str:
    """How to get the torchvision of this torch: PyPI's (what the extra installs) is built for
    PyPI's torch, which is a CUDA build; a CPU torch needs PyTorch's CPU index."""
    series = matching_torchvision()
    if torch.version.cuda is None and torch.version.hip is None:
        return f'install the torchvision built for it: pip install "{series}" --index-url https://download.pytorch.org/whl/cpu ({series} pairs with torch {_torch_minor()}; {INSTALL} takes PyPI\'s, built for a CUDA torch)'
    return f"install the torchvision built for it: {series} pairs with torch {_torch_minor()} ({INSTALL} installs it from PyPI)"


def _installed() -> bool:
    try:
        return importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or without a spec
        return False


def _torch_minor() -> str:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return f"{major}.{minor}"


def matching_torchvision() -> str:
    """The torchvision release series of this torch: torch 2.N pairs with torchvision 0.(N+15)."""
    major, minor = (int(part) for part in _torch_minor().split("."))
    return f"torchvision==0.{minor + 15}.*" if major == 2 else "the torchvision of the same release"


class TorchvisionSplit(Dataset):
    """One split of a torchvision dataset: its first ``limit`` samples as ``(image, class)``
    pairs; ``targets`` (for stratified splits) when the dataset keeps its labels at hand."""

    def __init__(self, dataset: Dataset, limit: int | None) -> None:
        self.dataset = dataset
        self.size = len(dataset) if limit is None else min(limit, len(dataset))
        labels = getattr(dataset, "targets", None)
        if labels is None:
            labels = getattr(dataset, "labels", None)
        if labels is not None:
            self.targets = torch.as_tensor(labels)[: self.size]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.dataset[index]


def torchvision_dataset(
    name: str,
    split: str = "train",
    root: str = "data",
    transform: str | list | None = None,
    download: bool = False,
    limit: int | None = None,
    **options: Any,
) -> TorchvisionSplit:
    """One split of ``torchvision.datasets.<name>`` (e.g. ``"CIFAR10"``, ``"MNIST"``, ``"FakeData"``).

    ``split`` (``"train"`` or ``"test"``; others where the dataset has them) becomes the dataset's
    ``train = (split == "train")`` flag, or its own ``split`` argument; a dataset with neither
    (``FakeData``) takes what tells its splits apart from ``options`` (``random_offset``).
    ``root`` and ``download`` go to datasets that take them; ``options`` to the dataset as they
    are. ``transform`` is applied to each image of this split: a ``"module:attr"`` reference to a
    transform (a callable returning a tensor), or a list of ``torchvision.transforms.v2`` names,
    each a string (``"RandomHorizontalFlip"``) or a table (``{ class = "RandomCrop", size = 32,
    padding = 4 }``), composed and followed by the conversion to a float tensor in [0, 1]
    (``ToImage``, ``ToDtype(float32, scale=True)``), which is also the transform without one.
    """
    torchvision = import_torchvision()
    factory = getattr(torchvision.datasets, name, None)
    if not inspect.isclass(factory):
        names = [n for n in dir(torchvision.datasets) if not n.startswith("_")]
        raise IzitorchError(f'torchvision.datasets has no dataset "{name}"{did_you_mean(name, names)}')
    arguments = split_arguments(factory, split, root, download, options)
    arguments["transform"] = build_transform(torchvision, transform)
    return TorchvisionSplit(factory(**arguments), limit)


def split_arguments(factory: Any, split: str, root: str, download: bool, options: dict) -> dict:
    """The keyword arguments of a torchvision dataset class for one split (see
    :func:`torchvision_dataset`): ``options``, the split as the class takes it, and ``root`` and
    ``download`` where the class takes them."""
    accepted = inspect.signature(factory).parameters
    arguments = dict(options)
    if "train" in accepted:
        if split not in ("train", "test"):
            raise IzitorchError(f'{factory.__name__} has a train and a test split: split must be "train" or "test", got {split!r}')
        arguments["train"] = split == "train"
    elif "split" in accepted:
        arguments["split"] = split
    for key, value in (("root", root), ("download", download)):
        if key in accepted:
            arguments[key] = value
    return arguments


def build_transform(torchvision: Any, transform: str | list | None) -> Any:
    """The transform of one split (see :func:`torchvision_dataset`)."""
    if isinstance(transform, str):
        return resolve(transform)
    v2 = importlib.import_module("torchvision.transforms.v2")
    steps = []
    for position, item in enumerate(transform or []):
        params = dict(item) if isinstance(item, dict) else {"class": item}
        cls_name = params.pop("class", None)
        step = getattr(v2, cls_name, None) if isinstance(cls_name, str) else None
        if step is None:
            names = [n for n in dir(v2) if n[:1].isupper()]
            raise IzitorchError(f"transform[{position}]: {cls_name!r} is not a torchvision.transforms.v2 transform{did_you_mean(str(cls_name), names)}")
        steps.append(step(**params))
    return v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
