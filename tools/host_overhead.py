"""Host (CPU) time of one eager call of each jedi_kernels Triton op, measured on a machine without a GPU.

    python tools/host_overhead.py [--reps 2000] [--json OUT.json] [--unet]

Eager calls of small kernels are bound by the host: on the H100 (2026-11-27) the Triton set-attention forward took
>= 0.054 ms per eager call at every d 160 shape, and the optimized UNet step ran 33 ms eager for 12.8 ms of device
time. This tool measures that host time without a GPU, so the launch path can be worked on here:

- Triton's launcher runs for real up to the driver call: a stand-in driver reports device 0, stream 0 and an sm_90
  target, the kernels really compile for sm_90 (as ``tools/triton_aot_check.py`` does), and only the final C launch
  (``CompiledKernel.run``, a cuLaunchKernel of a few µs) is a no-op. Binding, specialization, the cache lookup, the
  autotuner's lookup and launch metadata are all timed.
- Every row is timed twice, one after the other in the same run: with every launch through Triton's own path
  (``jedi_kernels.ops.fast_launch`` switched off) and through the cached direct launches and launch plans (the
  default; a row's calls after its first replay a plan where the op has one).
- Inputs are CPU tensors of the real dtypes (the kernels never run), small so that allocation costs what the CUDA
  caching allocator costs: almost nothing.

It patches Triton internals (``triton.runtime.driver``, ``CompiledKernel``), so it is a development tool: a Triton
version whose internals moved makes it exit with a message, not a wrong number. Numbers are CPU-relative: compare
rows of one run (this machine is shared; the H200 sweep's eager rows imply a GPU host ≈ 4x slower per call,
benchmarks/README.md, "Launch plans").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _install_stand_in_driver() -> None:
    """Point Triton at a stand-in CUDA driver (sm_90, device 0, stream 0) whose launches do nothing."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler as tc
    from triton.runtime import driver

    class StandInDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

    def init_handles(self):
        if self.module is None:
            self.module, self.function, self.n_regs, self.n_spills, self.n_max_threads = 1, 1, 0, 0, 1024

    driver.set_active(StandInDriver())
    tc.CompiledKernel._init_handles = init_handles
    tc.CompiledKernel.run = property(lambda self: (lambda *args: None))


