"""Multiply-adds and the size line: a hand count on a tiny net, the paper's networks pinned."""
import pytest
import torch
from torch import nn

from fastdarts.eval_network import NetworkCIFAR, NetworkImageNet, count_parameters
from fastdarts.genotype import DARTS_V2
from fastdarts.model_size import count_multiply_adds, describe_size


class _Tiny(nn.Module):
    """A grouped strided conv used twice, BN, ReLU, pooling and a linear: every rule of the count."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
        self.back = nn.Conv2d(6, 4, (1, 3), padding=(0, 1), bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, 7)

    def forward(self, x):
        y = self.conv(x)                       # 4x9x9 -> 6x5x5
        y = self.conv(self.back(y))            # 6x5x5 -> 4x5x5 -> 6x3x3 (the same conv again)
        y = self.pool(torch.relu(self.bn(y)))  # 6x1x1: not counted
        y = nn.functional.pad(y, (0, 1, 0, 1))  # 6x2x2
        return self.fc(y.flatten(1))


def test_the_count_by_hand_on_a_tiny_net():
    model = _Tiny().train()
    first = (6 * 5 * 5) * (4 // 2) * 3 * 3     # out elements x in/groups x kh x kw: 2700
    back = (4 * 5 * 5) * 6 * 1 * 3             # 1800
    again = (6 * 3 * 3) * (4 // 2) * 3 * 3     # 972
    fc = 24 * 7                                # 168
    assert count_multiply_adds(model, (4, 9, 9)) == first + back + again + fc == 5640
    assert model.training  # its mode is restored
    assert count_multiply_adds(model.eval(), (4, 9, 9)) == 5640 and not model.training
    # The count is per image, and does not move the BatchNorm statistics (an eval forward).
    assert torch.equal(model.bn.running_mean, torch.zeros(6)) and int(model.bn.num_batches_tracked) == 0


def test_a_linear_counts_every_row():
    assert count_multiply_adds(nn.Sequential(nn.Linear(5, 3)), (4, 5)) == 4 * 5 * 3


def test_darts_v2_on_imagenet_is_in_the_mobile_setting():
    """The paper gives 574 M multiply-adds; the conv and linear count of its network is 530 M (the
    original never published its counter: quark0/darts#46 reports 523 M the same way), under 600 M."""
    model = NetworkImageNet(DARTS_V2, C=48, num_classes=1000, layers=14, auxiliary=True)
    macs = count_multiply_adds(model, (3, 224, 224))
    assert macs == 529_911_552 and macs < 600_000_000
    # The stem by hand: 112²·24·(3·9) + 56²·48·(24·9) + 28²·48·(48·9).
    assert count_multiply_adds(nn.Sequential(model.stem0, model.stem1), (3, 224, 224)) == (
        112 ** 2 * 24 * 27 + 56 ** 2 * 48 * 216 + 28 ** 2 * 48 * 432) == 56_899_584
    # The auxiliary head is not run in eval mode: the count is the same without it.
    assert count_multiply_adds(NetworkImageNet(DARTS_V2, auxiliary=False), (3, 224, 224)) == macs


def test_darts_v2_on_cifar():
    """3.3 M parameters in the paper; 528 M multiply-adds at 32x32 by the same count."""
    model = NetworkCIFAR(DARTS_V2, C=36, num_classes=10, layers=20, auxiliary=True)
    assert count_parameters(model) == 3_349_342
    assert count_multiply_adds(model, (3, 32, 32)) == 528_359_040
    assert describe_size(model, (3, 32, 32)) == (
        "3.35 M parameters (3.83 M with the auxiliary head), 528 M multiply-adds at 3x32x32")


@pytest.mark.parametrize("auxiliary, line", [
    (True, "0.0113 M parameters (0.422 M with the auxiliary head), 0.135 M multiply-adds at 1x8x8"),
    (False, "0.0113 M parameters, 0.135 M multiply-adds at 1x8x8"),
])
def test_describe_size_of_a_small_network(auxiliary, line):
    """Three significant figures; no parenthesis without an auxiliary head."""
    model = NetworkCIFAR(DARTS_V2, C=4, num_classes=10, layers=5, auxiliary=auxiliary, in_channels=1, image_size=8)
    assert (count_parameters(model), count_parameters(model, True)) == (11_338, 422_228 if auxiliary else 11_338)
    assert count_multiply_adds(model, (1, 8, 8)) == 134_848
    assert describe_size(model, (1, 8, 8)) == line


def test_describe_size_of_the_imagenet_network():
    model = NetworkImageNet(DARTS_V2, C=48, num_classes=1000, layers=14, auxiliary=True)
    assert describe_size(model, (3, 224, 224)) == (
        "4.72 M parameters (5.98 M with the auxiliary head), 530 M multiply-adds at 3x224x224")
