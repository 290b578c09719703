"""Stratified, grouped and recorded splits (``[data] stratify``, ``group_by``, resume)."""

from __future__ import annotations

import json
import pickle

import attrs
import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold

import izitorch
from izitorch import cli
from izitorch.errors import IzitorchError
from izitorch.splits import class_labels, holdout, kfold_chunks

# 7 classes of very different sizes: 90, 60, 40, 25, 15, 7, 3 samples (240 in all)
COUNTS = [90, 60, 40, 25, 15, 7, 3]


def imbalanced_labels(seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    return np.random.default_rng(seed).permutation(labels)


def class_counts(labels: np.ndarray, part: np.ndarray) -> np.ndarray:
    return np.bincount(labels[part], minlength=len(COUNTS))


def assert_proportional(labels: np.ndarray, part: np.ndarray, share: float) -> None:
    """Each class's count in ``part`` is within one sample of its exact share."""
    exact = np.asarray(COUNTS) * share
    assert np.all(np.abs(class_counts(labels, part) - exact) <= 1), (class_counts(labels, part), exact)


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_a_stratified_holdout_keeps_every_class_share(ratio):
    labels = imbalanced_labels()
    split = holdout(len(labels), ratio, False, 3, labels)
    n_train = int(np.floor(ratio * len(labels)))
    assert len(split.train) == n_train and len(split.test) == len(labels) - n_train
    assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(len(labels)))
    assert_proportional(labels, split.test, (len(labels) - n_train) / len(labels))
    assert_proportional(labels, split.train, n_train / len(labels))
    # the plain split of the same seed misses the rare classes' shares (what stratify fixes)
    plain = holdout(len(labels), ratio, False, 3, None)
    assert np.abs(class_counts(labels, plain.test) - np.asarray(COUNTS) * (1 - ratio)).max() > 1


def test_with_validation_the_held_out_part_is_halved_each_half_stratified():
    labels = imbalanced_labels()
    split = holdout(len(labels), 0.5, True, 3, labels)
    assert (len(split.train), len(split.val), len(split.test)) == (120, 60, 60)
    parts = [split.train, split.val, split.test]
    assert sorted(np.concatenate(parts).tolist()) == list(range(240))
    for part in (split.val, split.test):
        exact = np.asarray(COUNTS) / 4
        assert np.all(np.abs(class_counts(labels, part) - exact) <= 1.5), class_counts(labels, part)  # two halvings: within a sample and a half
    assert np.all(class_counts(labels, split.val) + class_counts(labels, split.test) == np.asarray(COUNTS) - class_counts(labels, split.train))


def test_stratified_kfold_chunks_are_sklearns_and_partition_the_data():
    labels = imbalanced_labels()
    chunks = kfold_chunks(len(labels), 3, 5, labels, None)
    reference = [test for _, test in StratifiedKFold(3, shuffle=True, random_state=5).split(np.zeros(len(labels)), labels)]
    assert [c.tolist() for c in chunks] == [r.tolist() for r in reference]
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(labels)))
    for chunk in chunks:
        assert_proportional(labels, chunk, 1 / 3)


def test_a_grouped_kfold_keeps_every_group_in_one_fold():
    labels = imbalanced_labels()
    groups = np.random.default_rng(1).integers(0, 30, size=len(labels))
    for stratify in (None, labels):
        chunks = kfold_chunks(len(labels), 3, 5, stratify, groups)
        assert sorted(np.concatenate(chunks).tolist()) == list(range(len(labels)))
        seen = [set(groups[chunk].tolist()) for chunk in chunks]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda y: kfold_chunks(len(y), 5, 1, y, None), "class 6 has 3 sample(s): a stratified 5-fold needs at least 5 of every class; lower k"),
        (
            lambda y: holdout(len(y) - 2, 0.8, False, 1, y[(y != 6) | (np.cumsum(y == 6) == 1)]),
            "class 6 has 1 sample(s): a stratified holdout needs at least 2",
        ),
        (
            lambda y: holdout(len(y) - 1, 0.8, True, 1, y[(y != 6) | (np.cumsum(y == 6) <= 2)]),
            "class 6 has 2 sample(s): a stratified holdout with validation needs at least 3",
        ),
        (
            lambda y: holdout(len(y), 0.6, False, 1, np.arange(len(y)) % 100),
            "splits 240 samples into 144 and 96: too few for one sample of each of the 100 classes",
        ),
        (lambda y: kfold_chunks(len(y), 5, 1, None, np.arange(len(y)) % 4), "group_by gives 4 group(s): a grouped 5-fold needs at least 5"),
    ],
)
def test_too_few_samples_of_a_class_or_groups_are_named(call, message):
    with pytest.raises(IzitorchError) as caught:
        call(imbalanced_labels())
    assert message in str(caught.value)


