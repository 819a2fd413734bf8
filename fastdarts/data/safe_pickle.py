"""Unpickling of data-set files that admits only plain data: no code can run.

The CIFAR python batches are pickles, and a plain ``pickle.load`` calls any
function a file names, so a planted batch file could run anything. This
unpickler admits the few things such a file holds: dicts, lists, bytes,
str and ints (built by pickle's own opcodes, no global involved) and numpy
integer arrays. Every global a file names is looked up by its exact module
and name among the few ``SafeUnpickler`` admits; any other is refused before
anything is imported or called (``persistent_load`` is refused too).

The admitted globals are not numpy's own functions but stand-ins that check
their arguments first: a dtype must be a plain integer one (never ``object``,
whose arrays are built from arbitrary objects; never one whose pickled state
added fields or flags), an array must be built from raw bytes of that dtype.
The stand-ins cannot be called in other ways or modified by the pickle.
Refusals raise ``RefusedPickle`` with a one-line reason ("it asks to load
posix.system, which the format never holds") for the caller to name its file.
"""
from __future__ import annotations

import _compat_pickle
import pickle
import reprlib
from typing import Any, BinaryIO, Callable

import numpy as np

# Plain integer types only: CIFAR's pixels are uint8, its labels Python ints.
# The names ``numpy.dtype`` may be called with (the byte order comes after, in the BUILD of its state) ...
_SPECS = frozenset(kind + str(size) for kind in "ui" for size in (1, 2, 4, 8))
# ... and the dtypes that may result, by their ``str`` ('|u1', '<i8', '>i8', ...).
_DTYPES = {d.str: d for spec in _SPECS for order in "<>" for d in [np.dtype(spec).newbyteorder(order)]}
_MAX_NDIM = 32


class RefusedPickle(pickle.UnpicklingError):
    """The file asks for something plain data never holds; the message says what."""


def _show(value: Any) -> str:
    """``value`` for a one-line message: text from the file as is when short and printable."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str) and value.isprintable() and len(value) <= 80:
        return value
    return reprlib.repr(value)


def _text(value: Any) -> str | None:
    """A str, or bytes (a Python 2 str read with ``encoding="bytes"``) as str; None otherwise."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if isinstance(value, str) else None


def _flag(value: Any) -> bool:
    """A pickled bool: True/False, or 0/1 from old pickles."""
    if type(value) is bool or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise RefusedPickle(f"it holds an array flag {_show(value)}, which the format never holds")


def _shape(value: Any) -> tuple[int, ...]:
    if (type(value) is not tuple or len(value) > _MAX_NDIM
            or not all(type(n) is int and n >= 0 for n in value)):
        raise RefusedPickle(f"it holds an array of shape {_show(value)}, which the format never holds")
    return value


def _checked_dtype(value: Any) -> np.dtype:
    """The canonical numpy dtype equal to ``value``, a plain integer dtype, or RefusedPickle.

    A dtype's pickled state (applied by BUILD, after our ``_dtype`` made it) can
    add fields, a sub-array or the has-object flags to an integer dtype; such a
    dtype is refused, and arrays are built with the canonical one.
    """
    if not isinstance(value, np.dtype):
        raise RefusedPickle(f"it holds an array whose dtype is a {type(value).__name__}, "
                            "which the format never holds")
    canonical = _DTYPES.get(value.str)
    if (canonical is None or value.flags != canonical.flags or value.fields is not None or value.names is not None
            or value.subdtype is not None or value.metadata is not None or value.itemsize != canonical.itemsize
            or value != canonical):
        # Not str(value): numpy need not print a dtype with forged fields safely.
        raise RefusedPickle(f"it holds an array of dtype {_show(value.str)} with altered fields or flags, "
                            "which the format never holds")
    return canonical


