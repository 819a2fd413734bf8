"""The search loop on real offline data (scikit-learn's digits)."""
import json

import pytest
import torch

import fastdarts.search_loop as search_module
from fastdarts import DARTS_OPS, FastDartsError, Genotype, SearchConfig, search
from fastdarts.search_loop import cosine_lr
from helpers import TINY_SEARCH as TINY


def _quiet(_):
    pass


def test_cosine_schedule_matches_the_reference():
    lrs = [cosine_lr(e, 50, 0.025, 0.001) for e in range(50)]
    assert lrs[0] == 0.025
    assert lrs[25] == pytest.approx(0.013)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.025), 50, eta_min=0.001)
    for e in range(50):
        assert lrs[e] == pytest.approx(sched.get_last_lr()[0], rel=1e-9)
        sched.optimizer.step()
        sched.step()


def test_search_writes_every_output(tmp_path):
    from fastdarts.kernels.backend import kernel_backend

    logged = []
    result = search(epochs=2, out=str(tmp_path), log=logged.append, **TINY)
    # The effective configuration is printed first, then the kernel implementation,
    # which is recorded per epoch and in the checkpoint.
    kernels = kernel_backend(torch.device("cpu"))
    assert logged[0].startswith("method: darts (method=darts, ") and "order=second" in logged[0]
    assert logged[1].startswith(f"mixed-op backend: fused, recompute: edge, kernels: {kernels} (usable here: ")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["kernels"] == kernels
    assert isinstance(result.genotype, Genotype)
    data = json.loads((tmp_path / "genotype.json").read_text())
    assert set(data) == {"normal", "normal_concat", "reduce", "reduce_concat"}
    assert Genotype.from_dict(data) == result.genotype
    for name in ("normal.png", "reduce.png", "alphas.png", "checkpoint.pt", "genotype.txt"):
        assert (tmp_path / name).stat().st_size > 1000 or name == "genotype.txt", name
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert m["backend"] == "fused" and m["recompute"] == "edge" and m["kernels"] == kernels
        assert m["method"] == "darts" and m["config"]["batch_size"] == TINY["batch_size"] and "betas" not in m
        assert 0 <= m["train_acc"] <= 100 and 0 <= m["val_acc"] <= 100
        assert m["lr"] <= 0.025 and m["train_loss"] > 0
        assert len(m["alphas"]["normal"]) == 5 and len(m["alphas"]["normal"][0]) == 8
    assert lines[0]["lr"] == 0.025 and lines[1]["lr"] < 0.025
    # α moved away from its near-uniform start.
    assert lines[-1]["alpha_entropy"]["normal"] < torch.log(torch.tensor(8.0)).item()


def _alphas(out):
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    return state["model"]["alpha_normal"], state["model"]["alpha_reduce"], state


