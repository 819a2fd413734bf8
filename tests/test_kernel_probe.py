"""The start-up probe of the compiled kernels compares their values with the
``*_ref`` twins' (``backend._probe``): a kernel that runs but computes a wrong
value is skipped like one that fails, with one warning naming the op (or, when
forced, an error)."""
import re
import warnings

import pytest
import torch

from fastdarts.errors import FastDartsError
from fastdarts.kernels import backend, triton_bn_accumulate
from fastdarts.kernels.backend import kernel_backend

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_probes(monkeypatch):
    """No probe result or warning from another test, and none left for them."""
    monkeypatch.setattr(backend, "_PROBED", {})
    monkeypatch.setattr(backend, "_WARNED", set())
    monkeypatch.delenv("FASTDARTS_BACKEND", raising=False)


def _need(name):
    if not backend._usable_on(name, "cpu"):
        pytest.skip(f"the {name} kernels are not usable on this CPU ({backend.available_backends()})")


def _prefer(monkeypatch, name):
    """``name`` first on the CPU, then ``ref`` (triton runs there under TRITON_INTERPRET=1)."""
    _need(name)
    monkeypatch.setattr(backend, "_DEFAULTS", {**backend._DEFAULTS, "cpu": (name, "ref")})


class _ScaledGrad(torch.autograd.Function):
    """Identity forward, gradient times 1.01: a pool whose backward alone is wrong."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


def _wrong(ops, mutation):
    """``ops`` with one kernel giving a wrong value, and the start of the
    probe's reason that must name it."""
    fwd, bwd, pool = ops

    def backward(perturb):
        def kernel(dy, z, mean, invstd, weight, compute_dz=True):
            dz, dweight = bwd(dy, z, mean, invstd, weight, compute_dz)
            return perturb(dz, dweight, compute_dz)
        return kernel

    def pool_for(setting, perturb):
        def kernel(x, stride, is_max):
            y = pool(x, stride, is_max)
            return perturb(y, x) if (is_max, stride) == setting else y
        return kernel

    def nan_at_one_element(out):
        out = out.clone()
        out.view(-1)[17] = float("nan")
        return out

    kind, _, setting = mutation.partition(":")
    if setting:
        is_max, stride = setting.split(",")
        setting = (is_max == "max", int(stride))
        in_setting = rf" for {is_max}, stride {stride} in float32"
    if kind == "forward":
        return ops._replace(bn_accumulate=lambda *a: fwd(*a) * 1.01), r"bn_accumulate gives wrong values in float32"
    if kind == "forward_nan":
        return (ops._replace(bn_accumulate=lambda *a: nan_at_one_element(fwd(*a))),
                r"bn_accumulate gives wrong values in float32 \(max error nan")
    if kind == "forward_ignores_statistics":  # passed the old probe: mean 0, invstd 1
        return (ops._replace(bn_accumulate=lambda acc, z, mean, invstd, w: fwd(acc, z, mean * 0, invstd * 0 + 1, w)),
                r"bn_accumulate gives wrong values")
    if kind == "forward_ignores_weight":  # passed the old probe: weight 1
        return (ops._replace(bn_accumulate=lambda acc, z, mean, invstd, w: fwd(acc, z, mean, invstd, w * 0 + 1)),
                r"bn_accumulate gives wrong values")
    if kind == "dz":
        return (ops._replace(bn_accumulate_backward=backward(lambda dz, dw, _: (dz * 1.01, dw))),
                r"bn_accumulate_backward gives wrong values of dz in float32")
    if kind == "dweight":
        return (ops._replace(bn_accumulate_backward=backward(lambda dz, dw, _: (dz, dw * 1.01))),
                r"bn_accumulate_backward gives wrong values of dweight in float32")
    if kind == "dweight_alpha_only":  # only the call without dz (the α gradient alone) is wrong
        return (ops._replace(bn_accumulate_backward=backward(
                    lambda dz, dw, compute_dz: (dz, dw if compute_dz else dw * 1.01))),
                r"bn_accumulate_backward gives wrong values of dweight \(compute_dz=False\) in float32")
    if kind == "pool":  # off by one pixel along W
        return (ops._replace(pool3x3=pool_for(setting, lambda y, x: torch.roll(y, 1, dims=-1))),
                rf"pool3x3 gives wrong values{in_setting}")
    if kind == "pool_backward":
        return (ops._replace(pool3x3=pool_for(setting, lambda y, x: _ScaledGrad.apply(y))),
                rf"pool3x3_backward gives wrong values of dx{in_setting}")
    if kind == "pool_ignores_stride":
        return (ops._replace(pool3x3=pool_for(setting, lambda y, x: pool(x, 1, setting[0]))),
                rf"pool3x3 gives a \(2, 3, 5, 7\) float32 tensor{in_setting} where the reference gives "
                r"\(2, 3, 3, 4\) float32")
    raise AssertionError(mutation)


def _break(monkeypatch, name, mutation):
    """The ``name`` kernels with ``mutation``; returns the expected reason's start."""
    real_ops_of = backend._ops_of
    wrong, reason = _wrong(real_ops_of(name), mutation)
    monkeypatch.setattr(backend, "_ops_of", lambda n: wrong if n == name else real_ops_of(n))
    return reason


def _choose_recording_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = kernel_backend(CPU)
        again = kernel_backend(CPU)  # decided once: no second probe, no second warning
    assert again == chosen
    return chosen, [w for w in caught if issubclass(w.category, RuntimeWarning)], caught


# -- (1), (2), (3): the cpp kernels --

