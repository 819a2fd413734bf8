"""Test accuracy of a trained network, and loading trained weights.

``evaluate`` runs a network over a loader in eval mode (no drop path, no
auxiliary head) and returns loss, top-1 and top-5 accuracy. ``load_trained``
rebuilds a ``NetworkCIFAR`` from a file written by ``fastdarts-train``
(``best.pt``, ``last.pt`` or ``checkpoint.pt``: each records the network it
belongs to) or from a state_dict saved by the original DARTS code (which
records nothing, so the genotype must be named; width, depth, classes and the
auxiliary head are read off the tensors). ``load_original_darts_state_dict``
is the converter for the latter; names are the same as the original's
``NetworkCIFAR`` by construction, so it only unwraps containers:

- a checkpoint dict holding the weights under ``state_dict`` (the original's
  ``save_checkpoint``) or ``model``;
- the ``module.`` prefix that ``nn.DataParallel`` adds to every name;
- BatchNorm ``num_batches_tracked`` buffers, absent from files written by
  PyTorch < 0.4.1 (the released DARTS model), added as 0 (they only matter
  with ``momentum=None``, which neither code uses).

Such files are in PyTorch's legacy (non-zip) format and may hold CUDA
tensors; ``torch.load(weights_only=True)`` reads the legacy format, and every
file is loaded onto the CPU (``map_location``) first, so they load on a
machine without a GPU.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from .checkpoints import TRAIN_FORMAT, WEIGHTS_FORMAT, check_entries, kind_of, load_model_state
from .distributed import DistContext, all_reduce_sum_, main_rank_first, per_rank_batch
from .errors import FastDartsError
from .eval_network import GenotypeNetwork, build_network, count_parameters, network_from_spec
from .model_size import count_multiply_adds
from .files import read_torch
from .genotype import Genotype
from .run_utils import resolve_device, resolve_fast_options
from .size_check import check_eval_size


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when asked, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    # No cast cache: each weight is cast once per forward anyway, and a cache
    # filled inside a CUDA graph capture would outlive its memory (torch's graph notes).
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, bf16: bool = False,
             channels_last: bool = False, max_steps: int | None = None,
             dist: DistContext | None = None) -> dict[str, float]:
    """Mean cross-entropy and top-1 / top-5 accuracy (percent) of ``model``
    over ``batches``, in eval mode; the model's mode is restored afterwards.
    Sums stay on the device until the end: one synchronisation per call.

    In a multi-process run (``dist``) each rank passes its shard of the
    batches and the sums are added over the ranks: the counts exactly, so the
    accuracies are the single process's on the same weights; every rank
    returns the totals."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct1 = torch.zeros((), device=device, dtype=torch.long)
    correct5 = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    try:
        for step, (x, y) in enumerate(batches):
            if max_steps is not None and step >= max_steps:
                break
            if len(y) == 0:  # this rank's part of a last batch smaller than the number of ranks
                continue
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, bf16):
                out = model(x)
            logits = (out[0] if isinstance(out, tuple) else out).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == y[:, None]
            correct1 += hits[:, 0].sum()
            correct5 += hits.any(dim=1).sum()
            seen += len(y)
    finally:
        model.train(was_training)
    if dist is not None and dist.distributed:
        images = torch.tensor(seen, device=device, dtype=torch.long)
        all_reduce_sum_([loss_sum, correct1, correct5, images])
        seen = int(images.item())
    if seen == 0:
        raise FastDartsError("nothing to evaluate: the test set is empty")
    return dict(loss=loss_sum.item() / seen, top1=100 * correct1.item() / seen, top5=100 * correct5.item() / seen,
                images=seen)


# ---------------------------------------------------------------- loading weights