def _time_us(fn, reps: int) -> float:
    """µs per call of fn: the fastest of 5 blocks of reps/5 calls (the machine is shared: the minimum is the cost)."""
    n = max(1, reps // 5)
    for _ in range(max(10, reps // 20)):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def _time_both(fn, reps: int) -> dict[str, float]:
    """µs per call through Triton's own launch path and through ``fast_launch`` (the default), measured alternately
    in the same run."""
    from jedi_kernels.ops import fast_launch

    out = {}
    for name, on in (("triton_launch", False), ("fast_launch", True)):
        with fast_launch.switched(on):
            out[name] = round(_time_us(fn, reps), 2)
    return out


def measure(reps: int = 2000) -> dict[str, dict[str, float]]:
    """µs of host time per call, per row (see the module docstring): {row: {"triton_launch": µs, "fast_launch": µs}},
    every kernel launched through Triton's own path and through :mod:`jedi_kernels.ops.fast_launch`."""
    os.environ["JEDI_TRITON_AUTOTUNE"] = "0"  # one config per class: the autotuner's lookup runs, no benchmarking
    _install_stand_in_driver()
    import torch

    import jedi_kernels as jk
    from jedi_kernels import functional
    from jedi_kernels.ops import geglu as gg
    from jedi_kernels.ops import layer_norm as ln
    from jedi_kernels.ops import group_norm as gn
    from jedi_kernels.ops import set_attention as sa

    functional.triton_ok = lambda device: True  # CPU tensors stand for CUDA ones (never launched)
    f16 = torch.float16
    x = torch.randn(4, 320, 8, 8, dtype=f16).to(memory_format=torch.channels_last)
    w, b = torch.randn(320, dtype=f16), torch.randn(320, dtype=f16)
    h = torch.randn(4, 64, 2560, dtype=f16)
    xl, xl2 = torch.randn(4, 64, 320, dtype=f16), torch.randn(4, 64, 320, dtype=f16)
    wl, wl2 = torch.randn(320, dtype=f16), torch.randn(320, dtype=f16)
    G, H, D = 2, 8, 160
    q, k, v = (torch.randn(2 * G, 64, H * D, dtype=f16) for _ in range(3))
    mask = torch.tensor([[True, False], [True, True]])
    out, lse = sa.set_attn_fwd(q, k, v, G, H, D**-0.5, None)
    do = torch.randn_like(out)  # (not out itself: a backward whose inputs alias each other is not planned)
    fns = {
        "torch.empty (reference: one allocation)": lambda: torch.empty(16),
        "group_norm launcher (3 Triton launches)": lambda: gn.group_norm_fwd(x, 32, w, b, 1e-5, True),
        "jk.group_norm (checks + launcher)": lambda: jk.group_norm(x, 32, w, b, 1e-5, silu=True, backend="triton"),
        "geglu launcher (1 Triton launch)": lambda: gg.geglu_fwd(h),
        "add + LayerNorm launcher (1 Triton launch)": lambda: ln.add_layer_norm_fwd(xl, xl2, wl, wl2, 1e-5),
        "set-attention mask lists (1 Triton launch)": lambda: sa._mask_lists(mask, G),
        "set_attn_fwd (autotuner lookup + 1 launch)": lambda: sa.set_attn_fwd(q, k, v, G, H, D**-0.5, None),
        "set_attn_fwd with a set_mask (+ mask lists)": lambda: sa.set_attn_fwd(q, k, v, G, H, D**-0.5, mask),
        "jk.set_attention (checks + set_attn_fwd)": lambda: jk.set_attention(q, k, v, G, H, backend="triton"),
        "set_attn_bwd (3 launches: delta, dK/dV, dQ)": lambda: sa.set_attn_bwd(do, q, k, v, out, lse, G, H,
                                                                               D**-0.5, None),
    }
    with torch.no_grad():
        rows = {name: _time_both(fn, reps) for name, fn in fns.items()}
    # a training step's eager call: forward recording autograd, then the backward through the autograd engine
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)

    def fwd_bwd():
        torch.autograd.grad(jk.set_attention(qg, kg, vg, G, H, backend="triton"), (qg, kg, vg), do)

    rows["jk.set_attention forward + backward (autograd)"] = _time_both(fwd_bwd, max(5, reps // 4))
    return rows


def unet_step(reps: int = 90) -> dict:
    """An eager JeDi step on a UNet with SD v1's structure at 1/10 of its width (model_channels 32, 2 heads, context 32;
    batch 4 = set size 2 with CFG, 8x8 latents, fp32, channels-last, every fused op and the attention on Triton):
    the Triton launches it makes, and ms per step both ways. Convolutions and GEMMs really run on the CPU (small), the
    Triton kernels do not; so only the difference between the two columns is launch overhead. Runs after
    :func:`measure`, which installs the stand-in driver."""
    import torch
    from triton.compiler import compiler as tc

    from jedi import JeDiUNet
    from jedi.config import UNetConfig
    from jedi_kernels.ops import fast_launch

    m = JeDiUNet(UNetConfig.sd_v1(model_channels=32, num_heads=2, context_dim=32)).eval()
    m.set_fused_ops(True, backend="triton")
    m.set_attn_backend("triton")
    m.set_fuse_qkv(True)
    m.set_fuse_context_kv(True)
    m = m.to(memory_format=torch.channels_last)
    N = 4
    x = torch.randn(N, 4, 8, 8).to(memory_format=torch.channels_last)
    x0, t, ctx = torch.randn_like(x), torch.randint(0, 1000, (N,)), torch.randn(N, 77, 32)
    ngm = torch.tensor([0.0, 1.0, 0.0, 1.0])

    launches = [0]
    run = tc.CompiledKernel.run
    tc.CompiledKernel.run = property(lambda self: (lambda *a: launches.__setitem__(0, launches[0] + 1)))
    try:
        with torch.no_grad():
            step = lambda: m(x, t, ctx, x0=x0, ng_mask=ngm, set_size=2)  # noqa: E731
            step()
            launches[0] = 0
            step()
            n = launches[0]
            best = {False: float("inf"), True: float("inf")}
            for _ in range(max(1, reps // 6)):  # alternate, 3 steps a block: the minimum of each
                for on in (False, True):
                    with fast_launch.switched(on):
                        t0 = time.perf_counter()
                        for _ in range(3):
                            step()
                        best[on] = min(best[on], (time.perf_counter() - t0) / 3)
    finally:
        tc.CompiledKernel.run = run
    return {"triton_launches": n, "triton_launch": round(best[False] * 1e3, 2), "fast_launch": round(best[True] * 1e3, 2),
            "saved_ms": round((best[False] - best[True]) * 1e3, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2000, help="timed calls per row")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--unet", action="store_true",
                    help="also time an eager step of a narrow SD-v1-structured UNet both ways (compiles ~20 kernels)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("host_overhead: unset TRITON_INTERPRET (the interpreter would run the kernels instead)", file=sys.stderr)
        return 2
    try:
        rows = measure(args.reps)
    except (AttributeError, ImportError, TypeError) as e:
        print(f"host_overhead: this Triton's internals differ from the ones patched here ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 3
    width = max(map(len, rows))
    print(f"{'call':{width}s}  {'Triton launch':>13s}  {'fast_launch':>11s}  (us per call)")
    for name, us in rows.items():
        print(f"{name:{width}s}  {us['triton_launch']:13.2f}  {us['fast_launch']:11.2f}")
    if args.unet:
        rows["unet_step_ms"] = u = unet_step()
        print(f"eager UNet step (SD v1 structure, 1/10 width, CPU): {u['triton_launches']} Triton launches, "
              f"{u['triton_launch']:.2f} ms through Triton's launch path, {u['fast_launch']:.2f} ms with fast_launch "
              f"(saved {u['saved_ms']:.2f} ms a step)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
