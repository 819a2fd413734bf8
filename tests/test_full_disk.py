"""A full disk at each write of a search, a training run and a rank run
(SPEC §14): the writer's ``torch.save``, ``savefig`` or ``os.replace`` fails
with ENOSPC. Each must end in one line naming the file and exit 2, leave the
previous checkpoint loadable and no temporary or empty file behind, and a
``--resume`` once there is room again must end exactly as the uninterrupted
run ends."""
import errno
import json
import os
from pathlib import Path

import matplotlib.figure
import pytest
import torch

import fastdarts.files as files
from helpers import run_cli
from fastdarts.cli import search_main, train_main
from fastdarts.cli_rank import rank_main

SEARCH = ["--dataset", "digits", "--layout", "N,R,N", "--channels", "4", "--steps", "2", "--multiplier", "2",
          "--batch-size", "32", "--max-steps", "2", "--order", "first", "--epochs", "2", "--device", "cpu",
          "--no-progress"]
TRAIN = ["--dataset", "digits", "--layers", "3", "--channels", "4", "--batch-size", "64", "--max-steps", "2",
         "--epochs", "2", "--device", "cpu", "--no-progress"]
RANK = ["--num-archs", "1", "--layers", "3", "--channels", "4", "--train-epochs", "1", "--batch-size", "32",
        "--calib-batches", "1", "--max-steps", "1", "--device", "cpu", "--no-progress"]


class Disk:
    """Counts the package's writes (by file name, in order) and makes the
    ``fail_at``-th one fail in ``how``: 'save' (torch.save), 'savefig' or
    'replace' (the rename into place)."""

    def __init__(self, monkeypatch, fail_at=None, how="replace"):
        self.names, self.fail_at, self.how = [], fail_at, how
        real_write, real_save, real_replace = files.atomic_write, torch.save, os.replace
        real_savefig = matplotlib.figure.Figure.savefig
        disk = self

        def atomic_write(path, write):
            disk.names.append(Path(path).name)
            return real_write(path, write)

        def failing(kind, real):
            def call(*args, **kwargs):
                if disk.how == kind and len(disk.names) - 1 == disk.fail_at and disk.active:
                    disk.active = False
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(*args, **kwargs)
            return call

        self.active = fail_at is not None
        monkeypatch.setattr(files, "atomic_write", atomic_write)
        monkeypatch.setattr(torch, "save", failing("save", real_save))
        monkeypatch.setattr(os, "replace", failing("replace", real_replace))
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing("savefig", real_savefig))


def _no_debris(folder: Path):
    for path in folder.rglob("*"):
        assert not path.name.endswith(".tmp"), path
        assert not path.is_file() or path.stat().st_size > 0, f"{path} is empty"


def _cases(kinds_at):
    return [pytest.param(i, how, id=f"{how}-write{i}") for how, indexes in kinds_at.items() for i in indexes]


# ---------------------------------------------------------------- search

@pytest.fixture(scope="module")
def search_whole(tmp_path_factory):
    """The uninterrupted search: its folder and the names of its writes, in order."""
    out = tmp_path_factory.mktemp("whole") / "search"
    with pytest.MonkeyPatch.context() as mp:
        disk = Disk(mp)
        assert run_cli(search_main, SEARCH + ["--out", str(out)])[0] == 0
    assert disk.names == ["metrics.jsonl", "checkpoint.pt"] * 2 + [
        "genotype.json", "genotype.txt", "normal.png", "reduce.png", "alphas.png"]
    return out, disk.names


