"""A CPU emulator for this project's Gluon kernels: runs a kernel's own Python source, one program at a time, with
every Gluon builtin it uses replaced by a torch implementation. Gluon has no interpreter mode; this stands in for one
in the tests, for what it can see:

- the math and indexing: tiles are torch tensors (float32 accumulators, the kernel's own rounding to fp16/bf16 where
  it converts), pointers are (tensor, offsets) pairs, TMA boxes are read with the hardware's zero fill past the
  tensor's bounds, and every load, store and atomic is bounds-checked;
- the asynchrony, at its worst case: a ``warpgroup_mma(..., is_async=True)`` records its operands (shared-memory
  views by reference) and runs only when a ``warpgroup_mma_wait`` retires it, so a shared tile overwritten while a
  product that reads it is still in flight gives a wrong result; an in-flight accumulator used as a value raises;
  TMA copies land either when issued or only at the wait on their barrier (``tma_lands``: "issue" / "wait"), so a
  tile read before its barrier was waited for, or a buffer refilled too early, gives a wrong result in one mode;
- the mbarrier protocol: ``expect`` byte counts against the boxes copied, and each ``wait`` must find exactly one
  newly completed phase of the parity it names (no completed phase: the kernel would hang; raised);
- the CTA-wide protocol between warps (:class:`Protocol`): a program's warps run as one here, so the rules a real
  CTA needs are checked instead: an MMA reads shared stores only after a fence and a CTA barrier, and a shared region
  MMAs read is overwritten (by TMA or stores) only after they retired and a CTA barrier followed.

A warp-specialized kernel's partitions (``gl.warp_specialize``) run as threads, each with its own MMA queue,
synchronized only by the mbarriers (a wait blocks until its phase completes; one that waits past ``HANG_S`` is
reported as a hang). What it cannot see: anything of the compiler (layouts, register allocation, the wgmma lowering),
and within a partition, hazards that need finer timing than the rules above.

Use: ``with emulated(module, "kernel_name", tma_lands) as runs: <call the host code>``; inside, launches of that
kernel (through ``kernel[grid](...)`` or ``fast_launch.launch``) run here on CPU tensors and its ``warmup`` does
nothing; ``runs`` lists each launch's (grid, meta).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import types

import torch

# ----------------------------------------------------------------------------------------------------------------------
# tensors, scalars, pointers
# ----------------------------------------------------------------------------------------------------------------------


class Ptr:
    """A pointer (or tensor of pointers): a flat tensor and element offsets into it."""

    def __init__(self, flat: torch.Tensor, offs, dtype):
        self.flat, self.offs, self.dtype = flat, offs, dtype

    def __add__(self, o):
        return Ptr(self.flat, self.offs + _t(o).long() if isinstance(o, torch.Tensor) else self.offs + o,
                   self.dtype)

    __radd__ = __add__


class _PtrType:
    def __init__(self, dtype):
        self.element_ty = dtype


def _t(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x)


def _index(ptr: Ptr, mask):
    offs = _t(ptr.offs).long()
    if mask is None:
        mask = torch.ones_like(offs, dtype=torch.bool)
    mask = torch.broadcast_to(_t(mask).bool(), offs.shape) if offs.dim() else _t(mask).bool()
    offs_b = torch.broadcast_to(offs, mask.shape)
    live = offs_b[mask]
    if live.numel() and (int(live.min()) < 0 or int(live.max()) >= ptr.flat.numel()):
        raise IndexError(f"access out of bounds: offsets [{int(live.min())}, {int(live.max())}] of "
                         f"{ptr.flat.numel()} elements")
    return offs_b, mask


def load(ptr: Ptr, mask=None, other=None, **kw):
    offs, mask = _index(ptr, mask)
    out = torch.zeros(offs.shape, dtype=ptr.flat.dtype)
    if other is not None:
        out = torch.full(offs.shape, float(other), dtype=ptr.flat.dtype) if ptr.flat.is_floating_point() else \
            torch.full(offs.shape, int(other), dtype=ptr.flat.dtype)
    out[mask] = ptr.flat[offs[mask]]
    return out


def store(ptr: Ptr, value, mask=None, **kw):
    offs, mask = _index(ptr, mask)
    value = torch.broadcast_to(_t(value), offs.shape).to(ptr.flat.dtype)
    ptr.flat[offs[mask]] = value[mask]


def atomic_add(ptr: Ptr, value, mask=None, sem=None, **kw):
    offs, mask = _index(ptr, mask)
    value = torch.broadcast_to(_t(value), offs.shape).to(ptr.flat.dtype)
    ptr.flat.index_put_((offs[mask],), value[mask], accumulate=True)


# ----------------------------------------------------------------------------------------------------------------------
# shared memory, barriers, TMA, warpgroup MMAs
# ----------------------------------------------------------------------------------------------------------------------

HANG_S = 20.0  # a partition's mbarrier wait longer than this is reported as a hang


class SMem:
    """A shared-memory view: a tensor view of its allocation (``permute`` gives a transposed view, as the MMA
    operand descriptors do)."""

    def __init__(self, data: torch.Tensor, em: "Emulator" = None, sliced: bool = False):
        self.data, self.em, self.sliced = data, em, sliced
        self.dtype = data.dtype
        self.shape = list(data.shape)

    def index(self, i):
        return SMem(self.data[int(i)], self.em, self.sliced)

    def slice(self, start, length, dim=0):
        return SMem(self.data.narrow(dim, int(start), int(length)), self.em, True)

    def permute(self, order):
        return SMem(self.data.permute(*order), self.em, self.sliced)

    def reshape(self, shape):
        # Triton 3.6 reshapes whole or indexed allocations, not slices ("NYI: memdesc_reshape of memdesc_subslice"):
        # a kernel that compiles never does, and one run here must not either
        if self.sliced:
            raise NotImplementedError("reshape of a sliced shared-memory view: Triton 3.6 does not implement it")
        return SMem(self.data.view([int(x) for x in shape]), self.em)

    def load(self, layout=None):
        return self.data.clone()

    def store(self, value):
        if self.em is not None:
            self.em.protocol.write(self, "a shared store")
        self.data.copy_(_t(value).to(self.data.dtype))

    def span(self) -> tuple[int, int]:
        """The bytes of shared memory this view touches, as [start, end)."""
        d = self.data
        last = sum((n - 1) * st for n, st in zip(d.shape, d.stride())) if d.numel() else -1
        return d.data_ptr(), d.data_ptr() + (last + 1) * d.element_size()


class Protocol:
    """The CTA-wide kernels' shared-memory protocol between warps, which the emulator's single-threaded run cannot
    violate by itself: it runs a program's warps as one, but each warpgroup of a real CTA retires its own MMAs and
    sees other warps' shared stores only after a barrier. So, per region of shared memory:

    - an MMA may read a region written by shared stores only after a ``fence_async_shared`` that follows the last
      store and a ``thread_barrier`` that follows that fence (every warp's stores visible to the async proxy);
    - a TMA copy or a shared store may overwrite a region that MMAs read only once every such MMA has retired and a
      ``thread_barrier`` followed the last retirement (every warpgroup done with it).

    Off for warp-specialized kernels, whose partitions synchronize through mbarriers (run as threads instead)."""

    def __init__(self):
        self.seq = 0
        self.last_barrier = self.last_fence = -1
        self.regions = []  # [start, end, last store seq, MMA reads in flight, last retirement seq]
        self.enabled = True

    def _tick(self) -> int:
        self.seq += 1
        return self.seq

    def _overlapping(self, view: SMem):
        a, b = view.span()
        return [r for r in self.regions if r[0] < b and a < r[1]]

    def _region(self, view: SMem):
        a, b = view.span()
        for r in self.regions:
            if r[0] == a and r[1] == b:
                return r
        r = [a, b, None, 0, None]
        self.regions.append(r)
        return r

    def barrier(self):
        self.last_barrier = self._tick()

    def fence(self):
        self.last_fence = self._tick()

    def write(self, view: SMem, what: str):
        if not self.enabled:
            return
        for r in self._overlapping(view):
            if r[3]:
                raise RuntimeError(f"{what} overwrites shared memory an MMA still in flight reads")
            if r[4] is not None and self.last_barrier < r[4]:
                raise RuntimeError(f"{what} overwrites shared memory an MMA read, with no CTA barrier after that MMA "
                                   f"retired (another warpgroup's MMA may still read it)")
        self._region(view)[2] = self._tick()

    def tma_write(self, view: SMem):
        if not self.enabled:
            return
        self.write(view, "a TMA copy")
        self._region(view)[2] = None  # the async proxy's own write: no fence needed before MMAs read it

    def mma_issue(self, views):
        if not self.enabled:
            return
        for v in views:
            for r in self._overlapping(v):
                if r[2] is not None and not (r[2] < self.last_fence < self.last_barrier):
                    raise RuntimeError("an MMA reads shared stores without a fence_async_shared and a CTA barrier "
                                       "after them")
            self._region(v)[3] += 1

    def mma_retire(self, views):
        if not self.enabled:
            return
        seq = self._tick()
        for v in views:
            r = self._region(v)
            r[3] -= 1
            r[4] = seq


class Barrier:
    def __init__(self, owner: "Emulator"):
        self.em, self.count, self.inited = owner, None, False
        self.arrivals = self.pending = 0
        self.completed = 0
        self.waited = {}  # phases each waiting thread (partition) has consumed
        self.in_flight = []  # copies that land at the wait ("wait" mode)

    def _maybe_complete(self):
        if self.arrivals >= self.count and self.pending == 0:
            self.completed += 1
            self.arrivals = 0
            self.em.cond.notify_all()


class BarrierArray:
    def __init__(self, owner, n):
        self.bars = [Barrier(owner) for _ in range(n)]

    def index(self, i):
        return self.bars[int(i)]


def _bar(b) -> Barrier:
    return b.bars[0] if isinstance(b, BarrierArray) else b


class Desc:
    """A host TMA descriptor: an N-D view of its tensor (shape and strides as given), a box of ``block_shape``."""

    def __init__(self, base: torch.Tensor, shape, strides, block_shape, gl_dtype):
        self.view = torch.as_strided(base, tuple(shape), tuple(strides))
        self.block_shape = list(block_shape)
        self.dtype = gl_dtype
        self.layout = None
        nbytes = base.element_size()
        for s in block_shape:
            nbytes *= s
        self.block_type = types.SimpleNamespace(nbytes=nbytes)

    def box(self, coords):
        """The box at ``coords`` with zeros past the tensor's bounds in every dimension (TMA's OOB fill)."""
        coords = [int(x) for x in coords]
        assert len(coords) == len(self.block_shape) == self.view.dim(), (coords, self.block_shape)
        out = torch.zeros(self.block_shape, dtype=self.view.dtype)
        src, dst = [], []
        for c, n, size in zip(coords, self.block_shape, self.view.shape):
            lo, hi = max(c, 0), min(c + n, size)
            if hi <= lo:
                return out
            src.append(slice(lo, hi))
            dst.append(slice(lo - c, hi - c))
        out[tuple(dst)] = self.view[tuple(src)]
        return out


class Token:
    """An in-flight warpgroup MMA's accumulator: only ``warpgroup_mma_wait`` turns it into a value."""

    def __init__(self):
        self.value = None

    def __getattr__(self, name):
        raise RuntimeError(f"an in-flight MMA accumulator used ({name}) before warpgroup_mma_wait retired it")


