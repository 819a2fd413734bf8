import pytest
import torch

from fastdarts import DARTS_OPS, EXTENDED_OPS, OPS, FastDartsError, resolve_ops
from fastdarts.ops import FactorizedReduce


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_every_op_shape_and_stride(name, stride, hw):
    C = 6
    x = torch.randn(2, C, *hw)
    y = OPS[name](C, stride, False)(x)
    expected = tuple((s + stride - 1) // stride for s in hw)  # ceil(s / stride): 'same' padding then stride
    assert y.shape == (2, C, *expected)


def test_none_is_zero_and_identity_is_x():
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(OPS["none"](4, 1, False)(x), torch.zeros_like(x))
    assert OPS["none"](4, 2, False)(x).abs().sum() == 0
    assert OPS["skip_connect"](4, 1, False)(x) is x
    assert isinstance(OPS["skip_connect"](4, 2, False), FactorizedReduce)


def test_avg_pool_excludes_padding():
    x = torch.ones(1, 1, 4, 4)
    y = OPS["avg_pool_3x3"](1, 1, False)(x)
    assert torch.allclose(y, torch.ones_like(y))  # count_include_pad=True would give 4/9 in the corners


def test_conv_ops_are_relu_conv_bn():
    # A negative input is zeroed by the leading ReLU, so the conv sees zeros and BN maps them to 0.
    for name in ("conv_3x3", "conv_1x3_3x1", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"):
        op = OPS[name](4, 1, False)
        y = op(-torch.rand(2, 4, 6, 6) - 0.1)
        assert torch.allclose(y, torch.zeros_like(y), atol=1e-6), name


def test_op_sets():
    assert DARTS_OPS == ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                         "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
    assert EXTENDED_OPS == DARTS_OPS + ("conv_3x3", "conv_1x3_3x1")
    assert resolve_ops("darts") == DARTS_OPS
    assert resolve_ops("extended") == EXTENDED_OPS
    assert resolve_ops("none, conv_3x3") == ("none", "conv_3x3")
    assert resolve_ops(["skip_connect"]) == ("skip_connect",)
    assert resolve_ops("darts,conv_3x3") == DARTS_OPS + ("conv_3x3",)


@pytest.mark.parametrize("bad, needle", [
    ("sep_conv_9x9", "unknown op 'sep_conv_9x9'; known ops: none, max_pool_3x3"),
    ("none,none", "twice"),
    ("", "empty"),
])
def test_bad_op_lists(bad, needle):
    with pytest.raises(FastDartsError, match=needle):
        resolve_ops(bad)
