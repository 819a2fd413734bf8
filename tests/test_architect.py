import pytest
import torch
from torch import nn
from torch.func import functional_call

from fastdarts import Architect
from helpers import tiny_net


class Quadratic(nn.Module):
    """L(w, α; x, y) = Σ x·w·α + ½ Σ y·w², whose derivatives are known in closed form:
    ∇w L = x·α + y·w,  ∇α L = x·w,  ∇²αw L · v = x·v."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
        self.alpha = nn.Parameter(torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64))

    def arch_parameters(self):
        return [self.alpha]

    def weight_parameters(self):
        return [self.w]

    def loss(self, x, y):
        return (x * self.w * self.alpha).sum() + 0.5 * (y * self.w ** 2).sum()


def test_second_order_step_matches_the_formula_by_hand():
    model = Quadratic()
    xi, mu, lam = 0.1, 0.9, 0.01
    sgd = torch.optim.SGD(model.weight_parameters(), lr=xi, momentum=mu, weight_decay=lam)
    m = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    sgd.state[model.w]["momentum_buffer"] = m.clone()
    architect = Architect(model, sgd, order="second", lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3)
    xt, yt = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    xv, yv = torch.tensor([-0.5, 1.5, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.2, 0.3], dtype=torch.float64)
    w, a = model.w.detach().clone(), model.alpha.detach().clone()

    # By hand: w' = w − ξ(μm + ∇w L_t + λw); v = ∇w' L_val; the Hessian term is x_t·v (exact: L is linear in α·w).
    w1 = w - xi * (mu * m + (xt * a + yt * w) + lam * w)
    v = xv * a + yv * w1
    expected = xv * w1 - xi * xt * v

    grads, _ = architect.arch_gradients(xt, yt, xv, yv)
    torch.testing.assert_close(grads[0], expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(model.w.detach(), w), "weights restored exactly"

    architect.step(xt, yt, xv, yv)
    g = expected + 1e-3 * a                       # Adam's L2 weight decay
    m_hat, v_hat = g, g * g                       # first step: bias corrections cancel (1-β)
    torch.testing.assert_close(model.alpha.detach(), a - 0.05 * m_hat / (v_hat.sqrt() + 1e-8))


def test_first_order_is_the_validation_gradient():
    model = Quadratic()
    sgd = torch.optim.SGD(model.weight_parameters(), lr=0.1, momentum=0.9)
    architect = Architect(model, sgd, order="first")
    xv = torch.tensor([-0.5, 1.5, 1.0], dtype=torch.float64)
    grads, _ = architect.arch_gradients(None, None, xv, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(grads[0], xv * model.w.detach())


def _exact_unrolled_alpha_grad(net, sgd, xt, yt, xv, yv):
    """d/dα L_val(w − ξ(μm + ∇w L_train(w, α) + λw), α) by double backward."""
    group = sgd.param_groups[0]
    xi, mu, lam = group["lr"], group["momentum"], group["weight_decay"]
    names = [n for n, p in net.named_parameters() if not n.startswith("alpha")]
    weights = net.weight_parameters()
    alphas = net.arch_parameters()
    g = torch.autograd.grad(net.loss(xt, yt), weights, create_graph=True)
    unrolled = {}
    for n, w, gw in zip(names, weights, g):
        m = sgd.state[w]["momentum_buffer"]
        unrolled[n] = w.detach() - xi * (mu * m + gw + lam * w.detach())
    unrolled.update(alpha_normal=net.alpha_normal, alpha_reduce=net.alpha_reduce)
    logits = functional_call(net, unrolled, (xv,))
    return torch.autograd.grad(nn.functional.cross_entropy(logits, yv), alphas)


def _smooth(module):
    """ReLU -> SiLU. On a ReLU network the gradient jumps at kinks, so a central
    difference of gradients has no limit to converge to; a smooth network makes
    the finite-difference Hessian term comparable with the exact one."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.SiLU())
        else:
            _smooth(child)
    return module


def test_finite_difference_matches_double_backward():
    torch.manual_seed(0)
    # No max pool either: its argmax switches are kinks too.
    net = _smooth(tiny_net(ops="none,avg_pool_3x3,skip_connect,sep_conv_3x3,dil_conv_3x3").double())
    with torch.no_grad():  # a non-trivial α so the mixing weights differ
        for a in net.arch_parameters():
            a.normal_(0, 0.5)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    xt, yt = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    xv, yv = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    # One real step so that the momentum buffer is non-zero.
    net.loss(xt, yt).backward()
    sgd.step()
    sgd.zero_grad()

    architect = Architect(net, sgd, order="second")
    fd, _ = architect.arch_gradients(xt, yt, xv, yv)
    exact = _exact_unrolled_alpha_grad(net, sgd, xt, yt, xv, yv)
    first, _ = Architect(net, sgd, order="first").arch_gradients(xt, yt, xv, yv)
    for f, e, fo in zip(fd, exact, first):
        # ε = 0.01/‖v‖ leaves an O(ε²) truncation error: about 1e-3 of the gradient here.
        assert (f - e).norm() < 3e-3 * e.norm()
        # ... and the Hessian term is not negligible, so the test can tell the orders apart.
        assert (fo - e).norm() > 100 * (f - e).norm()


@pytest.mark.parametrize("order", ["first", "second"])
def test_architecture_step_leaves_weights_and_bn_statistics_alone(order):
    net = tiny_net()
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    Architect(net, sgd, order=order).step(x, y, x.flip(0), y.flip(0))
    for k, v in net.state_dict().items():
        if k.startswith("alpha"):
            assert not torch.equal(v, before[k]), f"{k} should have moved"
        else:
            assert torch.equal(v, before[k]), k
