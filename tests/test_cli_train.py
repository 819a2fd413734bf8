"""`fastdarts-train`, `fastdarts-eval` and `fastdarts-pipeline` as a user runs them:
one-line errors, non-zero exits."""
import json

import pytest
import torch

import fastdarts.cli as cli
from fastdarts import DARTS_V2, NetworkCIFAR
from fastdarts.cli import eval_main, pipeline_main, train_main

TINY = ["--dataset", "digits", "--layers", "5", "--channels", "8", "--batch-size", "64", "--device", "cpu",
        "--no-progress"]


def _error_line(main, argv, capsys, prog):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """fastdarts-train on digits, 2 short epochs, and its output folder."""
    out = tmp_path_factory.mktemp("cli") / "run"
    # 6 steps of 64 also cover the 360 test images, so the accuracies compare.
    assert train_main(TINY + ["--epochs", "2", "--max-steps", "6", "--out", str(out)]) == 0
    return out


def test_train_then_eval(run_dir, capsys):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    # The training run's test batch size: the same batches, so the same accuracy to the last digit.
    assert eval_main([str(run_dir / "last.pt"), "--device", "cpu", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "digits test set, 360 images" in out
    assert f"top-1 {lines[-1]['test_acc']:.2f}%" in out
    assert "parameters: 0.04 M" in out and "with the auxiliary head" in out


def test_train_prints_progress_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train_main(TINY + ["--epochs", "1", "--max-steps", "1", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "0.0366 M parameters" in printed and "epoch 1/1" in printed and "final test accuracy" in printed
    assert train_main(TINY + ["--epochs", "1", "--max-steps", "1", "--out", out, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_bf16_and_channels_last_flags(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train_main(TINY + ["--epochs", "1", "--max-steps", "1", "--bf16", "--channels-last", "--out", out]) == 0
    assert "bf16 on, channels-last on" in capsys.readouterr().out
    assert eval_main([out + "/last.pt", "--device", "cpu", "--bf16"]) == 0


def test_unknown_genotype_name_lists_the_known_ones(tmp_path, capsys):
    line = _error_line(train_main, TINY + ["--genotype", "DARTS_V3", "--out", str(tmp_path)], capsys,
                       "fastdarts-train")
    assert "unknown genotype 'DARTS_V3'" in line and "DARTS_V1, DARTS_V2" in line


@pytest.mark.parametrize("content, needle", [
    ("{not json", "is not valid JSON"),
    ('{"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 4]], "normal_concat": [2],'
     ' "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]], "reduce_concat": [2]}', "not an earlier node"),
    ('{"normal": [["sep_conv_3x3", 0], ["conv_9x9", 1]], "normal_concat": [2],'
     ' "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]], "reduce_concat": [2]}', "unknown op 'conv_9x9'"),
    ('{"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1]], "normal_concat": [2, 3],'
     ' "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]], "reduce_concat": [2]}', "outside 2..2"),
])
def test_bad_genotype_files(tmp_path, capsys, content, needle):
    path = tmp_path / "genotype.json"
    path.write_text(content)
    for main, prog, argv in ((train_main, "fastdarts-train", TINY + ["--out", str(tmp_path / "o")]),
                             (eval_main, "fastdarts-eval", [str(tmp_path / "w.pt")])):
        line = _error_line(main, argv + ["--genotype", str(path)], capsys, prog)
        assert needle in line and str(path) in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--genotype", "DARTS_V1"], "was trained for another genotype"),
    (["--channels", "36"], "holds a network with channels=8, not 36"),
])
def test_eval_checkpoint_of_another_network(run_dir, capsys, argv, needle):
    line = _error_line(eval_main, [str(run_dir / "last.pt"), "--device", "cpu"] + argv, capsys, "fastdarts-eval")
    assert needle in line and "last.pt" in line


def test_eval_original_weights_need_the_right_genotype(tmp_path, capsys):
    model = NetworkCIFAR(DARTS_V2, C=4, layers=5, in_channels=1, image_size=8)
    path = tmp_path / "original.pt"
    torch.save({"module." + k: v for k, v in model.state_dict().items() if "num_batches" not in k}, path)
    line = _error_line(eval_main, [str(path), "--dataset", "digits", "--device", "cpu"], capsys, "fastdarts-eval")
    assert "pass --genotype" in line
    line = _error_line(eval_main, [str(path), "--genotype", "DARTS_V1", "--dataset", "digits", "--device", "cpu"],
                       capsys, "fastdarts-eval")
    assert "do not fit the given genotype" in line
    assert eval_main([str(path), "--genotype", "DARTS_V2", "--dataset", "digits", "--device", "cpu"]) == 0
    assert "original DARTS state_dict" in capsys.readouterr().out


def test_missing_cifar_without_download(tmp_path, capsys):
    line = _error_line(train_main, ["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"],
                       capsys, "fastdarts-train")
    assert "CIFAR-10 not found" in line and "--download" in line
    model = NetworkCIFAR(DARTS_V2, C=4, layers=5)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    line = _error_line(eval_main, [str(tmp_path / "w.pt"), "--genotype", "DARTS_V2", "--data", str(tmp_path),
                                   "--device", "cpu"], capsys, "fastdarts-eval")
    assert "CIFAR-10 not found" in line and "--download" in line


def test_eval_missing_or_corrupt_file(tmp_path, capsys):
    line = _error_line(eval_main, [str(tmp_path / "nothing.pt")], capsys, "fastdarts-eval")
    assert "no weights file at" in line
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    assert "cannot read weights file" in _error_line(eval_main, [str(tmp_path / "bad.pt")], capsys, "fastdarts-eval")


@pytest.mark.parametrize("argv, needle", [
    (["--channels", "0"], "must be a positive integer"),
    (["--cutout", "-1"], "must not be negative"),
    (["--drop-path-prob", "1.5"], "drop-path-prob must be in [0, 1)"),
    (["--seed", "-1"], "seed must be in 0..2**32-1"),
    (["--network", "imagenet"],
     "5 layers have 2 reduction cells, but 8x8 digits images (1x1 after the imagenet network's stem) allow at most 0"),
])
def test_bad_values(tmp_path, capsys, argv, needle):
    try:
        code = train_main(TINY + argv + ["--out", str(tmp_path / "o")])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fastdarts-train: error: ") and needle in err[0], err


def test_train_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", interrupted)
    assert train_main(TINY + ["--out", str(tmp_path)]) == 130
    assert "--resume" in capsys.readouterr().err


def test_eval_interrupt_exits_130(tmp_path, capsys, monkeypatch):
    import fastdarts.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastdarts.evaluate, "evaluate_checkpoint", interrupted)
    assert eval_main([str(tmp_path / "w.pt"), "--device", "cpu"]) == 130
    assert "fastdarts-eval: interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("damage, needle", [
    (lambda w: w.pop("network"), "its 'network' entry is missing"),
    (lambda w: w["network"].pop("layers"), "network spec lacks layers"),
    (lambda w: w.update(state_dict=[1, 2]), "its 'state_dict' entry is not a state_dict"),
])
def test_eval_damaged_fastdarts_file(run_dir, tmp_path, capsys, damage, needle):
    weights = torch.load(run_dir / "last.pt", weights_only=True)
    damage(weights)
    torch.save(weights, tmp_path / "damaged.pt")
    line = _error_line(eval_main, [str(tmp_path / "damaged.pt"), "--device", "cpu"], capsys, "fastdarts-eval")
    assert "damaged fastdarts file" in line and needle in line


def test_lr_min_above_lr_is_refused(tmp_path, capsys):
    line = _error_line(train_main, TINY + ["--lr", "0.01", "--lr-min", "0.1", "--out", str(tmp_path / "o")], capsys,
                       "fastdarts-train")
    assert "lr-min (0.1) must not exceed lr (0.01)" in line


def test_pipeline_runs_search_train_eval(tmp_path, capsys, monkeypatch):
    """The wiring of fastdarts-pipeline, at a smaller scale than its offline demo."""
    monkeypatch.setattr(cli, "PIPELINE_SEARCH", dict(cli.PIPELINE_SEARCH, channels=4, steps=2, multiplier=2,
                                                      max_steps=2))
    monkeypatch.setattr(cli, "PIPELINE_TRAIN", dict(cli.PIPELINE_TRAIN, layers=3, channels=4, max_steps=2))
    out = tmp_path / "pipe"
    assert pipeline_main(["--out", str(out), "--search-epochs", "1", "--train-epochs", "1", "--order", "first",
                          "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (out / "search" / "genotype.json").exists() and (out / "train" / "last.pt").exists()
    weights = torch.load(out / "train" / "last.pt", weights_only=True)
    assert weights["network"]["genotype"] == json.loads((out / "search" / "genotype.json").read_text())
    assert "== 3/3 evaluate" in printed and "final test accuracy" in printed.splitlines()[-1]
    assert "pipeline: search -> train -> eval on digits took" in printed
    # A second run into the same folder is refused rather than mixed with the first.
    assert "is not empty" in _error_line(pipeline_main, ["--out", str(out), "--device", "cpu"], capsys,
                                         "fastdarts-pipeline")


def test_pipeline_with_p_darts_splits_the_epochs_over_its_stages(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "PIPELINE_SEARCH", dict(cli.PIPELINE_SEARCH, channels=4, steps=2, multiplier=2,
                                                      max_steps=1))
    monkeypatch.setattr(cli, "PIPELINE_TRAIN", dict(cli.PIPELINE_TRAIN, layers=3, channels=4, max_steps=1))
    out = tmp_path / "pipe"
    assert pipeline_main(["--out", str(out), "--method", "p-darts", "--search-epochs", "3", "--train-epochs", "1",
                          "--device", "cpu", "--no-progress"]) == 0
    assert "1 epochs in each of the stages 3:8,3:5,3:3" in capsys.readouterr().out
    stages = [json.loads(line)["stage"] for line in (out / "search" / "metrics.jsonl").read_text().splitlines()]
    assert stages == [1, 2, 3]
