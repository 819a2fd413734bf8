"""Test accuracy and loading trained weights: fastdarts files and the original DARTS code's state_dicts."""
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fastdarts import DARTS_V1, DARTS_V2, FastDartsError, NetworkCIFAR, train
from fastdarts.evaluate import evaluate, evaluate_checkpoint, load_original_darts_state_dict, load_trained


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained digits network (5 cells, C=8) and its output folder."""
    out = tmp_path_factory.mktemp("trained")
    train(dataset="digits", layers=5, channels=8, batch_size=64, epochs=2, max_steps=8, device="cpu", progress=False,
          out=str(out), log=lambda _: None)
    return out


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits[x.long().flatten()], None


def test_evaluate_counts_top1_and_top5():
    # 6 classes; the true class is ranked 1st, 2nd, 5th and 6th for the four samples.
    logits = torch.tensor([[6., 5, 4, 3, 2, 1]] * 4)
    labels = torch.tensor([0, 1, 4, 5])
    batches = [(torch.tensor([0., 1]), labels[:2]), (torch.tensor([2., 3]), labels[2:])]
    model = FixedLogits(logits)
    model.train()
    result = evaluate(model, batches)
    assert result["top1"] == 25.0 and result["top5"] == 75.0 and result["images"] == 4
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert result["loss"] == pytest.approx(expected)
    assert model.training  # the mode is restored


def test_evaluate_puts_the_network_in_eval_mode():
    model = NetworkCIFAR(DARTS_V2, C=4, layers=5, auxiliary=True)
    model.drop_path_prob = 0.5
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    first = evaluate(model, [(x, y)])
    assert evaluate(model, [(x, y)]) == first  # no drop path, no batch statistics


def test_checkpoint_reports_the_training_runs_accuracy(trained):
    last = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()][-1]
    result = evaluate_checkpoint(trained / "last.pt", device="cpu")
    assert result["dataset"] == "digits" and result["images"] == 360 and result["source"] == "fastdarts"
    # Another batch size than in training: at most a rounding flip of one image.
    assert abs(result["top1"] - last["test_acc"]) <= 100 / 360 + 1e-9
    assert result["parameters"] < result["parameters_with_auxiliary"]
    assert result["network"]["genotype"] == DARTS_V2.to_dict()
    # The training checkpoint loads too, and with the right genotype named explicitly.
    again = evaluate_checkpoint(trained / "checkpoint.pt", genotype="DARTS_V2", channels=8, layers=5, device="cpu")
    assert again["top1"] == result["top1"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(genotype="DARTS_V1"), "was trained for another genotype"),
    (dict(channels=36), "holds a network with channels=8, not 36"),
    (dict(layers=20), "holds a network with layers=5, not 20"),
])
def test_fastdarts_file_for_another_network(trained, kwargs, needle):
    with pytest.raises(FastDartsError, match=needle):
        evaluate_checkpoint(trained / "last.pt", device="cpu", **kwargs)


def test_missing_cifar10_is_reported(trained, tmp_path):
    with pytest.raises(FastDartsError, match="CIFAR-10 not found"):
        evaluate_checkpoint(trained / "last.pt", dataset="cifar10", data=str(tmp_path), device="cpu")


@pytest.mark.parametrize("in_channels, num_classes, needle", [
    (3, 10, "3-channel images and 10 classes, but digits has 1-channel images and 10 classes"),
    (1, 7, "1-channel images and 7 classes, but digits has 1-channel images and 10 classes"),
])
def test_network_for_other_images_or_classes_is_refused(tmp_path, in_channels, num_classes, needle):
    model = NetworkCIFAR(DARTS_V2, C=4, layers=5, num_classes=num_classes, in_channels=in_channels)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(FastDartsError, match=f"holds a network for {needle}"):
        evaluate_checkpoint(tmp_path / "w.pt", genotype="DARTS_V2", dataset="digits", device="cpu")


def test_evaluation_defaults_to_float32():
    """bf16 only when asked, on any device; channels-last follows the device as in training."""
    from fastdarts.run_utils import resolve_fast_options

    assert resolve_fast_options(torch.device("cuda"), None, None, bf16_default=False) == (False, True)
    assert resolve_fast_options(torch.device("cuda"), True, False, bf16_default=False) == (True, False)
    assert resolve_fast_options(torch.device("cpu"), None, None) == (False, False)


@pytest.mark.parametrize("damage, needle", [
    (lambda w: w.update(network="oops"), "its 'network' entry is not a dict"),
    (lambda w: w["network"].pop("genotype"), "network spec lacks genotype"),
    (lambda w: w["network"].update(genotype={"normal": []}), "genotype has missing key"),
    (lambda w: w["network"].update(channels="8"), "channels must be a positive integer"),
    (lambda w: w.pop("state_dict"), "its 'state_dict' entry is missing"),
])
def test_damaged_fastdarts_file(trained, tmp_path, damage, needle):
    weights = torch.load(trained / "last.pt", weights_only=True)
    damage(weights)
    torch.save(weights, tmp_path / "damaged.pt")
    with pytest.raises(FastDartsError, match="damaged fastdarts file") as info:
        load_trained(tmp_path / "damaged.pt")
    assert needle in str(info.value) and "\n" not in str(info.value)
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    state.pop("model")
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(FastDartsError, match="its 'model' entry is missing"):
        load_trained(tmp_path / "checkpoint.pt")


def original_style(model, prefix="module.", wrap=True):
    """A state_dict as the original DARTS code saves it: no num_batches_tracked
    (PyTorch < 0.4.1), here also through DataParallel and inside a checkpoint dict."""
    state = OrderedDict((prefix + k, v.clone()) for k, v in model.state_dict().items()
                        if not k.endswith("num_batches_tracked"))
    return {"epoch": 600, "state_dict": state} if wrap else state


def _randomised(model):
    """Weights and BN statistics that are not the initial ones, so a load is visible."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=gen) + (0.5 if "running_var" in k else -0.5))
    return model