def load_original_darts_state_dict(obj: Any) -> "OrderedDict[str, torch.Tensor]":
    """A state_dict saved by the original DARTS code (or a checkpoint dict or
    DataParallel wrapper around one) as a state_dict that ``NetworkCIFAR`` (or ``NetworkImageNet``)
    loads by name. See the module docstring for what is converted."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise FastDartsError("not a state_dict: expected a dict of parameter names to tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FastDartsError(f"not a state_dict: entry {bad[0]!r} is not a named tensor")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    state = OrderedDict((k, v) for k, v in obj.items())
    for key in list(state):
        if key.endswith(".running_mean"):
            tracked = key[: -len("running_mean")] + "num_batches_tracked"
            state.setdefault(tracked, torch.tensor(0, dtype=torch.long))
    return state


def _infer_spec(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Channels, depth, classes and auxiliary head of an original state_dict, from its tensors."""
    # NetworkImageNet's stem0 starts with a conv to C/2 channels; NetworkCIFAR's stem with one to 3C.
    kind = "imagenet" if "stem0.0.weight" in state else "cifar"
    try:
        stem = state["stem0.0.weight" if kind == "imagenet" else "stem.0.weight"]
        classifier = state["classifier.weight"]
    except KeyError as e:
        raise FastDartsError(f"{path} is not the state_dict of a DARTS NetworkCIFAR or NetworkImageNet: it has no "
                             f"{e.args[0]}") from None
    if kind == "imagenet":
        if stem.dim() != 4:
            raise FastDartsError(f"{path}: stem0.0.weight has shape {tuple(stem.shape)}, expected "
                                 f"[C/2, in_channels, 3, 3]")
        channels = 2 * stem.shape[0]
    elif stem.dim() != 4 or stem.shape[0] % 3:
        raise FastDartsError(f"{path}: stem.0.weight has shape {tuple(stem.shape)}, expected [3*C, in_channels, 3, 3]")
    else:
        channels = stem.shape[0] // 3
    cells = {int(k.split(".")[1]) for k in state if k.startswith("cells.") and k.split(".")[1].isdigit()}
    if not cells:
        raise FastDartsError(f"{path} is not the state_dict of a DARTS NetworkCIFAR: it has no cells")
    return dict(kind=kind, channels=channels, in_channels=stem.shape[1], layers=max(cells) + 1,
                num_classes=classifier.shape[0], auxiliary=any(k.startswith("auxiliary_head.") for k in state))


@dataclass
class LoadedNetwork:
    model: GenotypeNetwork
    source: str                 # "fastdarts" or "original DARTS state_dict"
    dataset: str | None         # the data set it was trained on, where the file says
    epoch: int | None


def load_trained(path: str | Path, *, genotype: Genotype | None = None, channels: int | None = None,
                 layers: int | None = None, image_size: int | None = None,
                 map_location: torch.device | str = "cpu") -> LoadedNetwork:
    """The network of a weights file, with its weights.

    ``genotype``, ``channels``, ``layers``: for a fastdarts file, checks that
    the file is for them (None: take the file's); for an original DARTS
    state_dict, ``genotype`` is required and the others are checked against
    the tensors. ``image_size`` (default: the file's, else 32) only decides the
    auxiliary head's pooling.
    """
    path = Path(path)
    obj = read_torch(path, map_location, what="weights file")
    if isinstance(obj, Mapping) and obj.get("format") in (WEIGHTS_FORMAT, TRAIN_FORMAT):
        # A damaged or hand-edited file: one line saying what is wrong, not a KeyError from deep inside.
        check_entries(obj, path)
        weights_key = "state_dict" if obj["format"] == WEIGHTS_FORMAT else "model"
        spec, state = dict(obj["network"]), obj[weights_key]
        if image_size is not None:
            spec["image_size"] = image_size
        check_eval_size(spec, map_location, source=str(path))  # its weights, before it is built
        try:
            model = network_from_spec(spec)
        except FastDartsError as e:
            raise FastDartsError(f"{path} is a damaged fastdarts file: {e}") from None
        if genotype is not None and genotype != model.genotype:
            raise FastDartsError(f"{path} was trained for another genotype than the one given "
                                 f"(its own: {model.genotype.to_dict()}); omit --genotype to use the file's")
        for name, value in (("channels", channels), ("layers", layers)):
            if value is not None and value != spec[name]:
                raise FastDartsError(f"{path} holds a network with {name}={spec[name]}, not {value}")
        load_model_state(model, state, path, "the network it describes")
        history = obj.get("history")
        epoch = obj.get("epoch") if obj["format"] == WEIGHTS_FORMAT else (
            len(history) if isinstance(history, list) else None)
        return LoadedNetwork(model, "fastdarts", obj.get("dataset"), epoch)

    kind = kind_of(obj)
    if kind is not None:
        raise FastDartsError(f"{path} is {kind}, not trained weights")
    if isinstance(obj, Mapping) and "format" in obj and isinstance(obj.get("format"), (str, int)):
        raise FastDartsError(f"{path} is a file of an unknown kind (format {obj['format']!r}), not trained weights")
    try:
        state = load_original_darts_state_dict(obj)
    except FastDartsError as e:
        raise FastDartsError(f"{path}: {e}") from None
    if genotype is None:
        raise FastDartsError(f"{path} is a plain state_dict (the original DARTS code's format), which does not say "
                             f"its genotype: pass --genotype (e.g. DARTS_V2)")
    spec = _infer_spec(state, path)
    for name, value in (("channels", channels), ("layers", layers)):
        if value is not None and value != spec[name]:
            raise FastDartsError(f"{path} holds a network with {name}={spec[name]}, not {value}")
    default_size = 224 if spec["kind"] == "imagenet" else 32
    check_eval_size({**spec, "genotype": genotype.to_dict(), "image_size": image_size or default_size},
                    map_location, source=str(path))
    model = build_network(spec["kind"], genotype, C=spec["channels"], num_classes=spec["num_classes"],
                          layers=spec["layers"], auxiliary=spec["auxiliary"], in_channels=spec["in_channels"],
                          image_size=image_size or default_size)
    load_model_state(model, state, path, f"the given genotype at C={spec['channels']}, {spec['layers']} layers")
    return LoadedNetwork(model, "original DARTS state_dict", None, None)


