"""torchvision's datasets with a given split (the optional ``vision`` extra), and the one line a
missing or broken torchvision gives.

The adapter's own tests need a torchvision that imports beside the installed torch; PyPI's is
built for PyPI's CUDA torch and does not load beside the CPU torch of tox and CI, so there they
skip, saying why. The error lines are tested everywhere, by making the import fail."""

from __future__ import annotations

import importlib
import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from izitorch.errors import IzitorchError
from izitorch.vision import matching_torchvision, split_arguments, torchvision_dataset

from conftest import cli, error_of, make_manifest

FAKE = {"name": "FakeData", "size": 24, "image_size": [3, 8, 8], "num_classes": 4}


def _torchvision():
    """torchvision, or a skip that says why it does not import here."""
    try:
        return importlib.import_module("torchvision")
    except Exception as error:  # noqa: BLE001 - a build for another torch fails with RuntimeError
        pytest.skip(f"torchvision does not import here ({type(error).__name__}: {error}); install the build of this torch to run the adapter tests")


def _fake_manifest(folder: Path) -> Path:
    return make_manifest(
        folder,
        {
            "run.epochs": 1,
            "run.batch_size": 8,
            "data": {
                "dataset": "izitorch.datasets:torchvision_dataset",
                "params": FAKE,
                "train": {"split": "train", "random_offset": 0, "transform": [{"class": "RandomHorizontalFlip", "p": 0.5}]},
                "test": {"split": "test", "random_offset": 1000},
                "num_classes": 4,
            },
        },
        models=[{"name": "mlp", "model": "izitorch.models:MLP", "params": {"in_features": 192, "hidden": 16, "num_classes": 4}}],
    )


# -- without torchvision, or with one that does not load: one line -------------------------------


def test_a_missing_torchvision_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` fails as if not installed
    code, _, err = cli(capsys, "validate", _fake_manifest(tmp_path))
    assert code == 2
    message = error_of(err)
    assert message.endswith('data.train: torchvision is not installed; it is an optional extra: pip install "izitorch[vision]"'), message


def test_a_torchvision_that_does_not_load_is_one_line_naming_the_build_to_install(tmp_path, monkeypatch, capsys):
    package = tmp_path / "site" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    importlib.invalidate_caches()
    with pytest.raises(IzitorchError) as caught:
        torchvision_dataset("FakeData")
    minor = int(re.match(r"2\.(\d+)", torch.__version__).group(1))
    message = str(caught.value)
    assert (
        f"torchvision is installed but does not load with this torch ({torch.__version__}): RuntimeError: operator torchvision::nms does not exist" in message
    )
    assert f"torchvision==0.{minor + 15}.*" in message and 'pip install "izitorch[vision]"' in message
    code, _, err = cli(capsys, "validate", _fake_manifest(tmp_path / "run"))
    assert code == 2 and "data.train: torchvision is installed but does not load with this torch" in error_of(err)


@pytest.mark.parametrize("version,series", [("2.13.0+cpu", "torchvision==0.28.*"), ("2.2.1", "torchvision==0.17.*"), ("2.5.0a0+git", "torchvision==0.20.*")])
def test_the_torchvision_series_follows_the_torch_release(monkeypatch, version, series):
    monkeypatch.setattr(torch, "__version__", version)
    assert matching_torchvision() == series


class FlaggedSplits:  # the shape of CIFAR10, MNIST...: a train flag
    def __init__(self, root, train=True, transform=None, download=False): ...


class NamedSplits:  # the shape of SVHN, Places365...: a split argument
    def __init__(self, root, split="train", transform=None, download=False): ...


class NoSplits:  # the shape of FakeData
    def __init__(self, size=1000, transform=None, random_offset=0): ...


def test_the_split_maps_to_the_datasets_own_argument():
    assert split_arguments(FlaggedSplits, "train", "data", False, {}) == {"train": True, "root": "data", "download": False}
    assert split_arguments(FlaggedSplits, "test", "d", True, {}) == {"train": False, "root": "d", "download": True}
    assert split_arguments(NamedSplits, "extra", "d", False, {}) == {"split": "extra", "root": "d", "download": False}
    assert split_arguments(NoSplits, "test", "d", True, {"random_offset": 7}) == {"random_offset": 7}
    with pytest.raises(IzitorchError, match='FlaggedSplits has a train and a test split: split must be "train" or "test", got \'val\''):
        split_arguments(FlaggedSplits, "val", "d", False, {})


# -- with torchvision: FakeData ------------------------------------------------------------------


def test_fake_data_splits_transform_and_limit():
    torchvision = _torchvision()
    from torchvision.transforms.functional import pil_to_tensor

    options = {key: value for key, value in FAKE.items() if key != "name"}
    flipped = torchvision_dataset("FakeData", split="train", random_offset=0, transform=[{"class": "RandomHorizontalFlip", "p": 1.0}], limit=10, **options)
    plain = torchvision_dataset("FakeData", split="test", random_offset=0, **options)
    reference = torchvision.datasets.FakeData(random_offset=0, **options)  # PIL images, computed apart
    assert len(flipped) == 10 and len(plain) == 24
    for index in (0, 7):
        image, label = plain[index]
        pil, expected_label = reference[index]
        expected = pil_to_tensor(pil).float() / 255
        assert image.dtype == torch.float32 and image.shape == (3, 8, 8)
        torch.testing.assert_close(image, expected)
        assert label == expected_label == flipped[index][1]
        torch.testing.assert_close(flipped[index][0], expected.flip(-1))
    with pytest.raises(IndexError):
        flipped[10]
    with pytest.raises(IzitorchError, match='no dataset "FakeDta".*did you mean "FakeData"'):
        torchvision_dataset("FakeDta")
    with pytest.raises(IzitorchError, match=r"transform\[0\]: 'RandomFlip' is not a torchvision.transforms.v2 transform"):
        torchvision_dataset("FakeData", transform=["RandomFlip"], **options)


def test_a_manifest_trains_on_fake_data_with_given_splits(tmp_path, monkeypatch, capsys):
    _torchvision()
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "run", _fake_manifest(tmp_path))
    assert code == 0, err
    summary = json.loads((tmp_path / "res" / "results.json").read_text())
    assert 0.0 <= summary["mlp"]["mean"]["accuracy"] <= 100.0
    train, test = (np.asarray(part) for part in pickle.loads((tmp_path / "res" / "Dataset_split.pkl").read_bytes())[0])
    assert train.tolist() == list(range(24)) and test.tolist() == list(range(24, 48))  # the given splits, joined in order