class _Global:
    """A stand-in for an admitted global: callable, but not modifiable by the pickle (BUILD on it)."""

    __slots__ = ("_name", "_call")

    def __init__(self, name: str, call: Callable[..., Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_call", call)

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)

    def __setattr__(self, key: str, value: Any) -> None:
        raise RefusedPickle(f"it tries to modify {self._name}, which the format never does")

    def __setstate__(self, state: Any) -> None:
        raise RefusedPickle(f"it tries to modify {self._name}, which the format never does")

    def __reduce__(self) -> Any:
        raise TypeError(f"{self._name} stand-in cannot be pickled")


class _PendingArray(np.ndarray):
    """What ``_reconstruct`` returns: an empty array whose pickled state (BUILD) is checked
    before numpy applies it. Turned into a plain ndarray once the load is done."""

    def __setstate__(self, state: Any) -> None:
        if type(state) is not tuple or len(state) not in (4, 5):
            raise RefusedPickle(f"it holds an array state {_show(state)}, which the format never holds")
        if len(state) == 5:
            if type(state[0]) is not int or state[0] != 1:
                raise RefusedPickle(f"it holds an array state of version {_show(state[0])}, "
                                    "which the format never holds")
            state = state[1:]
        shape, dtype, fortran, raw = state
        dtype = _checked_dtype(dtype)
        if type(raw) is str:  # Python 2 data read with encoding="latin1", as numpy itself takes it
            raw = raw.encode("latin-1")
        if type(raw) is not bytes:
            raise RefusedPickle(f"it holds an array whose data is a {type(raw).__name__}, "
                                "which the format never holds")
        super().__setstate__((1, _shape(shape), dtype, _flag(fortran), raw))


class _ArrayClass:
    """What the name ``numpy.ndarray`` loads as: only an argument to ``_reconstruct``."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        raise RefusedPickle("it calls numpy.ndarray directly, which the format never does")

    def __setstate__(self, state: Any) -> None:
        raise RefusedPickle("it tries to modify numpy.ndarray, which the format never does")


_NDARRAY = _ArrayClass()


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` admitting only plain data and numpy integer arrays (see the module)."""

    def __init__(self, file: BinaryIO, *, encoding: str = "bytes") -> None:
        # encoding="bytes": Python 2 str (CIFAR's keys, numpy's raw data) stays bytes;
        # "latin1" (torchvision's choice for CIFAR-100) reads it as str.
        super().__init__(file, encoding=encoding)
        self._dtypes: list[np.dtype] = []
        self._allowed: dict[tuple[str, str], Any] = {}
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and numpy 2 names
            self._allowed[module, "_reconstruct"] = _Global(f"{module}._reconstruct", self._reconstruct)
        for module in ("numpy.core.numeric", "numpy._core.numeric"):  # arrays in pickle protocol 5
            self._allowed[module, "_frombuffer"] = _Global(f"{module}._frombuffer", self._frombuffer)
        self._allowed["numpy", "ndarray"] = _NDARRAY
        self._allowed["numpy", "dtype"] = _Global("numpy.dtype", self._dtype)
        # Python 3 writes bytes as _codecs.encode(text, "latin1") in protocols 0-2.
        self._allowed["_codecs", "encode"] = _Global("_codecs.encode", self._encode)

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            # Named as plain pickle would load it: protocols 0-2 write Python 2 names (commands.Popen
            # for subprocess.Popen), which pickle.Unpickler.find_class maps back.
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[module, name]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            raise RefusedPickle(f"it asks to load {_show(f'{module}.{name}')}, which the format never holds")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle(f"it asks for the external object {_show(pid)}, which the format never holds")

    def load(self) -> Any:
        result = super().load()
        for dtype in self._dtypes:  # also those no array used
            _checked_dtype(dtype)
        return _plain_arrays(result)

    def _dtype(self, spec: Any, align: Any = False, copy: Any = True, *rest: Any) -> np.dtype:
        text = _text(spec)
        if rest or text not in _SPECS:
            raise RefusedPickle(f"it holds an array of dtype {_show(spec)}, which the format never holds")
        _flag(align)
        _flag(copy)
        # Always a copy: the BUILD that follows must never change numpy's own dtype objects.
        dtype = np.dtype(text, False, True)
        self._dtypes.append(dtype)
        return dtype

    @staticmethod
    def _reconstruct(subtype: Any, shape: Any, code: Any) -> np.ndarray:
        if subtype is not _NDARRAY or type(shape) is not tuple or shape != (0,) or _text(code) != "b":
            raise RefusedPickle(f"it rebuilds an array from {_show((subtype, shape, code))}, "
                                "which the format never holds")
        return np.ndarray.__new__(_PendingArray, (0,), np.int8)

    @staticmethod
    def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        if type(buf) not in (bytes, bytearray):
            raise RefusedPickle(f"it holds an array whose data is a {type(buf).__name__}, "
                                "which the format never holds")
        if order not in ("C", "F"):
            raise RefusedPickle(f"it holds an array of order {_show(order)}, which the format never holds")
        return np.frombuffer(buf, dtype=_checked_dtype(dtype)).reshape(_shape(shape), order=order)

    @staticmethod
    def _encode(text: Any, encoding: Any) -> bytes:
        if type(text) is not str or encoding not in ("latin1", "latin-1"):
            raise RefusedPickle(f"it encodes text as {_show(encoding)}, which the format never does")
        return text.encode("latin-1")


def _plain_arrays(result: Any) -> Any:
    """``result`` with every ``_PendingArray`` in its dicts and lists turned into a plain ndarray."""
    seen: set[int] = set()
    stack = [result]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, _PendingArray):
                    item[key] = value.view(np.ndarray)
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(item, list):
            for i, value in enumerate(item):
                if isinstance(value, _PendingArray):
                    item[i] = value.view(np.ndarray)
                elif isinstance(value, (dict, list)):
                    stack.append(value)
    return result.view(np.ndarray) if isinstance(result, _PendingArray) else result


def safe_load(file: BinaryIO, *, encoding: str = "bytes") -> Any:
    """``pickle.load(file, encoding=encoding)`` of plain data only; RefusedPickle for anything else."""
    return SafeUnpickler(file, encoding=encoding).load()
