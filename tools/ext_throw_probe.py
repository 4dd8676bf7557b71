"""Does an error raised inside the compiled extension (``TORCH_CHECK`` in its C++ glue) reach Python as a
RuntimeError, or crash the process? No GPU needed: the CUDA glue is called through the dispatcher with CPU tensors
(``redispatch`` to the CUDA key), which its first check rejects.

    python tools/ext_throw_probe.py            # each probe in its own process; exit 1 if any crashed

On the H100 of 2026-11-27 ``tests/kernels/test_set_attention_cuda.py::test_bad_inputs_name_the_argument`` segfaulted
at the first rejected call, while the same build raised cleanly on the CPU machine. Each probe below runs in a fresh
interpreter (faulthandler on), so the output says which kinds of throw survive on the machine at hand, with the
compilers and torch's build settings printed for comparison.
"""
from __future__ import annotations

import subprocess
import sys

PROBES = {
    # a CPU kernel of the extension rejecting its input
    "cpu_op": "torch.ops.jedi.prepare_inputs_ext(torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8, 8), torch.ones(2))",
    # the CUDA glue's first check (q must be a CUDA tensor), reached without a GPU
    "cuda_glue_cpu_tensor": "torch.ops.jedi.set_attention_fwd_ext.default.redispatch("
                            "torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), q, q, q, 2, 2, 0.1, None)",
    # the test's call: a float32 CUDA tensor, rejected by the dtype check (needs a GPU)
    "cuda_glue_float32": "torch.ops.jedi.set_attention_fwd_ext(q.cuda(), q.cuda(), q.cuda(), 2, 2, 0.1, None)",
}
PRELUDE = ("import faulthandler; faulthandler.enable()\nimport torch\nimport jedi_kernels\n"
           "q = torch.randn(4, 16, 80)\n")


def run_probe(name: str, stmt: str) -> str:
    code = PRELUDE + (f"if '{name}'.startswith('cuda_glue_float32') and not torch.cuda.is_available():\n"
                      "    print('SKIP no GPU'); raise SystemExit(0)\n") + \
        f"try:\n    {stmt}\n    print('NO ERROR')\nexcept Exception as e:\n" \
        "    print('RAISED', type(e).__name__, str(e).splitlines()[0])\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode:
        return f"CRASHED rc={p.returncode} {out} {p.stderr.strip().splitlines()[:1]}"
    return out


def main() -> int:
    import torch

    print("torch", torch.__version__, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
    print("\n".join(line for line in torch.__config__.show().splitlines() if "GCC" in line or "clang" in line
                    or "CXX_COMPILER" in line or "CXX_FLAGS" in line)[:1500])
    for cc in ("c++", "gcc", "nvcc"):
        try:
            v = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
            print(cc, ":", " | ".join(v.strip().splitlines()[:1] + v.strip().splitlines()[-1:]))
        except (OSError, subprocess.TimeoutExpired) as e:
            print(cc, ":", type(e).__name__)
    crashed = False
    for name, stmt in PROBES.items():
        res = run_probe(name, stmt)
        crashed |= res.startswith("CRASHED")
        print(f"probe {name}: {res}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
