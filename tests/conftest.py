import os

# Triton kernels run on the CPU through Triton's interpreter when there is no
# GPU. The variable must be set before triton is first imported, so here, before
# anything imports fastdarts (torch itself does not import triton).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32(request):
    """Exactness tests compare fp32 results within ~1e-5 of their scale: on
    Ampere/Hopper cuDNN's default TF32 convolutions (10-bit mantissa) would
    decide the outcome instead of the code under test. TF32 is off for every
    test; tests marked ``tf32`` switch it on and use a TF32 tolerance."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    tf32 = request.node.get_closest_marker("tf32") is not None
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def search_cli_error(argv, capsys) -> str:
    """``fastdarts-search argv`` must fail with exit status 2 and one line on
    stderr (argparse's errors included); returns that line."""
    from fastdarts.cli import search_main

    try:
        code = search_main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdarts-search: error: "), err
    return err[0]


def tiny_net(**kw):
    """A supernet small enough for a test to run in well under a second."""
    from fastdarts import SearchNetwork

    args = dict(C=4, num_classes=5, layout="N,R,N", ops="darts", steps=2, multiplier=2, stem_multiplier=1,
                in_channels=3, backend="reference")
    args.update(kw)
    return SearchNetwork(**args)


def saved_activation_bytes(net, x, y):
    """Bytes autograd keeps for backward during one forward of ``net.loss``
    (each storage once; parameters are the model's own memory, not counted)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net.loss(x, y)
    loss.backward()
    return sum(storages.values())
