"""Relaunch compiled Triton kernels without Triton's per-launch Python work.

``kernel[grid](*args, **meta)`` costs ≈ 13 µs of host time on the CI machine's CPU before the driver is called
(``tools/host_overhead.py``): Triton binds and specializes every argument, builds its cache key, checks the globals
the kernel read, reads two environment knobs, builds launch metadata and, for an autotuned kernel, rebuilds the tuning
key and merges dicts. An eager set-attention forward + backward makes four such launches and the optimized UNet's
eager step ≈ 250, which is why small eager calls are bound by the host (benchmarks/README.md, "Host time").

:func:`launch` is a drop-in for ``kernel[grid](*args, **meta)``. The first call for a given *launch key* goes through
Triton as before (compiling or autotuning as needed) and keeps the compiled kernel it returned; later calls with the
same key call that kernel's launcher directly. The launch key holds everything Triton's choice of compiled kernel
depends on, in a form at least as fine as Triton's own specialization:

- per tensor argument: its dtype and whether its data pointer is 16-byte aligned (Triton's ``*fp16`` / ``D``);
- per int or bool argument: its type and exact value (Triton keys on divisibility by 16, == 1 and the i32/i64 range;
  the exact value also fixes every autotuning key and heuristic computed from it);
- per float argument: its value too (Triton passes floats as fp32 and never specializes them: finer than needed,
  and a layer's scale or eps does not change between calls);
- the constexpr and option keywords (``meta``) and their values, in call order;
- the current device, and the grid (or, for a grid computed from the autotuned config, ``grid_key``: everything
  that grid depends on besides the config).

TMA descriptor arguments (the Gluon kernels') are keyed by their base tensor's dtype and alignment and their exact
shape, strides, box, layout and padding; a cached launch passes the new descriptor objects to the compiled kernel's
launcher, which builds the hardware descriptor from them as it does on Triton's path. Calls it cannot key (an argument
of another type; an unhashable meta value), calls under the interpreter, and calls while a Triton launch hook is
installed (a profiler such as proton reads the launch metadata) take Triton's own path every time.
``JEDI_FAST_LAUNCH=0`` (read at import) turns the direct path off.

Launch plans (:func:`recording`, :func:`make_plan`, :func:`run_plan`): an op whose whole eager call is a fixed
sequence of allocations and launches for given properties of its inputs (the set-attention forward and backward, the
GroupNorm, GEGLU and add + LayerNorm forwards) records the entries its first call used and replays them on later
calls with the same properties, skipping even its own argument checks and this module's launch key. The op builds the plan key: every
property of the call its launches depend on (shapes, strides, dtypes and 16-byte alignments of the inputs, its
scalar arguments, the device, the switches it reads per call, its module constants), besides the tensors' addresses.

Precondition on the kernel (true of every jedi_kernels kernel): heuristics (``triton.heuristics``) compute values
from int/bool/float arguments and constexprs only, not from a tensor's shape or contents. An autotuning config with
a ``pre_hook`` (run before every launch) is never cached. Not seen by a cached launch: a Triton knob
(``TRITON_DEBUG``, instrumentation mode) changed after the first launch of a key, and the global values a kernel reads
changing after it was compiled (Triton raises on that; the Python constants here do not change).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import threading
from typing import Any, Iterator

import torch

from jedi_kernels.backends import env_get

__all__ = ["launch", "enabled", "set_enabled", "switched", "clear_cache", "clear_plans", "cache_size", "recording",
           "plan_device", "plan_cache", "tensor_facts", "make_plan", "run_plan", "store_plan", "replay", "record_plan"]

_ENABLED = os.environ.get("JEDI_FAST_LAUNCH", "1") != "0"
_MAX_ENTRIES = 4096  # per kernel; past it the cache is cleared (distinct shapes, not a steady state)

# kernel object -> (kernel object, {launch key: entry}); the kernel is kept alive so its id stays its own
_CACHES: dict[int, tuple[Any, dict]] = {}

# caches of launch plans built on this module's entries (cleared with it)
_PLAN_CACHES: list[dict] = []
# per thread: the list :func:`recording` collects (entry or None, positional args) into, or None
_REC = threading.local()

_driver = None  # triton.runtime.driver, imported on the first launch
_runtime_knobs = None  # triton.knobs.runtime
_HookChain = None


def enabled() -> bool:
    """Whether :func:`launch` relaunches cached kernels directly (``JEDI_FAST_LAUNCH``, or :func:`set_enabled`)."""
    return _ENABLED


def set_enabled(on: bool) -> bool:
    """Turn the direct path on or off for this process (tests compare both); returns the previous setting. Entries
    cached so far are kept: they are reused once it is on again."""
    global _ENABLED
    prev, _ENABLED = _ENABLED, bool(on)
    return prev


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """The direct path on or off inside the ``with`` block, restored after it (benchmarks time both paths)."""
    prev = set_enabled(on)
    try:
        yield
    finally:
        set_enabled(prev)


def clear_cache() -> None:
    """Forget every cached launch and every launch plan built on them (the compiled kernels stay in Triton's own
    cache)."""
    _CACHES.clear()
    clear_plans()


def clear_plans() -> None:
    """Forget every launch plan of every op (the cached launches stay): the next eager call of each op takes its full
    path (tests that patch something an op reads start from there)."""
    for c in _PLAN_CACHES:
        c.clear()


def plan_cache() -> dict:
    """A new dict for an op's launch plans (plan key -> plan), cleared by :func:`clear_cache` with the entries its
    plans hold."""
    cache: dict = {}
    _PLAN_CACHES.append(cache)
    return cache


_MAX_PLANS = 1024  # per plan cache; past it the cache is cleared (distinct shapes, not a steady state)


def tensor_facts(t: torch.Tensor | None):
    """A tensor's part of a plan key: None for an absent optional input, else its shape, strides, dtype, device and
    16-byte alignment (everything a launch or an allocation can depend on besides its address)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def make_plan(recorded: list, inputs: tuple, allocated: tuple, outputs: tuple):
    """A launch plan from what one call recorded (:func:`recording`), or None when the call cannot be replayed that
    way.

    Args:
        recorded: the call's (entry, args) list.
        inputs: the call's input tensors (None where an optional one was not given), as :func:`run_plan` will get
            them.
        allocated: the buffers the call allocated and passed to its launches, in allocation order.
        outputs: the tensors the call returns (inputs or allocations).

    Every tensor argument of every launch must be one of ``inputs`` or ``allocated`` (by identity: a copy made on the
    way, e.g. of a strided input, is neither), every other argument an int, float, bool or None, every launch must
    have an entry, and no two inputs may be one tensor (the plan could not tell them apart on a later call). The
    allocations must be contiguous (row-major, or channels-last for 4-d) and 16-byte aligned: :func:`run_plan` makes
    them again with ``torch.empty_strided`` on the same devices (so the plan key must hold every input device an
    allocation follows). Scalars are replayed as recorded: the plan key must tell apart values that compare equal but
    differ (0.0 and -0.0; 1, True and numpy ints), e.g. by admitting only plain ints and nonzero floats.
    The plan: (allocations as (shape, stride, dtype, device), steps as (entry, argument template, (position, tensor
    index) slots), indices of the outputs), tensors indexed inputs first, then allocations."""
    tensors = inputs + allocated
    index = {id(t): i for i, t in enumerate(tensors) if t is not None}
    if not recorded or len(index) != sum(t is not None for t in tensors):
        return None
    for t in allocated:
        if t is None or t.data_ptr() & 15 or not _dense(t):
            return None
    steps = []
    for entry, args in recorded:
        if entry is None:
            return None
        template, slots = [], []
        for pos, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                i = index.get(id(a))
                if i is None:
                    return None
                slots.append((pos, i))
                template.append(None)
            elif a is None or type(a) in (int, float, bool):
                template.append(a)
            else:
                return None
        steps.append((entry, tuple(template), tuple(slots)))
    return (tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in allocated), tuple(steps),
            tuple(index[id(t)] for t in outputs))


