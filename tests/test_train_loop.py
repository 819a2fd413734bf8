"""Training from scratch on real offline data (scikit-learn's digits)."""
import json

import pytest
import torch

import fastdarts.train_loop as train_module
from fastdarts import DARTS_V1, DARTS_V2, FastDartsError, TrainConfig, train
from fastdarts.evaluate import WEIGHTS_FORMAT

# A genuinely small network: 5 cells (reductions at 1 and 3), C=8, on 8x8 digits.
TINY = dict(dataset="digits", layers=5, channels=8, batch_size=64, device="cpu", progress=False)


def _quiet(_):
    pass


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_digits_training_is_clearly_above_chance(tmp_path):
    """Four epochs over the 1437 training digits (about 10 s on one CPU core) with the
    paper's recipe otherwise (auxiliary head, drop path, cutout): well above the 10% of chance."""
    result = train(epochs=4, out=str(tmp_path), log=_quiet, **TINY)
    assert result.test_acc > 50, result.history
    assert result.parameters == sum(p.numel() for n, p in result.model.named_parameters() if "auxiliary" not in n)
    lines = _metrics(tmp_path)
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert [m["drop_path_prob"] for m in lines] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert lines[0]["lr"] == 0.025 and lines[-1]["lr"] < lines[0]["lr"]
    assert lines[-1]["test_acc"] == result.test_acc and lines[-1]["test_top5"] >= lines[-1]["test_acc"]
    assert all(m["aux_loss"] > 0 and m["train_loss"] > 0 for m in lines)
    for name in ("checkpoint.pt", "best.pt", "last.pt", "curves.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert last["format"] == WEIGHTS_FORMAT and last["epoch"] == 4 and last["dataset"] == "digits"
    assert best["test_acc"] == max(m["test_acc"] for m in lines)
    assert last["network"]["genotype"] == DARTS_V2.to_dict() and last["network"]["channels"] == 8
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, last["state_dict"][k]), k


def test_learning_rate_is_cosine_to_zero(tmp_path):
    result = train(epochs=3, max_steps=1, out=str(tmp_path), log=_quiet, **TINY)
    assert [h["lr"] for h in result.history] == pytest.approx([0.025, 0.01875, 0.00625])


