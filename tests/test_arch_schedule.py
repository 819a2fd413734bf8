"""When the architecture step runs (issue 24 §1.1): ``arch_every`` (an α step
after every k-th weight batch), ``arch_after_weights`` (the α step follows
the weight step) and the warm-up, each checked against the original's rule
written out here, not against the presets' values."""
import json

import pytest

from fastdarts import Architect, FastDartsError, SearchConfig, search
from fastdarts.cuda_graph import DeviceLrSGD
from helpers import TINY_SEARCH, search_cli_error


def _quiet(_):
    pass


def proxyless_schedule(joint_epoch: int, batch: int, every: int) -> list[str]:
    """ProxylessNAS' order within one batch of its joint search, written from
    mit-han-lab/proxylessnas search/nas_manager.py: the weight step first
    (l. 384-387), then, if ``epoch > 0`` (l. 391), ``update_schedule.get(i, 0)``
    α steps (l. 393), where the schedule holds ``(i + 1) % every == 0``
    (l. 71-76, ``get_update_schedule``)."""
    steps = ["W"]
    if joint_epoch > 0 and (batch + 1) % every == 0:
        steps.append("A")
    return steps


@pytest.fixture
def recorded(monkeypatch):
    """The order of the run's weight steps ("W") and architecture steps ("A")."""
    calls = []
    arch_step, weight_step = Architect.step, DeviceLrSGD.step

    def arch(self, *args, **kwargs):
        calls.append("A")
        return arch_step(self, *args, **kwargs)

    def weights(self, *args, **kwargs):
        calls.append("W")
        return weight_step(self, *args, **kwargs)

    monkeypatch.setattr(Architect, "step", arch)
    monkeypatch.setattr(DeviceLrSGD, "step", weights)
    return calls


def _run(tmp_path, **kw):
    settings = dict(TINY_SEARCH, order="first", batch_size=16, **kw)
    return search(out=str(tmp_path), log=_quiet, **settings)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_an_arch_step_after_every_kth_weight_step(tmp_path, recorded, every):
    # The original's first joint epoch makes no α step: here that is one warm-up epoch.
    result = _run(tmp_path, epochs=2, max_steps=6, arch_every=every, arch_after_weights=True,
                  arch_warmup_epochs=1)
    expected = [s for epoch in range(2) for i in range(6) for s in proxyless_schedule(epoch, i, every)]
    assert recorded == expected
    assert [h["arch_steps"] for h in result.history] == [0, 6 // every]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["arch_steps"] for line in lines] == [0, 6 // every]
    assert lines[0]["arch_loss"] is None and lines[1]["arch_loss"] > 0


def test_darts_order_is_the_arch_step_first(tmp_path, recorded):
    # DARTS (quark0/darts cnn/train_search.py, train()): architect.step, then the weight step, every batch.
    result = _run(tmp_path, epochs=1, max_steps=3)
    assert recorded == ["A", "W"] * 3
    assert result.history[0]["arch_steps"] == 3


def test_the_schedule_draws_one_architecture_batch_per_arch_step(tmp_path):
    """A skipped batch draws nothing from the architecture half: α's updates see
    its batches in order, as the original's ``valid_next_batch`` (nas_manager.py:551)."""
    every_2 = _run(tmp_path / "a", epochs=1, max_steps=4, arch_every=2)
    once = _run(tmp_path / "b", epochs=1, max_steps=4, arch_every=1)
    assert every_2.history[0]["arch_steps"] == 2 and once.history[0]["arch_steps"] == 4
    assert every_2.history[0]["alphas"] != once.history[0]["alphas"]


def test_the_proxyless_preset_follows_the_original_schedule_scaled_to_its_epochs(tmp_path, recorded):
    """The original (imagenet_arch_search.py:37, 75, 87): 40 warm-up epochs and 120
    joint ones, no α step in the first joint epoch, one after every 5th weight
    step. Scaled to the preset's run of E epochs, the warm-up is
    floor(E·40/160) epochs, then one joint epoch without α."""
    config = SearchConfig(method="proxyless").checked()
    warmup = config.epochs * 40 // (40 + 120) + 1
    assert (config.arch_warmup_epochs, config.arch_every, config.arch_after_weights) == (warmup, 5, True)
    # A run of the preset's schedule: weights alone through the warm-up, then α after every 5th step.
    result = _run(tmp_path, method="proxyless", epochs=warmup + 1, max_steps=10, arch_warmup_epochs=None)
    assert [h["arch_steps"] for h in result.history] == [0] * warmup + [2]
    last = recorded[-12:]
    assert last == [s for i in range(10) for s in proxyless_schedule(1, i, 5)]


@pytest.mark.parametrize("kw, needle", [
    (dict(arch_every=0), "arch-every must be a positive integer"),
    (dict(arch_every=True), "arch-every must be a positive integer"),
    (dict(arch_after_weights="yes"), "arch-after-weights must be true or false"),
    (dict(arch_every=2, cuda_graph=True), "--arch-every 2 alternates two kinds of step"),
])
def test_bad_schedules_are_refused(kw, needle):
    with pytest.raises(FastDartsError, match=needle):
        SearchConfig(**kw).checked()


def test_cli_refuses_a_bad_arch_every(tmp_path, capsys):
    line = search_cli_error(["--dataset", "digits", "--arch-every", "0", "--out", str(tmp_path)], capsys)
    assert "--arch-every" in line