def run_plan(plan, inputs: tuple, device: int):
    """Allocate a plan's buffers and replay its launches on ``device`` (Triton's current device,
    :func:`plan_device`) with ``inputs`` in the recorded call's places; returns the plan's outputs, or None when an
    allocation is not 16-byte aligned (the caller then takes its full path). The caller checks that the call's plan
    key equals the recorded call's."""
    allocs, steps, outputs = plan
    tensors = list(inputs)
    empty = torch.empty_strided
    for shape, stride, dtype, dev in allocs:
        t = empty(shape, stride, device=dev, dtype=dtype)
        if t.data_ptr() & 15:
            return None
        tensors.append(t)
    rec = getattr(_REC, "launches", None)
    if rec is not None:  # replayed inside another op's recording: that op cannot be replayed from what it saw
        rec.append((None, ()))
    stream = _driver.active.get_current_stream(device)
    for (run, compiled, g, tail), template, slots in steps:
        args = list(template)
        for pos, i in slots:
            args[pos] = tensors[i]
        run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
    return tuple(tensors[i] for i in outputs)


def store_plan(cache: dict, key: tuple, plan) -> None:
    """Keep ``plan`` (from :func:`make_plan`; None is not kept) under ``key``."""
    if plan is not None:
        if len(cache) >= _MAX_PLANS:
            cache.clear()
        cache[key] = plan