def parameter_counts(model: GenotypeNetwork) -> dict[str, int]:
    return dict(parameters=count_parameters(model), parameters_with_auxiliary=count_parameters(model, True))


def evaluate_checkpoint(path: str | Path, *, genotype: str | Genotype | None = None, channels: int | None = None,
                        layers: int | None = None, dataset: str | None = None, data: str = "./data",
                        download: bool = False, batch_size: int = 256, device: str = "auto",
                        bf16: bool | None = None, channels_last: bool | None = None,
                        max_steps: int | None = None, dist: DistContext | None = None,
                        workers: int | None = None, data_budget_mb: float | None = None,
                        skip_bad_images: bool = False) -> dict[str, Any]:
    """Test accuracy (top-1, top-5, percent), loss and parameter counts of the
    network in ``path`` (see ``load_trained``) on ``dataset``'s test set
    (default: the one it was trained on, else CIFAR-10). The forward passes
    run in float32 unless ``bf16=True``: the reported accuracy is the fp32
    one even for a network trained under bf16 autocast. ``channels_last``
    defaults to on for CUDA and off on the CPU, as in training (it changes
    only the memory layout).

    Under ``dist`` (a multi-process run) the device is the rank's, and the
    test set is shared out among the ranks batch by batch (``batch_size`` is
    the global batch) and the result reduced over them (see ``evaluate``)."""
    from .data import FOLDER_DATASETS, Loaders, load_dataset
    from .genotype import get_genotype

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise FastDartsError(f"batch-size must be a positive integer, got {batch_size!r}")
    shard = None
    if dist is not None and dist.distributed:
        per_rank_batch(batch_size, dist.world_size)
        shard = (dist.rank, dist.world_size)
    target = resolve_device(device) if dist is None else dist.device
    if isinstance(genotype, str):
        genotype = get_genotype(genotype)
    loaded = load_trained(path, genotype=genotype, channels=channels, layers=layers, map_location="cpu")
    model, spec = loaded.model, loaded.model.spec()
    name = dataset or loaded.dataset or "cifar10"
    # A folder's images at the size the network was trained on (its cache is kept per size).
    image_size = spec["image_size"] if name in FOLDER_DATASETS and loaded.source == "fastdarts" else None
    # A download goes into one folder: rank 0 fetches it while the others wait; a folder's cache too,
    # the others waiting on the file system.
    with main_rank_first(dist) if download and dist is not None else contextlib.nullcontext():
        data_set = load_dataset(name, data, download=download, image_size=image_size, workers=workers,
                                skip_bad_images=skip_bad_images, progress=False,
                                build_cache=dist is None or dist.is_main)
    shape = (spec["in_channels"], spec["num_classes"])
    if (data_set.in_channels, data_set.num_classes) != shape:
        raise FastDartsError(
            f"{path} holds a network for {shape[0]}-channel images and {shape[1]} classes, but {name} has "
            f"{data_set.in_channels}-channel images and {data_set.num_classes} classes")
    if loaded.source == "fastdarts" and data_set.image_size != spec["image_size"]:
        raise FastDartsError(f"{path} was trained on {spec['image_size']}x{spec['image_size']} images, but {name}'s "
                             f"are {data_set.image_size}x{data_set.image_size}")
    if loaded.source != "fastdarts" and data_set.image_size != spec["image_size"]:
        model = network_from_spec({**spec, "image_size": data_set.image_size})
        model.load_state_dict(loaded.model.state_dict())
    bf16, channels_last = resolve_fast_options(target, bf16, channels_last, bf16_default=False)
    # The forward at this batch (and the weights, where they are not in host memory already).
    check_eval_size(spec, target, batch=batch_size, world_size=dist.world_size if dist else 1, bf16=bf16,
                    include_weights=target.type != "cpu", source=str(path))
    model = model.to(target)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loaders = Loaders(data_set, (data_set.test,), target, shard=shard, budget_mb=data_budget_mb, workers=workers)
    loader = loaders(loaders.placed[0], batch_size, train=False, shuffle=False)
    result = evaluate(model, loader.epoch(0), bf16=bf16, channels_last=channels_last, max_steps=max_steps,
                      dist=dist)
    input_shape = (data_set.in_channels, data_set.image_size, data_set.image_size)
    return dict(result, **parameter_counts(model), multiply_adds=count_multiply_adds(model, input_shape),
                input_shape=input_shape, dataset=name, source=loaded.source, epoch=loaded.epoch,
                network=spec, bf16=bf16, channels_last=channels_last, device=str(target))
