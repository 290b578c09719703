"""``izitorch.run(config)``: build what the configuration names and drive the hooks.

This is the outer sequence of DESIGN §2; the per-fold loop lives in :mod:`izitorch.loop`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from izitorch.config import Config
from izitorch.data import build_dataset, build_slots, make_loaders, pick_device
from izitorch.errors import IzitorchError, ManifestError
from izitorch.pluginmanager import make_plugin_manager
from izitorch.state import Fold, Run, Split


def run(config: Config) -> dict[str, list[dict]]:
    """Train every model of ``config`` on every split; return each model's final test scores per fold."""
    if config.run.multi_model == "vectorized":
        raise ManifestError('multi_model = "vectorized" is not available in this version yet; use "auto" or "sequential" (models then step one after another)', "run.multi_model", config.source)
    pm, versions = make_plugin_manager(config)
    device = pick_device(config.run.device)
    res_dir = Path(config.run.res_dir)
    prepare_res_dir(res_dir, config.run.overwrite, config.source)
    session = Run(config, pm, device, res_dir, plugin_versions=versions)
    pm.hook.izitorch_register_metrics(register=session.metric_factories.__setitem__)
    session.dataset = build_dataset(config)
    session.slots = build_slots(config, device)
    session.splits = check_splits(pm.hook.izitorch_make_splits(run=session, dataset=session.dataset), len(session.dataset))
    pm.hook.izitorch_run_start(run=session)
    results: dict[str, list[dict]] = {slot.name: [] for slot in session.slots}
    for index, split in enumerate(session.splits):
        for slot in session.slots:
            slot.reset()
        torch.manual_seed(config.run.rdm_seed + index)
        fold = Fold(index, len(session.splits), split, make_loaders(session, split, index), session.slots)
        final = pm.hook.izitorch_run_fold(run=session, fold=fold)
        for name, scores in final.items():
            results[name].append(scores)
    pm.hook.izitorch_run_finish(run=session, results=results)
    return results


def prepare_res_dir(res_dir: Path, overwrite: bool, source: str = "") -> None:
    """Refuse to mix two runs' outputs: an earlier run's folder needs ``overwrite``."""
    if res_dir.exists() and not res_dir.is_dir():
        raise ManifestError(f'res_dir "{res_dir}" is a file; choose a folder', "run.res_dir", source)
    if (res_dir / "conf.json").exists():
        if not overwrite:
            raise ManifestError(
                f'res_dir "{res_dir}" already holds a run; pass --overwrite (overwrite = true) to replace it, or choose another res_dir',
                "run.res_dir",
                source,
            )
        shutil.rmtree(res_dir)
    res_dir.mkdir(parents=True, exist_ok=True)


def check_splits(splits: list[Split] | None, size: int) -> list[Split]:
    """Every split must have training and test samples inside the dataset."""
    if not splits:
        raise IzitorchError("no split was made: enable the holdout or kfold plugin")
    for index, split in enumerate(splits):
        for part in ("train", "val", "test"):
            indices = getattr(split, part)
            if indices is None:
                continue
            if len(indices) == 0:
                raise IzitorchError(f"split {index + 1}: the {part} set is empty ({size} samples); use more data or change train_ratio / k")
            if indices.min() < 0 or indices.max() >= size:
                raise IzitorchError(f"split {index + 1}: {part} indices fall outside the dataset of {size} samples")
    return splits
