"""Method presets (``--method``), explicit flags over presets, and resume
checks for the method fields (issue 8 §3)."""
import json

import pytest
import torch

from fastdarts.cli import pipeline_parser, search_main, search_parser
from fastdarts.errors import FastDartsError
from fastdarts.methods import METHOD_PRESETS
from fastdarts.search_loop import SearchConfig, search

TINY = dict(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, batch_size=16,
            max_steps=2, device="cpu", progress=False)


def _quiet(_):
    pass


def test_darts_preset_is_the_paper():
    c = SearchConfig().checked()
    assert (c.method, c.batch_size, c.epochs, c.lr, c.lr_min, c.arch_lr, c.arch_weight_decay, c.order) == \
        ("darts", 64, 50, 0.025, 0.001, 3e-4, 1e-3, "second")
    assert (c.partial_channels, c.edge_norm, c.sample_paths, c.arch_warmup_epochs) == (1, False, 0, 0)
    assert c.arch_beta1 == 0.5  # Adam betas (0.5, 0.999) on α


def test_pc_darts_preset_is_the_papers_cifar10_search():
    c = SearchConfig(method="pc-darts").checked()
    assert (c.partial_channels, c.edge_norm, c.batch_size, c.lr, c.lr_min, c.arch_lr, c.order,
            c.arch_warmup_epochs, c.epochs) == (4, True, 256, 0.1, 0.0, 6e-4, "first", 15, 50)


def test_proxyless_preset():
    c = SearchConfig(method="proxyless").checked()
    assert (c.sample_paths, c.order, c.arch_lr, c.arch_weight_decay, c.arch_beta1) == (2, "first", 1e-3, 0.0, 0.0)


def test_the_architects_adam_takes_the_methods_beta1(tmp_path):
    # ProxylessNAS' Adam on α has betas (0, 0.999); an explicit --arch-beta1 wins; out of [0, 1) is refused.
    from fastdarts.search_loop import SearchRun as _Searcher
    from fastdarts.distributed import DistContext

    for argv, beta1 in ((["--method", "proxyless"], 0.0), (["--method", "proxyless", "--arch-beta1", "0.3"], 0.3),
                        ([], 0.5)):
        args = vars(search_parser().parse_args(argv + ["--dataset", "digits", "--layout", "N,R,N", "--channels", "4",
                                                       "--out", str(tmp_path / str(beta1)), "--device", "cpu"]))
        searcher = _Searcher(SearchConfig(**args), _quiet, DistContext())
        assert searcher.architect.optimizer.param_groups[0]["betas"] == (beta1, 0.999)
    with pytest.raises(FastDartsError, match=r"arch-beta1 must be in \[0, 1\), got 1.0"):
        SearchConfig(arch_beta1=1.0).checked()


def test_an_explicit_field_wins_over_the_preset():
    c = SearchConfig(method="pc-darts", batch_size=32, lr=0.05, arch_warmup_epochs=0, edge_norm=False).checked()
    assert (c.batch_size, c.lr, c.arch_warmup_epochs, c.edge_norm, c.partial_channels) == (32, 0.05, 0, False, 4)
    # The same through the command line: flags not given stay None and take the preset.
    args = vars(search_parser().parse_args(["--method", "pc-darts", "--batch-size", "32", "--no-edge-norm"]))
    c = SearchConfig(**args).checked()
    assert (c.batch_size, c.edge_norm, c.lr, c.partial_channels) == (32, False, 0.1, 4)
    # A method option on its own, on top of DARTS.
    c = SearchConfig(**vars(search_parser().parse_args(["--partial-channels", "2", "--edge-norm"]))).checked()
    assert (c.method, c.partial_channels, c.edge_norm, c.order) == ("darts", 2, True, "second")


def test_checked_is_idempotent():
    for method in METHOD_PRESETS:
        c = SearchConfig(method=method).checked()
        assert c.checked() == c


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(FastDartsError,
                       match="unknown method 'enas'; known methods: darts, pc-darts, pc-darts-imagenet, proxyless, p-darts, darts-"):
        SearchConfig(method="enas").checked()


@pytest.mark.parametrize("argv, message", [
    (["--arch-warmup-epochs", "-1"], "must not be negative"),
    (["--method", "nope"], "invalid choice: 'nope'"),
])
def test_bad_method_flags_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        search_main(["--dataset", "digits", "--out", str(out), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_pipeline_takes_a_method():
    args = pipeline_parser().parse_args(["--method", "pc-darts"])
    assert args.method == "pc-darts" and args.order == "first"


def test_a_checkpoint_from_before_the_methods_resumes_as_darts(tmp_path):
    """Checkpoints written before issue 8 have no method fields: they ran DARTS."""
    config = SearchConfig(epochs=2, order="first", **TINY)
    with pytest.raises(KeyboardInterrupt):
        def stop(entry):
            raise KeyboardInterrupt
        search(config, out=str(tmp_path), log=_quiet, on_epoch_end=stop)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for key in ("method", "partial_channels", "edge_norm", "sample_paths", "arch_warmup_epochs"):
        del state["config"][key]
    torch.save(state, path)
    result = search(config, out=str(tmp_path), resume=True, log=_quiet)
    assert len(result.history) == 2
    # ...but not as another method.
    other = tmp_path / "other"
    other.mkdir()
    torch.save(state, other / "checkpoint.pt")
    with pytest.raises(FastDartsError, match="method: checkpoint 'darts' vs now 'pc-darts'"):
        search(SearchConfig(method="pc-darts", epochs=2, order="first", **TINY), out=str(other), resume=True,
               log=_quiet)


def test_metrics_record_the_effective_configuration(tmp_path):
    search(SearchConfig(method="pc-darts", epochs=1, arch_warmup_epochs=0, **TINY), out=str(tmp_path), log=_quiet)
    entry = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert entry["method"] == "pc-darts" and entry["config"]["partial_channels"] == 4
    assert entry["config"] == torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert len(entry["betas"]["normal"]) == 5 and abs(sum(entry["betas"]["normal"][:2]) - 1) < 1e-6
