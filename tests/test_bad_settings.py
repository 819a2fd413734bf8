"""Settings and inputs a user gets wrong, each refused in one line before any
work (SPEC §14): non-finite numbers, a run that diverges, an unwritable
output folder, nested JSON, a file given as a folder, conflicting flags,
FASTDARTS_NO_EXTENSION at run time."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli_error
import fastdarts.search_loop as search_module
import fastdarts.train_loop as train_module
import fastdarts.files as files
from fastdarts.cli import genotype_main, search_main, train_main

SEARCH = ["--dataset", "digits", "--layout", "N,R,N", "--channels", "4", "--steps", "2", "--multiplier", "2",
          "--batch-size", "32", "--max-steps", "1", "--order", "first", "--device", "cpu", "--no-progress"]
TRAIN = ["--dataset", "digits", "--layers", "3", "--channels", "4", "--batch-size", "64", "--max-steps", "1",
         "--device", "cpu", "--no-progress"]


def _no_step(monkeypatch):
    """Any step taken fails the test: the refusal must come before the first."""
    def step(*args, **kwargs):
        pytest.fail("a step ran")
    monkeypatch.setattr(search_module, "search_step", step)
    monkeypatch.setattr(train_module, "train_step", step)


@pytest.mark.parametrize("flag", ["--lr", "--lr-min", "--momentum", "--weight-decay", "--grad-clip", "--arch-lr",
                                  "--arch-weight-decay", "--arch-grad-clip", "--arch-beta1"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_search_settings_are_refused(flag, value, tmp_path, monkeypatch):
    _no_step(monkeypatch)
    # --flag=value: argparse would read a separate -inf as a flag.
    line = cli_error(search_main, SEARCH + [f"{flag}={value}", "--out", str(tmp_path / "run")], "fastdarts-search")
    assert line.endswith(f"{flag[2:]} must be a finite number, got {float(value)!r}"), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--lr", "--lr-min", "--momentum", "--weight-decay", "--grad-clip",
                                  "--auxiliary-weight", "--drop-path-prob"])
def test_non_finite_training_settings_are_refused(flag, tmp_path, monkeypatch):
    _no_step(monkeypatch)
    line = cli_error(train_main, TRAIN + [flag, "inf", "--out", str(tmp_path / "run")], "fastdarts-train")
    assert line.endswith(f"{flag[2:]} must be a finite number, got inf"), line


def _strict_lines(path):
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
            for line in path.read_text().splitlines()]


def _poison_second_epoch(monkeypatch, module, name, weights):
    """The step of epoch 2 (one step per epoch) first turns a weight into NaN, as a diverging run would."""
    real, calls = getattr(module, name), []

    def step(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(iter(weights(model))).fill_(float("nan"))
        return real(model, *args, **kwargs)
    monkeypatch.setattr(module, name, step)


def test_a_diverging_search_stops_with_its_last_finite_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_second_epoch(monkeypatch, search_module, "search_step", lambda m: m.weight_parameters())
    line = cli_error(search_main, SEARCH + ["--epochs", "3", "--out", str(out)], "fastdarts-search")
    assert "epoch 2 diverged (train_loss nan" in line and f"{out / 'checkpoint.pt'} keeps epoch 1" in line, line
    assert "lower --lr (now 0.025) or --arch-lr (now 0.0003)" in line
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["history"]) == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                              if v.is_floating_point())
    assert [m["epoch"] for m in _strict_lines(out / "metrics.jsonl")] == [1]


def test_a_diverging_training_run_stops_with_its_last_finite_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_second_epoch(monkeypatch, train_module, "train_step", lambda m: m.parameters())
    line = cli_error(train_main, TRAIN + ["--epochs", "3", "--out", str(out)], "fastdarts-train")
    assert "epoch 2 diverged (train_loss nan" in line and f"{out / 'checkpoint.pt'} keeps epoch 1" in line, line
    assert len(torch.load(out / "checkpoint.pt", weights_only=True)["history"]) == 1
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert [m["epoch"] for m in _strict_lines(out / "metrics.jsonl")] == [1]


def test_a_run_diverging_in_its_first_epoch_says_nothing_was_kept(tmp_path):
    line = cli_error(train_main, TRAIN + ["--epochs", "2", "--lr", "1e30", "--out", str(tmp_path / "run")],
                  "fastdarts-train")
    assert "epoch 1 diverged" in line and "no checkpoint was written; lower --lr (now 1e+30)" in line, line


@pytest.mark.parametrize("main, argv, prog", [(search_main, SEARCH + ["--epochs", "1"], "fastdarts-search"),
                                              (train_main, TRAIN + ["--epochs", "1"], "fastdarts-train")])
def test_an_unwritable_out_is_found_before_the_first_step(main, argv, prog, tmp_path, monkeypatch):
    _no_step(monkeypatch)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # As root a read-only folder is writable anyway: the refusal is injected where the check writes.
    monkeypatch.setattr(files.tempfile, "mkstemp", refused)
    line = cli_error(main, argv + ["--out", str(tmp_path / "ro")], prog)
    assert line.endswith("is not writable (in " + str(tmp_path) + ", where it would be created): permission denied; "
                         "choose another folder"), line


@pytest.mark.parametrize("depth", [100_000, 3_000])
def test_deeply_nested_genotype_json_is_one_line(tmp_path, depth):
    path = tmp_path / "deep.json"
    path.write_text("[" * depth + "]" * depth)
    assert "is nested too deeply to be a genotype" in cli_error(genotype_main, [str(path)], "fastdarts-genotype")
    line = cli_error(train_main, TRAIN + ["--genotype", str(path), "--out", str(tmp_path / "run")], "fastdarts-train")
    assert "is nested too deeply to be a genotype" in line


def test_a_long_bad_value_is_quoted_short(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"normal": [[[[[[[["x"] * 50]]]]]]], "normal_concat": [2], "reduce": [],
                                "reduce_concat": []}))
    line = cli_error(genotype_main, [str(path)], "fastdarts-genotype")
    assert "must be an [op_name, input_node] pair, got [[[[[[" in line and line.endswith("...") and len(line) < 250


def test_data_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    line = cli_error(search_main, ["--data", str(tmp_path / "f"), "--download", "--out", str(tmp_path / "run")],
                  "fastdarts-search")
    assert line.endswith(f"--data {tmp_path / 'f'} is a file, not a folder: give the folder that holds "
                         f"(or receives) cifar-10-batches-py"), line
    line = cli_error(search_main, ["--data", str(tmp_path / "f" / "sub"), "--download", "--out", str(tmp_path / "run")],
                  "fastdarts-search")
    assert "cannot create the data folder" in line and "Errno" not in line, line


def test_stages_refuse_layers_as_they_refuse_a_layout(tmp_path):
    for flag, value in (("--layers", "5"), ("--layout", "N,R,N")):
        line = cli_error(search_main, ["--dataset", "digits", "--stages", "3:8,3:5", flag, value,
                                    "--out", str(tmp_path)], "fastdarts-search")
        assert line.endswith(f"--stages sets each stage's cells; drop {flag} (or give the stages' cells)"), line


def test_no_extension_is_honoured_at_run_time():
    code = "import fastdarts; from fastdarts.kernels import extension; " \
           "print(extension.HAS_EXTENSION, fastdarts.available_backends(), extension.EXTENSION_ERROR)"
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, FASTDARTS_NO_EXTENSION="1", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("False ['") and "'cpp'" not in out and "FASTDARTS_NO_EXTENSION is set" in out, out