def test_only_integer_labels_at_hand_are_stratified():
    """Float targets (regression), per-pixel targets (segmentation) and datasets without
    labels at hand are split at random unless stratify = true asks, which is refused."""
    inputs = torch.zeros(12, 3)
    cases = {
        "classes": (torch.utils.data.TensorDataset(inputs, torch.arange(12) % 3), True),
        "regression": (torch.utils.data.TensorDataset(inputs, torch.rand(12)), False),
        "segmentation": (torch.utils.data.TensorDataset(inputs, torch.zeros(12, 4, 4, dtype=torch.long)), False),
        "no labels": (torch.utils.data.Subset(torch.utils.data.TensorDataset(inputs, torch.arange(12) % 3), range(12)), False),
    }
    for name, (dataset, stratified) in cases.items():
        config = izitorch.Config(data=izitorch.DataConfig(dataset=dataset), models=(izitorch.ModelSpec(name="m", model="izitorch.models:MLP"),))
        assert (class_labels(config, dataset) is not None) == stratified, name
        forced = attrs.evolve(config, data=attrs.evolve(config.data, stratify=True))
        if stratified:
            assert class_labels(forced, dataset).tolist() == (torch.arange(12) % 3).tolist()
        else:
            with pytest.raises(izitorch.IzitorchError, match="stratify = true needs one integer class per sample at hand"):
                class_labels(forced, dataset)
        off = attrs.evolve(config, data=attrs.evolve(config.data, stratify=False))
        assert class_labels(off, dataset) is None


# -- through the command line ---------------------------------------------------------------------

DATA = """\
import numpy as np
import torch
from torch.utils.data import TensorDataset

COUNTS = {counts}


def imbalanced():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))
    inputs = torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(inputs, torch.as_tensor(labels))
    data.patient = np.arange(len(labels)) // 6  # six samples per patient
    return data


def patients(dataset):
    return dataset.patient


def two_groups(dataset):
    return [0, 1]


def broken(dataset):
    raise KeyError("ward")
"""


@pytest.fixture
def imbalanced(tmp_path):
    (tmp_path / "imbalanced.py").write_text(DATA.format(counts=COUNTS), encoding="utf-8")
    return {"data.dataset": "imbalanced.py:imbalanced", "data.params": None, "data.num_classes": 7}


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def read_split(res) -> list:
    return pickle.loads((res / "Dataset_split.pkl").read_bytes())


def test_a_run_stratifies_by_default_and_records_its_split(manifest, imbalanced, tmp_path, capsys):
    code, err = run_cli(capsys, "run", str(manifest(imbalanced, run={"epochs": 1})))
    assert code == 0, err
    ((train, test),) = read_split(tmp_path / "res")
    labels = imbalanced_labels()
    assert_proportional(labels, np.asarray(test), len(test) / len(labels))
    assert sorted(train + test) == list(range(len(labels)))


def test_a_run_with_k_fold_grouped_by_patient(manifest, imbalanced, tmp_path, capsys):
    for group_by, res in (("patient", "a"), ("imbalanced.py:patients", "b")):
        path = manifest({**imbalanced, "data.group_by": group_by, "run.res_dir": (tmp_path / res).as_posix()}, run={"epochs": 1}, plugins={"kfold": {"k": 3}})
        code, err = run_cli(capsys, "run", str(path))
        assert code == 0, err
        splits = read_split(tmp_path / res)
        patient = np.arange(240) // 6
        folds = [set(patient[test].tolist()) for _, test in splits]
        assert len(folds) == 3 and sum(len(f) for f in folds) == 40  # every patient tested in exactly one fold
    assert read_split(tmp_path / "a") == read_split(tmp_path / "b")