def test_wrong_cpp_kernels_fall_back_to_ref_with_one_warning(monkeypatch):
    _need("cpp")
    reason = _break(monkeypatch, "cpp", "forward")
    chosen, runtime_warnings, caught = _choose_recording_warnings()
    assert chosen == "ref"
    assert len(caught) == len(runtime_warnings) == 1, [str(w.message) for w in caught]
    message = str(runtime_warnings[0].message)
    assert message.startswith(f"fastdarts: the cpp kernels fail on cpu ({reason}")
    assert message.endswith("); using the ref kernels on cpu instead"), message
    assert "max error" in message and "against the reference's at tolerance" in message
    assert backend._PROBED[("cpp", CPU)].startswith("bn_accumulate gives wrong values")


def test_forcing_wrong_cpp_kernels_is_an_error_naming_the_op(monkeypatch):
    _need("cpp")
    reason = _break(monkeypatch, "cpp", "dweight")
    monkeypatch.setenv("FASTDARTS_BACKEND", "cpp")
    with pytest.raises(FastDartsError, match=rf"FASTDARTS_BACKEND=cpp: its kernels fail on cpu \({reason} "
                                             r"\(max error [^ ]+ against the reference's at tolerance [^ ]+\)\)$"):
        kernel_backend(CPU)


def test_correct_cpp_kernels_pass_the_probe(monkeypatch):
    if "cpp" not in backend.available_backends():
        pytest.skip("the compiled extension is not built")
    assert backend._probe("cpp", CPU) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_backend(CPU) == "cpp"
    assert backend._PROBED == {("cpp", CPU): None}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_the_probe_compares_the_backward_whatever_the_mode_of_the_first_caller(mode, monkeypatch):
    """The pool's backward goes through autograd: a first call under no_grad
    or inference_mode must neither fail the probe nor skip the comparison."""
    _need("cpp")
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        assert backend._probe("cpp", CPU) is None
    reason = _break(monkeypatch, "cpp", "pool_backward:max,2")
    with context():
        assert re.match(reason, backend._probe("cpp", CPU))


def test_a_first_fused_call_inside_a_checkpoint_recompute_probes_cleanly(monkeypatch):
    """With ``--recompute cell`` the first fused call may come inside a
    checkpoint: the probe must neither be recorded by it nor swallow its
    early stop as a kernel failure (it did: the C++ kernels were dropped,
    and the backward failed)."""
    from torch.utils.checkpoint import checkpoint

    from helpers import tiny_net

    _prefer(monkeypatch, "cpp")
    torch.manual_seed(0)
    ref = tiny_net(backend="reference").double()
    net = tiny_net(backend="fused", recompute="cell").double()
    net.load_state_dict(ref.state_dict())
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.double), torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        loss = checkpoint(net.loss, x, y, use_reentrant=False)  # the probe runs inside this forward
        loss.backward()
    assert backend._PROBED == {("cpp", CPU): None}
    ref.loss(x, y).backward()
    torch.testing.assert_close(net.alpha_normal.grad, ref.alpha_normal.grad, rtol=1e-9, atol=1e-12)


# -- (4): the triton kernels, under the interpreter on the CPU --

def test_correct_triton_kernels_pass_the_probe(monkeypatch):
    _prefer(monkeypatch, "triton")
    assert backend._probe("triton", CPU) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_backend(CPU) == "triton"


def _wrong_triton_backward(monkeypatch):
    """The real triton op (torch.ops.fastdarts_triton) with a wrong ∂L/∂w."""
    real = triton_bn_accumulate.bn_accumulate_backward_triton

    def wrong(*args, **kwargs):
        dz, dweight = real(*args, **kwargs)
        return dz, dweight + 0.01 * dweight.abs() + 0.01

    monkeypatch.setattr(triton_bn_accumulate, "bn_accumulate_backward_triton", wrong)


def test_wrong_triton_kernels_fall_back_with_one_warning(monkeypatch):
    _prefer(monkeypatch, "triton")
    _wrong_triton_backward(monkeypatch)
    chosen, runtime_warnings, caught = _choose_recording_warnings()
    assert chosen == "ref"
    assert len(caught) == len(runtime_warnings) == 1, [str(w.message) for w in caught]
    message = str(runtime_warnings[0].message)
    assert message.startswith("fastdarts: the triton kernels fail on cpu (bn_accumulate_backward gives wrong "
                              "values of dweight in float32 (max error "), message
    assert message.endswith("); using the ref kernels on cpu instead"), message


def test_forcing_wrong_triton_kernels_is_an_error_naming_the_op(monkeypatch):
    _need("triton")
    _wrong_triton_backward(monkeypatch)
    monkeypatch.setenv("FASTDARTS_BACKEND", "triton")
    with pytest.raises(FastDartsError, match=r"FASTDARTS_BACKEND=triton: its kernels fail on cpu "
                                             r"\(bn_accumulate_backward gives wrong values of dweight in float32"):
        kernel_backend(CPU)


# -- (5): a wrong value in each probed output is caught --

MUTATIONS = ["forward", "forward_nan", "forward_ignores_statistics", "forward_ignores_weight", "dz", "dweight",
             "dweight_alpha_only",
             *(f"{kind}:{pool},{stride}" for kind in ("pool", "pool_backward")
               for pool in ("max", "avg") for stride in (1, 2)),
             "pool_ignores_stride:avg,2"]


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_wrong_value_in_any_probed_output_is_caught(name, mutation, monkeypatch):
    _prefer(monkeypatch, name)
    reason = _break(monkeypatch, name, mutation)
    with pytest.warns(RuntimeWarning, match=rf"^fastdarts: the {name} kernels fail on cpu \({reason}.*\); "
                                            r"using the ref kernels on cpu instead$"):
        assert kernel_backend(CPU) == "ref"
