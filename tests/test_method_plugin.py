"""A method defined outside the package (issue 23 §5): it registers itself and
runs through ``search()`` and the CLI, touching no file of the package. The
same example as README's "Adding a method"."""
import json

import pytest
import torch

from fastdarts import FastDartsError, Option, SearchConfig, SearchMethod, register_method, register_preset, search
from fastdarts.cli import search_main, search_parser
from fastdarts.method import PRESETS, unregister_method
from fastdarts.search_config import DARTS_PRESET


class AlphaDecay(SearchMethod):
    """A toy regulariser: λ·‖α‖² added to the architecture step's loss, and ‖α‖ logged per epoch."""

    name = "alpha-decay"
    options = (Option("alpha_decay", 0.0, "toy: add λ·‖α‖² to the architecture loss", metavar="λ"),)

    @classmethod
    def check(cls, config, from_preset):
        try:
            value = float(config.alpha_decay)  # the CLI hands in text
        except ValueError:
            raise FastDartsError(f"alpha-decay must be a number, got {config.alpha_decay!r}") from None
        if not value >= 0:
            raise FastDartsError(f"alpha-decay must not be negative, got {value}")
        return {"alpha_decay": value}

    def arch_loss_term(self, model):
        return self.config.alpha_decay * sum((a * a).sum() for a in model.arch_parameters())

    def epoch_figures(self, run, entry):
        return {"alpha_norm": float(torch.cat([a.detach().flatten() for a in run.model.arch_parameters()]).norm())}


@pytest.fixture
def alpha_decay():
    register_method(AlphaDecay)
    register_preset("darts-decay", dict(DARTS_PRESET, alpha_decay=10.0))
    try:
        yield AlphaDecay
    finally:
        unregister_method(AlphaDecay.name)
        PRESETS.pop("darts-decay", None)


TINY = dict(dataset="digits", layout="N,R,N", channels=4, steps=2, multiplier=2, batch_size=16, epochs=2,
            max_steps=3, order="first", device="cpu", progress=False, seed=3)


def _quiet(_):
    pass


def test_a_registered_method_adds_its_option_preset_and_flag(alpha_decay):
    assert SearchConfig(alpha_decay="0.5").checked().alpha_decay == 0.5
    assert SearchConfig().checked().alpha_decay == 0.0  # off unless given
    assert SearchConfig(method="darts-decay").checked().alpha_decay == 10.0  # the preset's
    assert "alpha_decay=10.0" in SearchConfig(method="darts-decay").checked().summary()
    with pytest.raises(FastDartsError, match="alpha-decay must not be negative"):
        SearchConfig(alpha_decay=-1.0).checked()
    help_text = search_parser().format_help()
    assert "--alpha-decay" in help_text and "darts-decay" in help_text
    # Not registered: unknown to the configuration.
    unregister_method(AlphaDecay.name)
    with pytest.raises(TypeError, match="alpha_decay"):
        SearchConfig(alpha_decay=0.5)


def test_a_registered_method_runs_through_search(alpha_decay, tmp_path):
    plain = search(**TINY, out=str(tmp_path / "plain"), log=_quiet)
    decayed = search(**TINY, alpha_decay=50.0, out=str(tmp_path / "decayed"), log=_quiet)
    norm = lambda model: float(torch.cat([a.detach().flatten() for a in model.arch_parameters()]).norm())  # noqa: E731
    # The same seed and batches: only the term differs, and it pulls α towards 0.
    assert norm(decayed.model) < 0.5 * norm(plain.model)
    assert decayed.history[-1]["alpha_norm"] == pytest.approx(norm(decayed.model), rel=1e-5)
    assert "alpha_norm" not in plain.history[-1]  # off: the method is not part of the run
    saved = torch.load(tmp_path / "decayed" / "checkpoint.pt", weights_only=True)
    assert saved["config"]["alpha_decay"] == 50.0  # result-defining: a resume must agree on it


def test_a_registered_method_runs_through_the_cli(alpha_decay, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--dataset", "digits", "--layout", "N,R,N", "--channels", "4", "--steps", "2", "--multiplier", "2",
            "--batch-size", "16", "--epochs", "1", "--max-steps", "2", "--device", "cpu", "--no-progress",
            "--order", "first", "--out", str(out)]
    assert search_main(argv + ["--alpha-decay", "5"]) == 0
    entry = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert entry["alpha_norm"] > 0 and entry["config"]["alpha_decay"] == 5.0
    # Resuming with another value is refused: the option is result-defining.
    assert search_main(argv + ["--alpha-decay", "6", "--resume", "--epochs", "2"]) == 2
    assert "alpha_decay: checkpoint 5.0 vs now 6.0" in capsys.readouterr().err


def test_resuming_a_run_of_a_method_that_is_not_registered_now_says_so(alpha_decay, tmp_path, capsys):
    out = tmp_path / "run"
    search(**dict(TINY, epochs=1, max_steps=1), alpha_decay=1.0, out=str(out), log=_quiet)
    unregister_method(AlphaDecay.name)
    with pytest.raises(FastDartsError, match="written with option.s. alpha_decay, which no registered method has"):
        search(**dict(TINY, epochs=2, max_steps=1), out=str(out), resume=True, log=_quiet)
