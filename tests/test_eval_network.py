"""The evaluation network: shapes, the paper's parameter count, drop path, the auxiliary head, original names."""
import pytest
import torch

import fastdarts.eval_network as eval_network
from fastdarts.errors import FastDartsError
from fastdarts.eval_network import Cell, NetworkCIFAR, count_parameters, drop_path
from fastdarts.genotype import DARTS_V1, DARTS_V2, Genotype
from fastdarts.ops import Identity

# (in_channels, image_size): CIFAR-10 and digits.
DATA_SHAPES = {"cifar10": (3, 32), "digits": (1, 8)}


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2], ids=["DARTS_V1", "DARTS_V2"])
@pytest.mark.parametrize("dataset", list(DATA_SHAPES))
def test_shapes_of_the_paper_network(genotype, dataset):
    """20 cells, C=36: channels double and the resolution halves at cells 6 and 13; the
    auxiliary head reads cell 13's output; logits for 10 classes."""
    in_channels, size = DATA_SHAPES[dataset]
    model = NetworkCIFAR(genotype, C=36, num_classes=10, layers=20, auxiliary=True, in_channels=in_channels,
                         image_size=size)
    shapes = []
    hooks = [cell.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for cell in model.cells]
    x = torch.randn(2, in_channels, size, size)
    model.train()
    logits, aux = model(x)
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    assert len(shapes) == 20
    for i, shape in enumerate(shapes):
        level = (i >= 6) + (i >= 13)
        side = size // 2 ** level
        assert shape == (2, 4 * 36 * 2 ** level, side, side), (i, shape)
    model.eval()
    logits, aux = model(x)
    assert logits.shape == (2, 10) and aux is None


def test_parameter_count_is_the_papers():
    """DARTS (second order) at C=36, 20 cells: 3.3 M parameters in the paper, which, like
    the original code, does not count the auxiliary head (dropped after training)."""
    model = NetworkCIFAR(DARTS_V2, C=36, num_classes=10, layers=20, auxiliary=True)
    assert count_parameters(model) == 3_349_342
    assert round(count_parameters(model) / 1e6, 1) == 3.3
    assert count_parameters(model, auxiliary=True) == 3_825_768
    assert count_parameters(NetworkCIFAR(DARTS_V2, C=36, layers=20, auxiliary=False)) == 3_349_342
    assert count_parameters(NetworkCIFAR(DARTS_V1, C=36, layers=20)) == 3_169_414


def test_drop_path_masks_whole_samples_and_keeps_the_mean():
    x = torch.ones(4000, 3, 2, 2)
    gen = torch.Generator().manual_seed(0)
    y = drop_path(x, 0.3, gen)
    per_sample = y.flatten(1)
    # Each sample is either all zero or all 1/keep.
    assert torch.all((per_sample == 0).all(1) | torch.isclose(per_sample, torch.tensor(1 / 0.7)).all(1))
    dropped = (per_sample == 0).all(1).float().mean().item()
    assert 0.27 < dropped < 0.33
    assert abs(y.mean().item() - 1.0) < 0.05
    # Same generator seed, same mask; probability 0 is the identity.
    assert torch.equal(y, drop_path(x, 0.3, torch.Generator().manual_seed(0)))
    assert drop_path(x, 0.0) is x


def _all_ops(op):
    edges = [(op, 0), (op, 1), (op, 0), (op, 2), (op, 1), (op, 3), (op, 4), (op, 2)]
    return Genotype(normal=edges, normal_concat=[2, 3, 4, 5], reduce=edges, reduce_concat=[2, 3, 4, 5])


def _cell_outputs(genotype, training, drop_prob):
    torch.manual_seed(0)
    cell = Cell(genotype, 6, 6, 6, reduction=False, reduction_prev=False)
    cell.train(training)
    s0, s1 = torch.randn(16, 6, 5, 5), torch.randn(16, 6, 5, 5)
    return cell(s0, s1, drop_prob, torch.Generator().manual_seed(1))


def test_drop_path_never_on_identity():
    ident = _all_ops("skip_connect")
    assert torch.equal(_cell_outputs(ident, True, 0.9), _cell_outputs(ident, True, 0.0))
    conv = _all_ops("sep_conv_3x3")
    assert not torch.equal(_cell_outputs(conv, True, 0.9), _cell_outputs(conv, True, 0.0))


def test_drop_path_only_in_training():
    conv = _all_ops("sep_conv_3x3")
    assert torch.equal(_cell_outputs(conv, False, 0.9), _cell_outputs(conv, False, 0.0))


