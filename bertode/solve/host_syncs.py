"""Count host synchronisations: the calls that make the host wait for a value computed on the device.

    from bertode.solve.host_syncs import count_host_syncs
    with count_host_syncs() as syncs:
        loss = model(**batch).loss; loss.backward(); optimizer.step()
    print(syncs.count, syncs.by_op, syncs.sites)

What counts as one sync (each is one wait on CUDA, whatever the tensor size):
  * a scalar read: ``.item()``, ``bool(t)``/``if t:``, ``float(t)``, ``int(t)`` (``aten._local_scalar_dense``);
  * ``.tolist()`` and ``.numpy()`` -- once per call, not once per element. On CPU these read memory
    without dispatching any op, so they are caught by wrapping the two Tensor methods while a counter
    is active; the wrapper suppresses the device-to-host copy they dispatch on CUDA so it is not
    counted twice;
  * ops whose output shape depends on the data (the host must learn the size before allocating):
    ``nonzero``/``argwhere``/``torch.where(cond)``, ``masked_select``, boolean-mask indexing
    ``x[mask]`` and ``x[mask] = v``, ``unique*``, ``bincount``, ``repeat_interleave`` without
    ``output_size``;
  * ops that return a host bool: ``equal``, ``allclose``; error checks of ``torch.linalg``
    (``solve``, ``inv``, ``cholesky`` read an ``info`` tensor; the ``*_ex`` forms do not);
  * a blocking device-to-host copy (``.cpu()``, ``.to("cpu")``, ``copy_`` into a host tensor) of a
    non-CPU tensor.

The counter is a ``TorchDispatchMode``, so it sees every op the dispatcher runs, on CPU too, where it
counts what *would* synchronise on CUDA. Dispatch modes live in thread-local state that the autograd
engine carries into its worker threads, so ops run by ``backward()`` (including Python
``autograd.Function.backward`` code, e.g. the DEQ's implicit-gradient solve) are counted.

Not counted: scalar reads of host tensors made by ``torch.optim`` (its optimizers keep ``step`` on the
host and read it with ``.item()`` -- no wait on an accelerator; on CPU the same reads would otherwise
count one per parameter).

Caveats: on CPU, ``.cpu()``/``.to("cpu")`` of a CPU tensor is a no-op that dispatches nothing and is
not counted; on CUDA ``x.cpu().numpy()`` counts 2 (the copy and the numpy view of the host tensor).
Ops run inside ``torch.compile``d graphs are not seen individually.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

# Ops that always read a value back (scalar reads, host bools, data-dependent output shapes).
_ALWAYS_SYNC = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.nonzero_numpy",
        "aten.masked_select",
        "aten._unique",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.unique_dim_consecutive",
        "aten.bincount",
        "aten.equal",
        "aten.allclose",
        "aten._linalg_check_errors",
    }
)
_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
_REPEAT_INTERLEAVE = "aten.repeat_interleave"
_COPY_OPS = frozenset({"aten._to_copy", "aten.copy_"})

_THIS_FILE = __file__
_TORCH_DIR = os.path.dirname(torch.__file__)
_local = threading.local()  # .suppressed: depth of wrapped Tensor methods running in this thread


@dataclass
class HostSyncs:
    """What one ``count_host_syncs()`` block saw: ``count`` in all, ``by_op`` and ``sites`` (file:line)."""

    count: int = 0
    by_op: Counter = field(default_factory=Counter)
    sites: Counter = field(default_factory=Counter)

    def add(self, op: str) -> None:
        self.count += 1
        self.by_op[op] += 1
        self.sites[_caller_site()] += 1


def _caller_site() -> str:
    """The innermost stack frame outside torch and this file: where the sync was asked for."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return "<torch>"


def _is_bool_index(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _device_to_host(name: str, args, kwargs) -> bool:
    """A blocking copy of a non-CPU tensor into host memory."""
    if kwargs.get("non_blocking", False):
        return False
    if name == "aten._to_copy":
        source, target = args[0], kwargs.get("device")
        return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    destination, source = args[0], args[1]
    return (
        isinstance(source, torch.Tensor) and source.device.type != "cpu" and destination.device.type == "cpu"
    )


def sync_op_name(func, args, kwargs) -> str | None:
    """The name to count ``func(*args, **kwargs)`` under if it synchronises with the host, else None."""
    name = func._schema.name.replace("::", ".")
    if name in _ALWAYS_SYNC:
        return name
    if name in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return f"{name} (bool mask)" if any(_is_bool_index(i) for i in indices or ()) else None
    if name == _REPEAT_INTERLEAVE:
        has_tensor_repeats = any(isinstance(a, torch.Tensor) for a in args[:2])
        return name if has_tensor_repeats and kwargs.get("output_size") is None else None
    if name in _COPY_OPS and _device_to_host(name, args, kwargs):
        return f"{name} (device to host)"
    return None


_OPTIM_DIR = os.path.join(_TORCH_DIR, "optim") + os.sep
_DISPATCH_PLUMBING = tuple(os.path.join(_TORCH_DIR, p) for p in ("_ops.py", "_compile.py", "utils", "_dynamo"))


def _read_by_optimizer() -> bool:
    """Whether the scalar read in progress was asked for by ``torch.optim`` itself."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_OPTIM_DIR):
            return True
        if path != _THIS_FILE and not path.startswith(_DISPATCH_PLUMBING):
            return False
        frame = frame.f_back
    return False


def _host_state_read(name: str, args) -> bool:
    """A scalar read of a host tensor by ``torch.optim``: its optimizers keep ``step`` on the host (unless
    ``capturable``/``fused``, where they read nothing), so on an accelerator this read waits for nothing."""
    return name == "aten._local_scalar_dense" and args[0].device.type == "cpu" and _read_by_optimizer()


class _HostSyncMode(TorchDispatchMode):
    def __init__(self, record: HostSyncs):
        super().__init__()
        self.record = record
        self.lock = threading.Lock()  # backward may run on autograd worker threads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_local, "suppressed", 0):
            op = sync_op_name(func, args, kwargs)
            if op is not None and not _host_state_read(op, args):
                with self.lock:
                    self.record.add(op)
        return func(*args, **kwargs)


# .tolist()/.numpy() dispatch nothing on CPU: wrap them while at least one counter is active.
_WRAPPED_METHODS = ("tolist", "numpy")
_patch_lock = threading.Lock()
_patch_depth = 0
_originals: dict[str, object] = {}


def _wrap(method_name: str, original):
    def counted(self, *args, **kwargs):
        for mode in _get_current_dispatch_mode_stack():
            if isinstance(mode, _HostSyncMode) and not getattr(_local, "suppressed", 0):
                with mode.lock:
                    mode.record.add(f"Tensor.{method_name}")
        _local.suppressed = getattr(_local, "suppressed", 0) + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _local.suppressed -= 1

    counted.__name__ = method_name
    counted.__doc__ = original.__doc__
    return counted


@contextlib.contextmanager
def _tensor_methods_counted() -> Iterator[None]:
    global _patch_depth
    with _patch_lock:
        if _patch_depth == 0:
            for name in _WRAPPED_METHODS:
                _originals[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, _wrap(name, _originals[name]))
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                for name in _WRAPPED_METHODS:
                    setattr(torch.Tensor, name, _originals.pop(name))


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count the host synchronisations made inside the block (forward, backward and optimizer alike)."""
    record = HostSyncs()
    with _tensor_methods_counted(), _HostSyncMode(record):
        yield record
