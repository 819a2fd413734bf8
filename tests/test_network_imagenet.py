"""The ImageNet network: the original's stem and auxiliary head, the paper's 4.7 M parameters,
the original's names, the network kinds of a spec, and the size check of either kind."""
import math
import types

import pytest
import torch
from torch import nn

import fastdarts.size_check as size_check
from fastdarts.errors import FastDartsError
from fastdarts.eval_network import (AuxiliaryHeadImageNet, NetworkCIFAR, NetworkImageNet, build_network,
                                    count_parameters, network_from_spec)
from fastdarts.genotype import DARTS_V1, DARTS_V2, get_genotype
from fastdarts.ops import FactorizedReduce

GiB = 1 << 30


def _cell_outputs(model, x):
    shapes = []
    hooks = [cell.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for cell in model.cells]
    out = model(x)
    for h in hooks:
        h.remove()
    return out, shapes


def test_the_stem_takes_224_to_28_and_the_cells_halve_it_twice():
    torch.manual_seed(0)
    model = NetworkImageNet(DARTS_V2, C=4, num_classes=7, layers=5, auxiliary=True).train()
    x = torch.randn(2, 3, 224, 224)
    s0 = model.stem0(x)
    assert s0.shape == (2, 4, 56, 56) and model.stem1(s0).shape == (2, 4, 28, 28)
    assert isinstance(model.cells[0].preprocess0, FactorizedReduce)  # s0 is twice s1's size
    (logits, aux), shapes = _cell_outputs(model, x)
    # layers=5: reductions at cells 1 and 3 (C doubles there), 4 nodes concatenated.
    assert shapes == [(2, 16, 28, 28), (2, 32, 14, 14), (2, 32, 14, 14), (2, 64, 7, 7), (2, 64, 7, 7)]
    assert logits.shape == (2, 7) and aux.shape == (2, 7)
    model.eval()
    logits, aux = model(x)
    assert logits.shape == (2, 7) and aux is None


@pytest.mark.parametrize("size", [64, 100, 97])
def test_other_image_sizes_run(size):
    """The original works at 224 only (AvgPool2d(7), an auxiliary pool for 7x7); here any size runs."""
    model = NetworkImageNet(DARTS_V1, C=4, num_classes=3, layers=3, auxiliary=True, image_size=size).train()
    logits, aux = model(torch.randn(2, 3, size, size))
    assert logits.shape == aux.shape == (2, 3)


def test_the_adaptive_global_pooling_is_the_originals_at_224():
    """At 224 the last map is 7x7: the original's AvgPool2d(7) and the adaptive pooling give the same logits."""
    torch.manual_seed(1)
    model = NetworkImageNet(DARTS_V2, C=4, num_classes=5, layers=3, auxiliary=False).double().eval()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)[0]
        model.global_pooling = nn.AvgPool2d(7)
        original = model(x)[0]
    torch.testing.assert_close(ours, original, rtol=1e-14, atol=1e-14)


def test_the_auxiliary_head_is_the_originals_at_head():
    """HEAD of the original comments out the BatchNorm after the 2x2 conv (its first release had one)."""
    head = NetworkImageNet(DARTS_V2, C=4, num_classes=10, layers=5).auxiliary_head
    kinds = [type(m).__name__ for m in head.features]
    assert kinds == ["ReLU", "AvgPool2d", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "ReLU"]
    pool = head.features[1]
    assert (pool.kernel_size, pool.stride, pool.padding, pool.count_include_pad) == (5, 2, 0, False)
    # A map other than 7x7 (here 3x3) is pooled to 2x2 adaptively; no parameter changes.
    other = AuxiliaryHeadImageNet(64, 10, size=3)
    assert isinstance(other.features[1], nn.AdaptiveAvgPool2d)
    assert other.state_dict().keys() == AuxiliaryHeadImageNet(64, 10, size=7).state_dict().keys()