@pytest.mark.parametrize("prefix, wrap", [("", False), ("module.", False), ("module.", True)])
def test_original_darts_state_dict_loads(tmp_path, prefix, wrap):
    source = _randomised(NetworkCIFAR(DARTS_V2, C=6, num_classes=10, layers=5, auxiliary=True)).eval()
    path = tmp_path / "weights.pt"
    torch.save(original_style(source, prefix, wrap), path)
    loaded = load_trained(path, genotype=DARTS_V2)
    model = loaded.model.eval()
    assert loaded.source == "original DARTS state_dict"
    spec = model.spec()
    assert (spec["channels"], spec["layers"], spec["num_classes"], spec["auxiliary"]) == (6, 5, 10, True)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x)[0], source(x)[0])


@pytest.mark.parametrize("location", ["cpu", "cuda:0"])
def test_legacy_format_and_cuda_tensors_load(tmp_path, monkeypatch, location):
    """The released DARTS model was written by PyTorch 0.3/0.4: the legacy (non-zip)
    format, from CUDA tensors. Written here in that format with the storages tagged
    with the file's location; it loads (weights_only) onto the CPU and evaluates."""
    source = _randomised(NetworkCIFAR(DARTS_V2, C=4, layers=5, in_channels=1, image_size=8)).eval()
    path = tmp_path / "legacy.pt"
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: location)
    torch.save(original_style(source, wrap=True), path, _use_new_zipfile_serialization=False)
    monkeypatch.undo()
    import zipfile
    assert not zipfile.is_zipfile(path)  # really the legacy format
    if location != "cpu" and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does on a CPU machine
            torch.load(path, weights_only=True)
    loaded = load_trained(path, genotype=DARTS_V2)
    assert all(v.device.type == "cpu" for v in loaded.model.state_dict().values())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded.model.eval()(x)[0], source(x)[0])
    result = evaluate_checkpoint(path, genotype="DARTS_V2", dataset="digits", device="cpu")
    assert result["source"] == "original DARTS state_dict" and result["images"] == 360 and not result["bf16"]


def test_converter_adds_batch_counters_and_strips_the_prefix():
    model = NetworkCIFAR(DARTS_V2, C=4, layers=5)
    state = load_original_darts_state_dict(original_style(model))
    assert state.keys() == model.state_dict().keys()
    assert state["stem.1.num_batches_tracked"].item() == 0
    with pytest.raises(FastDartsError, match="not a state_dict"):
        load_original_darts_state_dict([1, 2])
    with pytest.raises(FastDartsError, match="is not a named tensor"):
        load_original_darts_state_dict({"a": 1})


def test_original_weights_of_another_genotype_or_width(tmp_path):
    path = tmp_path / "v1.pt"
    torch.save(original_style(NetworkCIFAR(DARTS_V1, C=6, layers=5), wrap=False), path)
    with pytest.raises(FastDartsError, match="do not fit the given genotype at C=6, 5 layers: .*missing"):
        load_trained(path, genotype=DARTS_V2)
    with pytest.raises(FastDartsError, match="holds a network with channels=6, not 36"):
        load_trained(path, genotype=DARTS_V1, channels=36)
    with pytest.raises(FastDartsError, match="pass --genotype"):
        load_trained(path)
    assert load_trained(path, genotype=DARTS_V1, channels=6, layers=5).model.genotype == DARTS_V1


def test_unreadable_files(tmp_path):
    with pytest.raises(FastDartsError, match="no weights file at"):
        load_trained(tmp_path / "missing.pt", genotype=DARTS_V2)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(FastDartsError, match="cannot read weights file"):
        load_trained(tmp_path / "garbage.pt", genotype=DARTS_V2)
    torch.save({"stem.0.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(FastDartsError, match="not the state_dict of a DARTS NetworkCIFAR or NetworkImageNet: it has no classifier"):
        load_trained(tmp_path / "other.pt", genotype=DARTS_V2)