class Emulator:
    def __init__(self, tma_lands: str = "issue", nan_ok: bool = False):
        assert tma_lands in ("issue", "wait")
        self.tma_lands, self.nan_ok = tma_lands, nan_ok
        self.queues = threading.local()  # per partition: the MMA groups in flight, (token, a, b, acc, use_acc)
        self.cond = threading.Condition(threading.RLock())  # barrier state; waits block on it
        self.pid = (0, 0, 0)
        self.protocol = Protocol()

    def _me(self) -> object:
        """This thread's (partition's) identity: a thread-local object (thread idents are reused once a thread
        ends, and a partition may end before the next one starts)."""
        me = getattr(self.queues, "me", None)
        if me is None:
            me = self.queues.me = object()
        return me

    @property
    def pending(self) -> list:
        q = getattr(self.queues, "q", None)
        if q is None:
            q = self.queues.q = []
        return q

    # -- shared memory and barriers
    def allocate_shared_memory(self, dtype, shape, layout=None, value=None):
        if isinstance(layout, _MBarrierLayout):
            return BarrierArray(self, shape[0])
        return SMem(torch.full(list(shape), float("nan"), dtype=dtype) if dtype.is_floating_point
                    else torch.zeros(list(shape), dtype=dtype), self)

    def mb_init(self, bar, count):
        b = _bar(bar)
        b.count, b.inited = count, True

    def mb_expect(self, bar, nbytes, pred=True):
        if not _truthy(pred):
            return
        with self.cond:
            b = _bar(bar)
            assert b.inited, "expect on an uninitialized mbarrier"
            b.arrivals += 1
            b.pending += int(nbytes)
            b._maybe_complete()

    def mb_arrive(self, bar, count=1, pred=True):
        if _truthy(pred):
            with self.cond:
                b = _bar(bar)
                b.arrivals += count
                b._maybe_complete()

    def mb_wait(self, bar, phase, pred=True, deps=None):
        """Block until the barrier has completed a phase this partition has not waited for yet: exactly one, of the
        parity given (a skipped phase or the wrong parity raises; no completion within HANG_S is a hang)."""
        if not _truthy(pred):
            return
        me = self._me()
        with self.cond:
            b = _bar(bar)
            waited = b.waited.get(me, 0)

            def done():  # copies issued to this barrier land now that someone waits for them
                while b.in_flight:
                    b.in_flight.pop(0)()
                return b.completed > waited

            if not self.cond.wait_for(done, timeout=HANG_S):
                raise RuntimeError(f"mbarrier wait (parity {int(phase)}) with no completed phase: the kernel would "
                                   f"hang ({b.pending} bytes still expected, {b.arrivals} of {b.count} arrivals)")
            if b.completed > waited + 1:
                raise RuntimeError(f"mbarrier wait skipped a completed phase ({b.completed} completed, {waited} "
                                   f"waited by this partition)")
            if (b.completed - 1) % 2 != int(phase) % 2:
                raise RuntimeError(f"mbarrier wait for parity {int(phase)}, but phase {b.completed - 1} completed")
            b.waited[me] = waited + 1

    def mb_invalidate(self, bar):
        b = _bar(bar)
        if b.in_flight or b.pending:
            raise RuntimeError("mbarrier invalidated with copies still in flight")

    def warp_specialize(self, partitions, worker_num_warps=None, worker_num_regs=None, memo=None):
        """Run the partitions ((fn, args), the default first) as threads; re-raise the first error."""
        self.protocol.enabled = False  # the partitions synchronize through mbarriers: checked by running as threads
        errors = []

        def run(fn, args):
            try:
                with torch.no_grad():  # (grad mode is per thread; a kernel records nothing)
                    _plain(fn, self, memo if memo is not None else {})(*args)
                if self.pending:
                    raise RuntimeError(f"a partition ended with {len(self.pending)} MMA groups in flight")
            except BaseException as e:  # noqa: BLE001  (reported by the caller)
                errors.append(e)
                with self.cond:
                    self.cond.notify_all()

        threads = [threading.Thread(target=run, args=(fn, args), daemon=True) for fn, args in partitions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_S * 3)
        if errors:
            raise errors[0]
        if any(t.is_alive() for t in threads):
            raise RuntimeError("a partition did not finish: the kernel would hang")

    def tma_load(self, desc: Desc, coords, bar, dest: SMem, pred=True):
        if not pred:
            return
        b = _bar(bar)
        assert list(dest.shape) == desc.block_shape, (dest.shape, desc.block_shape)
        box = desc.box(coords)
        nbytes = desc.block_type.nbytes

        def land():
            dest.data.copy_(box)
            b.pending -= nbytes
            if b.pending < 0:
                raise RuntimeError("more bytes landed than the mbarrier expected")
            b._maybe_complete()

        with self.cond:
            self.protocol.tma_write(dest)
            if self.tma_lands == "issue":
                land()
            else:
                b.in_flight.append(land)
                self.cond.notify_all()  # a partition already waiting on the barrier takes it

    # -- warpgroup MMAs
    def mma(self, a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
        tok = Token()
        self.protocol.mma_issue([x for x in (a, b) if isinstance(x, SMem)])
        self.pending.append((tok, a, b, acc, use_acc))
        if not is_async:
            self._retire(0)
            return tok.value
        return tok

    def _retire(self, keep: int):
        while len(self.pending) > keep:
            tok, a, b, acc, use_acc = self.pending.pop(0)
            av = a.data if isinstance(a, SMem) else a
            bv = b.data if isinstance(b, SMem) else b
            if isinstance(acc, Token):
                acc = object.__getattribute__(acc, "value")
                assert acc is not None, "an MMA chained onto one that has not run"
            if not self.nan_ok and (torch.isnan(av.float()).any() or torch.isnan(bv.float()).any()):
                raise RuntimeError("an MMA read shared memory never written (NaN-initialized)")
            prod = av.float() @ bv.float()
            object.__setattr__(tok, "value", prod + acc if _truthy(use_acc) else prod)
            self.protocol.mma_retire([x for x in (a, b) if isinstance(x, SMem)])

    def mma_wait(self, num_outstanding=0, deps=None):
        self._retire(int(num_outstanding))
        out = []
        for d in deps:
            if isinstance(d, Token):
                v = object.__getattribute__(d, "value")
                if v is None:
                    raise RuntimeError("warpgroup_mma_wait released a dependency whose MMA is still in flight")
                out.append(v)
            else:
                out.append(d)
        return out[0] if len(out) == 1 else tuple(out)


def _truthy(x):
    return bool(x) if not isinstance(x, torch.Tensor) else bool(x.item())


# ----------------------------------------------------------------------------------------------------------------------
# the gl namespace and friends
# ----------------------------------------------------------------------------------------------------------------------


class _Layout:
    def __init__(self, *a, **kw):
        pass


class _MBarrierLayout(_Layout):
    pass


class _NVMMASharedLayout(_Layout):
    @staticmethod
    def get_default_for(*a, **kw):
        return _NVMMASharedLayout()


def _gl_namespace(em: Emulator):
    def arange(start, end, layout=None):
        return torch.arange(int(start), int(end))

    def zeros(shape, dtype, layout=None):
        return torch.zeros(list(shape), dtype=dtype)

    def full(shape, value, dtype, layout=None):
        return torch.full(list(shape), value, dtype=dtype)

    def where(c, a, b):
        return torch.where(_t(c).bool(), _t(a), _t(b))

    def maximum(a, b):
        return torch.maximum(_t(a), _t(b))

    def minimum(a, b):
        return torch.minimum(_t(a), _t(b))

    def static_assert(cond, msg=""):
        assert cond, msg

    def program_id(axis):
        return torch.tensor(em.pid[axis], dtype=torch.int32)

    def cdiv(a, b):
        return (a + b - 1) // b

    def red(fn):
        return lambda x, axis=None, **kw: fn(x, dim=axis) if axis is not None else fn(x)

    return types.SimpleNamespace(
        constexpr=object, static_range=range, static_assert=static_assert, program_id=program_id, cdiv=cdiv,
        arange=arange, zeros=zeros, full=full, zeros_like=torch.zeros_like, where=where, maximum=maximum,
        minimum=minimum, exp2=torch.exp2, log2=torch.log2, expand_dims=torch.unsqueeze,
        max=red(lambda x, **k: torch.amax(x, **k)), sum=red(torch.sum),
        convert_layout=lambda x, layout, **kw: x, load=load, store=store, atomic_add=atomic_add,
        thread_barrier=em.protocol.barrier, allocate_shared_memory=em.allocate_shared_memory,
        float16=torch.float16, bfloat16=torch.bfloat16, float32=torch.float32, int32=torch.int32,
        int64=torch.int64,
        NVMMADistributedLayout=_Layout, DotOperandLayout=_Layout, SliceLayout=_Layout, BlockedLayout=_Layout,
        NVMMASharedLayout=_NVMMASharedLayout, warp_specialize=em.warp_specialize,
    )


def _replacements(em: Emulator) -> dict:
    return {
        "gl": _gl_namespace(em),
        "mbarrier": types.SimpleNamespace(init=em.mb_init, expect=em.mb_expect, wait=em.mb_wait,
                                          arrive=em.mb_arrive, invalidate=em.mb_invalidate,
                                          MBarrierLayout=_MBarrierLayout),
        "tma": types.SimpleNamespace(async_copy_global_to_shared=em.tma_load),
        "warpgroup_mma": em.mma,
        "warpgroup_mma_wait": em.mma_wait,
        "fence_async_shared": lambda *a, **kw: em.protocol.fence(),
    }


def _plain(fn, em: Emulator, memo: dict):
    """The Python function of a Gluon JIT function, with Gluon's builtins and every other JIT function it calls
    replaced (recursively) by their emulated forms."""
    raw = getattr(fn, "fn", fn)
    if raw in memo:
        return memo[raw]
    g = dict(raw.__globals__)
    new = types.FunctionType(raw.__code__, g, raw.__name__, raw.__defaults__, raw.__closure__)
    memo[raw] = new
    g.update(_replacements(em))
    for name, val in list(raw.__globals__.items()):
        if hasattr(val, "fn") and hasattr(val, "arg_names") and callable(getattr(val, "fn", None)):
            g[name] = _plain(val, em, memo)
    return new


# ----------------------------------------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------------------------------------


def _emu_arg(a):
    """A launch argument as the emulated kernel sees it: a contiguous tensor as a pointer, a TMA descriptor as a
    :class:`Desc` (its dtype is the torch dtype, as the emulated ``gl`` dtypes are), anything else unchanged."""
    if isinstance(a, torch.Tensor):
        if not a.is_contiguous():
            raise ValueError("the emulator passes contiguous tensors as pointers only (got a strided one)")
        return Ptr(a.view(-1), 0, _PtrType(a.dtype))
    if hasattr(a, "block_shape") and hasattr(a, "base"):
        return Desc(a.base, a.shape, a.strides, a.block_shape, a.base.dtype)
    return a


def run_kernel(kernel, grid, args: tuple, meta: dict, tma_lands: str = "issue", nan_ok: bool = False) -> None:
    """Run ``kernel[grid](*args, **meta)`` on the CPU, program by program (``nan_ok``: see :func:`emulated`)."""
    meta = {k: v for k, v in meta.items() if k not in ("num_stages", "num_ctas", "maxnreg")}
    g = tuple(int(x) for x in grid) + (1, 1)
    eargs = [_emu_arg(a) for a in args]
    for z in range(g[2]):
        for y in range(g[1]):
            for x in range(g[0]):
                em = Emulator(tma_lands, nan_ok)
                em.pid = (x, y, z)
                fn = _plain(kernel, em, {})
                fn(*eargs, **meta)
                if em.pending:
                    raise RuntimeError(f"program {em.pid} ended with {len(em.pending)} MMA groups in flight")


class _Launcher:
    def __init__(self, kernel, runs: list, tma_lands: str, nan_ok: bool = False):
        self.kernel, self.runs, self.tma_lands, self.nan_ok = kernel, runs, tma_lands, nan_ok
        self.fn = kernel.fn
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **meta):
        self.runs.append((tuple(grid), meta))
        run_kernel(self.kernel, grid, args, meta, self.tma_lands, self.nan_ok)

    def warmup(self, *args, grid=None, **meta):
        return None


@contextlib.contextmanager
def emulated(module, name: str, tma_lands: str = "issue", nan_ok: bool = False):
    """Inside the block, ``module.<name>`` (a Gluon kernel) launches run on this emulator; yields the list of
    (grid, meta) of each launch. Shared memory starts as NaN, and an MMA reading a NaN raises (a read of memory never
    written); ``nan_ok`` turns that check off for inputs that carry NaN or Inf on purpose."""
    kernel = getattr(module, name)
    runs: list = []
    setattr(module, name, _Launcher(kernel, runs, tma_lands, nan_ok))
    try:
        yield runs
    finally:
        setattr(module, name, kernel)
