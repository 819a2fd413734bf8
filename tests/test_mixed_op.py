"""The checkpoint backend against the reference: same numbers, same BN statistics."""
import pytest
import torch

from fastdarts.mixed_op import MixedOp
from helpers import saved_activation_bytes, tiny_net


def _grads(net, x, y):
    x = x.clone().requires_grad_(True)
    loss = net.loss(x, y)
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, [x] + params)
    return loss.detach(), grads


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ops", ["darts", "extended", "none,skip_connect,conv_3x3"])
@pytest.mark.parametrize("hw", [8, 7])
def test_checkpoint_matches_reference(ops, hw, device):
    torch.manual_seed(1)
    ref = tiny_net(ops=ops).to(device)
    ckpt = tiny_net(ops=ops).to(device)
    ckpt.load_state_dict(ref.state_dict())
    ckpt.set_backend("checkpoint")
    assert ckpt.backend == "checkpoint"
    # A non-contiguous input: every other column of a wider tensor.
    x = torch.randn(4, 3, hw, 2 * hw, device=device)[..., ::2]
    y = torch.randint(0, 5, (4,), device=device)
    loss_r, grads_r = _grads(ref, x, y)
    loss_c, grads_c = _grads(ckpt, x, y)
    torch.testing.assert_close(loss_c, loss_r, rtol=1e-6, atol=0)
    for gr, gc in zip(grads_r, grads_c):
        torch.testing.assert_close(gc, gr, rtol=1e-5, atol=1e-7)
    # BatchNorm statistics are updated once per forward, not again by the recompute.
    for (name, a), b in zip(ref.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name


def test_mixed_op_is_the_weighted_sum():
    op = MixedOp(4, 1, ("none", "skip_connect", "avg_pool_3x3"))
    x = torch.randn(2, 4, 5, 5)
    w = torch.tensor([0.2, 0.3, 0.5])
    expected = 0.3 * x + 0.5 * op.ops[2](x)
    torch.testing.assert_close(op(x, w), expected)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_checkpoint_in_no_grad_gives_the_reference(mode):
    torch.manual_seed(2)
    ref = tiny_net()
    ckpt = tiny_net()
    ckpt.load_state_dict(ref.state_dict())
    ckpt.set_backend("checkpoint")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for net in (ref, ckpt):
            net.train(mode == "train")
            net(x)  # in train mode this moves the running statistics: the same for both
        out_r, out_c = ref(x), ckpt(x)
    assert torch.equal(out_c, out_r)
    for (name, a), b in zip(ref.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_keeps_less_for_backward():
    ref = tiny_net()
    ckpt = tiny_net().set_backend("checkpoint")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    ref_bytes, ckpt_bytes = saved_activation_bytes(ref, x, y), saved_activation_bytes(ckpt, x, y)
    # Per edge, checkpoint keeps only the edge's input; the reference keeps every op's activations.
    assert ckpt_bytes < ref_bytes / 3, (ckpt_bytes, ref_bytes)