# Each kind of write fails once at its rename (metrics and checkpoint of the first and the last epoch,
# genotype.json, genotype.txt, a picture); a checkpoint at torch.save, a picture at savefig.
@pytest.mark.parametrize("index, how", _cases(dict(replace=[0, 1, 2, 3, 4, 5, 6], save=[3], savefig=[8])))
def test_search_on_a_full_disk(search_whole, tmp_path, monkeypatch, index, how):
    whole, names = search_whole
    out = tmp_path / "search"
    disk = Disk(monkeypatch, fail_at=index, how=how)
    code, err = run_cli(search_main, SEARCH + ["--out", str(out)])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"fastdarts-search: error: cannot write {out / names[index]}: the disk is full"), err
    _no_debris(out)
    if (out / "checkpoint.pt").exists():  # the previous epoch's, whole
        assert "--resume" in err[0]
        torch.load(out / "checkpoint.pt", weights_only=True)
    disk.active = False  # space freed
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    assert run_cli(search_main, SEARCH + ["--out", str(out)] + resume)[0] == 0
    _no_debris(out)
    ours, theirs = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (out, whole))
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    assert (out / "genotype.json").read_text() == (whole / "genotype.json").read_text()
    for name in ("normal.png", "reduce.png", "alphas.png"):
        assert (out / name).stat().st_size > 1000


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def train_whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "train"
    with pytest.MonkeyPatch.context() as mp:
        disk = Disk(mp)
        assert run_cli(train_main, TRAIN + ["--out", str(out)])[0] == 0
    assert disk.names[-1] == "curves.png" and disk.names.count("checkpoint.pt") == 2
    return out, disk.names


@pytest.mark.parametrize("index, how", _cases(dict(replace=[0, 1, 2, 3, -2], save=[0], savefig=[-1])))
def test_training_on_a_full_disk(train_whole, tmp_path, monkeypatch, index, how):
    whole, names = train_whole
    index %= len(names)
    out = tmp_path / "train"
    disk = Disk(monkeypatch, fail_at=index, how=how)
    code, err = run_cli(train_main, TRAIN + ["--out", str(out)])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"fastdarts-train: error: cannot write {out / names[index]}: the disk is full"), err
    _no_debris(out)
    if (out / "checkpoint.pt").exists():
        torch.load(out / "checkpoint.pt", weights_only=True)
    disk.active = False
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    assert run_cli(train_main, TRAIN + ["--out", str(out)] + resume)[0] == 0
    _no_debris(out)
    for name in ("checkpoint.pt", "last.pt"):
        ours, theirs = (torch.load(d / name, weights_only=True) for d in (out, whole))
        weights = "model" if name == "checkpoint.pt" else "state_dict"
        for key, value in theirs[weights].items():
            assert torch.equal(ours[weights][key], value), (name, key)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["test_acc"] for m in metrics] == [
        json.loads(line)["test_acc"] for line in (whole / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- rank

@pytest.fixture(scope="module")
def rank_whole(search_whole, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "rank"
    with pytest.MonkeyPatch.context() as mp:
        disk = Disk(mp)
        assert run_cli(rank_main, [str(search_whole[0]), *RANK, "--out", str(out)])[0] == 0
    assert disk.names[0] == "rank.json" and disk.names[-1] == "rank.png"
    return out, disk.names


def _rank_entries(folder):
    document = json.loads((folder / "rank.json").read_text())
    return [{k: v for k, v in a.items() if k != "seconds"} for a in document["architectures"]]


@pytest.mark.parametrize("index, how", _cases(dict(replace=[0, 4, -2], save=[1], savefig=[-1])))
def test_rank_on_a_full_disk(search_whole, rank_whole, tmp_path, monkeypatch, index, how):
    whole, names = rank_whole
    index %= len(names)
    out = tmp_path / "rank"
    disk = Disk(monkeypatch, fail_at=index, how=how)
    code, err = run_cli(rank_main, [str(search_whole[0]), *RANK, "--out", str(out)])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("fastdarts-rank: error: cannot write ") and names[index] in err[0], err
    assert "the disk is full" in err[0]
    _no_debris(out)
    disk.active = False
    resume = ["--resume"] if (out / "rank.json").exists() else []
    assert run_cli(rank_main, [str(search_whole[0]), *RANK, "--out", str(out)] + resume)[0] == 0
    _no_debris(out)
    assert _rank_entries(out) == _rank_entries(whole)