def _state(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _same_run(whole, split):
    a, b = _state(whole), _state(split)
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for x, y in zip(_metrics(whole), _metrics(split)):
        x.pop("seconds"), y.pop("seconds")
        assert x == y


# Drop path is on from epoch 2 and cutout from the start, so the resumed epochs
# must replay their masks and augmentations exactly; the runs are cut after
# epoch 2, once drop path has drawn masks (a draw from the global generator
# would then be out of step after the resume).
RESUME = dict(TINY, epochs=3, max_steps=3, drop_path_prob=0.5, cutout=4)


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    train(out=str(tmp_path / "whole"), log=_quiet, **RESUME)

    class Interrupt(Exception):
        pass

    def interrupt_after_second_epoch(entry):
        if entry["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(out=str(tmp_path / "split"), log=_quiet, on_epoch_end=interrupt_after_second_epoch, **RESUME)
    assert not (tmp_path / "split" / "curves.png").exists()
    result = train(out=str(tmp_path / "split"), resume=True, log=_quiet, **RESUME)
    assert len(result.history) == 3
    _same_run(tmp_path / "whole", tmp_path / "split")


def test_resume_after_an_interrupt_inside_an_epoch(tmp_path, monkeypatch):
    train(out=str(tmp_path / "whole"), log=_quiet, **RESUME)
    calls = {"n": 0}
    real_step = train_module.train_step

    def step_then_crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * RESUME["max_steps"] + 2:  # the second step of epoch 3
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(out=str(tmp_path / "split"), log=_quiet, **RESUME)
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert len(_state(tmp_path / "split")["history"]) == 2
    train(out=str(tmp_path / "split"), resume=True, log=_quiet, **RESUME)
    _same_run(tmp_path / "whole", tmp_path / "split")


def test_resume_refuses_another_configuration(tmp_path):
    train(epochs=1, max_steps=1, out=str(tmp_path), log=_quiet, **TINY)
    with pytest.raises(FastDartsError, match="different configuration.*channels: checkpoint 8 vs now 6"):
        train(epochs=1, max_steps=1, out=str(tmp_path), resume=True, log=_quiet, **{**TINY, "channels": 6})
    with pytest.raises(FastDartsError, match="different configuration.*genotype differs"):
        train(epochs=1, max_steps=1, out=str(tmp_path), resume=True, genotype="DARTS_V1", log=_quiet, **TINY)
    # The same genotype named by its file is the same configuration.
    DARTS_V2.save(tmp_path / "g.json")
    result = train(epochs=1, max_steps=1, out=str(tmp_path), resume=True, genotype=str(tmp_path / "g.json"),
                   log=_quiet, **TINY)
    assert len(result.history) == 1


def test_existing_checkpoint_is_not_overwritten_and_resume_needs_one(tmp_path):
    with pytest.raises(FastDartsError, match="no checkpoint at"):
        train(epochs=1, max_steps=1, out=str(tmp_path), resume=True, log=_quiet, **TINY)
    train(epochs=1, max_steps=1, out=str(tmp_path), log=_quiet, **TINY)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(FastDartsError, match="already holds a training checkpoint; pass --resume"):
        train(epochs=1, max_steps=1, out=str(tmp_path), log=_quiet, **TINY)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(FastDartsError, match="cannot read training checkpoint"):
        train(epochs=1, max_steps=1, out=str(tmp_path), resume=True, log=_quiet, **TINY)


def test_bf16_autocast_and_channels_last_run_and_train(tmp_path, monkeypatch):
    """The GPU speed options work on the CPU too: the convolutions run in bf16 on
    channels-last tensors, the weights stay float32 and channels-last, and the network learns."""
    seen = {}
    real_init = train_module._Trainer.__init__

    def init_and_hook(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen["model"] = self.model

        def record(module, inputs, output):
            seen.setdefault("conv_out", (output.dtype, output.is_contiguous(memory_format=torch.channels_last)))

        self.model.stem[0].register_forward_hook(record)

    monkeypatch.setattr(train_module._Trainer, "__init__", init_and_hook)
    result = train(epochs=3, bf16=True, channels_last=True, out=str(tmp_path), log=_quiet, **TINY)
    assert seen["conv_out"] == (torch.bfloat16, True)
    weight = seen["model"].stem[0].weight
    assert weight.dtype == torch.float32 and weight.is_contiguous(memory_format=torch.channels_last)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] and result.test_acc > 30, result.history


def test_options_default_off_on_the_cpu(tmp_path):
    lines = []
    train(epochs=1, max_steps=1, out=str(tmp_path), log=lines.append, **TINY)
    assert "bf16 off, channels-last off" in lines[0]
    assert "0.0366 M parameters" in lines[0] and "multiply-adds at 1x8x8" in lines[0]


def test_cutout_default_scales_with_the_image():
    assert train_module.default_cutout(32) == 16 and train_module.default_cutout(8) == 4


@pytest.mark.parametrize("field, value, needle", [
    ("channels", 0, "channels must be a positive integer"),
    ("layers", -2, "layers must be a positive integer"),
    ("drop_path_prob", 1.0, r"drop-path-prob must be in \[0, 1\)"),
    ("auxiliary_weight", -0.4, "auxiliary-weight must not be negative"),
    ("cutout", -1, "cutout must be a non-negative integer"),
    ("grad_clip", 0, "grad-clip must be positive"),
    ("genotype", "DARTS_V9", "unknown genotype 'DARTS_V9'.*DARTS_V1, DARTS_V2"),
    ("device", "tpu:0", "unknown device"),
    ("seed", -1, "seed must be in"),
    ("lr_min", 0.5, r"lr-min \(0.5\) must not exceed lr \(0.025\)"),
    ("batch_size", 1, "batch-size 1 cannot train the auxiliary head"),
])
def test_bad_configuration(tmp_path, field, value, needle):
    with pytest.raises(FastDartsError, match=needle):
        train(epochs=1, out=str(tmp_path), log=_quiet, **{**TINY, field: value})


def test_metrics_are_written_before_the_checkpoint_and_best_is_the_first_best(tmp_path, monkeypatch):
    """metrics.jsonl goes to disk before checkpoint.pt, so a crash between them never
    leaves a checkpoint newer than the metrics; with every epoch tied, best.pt is
    epoch 1, the epoch the final report and the curves name as best."""
    written = []
    real_save, real_jsonl = train_module.save_torch, train_module.write_jsonl
    monkeypatch.setattr(train_module, "save_torch", lambda path, obj: (written.append(path.name), real_save(path, obj)))
    monkeypatch.setattr(train_module, "write_jsonl",
                        lambda path, entries: (written.append(path.name), real_jsonl(path, entries)))
    monkeypatch.setattr(train_module, "evaluate",
                        lambda *a, **k: dict(loss=1.0, top1=50.0, top5=90.0, images=360))
    lines = []
    train(epochs=3, max_steps=1, out=str(tmp_path), log=lines.append, **TINY)
    # Epoch 1 is the best so far; epochs 2 and 3 only tie it, so best.pt is not rewritten.
    assert written == ["last.pt", "best.pt", "metrics.jsonl", "checkpoint.pt"] + [
        "last.pt", "metrics.jsonl", "checkpoint.pt"] * 2
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    assert any("best 50.00% at epoch 1" in line for line in lines)


def test_logged_drop_path_prob_is_the_models(tmp_path, monkeypatch):
    used = []
    real_step = train_module.train_step

    def recording_step(model, *args, **kwargs):
        used.append(model.drop_path_prob)
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", recording_step)
    result = train(epochs=3, max_steps=1, drop_path_prob=0.3, out=str(tmp_path), log=_quiet, **TINY)
    assert [h["drop_path_prob"] for h in result.history] == used
    assert used == pytest.approx([0.0, 0.1, 0.2])  # p * epoch / epochs, epoch from 0: p*(E-1)/E at the end


def test_a_last_batch_of_one_image_is_dropped(tmp_path, monkeypatch):
    """1437 training digits in batches of 4 leave one image for the last batch: the
    auxiliary head's BatchNorm cannot train on it (1x1 maps), so the loader drops it.
    A whole epoch (359 steps, every batch of 4) runs."""
    from fastdarts.data import load_dataset
    from fastdarts.eval_network import NetworkCIFAR

    assert len(load_dataset("digits").train) % 4 == 1
    model = NetworkCIFAR(DARTS_V2, C=2, num_classes=10, layers=3, in_channels=1, image_size=8).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # why it is dropped
        train_module.train_step(model, optimizer, torch.randn(1, 1, 8, 8), torch.tensor([3]),
                                auxiliary_weight=0.4, grad_clip=5.0, bf16=False)
    assert train_module._Trainer.drops_last_batch(1437, 4)
    assert not train_module._Trainer.drops_last_batch(1437, 64)      # 29 left: kept
    assert not train_module._Trainer.drops_last_batch(50_000, 96)    # CIFAR-10 at the paper's batch: 80 left
    sizes = []
    real_step = train_module.train_step

    def recording_step(model, optimizer, x, y, **kwargs):
        sizes.append(len(y))
        return real_step(model, optimizer, x, y, **kwargs)

    monkeypatch.setattr(train_module, "train_step", recording_step)
    result = train(epochs=1, out=str(tmp_path), log=_quiet, **{**TINY, "layers": 3, "channels": 2, "batch_size": 4})
    assert len(sizes) == 359 and set(sizes) == {4}
    assert len(result.history) == 1


def test_training_a_v1_genotype_file(tmp_path):
    DARTS_V1.save(tmp_path / "v1.json")
    result = train(epochs=1, max_steps=2, genotype=str(tmp_path / "v1.json"), out=str(tmp_path / "run"), log=_quiet,
                   **TINY)
    assert result.model.genotype == DARTS_V1


def test_config_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.layers, c.channels, c.batch_size, c.epochs, c.lr, c.lr_min, c.momentum, c.weight_decay,
            c.auxiliary, c.auxiliary_weight, c.drop_path_prob, c.grad_clip, c.dataset, c.genotype) == (
        20, 36, 96, 600, 0.025, 0.0, 0.9, 3e-4, True, 0.4, 0.2, 5.0, "cifar10", "DARTS_V2")
    assert c.cutout is None and train_module.default_cutout(32) == 16
