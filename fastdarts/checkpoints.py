"""The kinds of file fastdarts writes, and one validator for all of them.

A file is read with ``read_torch`` (``weights_only=True``), then checked
entry by entry before anything is built from it: a hand-edited or damaged
file (an entry missing or of the wrong type, a tensor of the wrong shape, an
optimiser state that does not fit its parameters) is one line naming the file
and the entry, never a KeyError from deep inside a loop. The search, training
and evaluation loaders and ``fastdarts-rank`` all go through ``read_checked``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .errors import FastDartsError
from .files import read_torch

SEARCH_FORMAT = 1
TRAIN_FORMAT = "fastdarts-train-checkpoint/1"
WEIGHTS_FORMAT = "fastdarts-weights/1"

# format -> (what the file is, which commands read it)
KINDS: dict[Any, tuple[str, str]] = {
    SEARCH_FORMAT: ("a search checkpoint", "fastdarts-search --resume and fastdarts-rank read it"),
    TRAIN_FORMAT: ("a training checkpoint", "fastdarts-train --resume and fastdarts-eval read it"),
    WEIGHTS_FORMAT: ("trained weights", "fastdarts-eval reads them"),
}


def kind_of(obj: Any) -> str | None:
    """'a search checkpoint (fastdarts-search --resume and fastdarts-rank read it)' for a fastdarts
    file's contents, None for anything else."""
    if isinstance(obj, Mapping):
        fmt = obj.get("format")
        if isinstance(fmt, (str, int)) and not isinstance(fmt, bool) and fmt in KINDS:
            what, readers = KINDS[fmt]
            return f"{what} ({readers})"
    return None


# ---------------------------------------------------------------- entry checks

def _state_dict(value: Any) -> str | None:
    if not isinstance(value, Mapping) or not value:
        return "not a state_dict"
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            return f"not a state_dict (entry {k!r} is not a named tensor)"
    return None


def _optimizer(value: Any) -> str | None:
    if not isinstance(value, Mapping) or not isinstance(value.get("state"), Mapping) \
            or not isinstance(value.get("param_groups"), list) \
            or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in value["param_groups"]):
        return "not an optimizer state (a dict with 'state' and 'param_groups')"
    return None


def _of_type(*types: type, optional: bool = False) -> Callable[[Any], str | None]:
    names = " or ".join(t.__name__ for t in types) + (" or None" if optional else "")

    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            return f"not a {names} (a {type(value).__name__})"
        return None
    return check


def _history(required: dict[str, Callable[[Any], str | None]]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"not a list of epochs (a {type(value).__name__})"
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping):
                return f"not a list of epochs (entry {i} is a {type(entry).__name__})"
            if entry.get("epoch") != i + 1:
                return f"not the list of epochs 1..{len(value)} (entry {i} says epoch {entry.get('epoch')!r})"
            for key, check_entry in required.items():
                if key not in entry:
                    return f"missing {key!r} in epoch {i + 1}"
                problem = check_entry(entry[key])
                if problem:
                    return f"{key!r} of epoch {i + 1} is {problem}"
        return None
    return check


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{value!r}, not a finite number"
    return None


def _alphas(value: Any) -> str | None:
    if not isinstance(value, Mapping) or not all(isinstance(value.get(c), list) for c in ("normal", "reduce")):
        return "not a dict of 'normal' and 'reduce' op weights"
    return None


def _stage(value: Any) -> str | None:
    if value is None:
        return None
    if (not isinstance(value, Mapping) or isinstance(value.get("index"), bool)
            or not isinstance(value.get("index"), int) or value["index"] < 0
            or not isinstance(value.get("layout"), str) or not isinstance(value.get("edge_ops"), Mapping)):
        return "not a stage (index, layout, edge_ops)"
    return None


_ENTRIES: dict[Any, dict[str, Callable[[Any], str | None]]] = {
    SEARCH_FORMAT: dict(config=_of_type(dict), model=_state_dict, weight_optimizer=_optimizer,
                        arch_optimizer=_optimizer, stage=_stage,
                        history=_history(dict(alphas=_alphas, train_loss=_number))),
    TRAIN_FORMAT: dict(config=_of_type(dict), network=_of_type(dict), model=_state_dict, optimizer=_optimizer,
                       history=_history(dict(test_acc=_number, test_top5=_number, train_loss=_number)),
                       dataset=_of_type(str, optional=True)),
    WEIGHTS_FORMAT: dict(network=_of_type(dict), state_dict=_state_dict, dataset=_of_type(str, optional=True),
                         epoch=_of_type(int, optional=True)),
}
# Entries a file may lack (written by an older version): read with .get().
_OPTIONAL = {"stage", "dataset", "epoch"}


def damaged(path: Path, problem: str) -> FastDartsError:
    return FastDartsError(f"{path} is a damaged fastdarts file: {problem}")


def check_entries(obj: Mapping, path: Path) -> None:
    """Each entry the file's kind needs is there and of the right type."""
    for key, check in _ENTRIES[obj["format"]].items():
        if key not in obj:
            if key in _OPTIONAL:
                continue
            raise damaged(path, f"its {key!r} entry is missing")
        problem = check(obj[key])
        if problem:
            raise damaged(path, f"its {key!r} entry is {problem}")


def read_checked(path: str | Path, formats: tuple, what: str, map_location: torch.device | str = "cpu") -> dict:
    """The contents of the fastdarts file at ``path``, which must be of one of
    ``formats`` (what: its name in messages, e.g. "search checkpoint"), checked
    entry by entry. Another kind of fastdarts file is named with the command
    that reads it."""
    path = Path(path)
    obj = read_torch(path, map_location, what=what)
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        kind = kind_of(obj)
        if kind is not None:
            raise FastDartsError(f"{path} is {kind}, not a {what}")
        raise FastDartsError(f"{path} is not a fastdarts {what}")
    check_entries(obj, path)
    return obj


# ---------------------------------------------------------------- fitting a model

def check_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """load_state_dict's complaints as one line that names the first few."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if names:
            problems.append(f"{len(names)} tensor(s) {label} (first: {names[0]})")
    if problems:
        raise FastDartsError(f"weights in {path} do not fit {what}: {'; '.join(problems)}")


def load_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """``model.load_state_dict(state)`` after ``check_fits``; non-finite weights are refused too."""
    check_fits(model, state, path, what)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise damaged(path, f"tensor {name} holds NaN or infinite values")
    model.load_state_dict(state)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping, path: Path, entry: str) -> None:
    """``optimizer.load_state_dict(state)`` once its groups and every per-parameter
    tensor (momentum, Adam's moments) fit the parameters: a wrong shape would
    otherwise fail only at the first step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = state["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise damaged(path, f"its {entry!r} holds groups of {sizes} parameters, the model has "
                            f"{[len(g['params']) for g in optimizer.param_groups]}")
    ids = [i for g in groups for i in g["params"]]
    for index, per_param in state["state"].items():
        if index not in ids or not isinstance(per_param, Mapping):
            raise damaged(path, f"its {entry!r} has state for an unknown parameter {index!r}")
        param = params[ids.index(index)]
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise damaged(path, f"its {entry!r} holds {key} of shape {tuple(value.shape)} for a parameter "
                                    f"of shape {tuple(param.shape)}")
    try:
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise damaged(path, f"its {entry!r} does not fit ({type(e).__name__}: {e})".splitlines()[0]) from None
