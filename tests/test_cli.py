"""`fastdarts-search` as a user runs it: one-line errors, non-zero exits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdarts.cli import search_main

TINY = ["--dataset", "digits", "--layout", "N,R,N", "--channels", "4", "--steps", "2", "--multiplier", "2",
        "--batch-size", "32", "--max-steps", "2", "--device", "cpu", "--no-progress"]


def _fails(argv, capsys, needle):
    with pytest.raises(SystemExit) as exc:  # argparse's own errors
        search_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdarts-search: error: ") and needle in err[0], err


def _error_line(argv, capsys):
    code = search_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fastdarts-search: error: "), err
    return err[0]


@pytest.mark.slow
def test_readme_main_job_runs_offline(tmp_path):
    """The README's first command, exactly (digits, settings under which α moves).
    No timeout: the job takes about two minutes on an idle 2-core machine and
    many times that on a busy one, and a slow machine is no failure (a hang
    would end CI's own time limit)."""
    import math
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"&& (fastdarts-search [^\n`]*)", readme).group(1).split()
    assert command[-2] == "--out"
    out = tmp_path / "digits"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "fastdarts.cli", *command[1:-1], str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    genotype = json.loads((out / "genotype.json").read_text())
    assert set(genotype) == {"normal", "normal_concat", "reduce", "reduce_concat"}
    for cell in ("normal", "reduce"):
        assert len(genotype[cell]) == 8
        for op, node in genotype[cell]:
            assert isinstance(op, str) and op != "none" and isinstance(node, int)
    assert "epoch 6/6" in proc.stdout and "val_acc" in proc.stdout
    # α moved: the README states a drop of the normal cell's mean entropy from ln 8 to 1.96.
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["alpha_entropy"]["normal"] < math.log(8) - 0.05, last["alpha_entropy"]


def test_small_run_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert search_main(TINY + ["--epochs", "1", "--out", out]) == 0
    assert "epoch 1/1" in capsys.readouterr().out
    assert search_main(TINY + ["--epochs", "1", "--out", out, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--ops", "darts,sep_conv_9x9"], "unknown op 'sep_conv_9x9'; known ops: none, max_pool_3x3"),
    (["--layout", "N,Q"], "malformed layout 'N,Q'"),
])
def test_bad_search_space(tmp_path, capsys, extra, needle):
    argv = [a for a in TINY if a not in ("--layout", "N,R,N")] + extra + ["--out", str(tmp_path)]
    assert needle in _error_line(argv, capsys)


@pytest.mark.parametrize("flag", ["--channels", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_sizes(capsys, flag, value):
    _fails([flag, value], capsys, "must be a positive integer")


@pytest.mark.parametrize("argv, needle", [
    (["--seed", "-1"], "seed must be in 0..2**32-1"),
    (["--grad-clip", "0"], "grad-clip must be positive"),
    (["--momentum", "-0.9"], "momentum must not be negative"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--layout", "R,R,R,R,R"], "layout R,R,R,R,R has 5 reduction cells, but 8x8 digits images allow at most 3"),
    (["--layout", "N,R,N", "--stem", "imagenet"],
     "layout N,R,N has 1 reduction cells, but 8x8 digits images (1x1 after the imagenet stem) allow at most 0"),
    (["--multiplier", "3"], "multiplier (3) cannot exceed steps (2)"),
])
def test_bad_values(tmp_path, capsys, argv, needle):
    args = list(TINY)
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert needle in _error_line(args + ["--out", str(tmp_path / "o")], capsys)


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert "is a file" in _error_line(TINY + ["--out", str(tmp_path / "f")], capsys)


def test_missing_cifar_without_download(tmp_path, capsys):
    line = _error_line(["--dataset", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert "--download" in line and str(tmp_path) in line


def test_corrupt_archive(tmp_path, capsys):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b truncated")
    line = _error_line(["--dataset", "cifar10", "--download", "--data", str(tmp_path), "--out",
                        str(tmp_path / "o")], capsys)
    assert "cifar-10-python.tar.gz" in line and "md5" in line.lower()
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_resume_with_other_configuration(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert search_main(TINY + ["--epochs", "1", "--out", out]) == 0
    capsys.readouterr()
    line = _error_line([a if a != "4" else "6" for a in TINY] + ["--epochs", "1", "--out", out, "--resume"], capsys)
    assert "different configuration" in line and "channels" in line


def test_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import fastdarts.cli as cli

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "search", interrupted)
    assert search_main(TINY + ["--out", str(tmp_path)]) == 130
    assert "--resume" in capsys.readouterr().err


def test_genotype_cli_prints_and_draws(tmp_path, capsys):
    from fastdarts.cli import genotype_main

    assert genotype_main(["DARTS_V2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "node 3 = skip_connect(c_{k-2}) + dil_conv_3x3(node 0)" in out
    assert (tmp_path / "normal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "reduce.png").exists()


@pytest.mark.parametrize("content, needle", [
    ('{"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1]], "normal_concat": [2]}', "missing key(s) reduce"),
    ('{"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 3]], "normal_concat": [2],'
     ' "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]], "reduce_concat": [2]}', "not an earlier node"),
    ("{not json", "not valid JSON"),
])
def test_genotype_cli_bad_files(tmp_path, capsys, content, needle):
    from fastdarts.cli import genotype_main

    path = tmp_path / "g.json"
    path.write_text(content)
    assert genotype_main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdarts-genotype: error: ") and needle in err[0], err
    assert str(path) in err[0]


def test_genotype_cli_unknown_name(capsys):
    from fastdarts.cli import genotype_main

    assert genotype_main(["DARTS_V3"]) == 2
    assert "DARTS_V1" in capsys.readouterr().err
