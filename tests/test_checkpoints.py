"""Damaged checkpoints (SPEC §14): every entry of a search checkpoint, a
training checkpoint and a weights file removed or mistyped, through each
command that reads it (search --resume, fastdarts-rank, train --resume,
fastdarts-eval). Each is one line naming the file and the entry, exit 2."""
import contextlib
import io
import shutil

import pytest
import torch

from helpers import cli_error
from fastdarts.checkpoints import kind_of
from fastdarts.cli import eval_main, search_main, train_main
from fastdarts.files import read_torch
from fastdarts.cli_rank import rank_main

SEARCH = ["--dataset", "digits", "--layout", "N,R,N", "--channels", "4", "--steps", "2", "--multiplier", "2",
          "--batch-size", "32", "--max-steps", "1", "--order", "first", "--epochs", "2", "--device", "cpu",
          "--no-progress"]
TRAIN = ["--dataset", "digits", "--layers", "3", "--channels", "4", "--batch-size", "64", "--max-steps", "1",
         "--epochs", "2", "--device", "cpu", "--no-progress"]
RANK = ["--num-archs", "1", "--layers", "3", "--channels", "4", "--train-epochs", "1", "--batch-size", "32",
        "--calib-batches", "1", "--max-steps", "1", "--device", "cpu", "--no-progress"]