def test_drop_path_is_applied_to_every_other_op(monkeypatch):
    """In training every op but the identity goes through drop_path; in eval none does."""
    model = NetworkCIFAR(DARTS_V2, C=4, num_classes=10, layers=5, auxiliary=True)
    model.drop_path_prob = 0.2
    seen = []

    def recording(x, prob, generator=None):
        seen.append(prob)
        return x

    monkeypatch.setattr(eval_network, "drop_path", recording)
    non_identity = sum(not isinstance(op, Identity) for cell in model.cells for op in cell._ops)
    identities = sum(isinstance(op, Identity) for cell in model.cells for op in cell._ops)
    assert identities > 0 and non_identity > 0  # DARTS_V2 has both, so the count below means something
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert len(seen) == non_identity and set(seen) == {0.2}
    seen.clear()
    model.eval()
    model(torch.randn(2, 3, 32, 32))
    assert seen == []


def test_auxiliary_head_only_in_training_and_only_when_asked():
    model = NetworkCIFAR(DARTS_V2, C=4, num_classes=7, layers=5, auxiliary=False)
    assert not hasattr(model, "auxiliary_head")
    model.train()
    assert model(torch.randn(2, 3, 32, 32))[1] is None
    model = NetworkCIFAR(DARTS_V2, C=4, num_classes=7, layers=5, auxiliary=True)
    model.train()
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert aux.shape == (2, 7)
    # The auxiliary loss trains the cells below it.
    aux.sum().backward()
    assert model.cells[0].preprocess1.op[1].weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None


@pytest.mark.parametrize("layers", [5, 8, 20])
def test_auxiliary_head_reads_the_cell_at_two_thirds(layers):
    """The head's input is the output of cells[2L//3] itself (the reduction cell at
    2/3 depth, as the original): the cells after it have the same shape, so only
    identity tells a wrong attachment point apart."""
    model = NetworkCIFAR(DARTS_V2, C=4, num_classes=10, layers=layers, auxiliary=True).train()
    outputs, head_input = {}, []
    for i, cell in enumerate(model.cells):
        cell.register_forward_hook(lambda m, inp, out, i=i: outputs.__setitem__(i, out))
    model.auxiliary_head.register_forward_pre_hook(lambda m, inp: head_input.append(inp[0]))
    model(torch.randn(2, 3, 32, 32))
    index = 2 * layers // 3
    assert len(head_input) == 1
    assert head_input[0] is outputs[index]
    assert [i for i, out in outputs.items() if out is head_input[0]] == [index]
    if index + 1 < layers:  # a neighbour of the same shape, which a shape check would accept
        assert outputs[index + 1].shape == outputs[index].shape


def test_spec_round_trip():
    model = NetworkCIFAR(DARTS_V1, C=6, num_classes=4, layers=4, auxiliary=False, in_channels=1, image_size=8)
    clone = NetworkCIFAR.from_spec(model.spec())
    assert clone.genotype == DARTS_V1 and clone.spec() == model.spec()
    assert clone.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(C=0), "channels must be a positive integer"),
    (dict(layers=-1), "layers must be a positive integer"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(FastDartsError, match=needle):
        NetworkCIFAR(DARTS_V2, **kwargs)
    with pytest.raises(FastDartsError, match="needs a Genotype"):
        NetworkCIFAR("DARTS_V2")


def test_malformed_spec_is_one_error():
    spec = NetworkCIFAR(DARTS_V2, C=4, layers=5).spec()
    with pytest.raises(FastDartsError, match="network spec lacks image_size"):
        NetworkCIFAR.from_spec({k: v for k, v in spec.items() if k != "image_size"})
    with pytest.raises(FastDartsError, match="must be a dict"):
        NetworkCIFAR.from_spec([spec])
    with pytest.raises(FastDartsError, match="auxiliary must be true or false"):
        NetworkCIFAR.from_spec({**spec, "auxiliary": "yes"})


# ---------------------------------------------------------------- the original's names

def _bn(prefix, c):
    return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")}


def _original_op(prefix, op, C, stride):
    """Parameter names and shapes of one op as the original DARTS operations.py builds it."""
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


def original_names(genotype, C, layers, num_classes):
    """The state_dict names and shapes of the original code's NetworkCIFAR (model.py),
    written out from its structure, independently of fastdarts.eval_network."""
    names = {"stem.0.weight": (3 * C, 3, 3, 3), **_bn("stem.1", 3 * C)}
    c_pp, c_p, c = 3 * C, 3 * C, C
    reduction_prev = False
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
                  "auxiliary_head.features.5.weight": (768, 128, 2, 2), **_bn("auxiliary_head.features.6", 768),
                  "auxiliary_head.classifier.weight": (num_classes, 768), "auxiliary_head.classifier.bias": (num_classes,),
                  "classifier.weight": (num_classes, c_p), "classifier.bias": (num_classes,)})
    return names


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2], ids=["DARTS_V1", "DARTS_V2"])
def test_names_and_shapes_are_the_originals(genotype):
    model = NetworkCIFAR(genotype, C=8, num_classes=10, layers=8, auxiliary=True)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == original_names(genotype, C=8, layers=8, num_classes=10)