def test_the_auxiliary_head_reads_the_cell_at_two_thirds_and_trains_the_cells_below():
    model = NetworkImageNet(DARTS_V2, C=4, num_classes=7, layers=5, image_size=64).train()
    outputs, head_input = {}, []
    for i, cell in enumerate(model.cells):
        cell.register_forward_hook(lambda m, inp, out, i=i: outputs.__setitem__(i, out))
    model.auxiliary_head.register_forward_pre_hook(lambda m, inp: head_input.append(inp[0]))
    _, aux = model(torch.randn(2, 3, 64, 64))
    assert len(head_input) == 1 and head_input[0] is outputs[2 * 5 // 3]
    aux.sum().backward()
    assert model.stem0[0].weight.grad.abs().sum() > 0 and model.classifier.weight.grad is None


def test_drop_path_follows_the_generator():
    torch.manual_seed(2)
    model = NetworkImageNet(DARTS_V2, C=4, num_classes=5, layers=3, auxiliary=False).train()
    x = torch.randn(4, 3, 32, 32)
    state = model.state_dict()

    def run(prob, seed):
        model.load_state_dict(state)  # the same BatchNorm statistics for every run
        model.drop_path_prob = prob
        model.drop_path_generator = torch.Generator().manual_seed(seed)
        return model(x)[0]

    assert torch.equal(run(0.5, 0), run(0.5, 0))
    assert not torch.equal(run(0.5, 0), run(0.0, 0))


def test_bad_arguments():
    with pytest.raises(FastDartsError, match="NetworkImageNet needs an even number of channels .* got 5"):
        NetworkImageNet(DARTS_V2, C=5)
    with pytest.raises(FastDartsError, match="NetworkImageNet needs a Genotype"):
        NetworkImageNet("DARTS_V2")
    with pytest.raises(FastDartsError, match="image_size must be a positive integer"):
        NetworkImageNet(DARTS_V2, C=4, image_size=0)


# ---------------------------------------------------------------- the paper's size and the original's names

def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _original_op(prefix, op, C, stride):
    """Parameter names and shapes of one op as the original operations.py builds it (BN statistics left out)."""
    if op in ("max_pool_3x3", "avg_pool_3x3") or (op == "skip_connect" and stride == 1):
        return {}
    if op == "skip_connect":  # FactorizedReduce
        return {f"{prefix}.conv_1.weight": (C // 2, C, 1, 1), f"{prefix}.conv_2.weight": (C // 2, C, 1, 1),
                **_bn(f"{prefix}.bn", C)}
    k = {"sep_conv_3x3": 3, "sep_conv_5x5": 5, "dil_conv_3x3": 3, "dil_conv_5x5": 5}[op]
    names = {f"{prefix}.op.1.weight": (C, 1, k, k), f"{prefix}.op.2.weight": (C, C, 1, 1), **_bn(f"{prefix}.op.3", C)}
    if op.startswith("sep"):
        names.update({f"{prefix}.op.5.weight": (C, 1, k, k), f"{prefix}.op.6.weight": (C, C, 1, 1),
                      **_bn(f"{prefix}.op.7", C)})
    return names


def original_imagenet_parameters(genotype, C, layers, num_classes):
    """The parameter names and shapes of the original's NetworkImageNet (model.py at HEAD), written out
    from its structure, independently of fastdarts.eval_network."""
    names = {"stem0.0.weight": (C // 2, 3, 3, 3), **_bn("stem0.1", C // 2), "stem0.3.weight": (C, C // 2, 3, 3),
             **_bn("stem0.4", C), "stem1.1.weight": (C, C, 3, 3), **_bn("stem1.2", C)}
    c_pp, c_p, c = C, C, C
    reduction_prev = True
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        c = 2 * c if reduction else c
        p = f"cells.{i}"
        if reduction_prev:
            names.update({f"{p}.preprocess0.conv_1.weight": (c // 2, c_pp, 1, 1),
                          f"{p}.preprocess0.conv_2.weight": (c // 2, c_pp, 1, 1), **_bn(f"{p}.preprocess0.bn", c)})
        else:
            names.update({f"{p}.preprocess0.op.1.weight": (c, c_pp, 1, 1), **_bn(f"{p}.preprocess0.op.2", c)})
        names.update({f"{p}.preprocess1.op.1.weight": (c, c_p, 1, 1), **_bn(f"{p}.preprocess1.op.2", c)})
        edges = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        for k, (op, index) in enumerate(edges):
            names.update(_original_op(f"{p}._ops.{k}", op, c, 2 if reduction and index < 2 else 1))
        reduction_prev = reduction
        c_pp, c_p = c_p, len(concat) * c
        if i == 2 * layers // 3:
            c_aux = c_p
    names.update({"auxiliary_head.features.2.weight": (128, c_aux, 1, 1), **_bn("auxiliary_head.features.3", 128),
                  "auxiliary_head.features.5.weight": (768, 128, 2, 2),
                  "auxiliary_head.classifier.weight": (num_classes, 768),
                  "auxiliary_head.classifier.bias": (num_classes,),
                  "classifier.weight": (num_classes, c_p), "classifier.bias": (num_classes,)})
    return names


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2], ids=["DARTS_V1", "DARTS_V2"])
def test_names_and_shapes_are_the_originals(genotype):
    """So the original's state_dict loads by name (its BatchNorm buffers sit beside the same names)."""
    model = NetworkImageNet(genotype, C=8, num_classes=10, layers=8, auxiliary=True)
    ours = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert ours == original_imagenet_parameters(genotype, C=8, layers=8, num_classes=10)
    buffers = {k.rsplit(".", 1)[0] for k in model.state_dict() if k.endswith("running_mean")}
    assert buffers == {k.rsplit(".", 1)[0] for k in ours if k.endswith(".bias") and "classifier" not in k}


def test_parameter_count_is_the_papers():
    """DARTS (second order) in the mobile setting, C=48, 14 cells, 1000 classes: the paper's 4.7 M
    parameters, counted as the original's count_parameters_in_MB (no auxiliary head)."""
    genotype = get_genotype("DARTS_V2")
    model = NetworkImageNet(genotype, C=48, num_classes=1000, layers=14, auxiliary=True)
    assert count_parameters(model) == 4_718_752
    assert round(count_parameters(model) / 1e6, 1) == 4.7
    assert count_parameters(model, auxiliary=True) == 5_979_528
    assert count_parameters(NetworkImageNet(genotype, auxiliary=False)) == 4_718_752

    # Independently: the original's layer shapes, written out above.
    shapes = original_imagenet_parameters(genotype, C=48, layers=14, num_classes=1000)
    assert sum(math.prod(s) for k, s in shapes.items() if "auxiliary" not in k) == 4_718_752
    assert sum(math.prod(s) for s in shapes.values()) == 5_979_528

    # And by hand, a part of it: the stem (3x3 convs 3->24->48 stride 2, then 48->48; BN weight and bias).
    stem = 3 * 24 * 9 + 2 * 24 + 24 * 48 * 9 + 2 * 48 + 48 * 48 * 9 + 2 * 48
    assert stem == 31_992 == sum(p.numel() for p in [*model.stem0.parameters(), *model.stem1.parameters()])
    # The classifier: the last cell's 4 nodes of 4*48 channels, to 1000 classes.
    assert 4 * 192 * 1000 + 1000 == 769_000 == sum(p.numel() for p in model.classifier.parameters())
    # The first cell (normal, C=48, its s0 halved): FactorizedReduce 2x(48x24) + BN, 1x1 conv 48x48 + BN,
    # 5 sep_conv_3x3 (twice depthwise 48x9, pointwise 48x48, BN), 2 skips (nothing), 1 dil_conv_3x3 (once).
    sep, dil = 2 * (48 * 9 + 48 * 48 + 2 * 48), 48 * 9 + 48 * 48 + 2 * 48
    cell0 = (2 * 48 * 24 + 2 * 48) + (48 * 48 + 2 * 48) + 5 * sep + dil
    assert cell0 == 35_952 == sum(p.numel() for p in model.cells[0].parameters())


# ---------------------------------------------------------------- kinds and specs

def test_spec_round_trip_and_kinds():
    model = NetworkImageNet(DARTS_V1, C=6, num_classes=4, layers=4, auxiliary=False, in_channels=1, image_size=64)
    spec = model.spec()
    assert spec["kind"] == "imagenet" and NetworkCIFAR(DARTS_V1, C=4, layers=3).spec()["kind"] == "cifar"
    for clone in (network_from_spec(spec), NetworkImageNet.from_spec(spec)):
        assert type(clone) is NetworkImageNet and clone.spec() == spec
        assert clone.state_dict().keys() == model.state_dict().keys()
    built = build_network("imagenet", DARTS_V1, C=6, num_classes=4, layers=4, auxiliary=False, in_channels=1,
                          image_size=64)
    assert type(built) is NetworkImageNet and built.spec() == spec
    assert type(build_network("cifar", DARTS_V1, C=4, layers=3)) is NetworkCIFAR


def test_a_spec_without_a_kind_is_a_cifar_network():
    """Weight files written before the kind was stored."""
    spec = NetworkCIFAR(DARTS_V2, C=4, layers=3).spec()
    del spec["kind"]
    assert type(network_from_spec(spec)) is NetworkCIFAR and type(NetworkCIFAR.from_spec(spec)) is NetworkCIFAR
    with pytest.raises(FastDartsError, match="kind 'cifar' is not a NetworkImageNet"):
        NetworkImageNet.from_spec(spec)


def test_bad_kinds_are_one_line_errors():
    spec = NetworkImageNet(DARTS_V2, C=4, layers=3).spec()
    with pytest.raises(FastDartsError, match=r"^network spec: unknown network kind 'mobile'; known: cifar, imagenet$"):
        network_from_spec({**spec, "kind": "mobile"})
    with pytest.raises(FastDartsError, match="kind 'imagenet' is not a NetworkCIFAR .* network_from_spec"):
        NetworkCIFAR.from_spec(spec)
    with pytest.raises(FastDartsError, match=r"^unknown network kind 'mobile'; known: cifar, imagenet$"):
        build_network("mobile", DARTS_V2)
    with pytest.raises(FastDartsError, match="network spec lacks layers"):
        network_from_spec({k: v for k, v in spec.items() if k != "layers"})
    with pytest.raises(FastDartsError, match="must be a dict"):
        network_from_spec([spec])


# ---------------------------------------------------------------- the size check of either kind

IMAGENET = types.SimpleNamespace(num_classes=1000, in_channels=3, image_size=224)


@pytest.fixture
def memory(monkeypatch):
    """Every device has 24 GiB (nothing here depends on the machine's memory)."""
    monkeypatch.setattr(size_check, "device_memory_bytes", lambda device: 24 * GiB)


def _train_config(**kw):
    from fastdarts import TrainConfig

    return TrainConfig(**kw)


def test_the_size_check_builds_the_kind_of_network(memory):
    """The cut of a depth (3 cells a run) counts what the whole ImageNet network holds and keeps."""
    kw = dict(layers=14, channels=8, batch_size=2, drop_path_prob=0.0)
    train = size_check.check_train_size(_train_config(**kw), IMAGENET, "cpu", kind="imagenet")
    cifar = size_check.check_train_size(_train_config(**kw), IMAGENET, "cpu")
    full = size_check.check_fits("full", lambda: NetworkImageNet(DARTS_V2, C=8, layers=14), batch=2,
                                 input_shape=(3, 224, 224), device="cpu", extra_copies=2)
    assert (train.parameters, train.weight_bytes, train.activation_bytes) == (
        full.parameters, full.weight_bytes, full.activation_bytes)
    assert cifar.parameters != train.parameters  # without kind: the CIFAR network, as before
    # Without kind: the config's network.
    from_config = size_check.check_train_size(_train_config(network="imagenet", **kw), IMAGENET, "cpu")
    assert from_config == train

    with torch.device("meta"):
        spec = NetworkImageNet(DARTS_V2, C=8, layers=14).spec()
    evaluation = size_check.check_eval_size(spec, "cpu", batch=2)
    assert evaluation.parameters == full.parameters and evaluation.activation_bytes > 0
    # An unknown kind is left to network_from_spec to report.
    assert size_check.check_eval_size({**spec, "kind": "mobile"}, "cpu", batch=2).parameters == 0


def test_the_imagenet_width_fit_is_exact_and_what_fits_is_even(memory):
    """C//2 in the stem: the fit in C runs through even widths, where it is exact."""
    sizer = size_check._network_sizer(DARTS_V2, num_classes=1000, auxiliary=True, in_channels=3, image_size=64,
                                      grad=True, copies=2, bf16=False, kind="imagenet")
    layout, weights = sizer._layout_for(14)
    fit = sizer._fit(layout, weights)
    assert tuple(f(10) for f in fit) == sizer.profile(10, layout).totals(weights)
    with pytest.raises(FastDartsError) as info:
        size_check.check_train_size(_train_config(channels=10 ** 6, layers=14), IMAGENET, "cpu", kind="imagenet")
    channels = int(str(info.value).split("at most --channels ")[1].split()[0])
    assert channels % 2 == 0 and channels >= 2


@pytest.mark.parametrize("step, stem, expected", [(1, "imagenet", 2), (4, "imagenet", 4), (3, "imagenet", 6),
                                                  (3, "cifar", 3)])
def test_a_search_with_the_imagenet_stem_is_sized_at_even_widths(step, stem, expected):
    """Its first cell's FactorizedReduce takes an even C only (and the stem's 3C//2 is linear in even C)."""
    config = types.SimpleNamespace(channel_step=lambda: step, stem=stem)
    assert size_check._search_sizer(config, IMAGENET, None, 4).step == expected


def test_a_search_with_the_imagenet_stem_is_sized_as_built(memory):
    from fastdarts import SearchConfig, SearchNetwork

    config = SearchConfig(layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, stem="imagenet",
                          batch_size=2)
    estimate = size_check.check_search_size(config, IMAGENET, "cpu")
    full = size_check.check_fits(
        "full", lambda: SearchNetwork(C=4, num_classes=1000, layers=None, layout="N,R,N", steps=2, multiplier=2,
                                      stem="imagenet"),
        batch=2, input_shape=(3, 224, 224), device="cpu", extra_copies=4)
    assert estimate == full