def test_resumed_run_ends_with_the_same_alpha(tmp_path):
    config = SearchConfig(epochs=3, order="second", **TINY)
    search(config, out=str(tmp_path / "whole"), log=_quiet)

    class Interrupt(Exception):
        pass

    def interrupt_after_first_epoch(entry):
        if entry["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        search(config, out=str(tmp_path / "split"), log=_quiet, on_epoch_end=interrupt_after_first_epoch)
    assert not (tmp_path / "split" / "genotype.json").exists()
    search(config, out=str(tmp_path / "split"), resume=True, log=_quiet)

    a_whole, r_whole, s_whole = _alphas(tmp_path / "whole")
    a_split, r_split, s_split = _alphas(tmp_path / "split")
    assert torch.equal(a_whole, a_split) and torch.equal(r_whole, r_split)
    for k, v in s_whole["model"].items():
        assert torch.equal(v, s_split["model"][k]), k
    assert (tmp_path / "whole" / "genotype.json").read_text() == (tmp_path / "split" / "genotype.json").read_text()
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_after_an_interrupt_inside_an_epoch(tmp_path, monkeypatch):
    config = SearchConfig(epochs=2, order="first", **TINY)
    whole = search(config, out=str(tmp_path / "whole"), log=_quiet)

    calls = {"n": 0}
    real_step = search_module.search_step

    def step_then_crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == TINY["max_steps"] + 2:  # the second step of epoch 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(search_module, "search_step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        search(config, out=str(tmp_path / "split"), log=_quiet)
    monkeypatch.setattr(search_module, "search_step", real_step)
    # Only the epoch in progress is lost: the checkpoint holds epoch 1.
    assert len(torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["history"]) == 1
    resumed = search(config, out=str(tmp_path / "split"), resume=True, log=_quiet)
    for a, b in zip(whole.model.arch_parameters(), resumed.model.arch_parameters()):
        assert torch.equal(a, b)


def test_backends_search_alike(tmp_path):
    """Three second-order steps with each backend give the same α and genotype."""
    results = {b: search(epochs=1, backend=b, out=str(tmp_path / b), log=_quiet, **TINY)
               for b in ("reference", "checkpoint")}
    ref, ckpt = results["reference"].model, results["checkpoint"].model
    for a, b in zip(ref.arch_parameters(), ckpt.arch_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert results["reference"].genotype == results["checkpoint"].genotype


def test_resume_refuses_another_configuration(tmp_path):
    search(epochs=1, out=str(tmp_path), log=_quiet, **TINY)
    with pytest.raises(FastDartsError, match="different configuration.*channels: checkpoint 4 vs now 6"):
        search(epochs=1, out=str(tmp_path), resume=True, log=_quiet, **{**TINY, "channels": 6})
    # The backend does not change the numbers, so switching it on resume is allowed;
    # spelling the same ops or layout differently is the same configuration.
    result = search(epochs=1, out=str(tmp_path), resume=True, backend="checkpoint", log=_quiet,
                    **{**TINY, "ops": list(DARTS_OPS), "layout": "n,r,n", "layers": 8})
    assert result.model.backend == "checkpoint" and len(result.history) == 1


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    search(epochs=1, out=str(tmp_path), log=_quiet, **TINY)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(FastDartsError, match="already holds a search checkpoint; pass --resume"):
        search(epochs=1, out=str(tmp_path), log=_quiet, **TINY)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_without_checkpoint_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(FastDartsError, match="no checkpoint at"):
        search(epochs=1, out=str(tmp_path), resume=True, log=_quiet, **TINY)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FastDartsError, match="cannot read search checkpoint .*: it is not a PyTorch file"):
        search(epochs=1, out=str(tmp_path), resume=True, log=_quiet, **TINY)


@pytest.mark.parametrize("field, value, needle", [
    ("channels", 0, "channels must be a positive integer"),
    ("batch_size", -1, "batch-size must be a positive integer"),
    ("order", "third", "order must be 'first' or 'second'"),
    ("backend", "magic", "unknown backend 'magic'"),
    ("device", "tpu:0", "unknown device"),
])
def test_bad_configuration(tmp_path, field, value, needle):
    with pytest.raises(FastDartsError, match=needle):
        search(epochs=1, out=str(tmp_path), log=_quiet, **{**TINY, field: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_search_on_cuda(tmp_path):
    result = search(epochs=2, out=str(tmp_path), log=_quiet, **{**TINY, "device": "cuda"})
    assert result.model.alpha_normal.is_cuda
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_run_resumed_with_cell_recompute_continues(tmp_path):
    """recompute changes memory, not results: a resume may switch it."""
    class Interrupt(Exception):
        pass

    def stop(entry):
        raise Interrupt

    with pytest.raises(Interrupt):
        search(epochs=2, out=str(tmp_path), log=_quiet, on_epoch_end=stop, **TINY)
    result = search(epochs=2, out=str(tmp_path), resume=True, recompute="cell", log=_quiet, **TINY)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["recompute"] for m in lines] == ["edge", "cell"]
    assert result.model.recompute == "cell"