def _finished(main, argv, out):
    """A finished two-epoch run: --resume on it reads and checks its checkpoint, then has nothing to run."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv + ["--out", str(out)]) == 0


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "run"
    _finished(search_main, SEARCH, out)
    return out


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    _finished(train_main, TRAIN, out)
    return out


def _damaged_copy(run, tmp_path, name, damage):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state = torch.load(copy / name, weights_only=True)
    damage(state)
    torch.save(state, copy / name)
    return copy


def _first_tensor(state_dict, dims=1):
    return next(k for k, v in state_dict.items() if v.dim() >= dims)


SEARCH_DAMAGE = {
    "no history": (lambda s: s.pop("history"), "its 'history' entry is missing"),
    "no model": (lambda s: s.pop("model"), "its 'model' entry is missing"),
    "no config": (lambda s: s.pop("config"), "its 'config' entry is missing"),
    "config a string": (lambda s: s.update(config="darts"), "its 'config' entry is not a dict (a str)"),
    "no weight optimizer": (lambda s: s.pop("weight_optimizer"), "its 'weight_optimizer' entry is missing"),
    "arch optimizer a list": (lambda s: s.update(arch_optimizer=[]), "'arch_optimizer' entry is not an optimizer"),
    "history a dict": (lambda s: s.update(history={}), "its 'history' entry is not a list of epochs"),
    "history without alphas": (lambda s: s["history"][0].pop("alphas"), "missing 'alphas' in epoch 1"),
    "history renumbered": (lambda s: s["history"][0].update(epoch=3), "entry 0 says epoch 3"),
    "nan loss in history": (lambda s: s["history"][0].update(train_loss=float("nan")),
                            "'train_loss' of epoch 1 is nan, not a finite number"),
    "tensor of another shape": (lambda s: s["model"].update({_first_tensor(s["model"], 2): torch.zeros(1, 2, 3)}),
                                "of another shape"),
    "a tensor less": (lambda s: s["model"].pop(_first_tensor(s["model"])), "tensor(s) missing"),
    "nan weight": (lambda s: s["model"][_first_tensor(s["model"], 2)].fill_(float("nan")), "holds NaN"),
    "momentum of another shape": (
        lambda s: s["weight_optimizer"]["state"][0].update(momentum_buffer=torch.zeros(7, 7)),
        "'weight_optimizer' holds momentum_buffer of shape (7, 7)"),
    "optimizer of another model": (
        lambda s: s["arch_optimizer"]["param_groups"][0]["params"].append(99), "'arch_optimizer' holds groups of"),
    "stage out of range": (lambda s: s.update(stage=dict(index=5, layout="N,R,N", edge_ops={})),
                           "its stage 6 is past the run's 1 stage(s)"),
    "stage a string": (lambda s: s.update(stage="2"), "its 'stage' entry is not a stage"),
    "world size a string": (lambda s: s["config"].update(world_size="2"), "its world size '2' is not a number"),
}


@pytest.mark.parametrize("damage, needle", SEARCH_DAMAGE.values(), ids=SEARCH_DAMAGE.keys())
def test_damaged_search_checkpoint_on_resume(search_run, tmp_path, damage, needle):
    run = _damaged_copy(search_run, tmp_path, "checkpoint.pt", damage)
    line = cli_error(search_main, SEARCH + ["--out", str(run), "--resume"], "fastdarts-search")
    assert str(run / "checkpoint.pt") in line and needle in line, line


# What fastdarts-rank reads of a search checkpoint: its configuration, stage and supernet.
RANK_DAMAGE = {k: SEARCH_DAMAGE[k] for k in ("no model", "no config", "config a string", "tensor of another shape",
                                              "nan weight", "stage a string", "history without alphas")}
RANK_DAMAGE["stage of nonsense"] = (lambda s: s.update(stage=dict(index=0, layout="N,X", edge_ops={})),
                                    "its stage does not describe a supernet")
RANK_DAMAGE["config of nonsense"] = (lambda s: s["config"].update(channels="many"), "its configuration is invalid")


@pytest.mark.parametrize("damage, needle", RANK_DAMAGE.values(), ids=RANK_DAMAGE.keys())
def test_damaged_search_checkpoint_in_rank(search_run, tmp_path, damage, needle):
    run = _damaged_copy(search_run, tmp_path, "checkpoint.pt", damage)
    line = cli_error(rank_main, [str(run), *RANK, "--out", str(tmp_path / "rank")], "fastdarts-rank")
    assert str(run / "checkpoint.pt") in line and needle in line, line


TRAIN_DAMAGE = {
    "no history": (lambda s: s.pop("history"), "its 'history' entry is missing"),
    "no model": (lambda s: s.pop("model"), "its 'model' entry is missing"),
    "no optimizer": (lambda s: s.pop("optimizer"), "its 'optimizer' entry is missing"),
    "config a string": (lambda s: s.update(config="x"), "its 'config' entry is not a dict (a str)"),
    "network a list": (lambda s: s.update(network=[]), "its 'network' entry is not a dict (a list)"),
    "history without test_acc": (lambda s: s["history"][0].pop("test_acc"), "missing 'test_acc' in epoch 1"),
    "tensor of another shape": (lambda s: s["model"].update({_first_tensor(s["model"], 2): torch.zeros(2, 2)}),
                                "of another shape"),
    "nan weight": (lambda s: s["model"][_first_tensor(s["model"], 2)].fill_(float("inf")), "holds NaN"),
    "momentum of another shape": (
        lambda s: s["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
        "'optimizer' holds momentum_buffer of shape (3,)"),
}


@pytest.mark.parametrize("damage, needle", TRAIN_DAMAGE.values(), ids=TRAIN_DAMAGE.keys())
def test_damaged_training_checkpoint_on_resume(train_run, tmp_path, damage, needle):
    run = _damaged_copy(train_run, tmp_path, "checkpoint.pt", damage)
    line = cli_error(train_main, TRAIN + ["--out", str(run), "--resume"], "fastdarts-train")
    assert str(run / "checkpoint.pt") in line and needle in line, line


EVAL_DAMAGE = {k: TRAIN_DAMAGE[k] for k in ("no model", "network a list", "tensor of another shape", "nan weight",
                                             "no history")}


@pytest.mark.parametrize("damage, needle", EVAL_DAMAGE.values(), ids=EVAL_DAMAGE.keys())
def test_damaged_training_checkpoint_in_eval(train_run, tmp_path, damage, needle):
    run = _damaged_copy(train_run, tmp_path, "checkpoint.pt", damage)
    line = cli_error(eval_main, [str(run / "checkpoint.pt"), "--device", "cpu"], "fastdarts-eval")
    assert needle in line, line


def test_weights_with_a_nan_are_refused_by_eval(train_run, tmp_path):
    run = _damaged_copy(train_run, tmp_path, "last.pt",
                        lambda s: s["state_dict"][_first_tensor(s["state_dict"], 2)].view(-1)[0].fill_(float("nan")))
    line = cli_error(eval_main, [str(run / "last.pt"), "--device", "cpu"], "fastdarts-eval")
    assert "damaged fastdarts file" in line and "holds NaN or infinite values" in line


def test_each_kind_is_named_with_the_command_that_reads_it(search_run, train_run, tmp_path):
    line = cli_error(eval_main, [str(search_run / "checkpoint.pt"), "--device", "cpu"], "fastdarts-eval")
    assert line.endswith("is a search checkpoint (fastdarts-search --resume and fastdarts-rank read it), "
                         "not trained weights"), line
    shutil.copytree(train_run, tmp_path / "as_search")
    line = cli_error(search_main, SEARCH + ["--out", str(tmp_path / "as_search"), "--resume"], "fastdarts-search")
    assert "is a training checkpoint (fastdarts-train --resume and fastdarts-eval read it), not a search checkpoint" \
        in line, line
    assert kind_of(read_torch(train_run / "last.pt")) == "trained weights (fastdarts-eval reads them)"


@pytest.mark.parametrize("content, needle", [
    (b"", "is empty (0 bytes)"),
    (None, "is a directory, not a file"),
    ("half", "the file is truncated"),
    (b"hello", "it is not a PyTorch file, or it is damaged"),
])
def test_unreadable_checkpoints_say_what_is_wrong(search_run, tmp_path, content, needle):
    run = tmp_path / "run"
    shutil.copytree(search_run, run)
    whole = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").unlink()
    if content == "half":  # cut off mid-write, as a crash without the atomic writer would
        (run / "checkpoint.pt").write_bytes(whole[:len(whole) // 2])
    elif content is None:
        (run / "checkpoint.pt").mkdir()
    else:
        (run / "checkpoint.pt").write_bytes(content)
    line = cli_error(search_main, SEARCH + ["--out", str(run), "--resume"], "fastdarts-search")
    assert needle in line and "weights_only" not in line, line


def test_a_pickle_with_code_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    import os

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'MARKER'}",)

    torch.save({"format": 1, "model": Planted()}, tmp_path / "w.pt")
    line = cli_error(eval_main, [str(tmp_path / "w.pt"), "--device", "cpu"], "fastdarts-eval")
    assert "loading such objects can run code" in line and "weights_only" not in line, line
    assert not (tmp_path / "MARKER").exists()