@pytest.mark.parametrize(
    "overrides,line",
    [
        (
            {"plugins.kfold.k": 5},
            "data.stratify: class 6 has 3 sample(s): a stratified 5-fold needs at least 5 of every class; lower k, or set stratify = false",
        ),
        ({"data.group_by": "ward"}, 'data.group_by: the dataset (TensorDataset) has no attribute "ward"'),
        ({"data.group_by": "imbalanced.py:nope"}, 'data.group_by: "imbalanced.py" has no attribute "nope"'),
        ({"data.group_by": "3 wards"}, 'data.group_by: expected a dataset attribute name or a reference "module:callable", got "3 wards"'),
        ({"data.group_by": "patient", "plugins.kfold": None}, "data.group_by: group_by keeps groups apart in k-fold splits only"),
        ({"data.stratify": "yes"}, 'data.stratify: expected true or false, got "yes"'),
        ({"data.group_by": "imbalanced.py:two_groups"}, "data.group_by: group_by gives 2 values for 240 samples; it must give one group per sample"),
        ({"data.group_by": "imbalanced.py:broken"}, "data.group_by: \"imbalanced.py:broken\"(dataset) raised KeyError: 'ward'"),
    ],
)
def test_split_mistakes_are_one_line_exit_2(manifest, imbalanced, tmp_path, capsys, overrides, line):
    path = manifest({**imbalanced, "plugins.kfold.k": 3, **overrides}, run={"epochs": 1})
    for command in ("validate", "run"):
        code, err = run_cli(capsys, command, str(path))
        assert code == 2, (command, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert line in err, err
    assert not (tmp_path / "res" / "mlp").exists()


def test_stratify_true_without_labels_at_hand_is_refused(manifest, tmp_path, capsys):
    (tmp_path / "bare.py").write_text(
        "from izitorch.datasets import digits\n"
        "class Bare:\n    def __init__(self):\n        self.base = digits(limit=300)\n"
        "    def __len__(self):\n        return len(self.base)\n    def __getitem__(self, i):\n        return self.base[i]\n",
        encoding="utf-8",
    )
    path = manifest({"data.dataset": "bare.py:Bare", "data.params": None, "data.stratify": True})
    code, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and err.count("\n") == 1 and "data.stratify: stratify = true needs one integer class per sample at hand" in err


def _drop_new_keys(state_file) -> None:
    """Make a saved state look written before ``[data] stratify`` existed: its fingerprint
    lacks the key (and the other keys added with it)."""
    state = torch.load(state_file, weights_only=True)
    fingerprint = json.loads(state["fingerprint"])
    for key in ("stratify", "group_by", "collate_fn", "sampler", "drop_last", "eval_batch_size", "train", "val", "test"):
        fingerprint.pop(f"data.{key}")
    state["fingerprint"] = json.dumps(fingerprint)
    torch.save(state, state_file)


def test_a_state_from_before_stratification_resumes_with_its_own_split(manifest, tmp_path, capsys):
    """A run made when splits were not stratified resumes on the split it recorded, though a
    new run of the same manifest stratifies: its folds keep testing what they never trained on."""
    old = manifest({"data.stratify": False}, run={"epochs": 1}, plugins={"kfold": {"k": 3}})
    assert run_cli(capsys, "run", str(old))[0] == 0
    before = read_split(tmp_path / "res")
    for fold in (1, 2, 3):
        _drop_new_keys(tmp_path / "res" / ".izitorch" / f"fold_{fold}.pth.tar")
    resumed = manifest({"data.stratify": None}, run={"epochs": 2}, plugins={"kfold": {"k": 3}})
    code, err = run_cli(capsys, "run", str(resumed), "--resume")
    assert code == 0, err
    assert read_split(tmp_path / "res") == before
    fresh = manifest({"data.stratify": None, "run.res_dir": (tmp_path / "fresh").as_posix()}, run={"epochs": 2}, plugins={"kfold": {"k": 3}})
    assert run_cli(capsys, "run", str(fresh))[0] == 0
    assert read_split(tmp_path / "fresh") != before  # today's default draws another split
    labels = izitorch.datasets.digits(limit=300).tensors[1].numpy()
    for fold, (_train, test) in enumerate(before, 1):  # the resumed epochs tested the recorded test sets
        matrix = pickle.loads((tmp_path / "res" / "mlp" / f"FOLD_{fold}" / "confusion_matrix.pkl").read_bytes())
        assert matrix.sum(axis=1).tolist() == np.bincount(labels[test], minlength=10).tolist()


# -- given splits ---------------------------------------------------------------------------------

GIVEN = """\
import torch
from torch.utils.data import Dataset, TensorDataset

from izitorch.datasets import digits

ROWS = {"train": slice(0, 200), "val": slice(200, 250), "test": slice(250, 300)}


def part(split="train", augment=False):
    inputs, targets = digits(limit=300).tensors
    rows = ROWS[split]
    return TensorDataset(inputs[rows] + (1.0 if augment else 0.0), targets[rows])  # "augmentation": the training inputs shifted


def test_set():
    return part("test")


class Patients(Dataset):
    '''The same samples one by one (the DataLoader path), four per patient.'''

    def __init__(self, split="train"):
        self.base = part(split)
        self.targets = self.base.tensors[1]
        self.patient = [f"{split}-{i // 4}" for i in range(len(self.base))]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index]
"""

GIVEN_DATA = {"data.dataset": "given.py:part", "data.params": None, "data.train": {"split": "train", "augment": True}, "data.test": {"split": "test"}}


@pytest.fixture
def given(tmp_path):
    (tmp_path / "given.py").write_text(GIVEN, encoding="utf-8")
    return dict(GIVEN_DATA)


def test_given_splits_train_and_test_on_what_they_are_given(manifest, given, tmp_path, capsys):
    """One callable with a split parameter, the augmentation on the training split only."""
    path = manifest(given, run={"epochs": 1})
    config = izitorch.load_manifest(path)
    joined = izitorch.data.build_dataset(config)
    inputs, targets = izitorch.datasets.digits(limit=300).tensors
    assert torch.equal(joined.tensors[0][:200], inputs[:200] + 1.0) and torch.equal(joined.tensors[0][200:], inputs[250:])
    assert torch.equal(joined.tensors[1], torch.cat([targets[:200], targets[250:]]))
    code, err = run_cli(capsys, "run", str(path))
    assert code == 0, err
    assert read_split(tmp_path / "res") == [(list(range(200)), list(range(200, 250)))]
    matrix = pickle.loads((tmp_path / "res" / "mlp" / "confusion_matrix.pkl").read_bytes())
    assert matrix.sum(axis=1).tolist() == np.bincount(targets[250:].numpy(), minlength=10).tolist()  # the given test set was scored


def test_given_validation_and_a_test_set_of_its_own_callable(manifest, given, tmp_path, capsys):
    path = manifest({**given, "data.val": {"split": "val"}, "data.test": "given.py:test_set", "data.validation": True}, run={"epochs": 1})
    code, err = run_cli(capsys, "run", str(path))
    assert code == 0, err
    assert read_split(tmp_path / "res") == [(list(range(200)), list(range(200, 250)), list(range(250, 300)))]


@pytest.mark.parametrize("validation", [False, True])
def test_k_fold_over_the_given_training_set_tests_every_fold_on_the_given_test_set(manifest, given, tmp_path, capsys, validation):
    path = manifest({**given, "data.validation": validation}, run={"epochs": 1}, plugins={"kfold": {"k": 3}})
    code, err = run_cli(capsys, "run", str(path))
    assert code == 0, err
    splits = read_split(tmp_path / "res")
    assert len(splits) == 3
    chunks = []
    for split in splits:
        train, test = split[0], split[-1]
        assert test == list(range(200, 250))
        chunk = sorted(set(range(200)) - set(train))
        if validation:
            assert sorted(split[1]) == chunk
        chunks.append(chunk)
    assert sorted(sum(chunks, [])) == list(range(200))  # the folds' own chunks share out the training set
    labels = izitorch.datasets.digits(limit=300).tensors[1].numpy()
    for chunk in chunks:  # stratified: each chunk holds a third of every class, within a sample
        assert np.all(np.abs(np.bincount(labels[chunk], minlength=10) - np.bincount(labels[:200], minlength=10) / 3) <= 1)


def test_given_splits_served_per_sample_group_their_k_fold_by_an_attribute(manifest, given, tmp_path, capsys):
    data = {**given, "data.dataset": "given.py:Patients", "data.train": {"split": "train"}, "data.group_by": "patient"}
    path = manifest(data, run={"epochs": 1}, plugins={"kfold": {"k": 3, "parallel": True}})
    code, err = run_cli(capsys, "run", str(path))
    assert code == 0, err
    splits = read_split(tmp_path / "res")
    patient = np.asarray([i // 4 for i in range(200)])
    held = [set(patient[sorted(set(range(200)) - set(train))].tolist()) for train, _ in splits]
    assert sum(len(h) for h in held) == 50 and set().union(*held) == set(range(50))  # every patient out of exactly one fold


@pytest.mark.parametrize(
    "overrides,plugins,line",
    [
        ({"data.test": None}, {}, "data.test: [data] train is given, so the test set must be given too"),
        ({"data.val": {"split": "val"}}, {}, "data.val: a given validation set picks the best epoch: set validation = true, or drop val"),
        ({"data.train_ratio": 0.7}, {}, "data.train_ratio: with given splits ([data] train and test) train_ratio does not apply: drop it"),
        ({"data.validation": True}, {}, "data.validation: validation = true with given splits needs the validation set"),
        (
            {"data.val": {"split": "val"}, "data.validation": True},
            {"kfold": {"k": 3}},
            "data.val: k-fold validates each fold on a chunk of the given training set",
        ),
        ({"data.dataset": None}, {}, 'data.train: a table without "class" calls [data] dataset with its parameters'),
        ({"data.train": {"split": "train", "augmnt": True}}, {}, 'data.train.augmnt: unexpected argument "augmnt"'),
        ({"data.test": "given.py:nope"}, {}, 'data.test: "given.py" has no attribute "nope"'),
        ({"data.test": 3}, {}, 'data.test: expected a reference "module:callable", a table { class = ..., ... } or a table of parameters'),
    ],
)
def test_given_split_mistakes_are_one_line_exit_2(manifest, given, tmp_path, capsys, overrides, plugins, line):
    path = manifest({**given, **overrides}, plugins=plugins)
    for command in ("validate", "run"):
        code, err = run_cli(capsys, command, str(path))
        assert code == 2, (command, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert line in err, err
    assert not (tmp_path / "res" / "mlp").exists()


def test_given_splits_resume_to_the_uninterrupted_run(manifest, given, tmp_path, capsys):
    whole = manifest({**given, "run.res_dir": (tmp_path / "whole").as_posix()}, name="whole.toml")
    cut = manifest({**given, "run.res_dir": (tmp_path / "cut").as_posix(), "run.epochs": 1}, name="cut.toml")
    assert run_cli(capsys, "run", str(whole))[0] == 0 and run_cli(capsys, "run", str(cut))[0] == 0
    code, err = run_cli(capsys, "run", str(cut), "--resume", "--set", "run.epochs=2")
    assert code == 0, err
    logs = [json.loads((tmp_path / res / "mlp" / "trainlog.json").read_text()) for res in ("whole", "cut")]
    strip = lambda log: {e: {k: v for k, v in d.items() if not k.endswith("_time")} for e, d in log.items()}  # noqa: E731
    assert strip(logs[0]) == strip(logs[1])
    code, err = run_cli(capsys, "run", str(cut), "--resume", "--set", "run.epochs=3", "--set", 'data.train={split="train"}')
    assert code == 2 and "cannot resume: data.train.params.augment changed" in err, err