def replay(cache: dict, key: tuple, inputs: tuple, device: int):
    """The outputs of the plan ``cache`` holds under ``key``, replayed on ``inputs`` (:func:`run_plan`), or None when
    there is none (or its allocation was misaligned): the caller then runs its full path, e.g. through
    :func:`record_plan`."""
    plan = cache.get(key)
    return None if plan is None else run_plan(plan, inputs, device)


def record_plan(cache: dict, key: tuple, inputs: tuple, call):
    """Run ``call()`` (the op's full path on ``inputs``, returning (outputs, the buffers it allocated for its
    launches)) while recording its launches, keep the plan :func:`make_plan` makes of them under ``key``, and return
    the outputs."""
    with recording() as rec:
        outputs, allocated = call()
    store_plan(cache, key, make_plan(rec, inputs, allocated, outputs))
    return outputs


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect, for every :func:`launch` this thread makes inside the block, ``(entry, args)``: the cache entry the
    launch used or made (None when it took Triton's path without one: direct path off, interpreter, a launch hook, an
    argument it cannot key) and its positional arguments, for :func:`make_plan`. Blocks nest: the inner one collects
    the launches inside it, and the outer one gets a ``(None, ())`` in their place, so no plan is made of it (as
    when a plan is replayed inside the block: :func:`run_plan`)."""
    prev = getattr(_REC, "launches", None)
    _REC.launches = rec = []
    try:
        yield rec
    finally:
        _REC.launches = prev
        if prev is not None:
            prev.append((None, ()))


def _note(entry, args) -> None:
    rec = getattr(_REC, "launches", None)
    if rec is not None:
        rec.append((entry, args))


def plan_device() -> int | None:
    """The device Triton launches on now (its driver's current device) when launch plans may be made and replayed,
    else None: the direct path off, Triton's interpreter (no compiled kernels), a launch hook installed, or no driver
    that can name a device (a machine without a GPU). Imports Triton's driver on the first call."""
    if not _ENABLED or env_get("TRITON_INTERPRET") == "1":
        return None
    if _driver is None:
        _import_triton()
    if _hooks_installed():
        return None
    try:
        return _driver.active.get_current_device()
    except Exception:  # no active driver here: the ops' full paths raise what they raise without one
        return None


def cache_size(kernel=None) -> int:
    """Number of cached launch keys, for one kernel object or all of them."""
    if kernel is not None:
        return len(_CACHES.get(id(kernel), (None, None))[1] or ())
    return sum(len(c) for _, c in _CACHES.values() if c)


def _is_desc(a) -> bool:
    """A host-side TMA descriptor (Triton's ``TensorDescriptor`` or Gluon's): a base tensor and a box shape."""
    return hasattr(a, "block_shape") and isinstance(getattr(a, "base", None), torch.Tensor)


def _desc_key(a) -> tuple:
    """A TMA descriptor's part of the key: its class, its base's dtype and 16-byte alignment, and its exact shape,
    strides, box, shared layout and padding (finer than anything Triton specializes a descriptor on; the launcher
    builds the hardware descriptor from the object on every launch, cached or not)."""
    b = a.base
    return (a.__class__, b.dtype, b.data_ptr() & 15, tuple(a.shape), tuple(a.strides), tuple(a.block_shape),
            getattr(a, "layout", None), getattr(a, "padding", None))


def _arg_key(args: tuple) -> tuple:
    """The part of the launch key that comes from the positional arguments: (dtype, data pointer mod 16) per tensor,
    :func:`_desc_key` per TMA descriptor, (class, value) for anything else (a float's value too: finer than Triton,
    never wrong). Whether every class is one Triton takes as a scalar is checked once, when an entry is made
    (:func:`_keyable`): a later call can only hit that entry with the same classes."""
    T = torch.Tensor
    return tuple([(a.dtype, a.data_ptr() & 15) if isinstance(a, T) else _desc_key(a) if _is_desc(a) else
                  (a.__class__, a) for a in args])


def _keyable(args: tuple) -> bool:
    """Every positional argument is a tensor, a TMA descriptor, an int, a float, a bool or None."""
    return all(isinstance(a, torch.Tensor) or a is None or type(a) in (int, float, bool) or _is_desc(a) for a in args)


def _jit_of(kernel):
    """The JITFunction under autotuner / heuristics wrappers, and the wrappers on the way down (outermost first). Under
    the interpreter the innermost object is an InterpretedFunction (no ``device_caches``: nothing to cache)."""
    wrappers = []
    k = kernel
    while not hasattr(k, "device_caches") and hasattr(getattr(k, "fn", None), "arg_names"):
        wrappers.append(k)
        k = k.fn
    return k, wrappers


def _hooks_installed() -> bool:
    """A launch hook is installed (a profiler wants launch metadata): such launches take Triton's own path."""
    rt = _runtime_knobs
    for h in (rt.launch_enter_hook, rt.launch_exit_hook):
        if h is not None and (type(h) is not _HookChain or h.calls):
            return True
    return False


def _import_triton() -> None:
    global _driver, _runtime_knobs, _HookChain
    from triton import knobs
    from triton.knobs import HookChain
    from triton.runtime import driver

    _driver, _runtime_knobs, _HookChain = driver, knobs.runtime, HookChain


def _entry(kernel, compiled, grid, args: tuple, meta: dict):
    """The cache entry of a launch Triton just made: (launcher, compiled kernel, grid as 3 ints, the values of the
    parameters after the positional ones, in signature order), or None when it cannot be reproduced."""
    if hasattr(compiled, "result"):  # an asynchronous compile's future
        compiled = compiled.result()
    jit, wrappers = _jit_of(kernel)
    kw = dict(meta)
    for w in wrappers:  # outermost first: the autotuner adds its config, then heuristics compute from everything
        best = getattr(w, "best_config", None)
        if best is not None and hasattr(w, "configs"):
            if best.pre_hook is not None:
                return None
            kw.update(best.all_kwargs())
        values = getattr(w, "values", None)
        if isinstance(values, dict):
            named = dict(zip(jit.arg_names, args))
            for name, heur in values.items():
                kw[name] = heur({**named, **kw})
    tail = []
    for p in jit.params[len(args):]:
        name = p.name
        if name in kw:
            tail.append(kw[name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            return None
    if callable(grid):
        grid = grid({**dict(zip(jit.arg_names, args)), **kw})
    g = tuple(int(x) for x in grid) + (1, 1)
    return compiled.run, compiled, (g[0], g[1], g[2]), tuple(tail)


def launch(kernel, grid, *args, grid_key: tuple = (), **meta):
    """``kernel[grid](*args, **meta)``, relaunching the compiled kernel directly when this launch key was seen before
    (module docstring).

    Args:
        kernel: a ``triton.jit`` function, or an autotuner / heuristics wrapper of one.
        grid: a tuple of ints, or a callable of the launch's named arguments (config included) returning one.
        *args: the kernel's leading positional arguments (tensors, TMA descriptors, ints, floats, bools, None;
            anything else makes this call take Triton's path).
        grid_key: with a callable grid, everything the grid depends on besides the config and the arguments (e.g. the
            batch size a grid multiplies in). Ignored for a tuple grid, which is part of the key itself.
        **meta: constexpr and option keywords (num_warps, ...), as for ``kernel[grid]``.

    Returns:
        Whatever Triton's launch returned on the first call of a key (the compiled kernel); None on cached calls.
    """
    if not _ENABLED:
        _note(None, args)
        return kernel[grid](*args, **meta)
    entry_cache = _CACHES.get(id(kernel))
    if entry_cache is None:
        if _driver is None:
            _import_triton()
        # the interpreter's function has nothing compiled to keep: remembered as None, every call takes Triton's path
        cacheable = hasattr(_jit_of(kernel)[0], "device_caches")
        entry_cache = _CACHES.setdefault(id(kernel), (kernel, {} if cacheable else None))
    cache = entry_cache[1]
    if cache is None or _hooks_installed():
        _note(None, args)
        return kernel[grid](*args, **meta)
    dev = _driver.active.get_current_device()
    try:
        key = (grid_key if callable(grid) else tuple(grid), dev, _arg_key(args), tuple(meta.items()))
        ent = cache.get(key)
    except TypeError:  # an unhashable argument or meta value
        _note(None, args)
        return kernel[grid](*args, **meta)
    if ent is not None:
        run, compiled, g, tail = ent
        stream = _driver.active.get_current_stream(dev)
        run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
        _note(ent, args)
        return None
    compiled = kernel[grid](*args, **meta)
    ent = None
    if compiled is not None and _keyable(args):
        ent = _entry(kernel, compiled, grid, args, meta)
        if ent is not None:
            if len(cache) >= _MAX_ENTRIES:
                cache.clear()
            cache[key] = ent
    _note(ent, args)
    return compiled
