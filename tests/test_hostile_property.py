"""Random mistakes in manifests and command lines keep izitorch's promises (hypothesis).

Starting from a valid manifest, each example replaces, deletes or adds one value (or adds one
``--set``) at random, runs ``izitorch validate`` or ``izitorch run`` in this process, and checks:
the exit code is 0, 1 or 2; a failure prints exactly one line on stderr, ``izitorch: error: ...``,
and never a traceback; nothing outside ``res_dir`` is written or deleted, and the user's files
next to the manifest are intact.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
tomli_w = pytest.importorskip("tomli_w")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from izitorch import cli  # noqa: E402
from izitorch.config import RunConfig  # noqa: E402

VALID = {
    "run": {"res_dir": "res", "epochs": 1, "batch_size": 32, "display_step": 1000, "rdm_seed": 3},
    "data": {"dataset": "izitorch.datasets:digits", "params": {"limit": 120}, "num_classes": 10, "train_ratio": 0.75},
    "models": [
        {"name": "mlp", "model": "izitorch.models:MLP", "params": {"hidden": 8}, "optimizer": {"class": "torch.optim:SGD", "lr": 0.05}},
        {"name": "mlp2", "model": "izitorch.models:MLP", "params": {"hidden": 4}},
    ],
    "plugins": {"checkpoint": {"policy": "last"}},
}

#: Values a careless or hostile user may write, of every TOML type.
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "/",
            "~",
            "a:b",
            "torch.nn:Linear",
            "torch.nn:Identity",
            "torch.optim:SGD",
            "izitorch.models:MLP",
            "nope:Nope",
            "x.py:Y",
            "results.json",
            ".izitorch",
            "auto",
            "cuda",
            "\u2028",
            "\x00",
        ]
    ),
    st.text(max_size=40),
)
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)), max_leaves=6
)


def paths(tree, prefix=()):
    """Every key path of a nested dict/list, as tuples."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield (*prefix, index)
            yield from paths(value, (*prefix, index))


ALL_PATHS = sorted(paths(VALID), key=repr)


def set_at(tree, path, value):
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def delete_at(tree, path):
    node = tree
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


@st.composite
def mutations(draw):
    """A manifest (as a dict) with one mistake, and extra command-line arguments."""
    manifest = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "set"]))
    path = draw(st.sampled_from(ALL_PATHS))
    extra: list[str] = []
    if kind == "replace":
        set_at(manifest, path, draw(values))
    elif kind == "delete":
        delete_at(manifest, path)
    elif kind == "add":
        parent = path[:-1]
        node = manifest
        for key in parent:
            node = node[key]
        if isinstance(node, dict):
            node[draw(st.text(min_size=1, max_size=10))] = draw(values)
    else:
        key = ".".join(f"[{k}]" if isinstance(k, int) else k for k in path).replace(".[", "[")
        text = draw(st.one_of(st.text(max_size=20), st.sampled_from(["", "1e9", "-1", "[1,", "{a=1}", '"x"', "true"])))
        extra = ["--set", f"{key}={text}" if draw(st.booleans()) else key]
    return manifest, extra


def clamp(manifest: dict) -> None:
    """Keep a run that would succeed short: the property is about mistakes, not long trainings."""
    run = manifest.get("run")
    if isinstance(run, dict):
        for key, limit in (("epochs", 2), ("num_workers", 0)):
            if isinstance(run.get(key), int) and not isinstance(run.get(key), bool) and run[key] > limit:
                run[key] = limit


def snapshot(folder: Path, skip: Path | None) -> dict[str, bytes]:
    found = {}
    for path in folder.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file() and not path.is_symlink():
            found[path.relative_to(folder).as_posix()] = path.read_bytes()
        elif path.is_dir():
            found[path.relative_to(folder).as_posix() + "/"] = b""
    return found


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


counter = iter(range(10**9))


@settings(
    max_examples=int(os.environ.get("IZITORCH_HOSTILE_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=mutations(), command=st.sampled_from(["validate", "validate", "run"]))
def test_a_random_mistake_is_one_line_and_touches_nothing_else(sandbox, case, command, monkeypatch):
    manifest, extra = case
    clamp(manifest)
    folder = sandbox / f"case{next(counter)}"
    work = folder / "work"
    work.mkdir(parents=True)
    (work / "data.csv").write_text("the user's data\n")
    (folder / "notes.txt").write_text("the user's notes\n")
    try:
        text = tomli_w.dumps(manifest)
    except Exception:  # a value TOML cannot hold (a NUL in a key, say): write it as a --set instead
        return
    path = work / "m.toml"
    path.write_text(text, encoding="utf-8")
    # a mutation may delete run.res_dir (or the whole [run]): the run then writes into the default one
    run_table = manifest.get("run", {})
    res_dir = run_table.get("res_dir", RunConfig().res_dir) if isinstance(run_table, dict) else None
    res_path = (work / res_dir).resolve() if isinstance(res_dir, str) and res_dir and "\x00" not in res_dir else None
    before = snapshot(folder, None)
    monkeypatch.chdir(work)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([command, str(path), *extra])
        except SystemExit as exit_:  # argparse's own exit, if any
            code = exit_.code
    stderr = err.getvalue()
    assert code in (0, 1, 2), (code, stderr)
    assert "Traceback" not in stderr
    if code != 0:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("izitorch: error: "), stderr
        assert len(lines[0]) < 2000
    after = snapshot(folder, res_path if res_path is not None and folder in res_path.parents else None)
    for name, content in before.items():
        assert after.get(name) == content, f"{name} changed or vanished"
    new = set(after) - set(before)
    assert not new, f"written outside res_dir: {sorted(new)[:5]}"
