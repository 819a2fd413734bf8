"""The search and training steps as CUDA graphs (``--cuda-graph``, SPEC §11).

A DARTS step launches tens of thousands of small kernels from Python (see
``benchmarks/op_count.py``); on a GPU the launches, not the arithmetic, set
its time. ``GraphedStep`` runs a step function eagerly for a few warm-up
calls on a side stream, captures it once into a CUDA graph, and from then on
copies each batch into the captured (static) input buffers and replays the
graph: one launch per step.

A captured graph replays the kernels and the *values baked in at capture*:
every Python number the step used is frozen. What changes between steps
must therefore live in device tensors updated in place:

- the weights' learning rate: ``hold_lr_on_device`` turns it into a 0-dim
  device tensor that ``run_utils.set_lr`` (the cosine schedule) fills;
  ``DeviceLrSGD`` steps with it (torch's SGD turns a tensor learning rate
  into a host number, a synchronisation that a capture refuses);
- Adam on α with ``capturable=True`` (its step count on the device);
- BatchNorm counters and running statistics, momentum buffers, Adam moments:
  all updated in place already.

What changes per epoch (drop-path rates and a method's per-epoch settings,
warm-up epochs without an architecture step, a stage's new supernet) is handled by
capturing a new graph for every epoch: ``GraphedStep`` lives for one epoch.
Random draws inside the step come from the default CUDA generator (graph-safe
in torch) or from generators registered with the graph (the training loop's
drop-path generator). A short last batch (other shapes) runs eagerly: the
eager step updates the same tensors the graph does.

What cannot be captured is refused: by ``check_cuda_graph``, a device that
is not CUDA and torchrun (collectives inside a captured graph are untested
here); by each method, what it cannot capture (e.g. paths drawn on the
host, or a generator state restored inside the step).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from .errors import FastDartsError

# Eager steps on a side stream before the capture: they create the optimiser
# states, compile the Triton kernels and let cuDNN choose its algorithms.
WARMUP_STEPS = 3


def check_cuda_graph(device: torch.device, *, distributed: bool = False) -> None:
    """Refuse, with the reason, what ``--cuda-graph`` cannot capture here (a
    method refuses what it cannot capture itself: ``SearchMethod.incompatible``)."""
    if device.type != "cuda":
        raise FastDartsError(f"--cuda-graph needs a CUDA device, got {device}; run without --cuda-graph")
    if not hasattr(torch.cuda, "CUDAGraph"):
        raise FastDartsError("--cuda-graph: this torch build has no CUDA graphs")
    if distributed:
        raise FastDartsError("--cuda-graph does not run under torchrun yet (collectives inside a captured graph "
                             "are untested); run without --cuda-graph")


# -- learning rate and optimisers on the device -------------------------------------------
def hold_lr_on_device(optimizer: torch.optim.Optimizer, on: bool) -> None:
    """Each group's learning rate as a 0-dim tensor on its parameters' device
    (``on``) or as a float; the value is kept. Also after ``load_state_dict``,
    which restores whatever form the checkpoint held."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if on and not isinstance(lr, torch.Tensor):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=group["params"][0].device)
        elif on:
            group["lr"] = lr.to(device=group["params"][0].device, dtype=torch.float32)
        elif isinstance(lr, torch.Tensor):
            group["lr"] = lr.item()  # once, outside any step


def adam_capturable(optimizer: torch.optim.Adam, on: bool) -> None:
    """Adam's ``capturable`` flag, with its step counts where that mode keeps
    them (on the parameters' device, or on the host); again after ``load_state_dict``."""
    for group in optimizer.param_groups:
        group["capturable"] = on
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                step = state["step"]
                state["step"] = (step.to(device=p.device, dtype=torch.float32) if on
                                 else torch.tensor(float(step), dtype=torch.float32))


class DeviceLrSGD(torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, weight decay; no dampening, nesterov or
    maximize) that also steps with a learning rate held in a device tensor,
    without reading it on the host. With a float learning rate it is torch's
    SGD unchanged; the state (``momentum_buffer``) is torch's either way, so
    checkpoints move freely between the two."""

    @torch.no_grad()
    def step(self, closure=None):
        if not any(isinstance(group["lr"], torch.Tensor) for group in self.param_groups):
            return super().step(closure)
        if closure is not None:
            raise ValueError("DeviceLrSGD with a tensor learning rate takes no closure")
        for group in self.param_groups:
            if group["dampening"] or group["nesterov"] or group["maximize"]:
                raise ValueError("DeviceLrSGD with a tensor learning rate: no dampening, nesterov or maximize")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["momentum"]:
                states = [self.state[p] for p in params]
                if any("momentum_buffer" not in s or s["momentum_buffer"] is None for s in states):
                    # The first step (a warm-up step under graphs): the buffer is the gradient.
                    for s, g in zip(states, grads):
                        s["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buffers = [s["momentum_buffer"] for s in states]
                    torch._foreach_mul_(buffers, group["momentum"])
                    torch._foreach_add_(buffers, grads)
                grads = [s["momentum_buffer"] for s in states]
            torch._foreach_sub_(params, torch._foreach_mul(grads, group["lr"]))
        return None


# -- capture and replay ----------------------------------------------------------------------
class GraphedStep:
    """``step(*inputs)`` (tensors in; a tuple of tensors or None out) as a
    CUDA graph: ``warmup`` eager calls on a side stream, then one capture,
    then replays with the inputs copied into the captured buffers. Inputs of
    another shape (a short last batch) run eagerly. The outputs of a replay
    are the captured output tensors: read them before the next call.
    ``generators``: non-default CUDA generators the step draws from."""

    def __init__(self, step: Callable[..., tuple], warmup: int = WARMUP_STEPS,
                 generators: Sequence[torch.Generator] = ()):
        self.step, self.warmup, self.generators = step, warmup, tuple(generators)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_outputs = None
        self.eager_calls = 0
        self.replays = 0

    def __call__(self, *inputs: torch.Tensor):
        if self.graph is not None:
            if self._fits(inputs):
                for static, x in zip(self.static_inputs, inputs):
                    static.copy_(x, non_blocking=True)
                self.graph.replay()
                self.replays += 1
                return self.static_outputs
            return self._eager(inputs)
        if self.eager_calls < self.warmup:
            return self._eager(inputs, side_stream=True)
        return self._capture(inputs)

    def _fits(self, inputs: Sequence[torch.Tensor]) -> bool:
        return all(s.shape == x.shape and s.dtype == x.dtype and s.device == x.device
                   for s, x in zip(self.static_inputs, inputs))

    def _eager(self, inputs, side_stream: bool = False):
        self.eager_calls += 1
        with warnings.catch_warnings():
            # Adam(capturable=True) warns when stepped outside a capture; here that is intended.
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            if not side_stream:
                return self.step(*inputs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                outputs = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return outputs

    def _capture(self, inputs):
        # Allocated outside the graph's pool: they live as long as this object.
        self.static_inputs = [x.clone() for x in inputs]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what the warm-up cached goes back before the graph takes its own pool
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self.static_outputs = self.step(*self.static_inputs)
        self.graph = graph
        # The capture recorded this batch's step without running it.
        graph.replay()
        self.replays += 1
        return self.static_outputs

    def close(self) -> None:
        """Release the graph and its memory pool (before the next epoch's capture)."""
        self.graph = None
        self.static_inputs, self.static_outputs = [], None
