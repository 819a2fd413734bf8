"""The size check: a network that cannot fit the device is refused in one line
that names its size and what fits, before anything real is built; the runs
people make pass. The device's memory is fixed in every test (monkeypatched),
so nothing here depends on the machine's."""
import re
import types

import pytest
import torch
from torch import nn

import fastdarts.size_check as size_check
from fastdarts import DARTS_V2, NetworkCIFAR, SearchConfig, SearchNetwork, TrainConfig
from fastdarts.errors import FastDartsError
from fastdarts.size_check import (check_eval_size, check_fits, check_search_size, check_train_size,
                                  device_memory_bytes, format_bytes)
from helpers import saved_activation_bytes, tiny_net

GiB, MB = 1 << 30, 10 ** 6
CIFAR = types.SimpleNamespace(num_classes=10, in_channels=3, image_size=32)   # what the checks read of a Dataset
DIGITS = types.SimpleNamespace(num_classes=10, in_channels=1, image_size=8)


@pytest.fixture
def memory(monkeypatch):
    """Sets the bytes every device has (24 GiB unless a test says otherwise)."""
    def set_memory(n: int) -> None:
        monkeypatch.setattr(size_check, "device_memory_bytes", lambda device: n)
    set_memory(24 * GiB)
    return set_memory


def refusal(check, *args, **kwargs) -> str:
    """The check must refuse with one line; returns it."""
    with pytest.raises(FastDartsError) as info:
        check(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


def suggested(flag: str, message: str) -> int:
    match = re.search(rf"at most {flag} (\d+) fits", message)
    assert match, message
    return int(match.group(1))


# A refusal profiles the supernet on meta several times (what is asked, then the fit of what fits):
# seconds at the paper's size. The fast tier checks the refusals on a smaller supernet (5 cells of 2
# steps); the slow tier on the paper's as well.
SUPERNETS = [pytest.param(dict(layers=5, steps=2, multiplier=2), 5, id="small"),
             pytest.param({}, 8, id="paper", marks=pytest.mark.slow)]


def paper_spec(**changes) -> dict:
    with torch.device("meta"):
        spec = NetworkCIFAR(DARTS_V2, C=36, layers=20).spec()
    return dict(spec, **changes)


# ---------------------------------------------------------------- device memory

def test_cpu_memory_is_positive_and_at_most_the_physical_memory():
    physical = size_check.os.sysconf("SC_PAGE_SIZE") * size_check.os.sysconf("SC_PHYS_PAGES")
    assert 0 < device_memory_bytes("cpu") <= physical
    assert device_memory_bytes(torch.device("cpu")) > 0


def test_host_memory_is_meminfo_limited_by_a_smaller_cgroup(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16777216 kB\nMemFree:         1048576 kB\nMemAvailable:    8388608 kB\n")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    monkeypatch.setattr(size_check, "_MEMINFO", str(meminfo))
    monkeypatch.setattr(size_check, "_CGROUP_LIMITS", ((str(limit), str(usage)),))
    assert device_memory_bytes("cpu") == 8 * GiB                 # no cgroup files
    limit.write_text("max\n")
    assert device_memory_bytes("cpu") == 8 * GiB                 # cgroup without a limit
    limit.write_text(f"{32 * GiB}\n")
    assert device_memory_bytes("cpu") == 8 * GiB                 # a limit above what is available
    limit.write_text(f"{2 * GiB}\n")
    usage.write_text(f"{GiB // 2}\n")
    assert device_memory_bytes("cpu") == 2 * GiB - GiB // 2      # the limit less the cgroup's usage
    monkeypatch.setattr(size_check, "_MEMINFO", str(tmp_path / "absent"))
    limit.unlink()
    assert device_memory_bytes("cpu") == size_check.os.sysconf("SC_PAGE_SIZE") * size_check.os.sysconf(
        "SC_PHYS_PAGES")                                          # no meminfo: the physical memory


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(23.4 * GiB) == "23.4 GiB"
    assert format_bytes(5.2 * 1024 ** 4) == "5.2 TiB"
    assert format_bytes(1000 * 1024 ** 8) == "1000.0 YiB"
    assert format_bytes(3 * 1024 ** 9) == "10^27 B" and format_bytes(10 ** 500) == "10^500 B"  # past a float


# ---------------------------------------------------------------- the runs people make pass

@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_the_papers_search_fits_a_24_gib_machine(memory, backend):
    estimate = check_search_size(SearchConfig(backend=backend), CIFAR, "cpu")
    assert estimate.fits and estimate.memory_bytes == 24 * GiB
    assert estimate.parameters > 1_900_000                        # the supernet's 1.93 M weights and α
    # Activations are counted: the reference backend keeps every op's output, the fused one none.
    assert (estimate.activation_bytes > 2 * GiB) == (backend == "reference")
    assert estimate.total_bytes < 12 * GiB


def test_the_papers_training_fits_a_24_gib_machine(memory):
    estimate = check_train_size(TrainConfig(channels=36, layers=20, batch_size=96), CIFAR, "cpu")
    assert estimate.fits and 3_800_000 < estimate.parameters < 3_900_000  # with the auxiliary head
    assert GiB < estimate.total_bytes < 12 * GiB


def test_the_papers_network_evaluates_on_a_24_gib_machine(memory):
    estimate = check_eval_size(paper_spec(), "cpu", batch=256)
    assert estimate.fits and 0 < estimate.activation_bytes < 4 * GiB
    assert check_eval_size(paper_spec(), "cpu").activation_bytes == 0      # building it: weights only


@pytest.mark.parametrize("settings", [
    dict(method="pc-darts"), dict(method="proxyless"), dict(method="p-darts"), dict(aux_skip=True),
    dict(recompute="cell"), dict(backend="checkpoint", order="first"), dict(dataset="digits", layout="N,R,N"),
], ids=["pc-darts", "proxyless", "p-darts", "darts-", "cell-recompute", "checkpoint", "digits"])
def test_every_method_is_estimated(memory, settings):
    data = DIGITS if settings.get("dataset") == "digits" else CIFAR
    estimate = check_search_size(SearchConfig(**settings), data, "cpu")
    assert estimate.fits and estimate.parameters > 0 and estimate.activation_bytes > 0


def test_a_p_darts_stage_is_checked_with_its_own_edges(memory):
    config = SearchConfig(method="p-darts").checked()
    edges = {cell: (("skip_connect", "sep_conv_3x3", "sep_conv_5x5"),) * 14 for cell in ("normal", "reduce")}
    estimate = check_search_size(config, CIFAR, "cpu", layout=config.stage_layouts()[2][0], edge_ops=edges,
                                 stage=2)
    assert estimate.fits
    memory(estimate.total_bytes - 1)
    assert refusal(check_search_size, config, CIFAR, "cpu", layout=config.stage_layouts()[2][0], edge_ops=edges,
                   stage=2).startswith("stage 3's supernet (C=16, 17 cells")


def test_a_network_the_check_cannot_estimate_runs_unchecked_with_a_warning(memory, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no meta kernel for some_new_op\nsecond line")

    monkeypatch.setattr(size_check, "_profile", broken)
    with pytest.warns(RuntimeWarning, match=r"could not estimate this network \(RuntimeError: no meta kernel "
                                            r"for some_new_op\); not checked"):
        assert check_train_size(TrainConfig(), CIFAR, "cpu") is None
    # A refusal, or a bad configuration, still stops the run.
    with pytest.raises(FastDartsError, match="channels must be a positive integer"):
        check_train_size(TrainConfig(channels=0), CIFAR, "cpu")


def test_the_check_leaves_the_random_generators_alone(memory):
    torch.manual_seed(1)
    before = torch.get_rng_state()
    check_search_size(SearchConfig(method="proxyless", layout="N,R,N", layers=None), CIFAR, "cpu")
    check_train_size(TrainConfig(layers=5, channels=8), CIFAR, "cpu")
    assert torch.equal(before, torch.get_rng_state())


# ---------------------------------------------------------------- absurd sizes are refused, saying what fits

@pytest.mark.parametrize("supernet, cells", SUPERNETS)
def test_a_search_with_10_8_channels_is_refused_with_the_channels_that_fit(memory, supernet, cells):
    message = refusal(check_search_size, SearchConfig(**supernet, channels=100_000_000), CIFAR, "cpu")
    assert message.startswith(f"the supernet (C=100000000, {cells} cells, batch 64")
    assert re.search(r"needs about [\d.]+ [EZY]iB .*more than the 24\.0 GiB available on this CPU", message)
    channels = suggested("--channels", message)
    assert 16 <= channels < 100_000_000
    check_search_size(SearchConfig(**supernet, channels=channels), CIFAR, "cpu")           # what fits does fit
    refusal(check_search_size, SearchConfig(**supernet, channels=2 * channels), CIFAR, "cpu")


@pytest.mark.parametrize("supernet, cells", SUPERNETS)
def test_a_search_with_10_5_layers_is_refused_with_the_depth_that_fits(memory, supernet, cells):
    supernet = dict(supernet, layers=100_000)
    message = refusal(check_search_size, SearchConfig(**supernet), CIFAR, "cpu")
    assert message.startswith("the supernet (C=16, 100000 cells")
    layers = suggested("--layers", message)
    assert cells <= layers < 100_000
    check_search_size(SearchConfig(**dict(supernet, layers=layers)), CIFAR, "cpu")
    refusal(check_search_size, SearchConfig(**dict(supernet, layers=2 * layers)), CIFAR, "cpu")


@pytest.mark.parametrize("supernet, cells", SUPERNETS)
def test_a_search_with_a_batch_of_10_9_is_refused_with_the_batch_that_fits(memory, supernet, cells):
    message = refusal(check_search_size, SearchConfig(**supernet, batch_size=10 ** 9), CIFAR, "cpu")
    assert message.startswith(f"the supernet (C=16, {cells} cells, batch 1000000000")
    batch = suggested("--batch-size", message)
    assert 64 <= batch < 10 ** 9
    check_search_size(SearchConfig(**supernet, batch_size=batch), CIFAR, "cpu")
    refusal(check_search_size, SearchConfig(**supernet, batch_size=2 * batch), CIFAR, "cpu")


@pytest.mark.parametrize("field, flag", [("channels", "--channels"), ("layers", "--layers")])
def test_an_absurd_training_network_is_refused_with_what_fits(memory, field, flag):
    huge = {"channels": 10 ** 7, "layers": 10 ** 5}[field]
    message = refusal(check_train_size, TrainConfig(**{field: huge}), CIFAR, "cpu")
    assert message.startswith(f"the network (C={36 if field == 'layers' else huge}, "
                              f"{20 if field == 'channels' else huge} cells, batch 96)")
    fits = suggested(flag, message)
    check_train_size(TrainConfig(**{field: fits}), CIFAR, "cpu")
    refusal(check_train_size, TrainConfig(**{field: 2 * fits}), CIFAR, "cpu")


@pytest.mark.parametrize("batch", [None, 256])
def test_a_weights_file_with_10_7_channels_is_refused_before_it_is_built(memory, batch):
    message = refusal(check_eval_size, paper_spec(channels=10 ** 7), "cpu", batch=batch, source="best.pt")
    assert message.startswith(f"the network in best.pt (C=10000000, 20 cells{', batch 256' if batch else ''}) "
                              f"needs about")
    assert "PiB" in message and message.endswith("evaluate it on a device with more memory")


def test_an_evaluation_batch_that_cannot_fit_is_refused_with_the_batch_that_fits(memory):
    message = refusal(check_eval_size, paper_spec(), "cpu", batch=10 ** 9)
    batch = suggested("--batch-size", message)
    assert 256 <= batch < 10 ** 9
    check_eval_size(paper_spec(), "cpu", batch=batch)
    refusal(check_eval_size, paper_spec(), "cpu", batch=2 * batch)
    # Weights already resident (the CPU model load_trained built): the activations only.
    only = check_eval_size(paper_spec(), "cpu", batch=batch, include_weights=False)
    assert only.weight_bytes == 0 and only.activation_bytes > 0


def test_depth_is_not_laid_out_cell_by_cell(memory):
    """A depth of 10^12 is refused from the 11-cell cut, not by building (or listing) 10^12 cells."""
    message = refusal(check_eval_size, paper_spec(layers=10 ** 12), "cpu")
    assert "1000000000000 cells" in message
    assert suggested("--layers", refusal(check_train_size, TrainConfig(layers=10 ** 12), CIFAR, "cpu")) >= 11


# ---------------------------------------------------------------- a small device

@pytest.mark.parametrize("supernet, megabytes, available", [
    pytest.param(dict(layers=5, steps=2, multiplier=2), 30, "28.6 MiB", id="small"),      # needs 101.6 MiB
    pytest.param({}, 100, "95.4 MiB", id="paper", marks=pytest.mark.slow),              # needs 235.9 MiB
])
def test_a_small_device_refuses_the_search_and_its_suggested_channels_fit(memory, supernet, megabytes, available):
    memory(megabytes * MB)
    message = refusal(check_search_size, SearchConfig(**supernet), CIFAR, "cpu")
    assert f"more than the {available} available on this CPU" in message
    channels = suggested("--channels", message)
    assert 1 <= channels < 16
    estimate = check_search_size(SearchConfig(**supernet, channels=channels), CIFAR, "cpu")
    assert estimate.total_bytes <= megabytes * MB
    refusal(check_search_size, SearchConfig(**supernet, channels=2 * channels), CIFAR, "cpu")
    # And the batch that fits at C=16.
    batch = suggested("--batch-size", message)
    assert 1 <= batch < 64 and check_search_size(SearchConfig(**supernet, batch_size=batch), CIFAR, "cpu").fits
    # The reference backend keeps every op's output: at batch 64 not even C=1 fits, nor one image at C=16.
    message = refusal(check_search_size, SearchConfig(**supernet, backend="reference"), CIFAR, "cpu")
    assert message.endswith("; no smaller --channels, --layers or --batch-size fits either")


@pytest.mark.parametrize("supernet, cells", SUPERNETS)
def test_ranks_share_the_batch(memory, supernet, cells):
    one = check_search_size(SearchConfig(**supernet, batch_size=64), CIFAR, "cpu")
    two = check_search_size(SearchConfig(**supernet, batch_size=128), CIFAR, "cpu", world_size=2)
    assert one.total_bytes == two.total_bytes
    memory(one.total_bytes - 1)
    message = refusal(check_search_size, SearchConfig(**supernet, batch_size=128), CIFAR, "cpu", world_size=2)
    assert "batch 128 over 2 ranks" in message and suggested("--batch-size", message) % 2 == 0


# ---------------------------------------------------------------- the estimate itself

def test_the_cut_depth_counts_what_the_full_network_holds(memory):
    """Runs of normal cells are built 3 long, the third cell counted for the
    rest: the same parameters and activations as building every cell."""
    layout = "N,N,N,N,N,R,N,N,N,N,R,N"
    config = SearchConfig(layout=layout, layers=None, channels=8, batch_size=2)
    cut = check_search_size(config, CIFAR, "cpu")
    full = check_fits("full", lambda: SearchNetwork(C=8, layers=None, layout=layout), batch=2,
                      input_shape=(3, 32, 32), device="cpu", extra_copies=4)
    assert (cut.parameters, cut.weight_bytes, cut.activation_bytes) == (
        full.parameters, full.weight_bytes, full.activation_bytes)
    train = check_train_size(TrainConfig(layers=14, channels=8, batch_size=2, drop_path_prob=0.0), CIFAR, "cpu")
    full = check_fits("full", lambda: NetworkCIFAR(DARTS_V2, C=8, layers=14), batch=2, input_shape=(3, 32, 32),
                      device="cpu", extra_copies=2)
    assert (train.parameters, train.weight_bytes, train.activation_bytes) == (
        full.parameters, full.weight_bytes, full.activation_bytes)


def test_the_closed_form_cut_of_a_depth_is_the_cut_of_its_layout():
    for layers in range(1, 300):
        assert size_check._standard_cut(layers) == size_check._compress(size_check._standard_layout(layers))


@pytest.mark.parametrize("supernet, cells", SUPERNETS)
def test_the_fit_in_channels_is_exact(memory, supernet, cells):
    """Parameters are quadratic and activations affine in C: the fit through
    three small widths gives what a build at another width counts."""
    sizer = size_check._search_sizer(SearchConfig(**supernet).checked(), CIFAR, None, 4)
    layout, weights = sizer._layout_for(8)
    fit = sizer._fit(layout, weights)
    assert tuple(f(10) for f in fit) == sizer.profile(10, layout).totals(weights)


def test_the_counts_match_the_real_network(memory):
    """The meta build counts what a real build holds; the meta forward saves
    what a real forward saves (helpers' count on a CPU network, which
    also counts the BatchNorm running statistics autograd saves: the check
    counts those buffers once, with the weights)."""
    net = tiny_net(backend="reference")
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
    estimate = check_fits("tiny", lambda: tiny_net(backend="reference"), batch=2, input_shape=(3, 8, 8),
                          device="cpu")
    assert estimate.parameters == sum(p.numel() for p in net.parameters())
    buffers = sum(b.nbytes for b in net.buffers())
    assert estimate.weight_bytes == 4 * estimate.parameters + buffers
    running_stats = sum(m.running_mean.nbytes + m.running_var.nbytes for m in net.modules()
                        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None)
    assert estimate.activation_bytes == saved_activation_bytes(net, x, y) - running_stats


def test_check_fits_for_any_model(memory):
    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))

    estimate = check_fits("the probe", build, batch=4, input_shape=(3, 16, 16), device="cpu", extra_copies=2)
    assert estimate.parameters == sum(p.numel() for p in build().parameters())
    assert estimate.weight_bytes == estimate.parameters * 4 * 3
    memory(estimate.total_bytes - 1)
    message = refusal(check_fits, "the probe", build, batch=4, input_shape=(3, 16, 16), device="cpu",
                      extra_copies=2, hint="try a smaller probe")
    assert message.startswith("the probe needs about") and message.endswith("; try a smaller probe")
