"""Does an error raised inside the compiled extension (``TORCH_CHECK`` in its C++ glue) reach Python as a
RuntimeError, or crash the process? No GPU needed: the CUDA glue is called through the dispatcher with CPU tensors
(``redispatch`` to the CUDA key), which its first check rejects.

    python tools/ext_throw_probe.py            # each probe in its own process; exit 1 if any crashed
    python tools/ext_throw_probe.py --inline   # which message formatting crashes, in a tiny extension built here

On the H100 of 2026-11-27 ``tests/kernels/test_set_attention_cuda.py::test_bad_inputs_name_the_argument`` segfaulted
at the first rejected call, while the same build raised cleanly on the CPU machine. Each probe below runs in a fresh
interpreter (faulthandler on), so the output says which kinds of throw survive on the machine at hand, with the
compilers and torch's build settings printed for comparison.

The third H100 session of 2026-11-27 found the cause with ``--inline`` (torch 2.11.0+cu130, Ubuntu g++ 13.3,
libstdc++ 6.0.33): inserting any integer into a std::ostream inside an extension segfaults, a plain
std::ostringstream included, so every TORCH_CHECK whose message held a number or a shape crashed; strings, dtype
names, std::to_string and the throw itself work. Hence csrc/check.h's JEDI_CHECK. The same probe raises everywhere
on the CPU machine (g++ 12.2, libstdc++ 6.0.30).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

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


def run_probe(name: str, stmt: str, prelude: str = PRELUDE) -> str:
    """Run ``stmt`` after ``prelude`` in a fresh interpreter; returns 'RAISED <type> <message>', 'NO ERROR' or
    'CRASHED rc=...'."""
    code = prelude + (f"if '{name}'.startswith('cuda_glue_float32') and not torch.cuda.is_available():\n"
                      "    print('SKIP no GPU'); raise SystemExit(0)\n") + \
        f"try:\n    {stmt}\n    print('NO ERROR')\nexcept Exception as e:\n" \
        "    print('RAISED', type(e).__name__, str(e).splitlines()[0])\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode:
        return f"CRASHED rc={p.returncode} {out} {p.stderr.strip().splitlines()[:1]}"
    return out


# --inline: one TORCH_CHECK per kind of message part, registered as ops of a tiny extension compiled with the
# machine's own compiler, plus a bare ostringstream (no throw involved) and a std::runtime_error.
INLINE_SRC = r'''
#include <torch/extension.h>
#include <torch/library.h>
#include <sstream>
#include <string>
using at::Tensor;
Tensor k_str(const Tensor& a) { TORCH_CHECK(false, "msg ", "literal"); return a; }
Tensor k_dtype(const Tensor& a) { TORCH_CHECK(false, "msg ", a.scalar_type()); return a; }
Tensor k_int(const Tensor& a) { TORCH_CHECK(false, "msg ", a.dim()); return a; }
Tensor k_int32(const Tensor& a) { TORCH_CHECK(false, "msg ", static_cast<int>(a.dim())); return a; }
Tensor k_sizes(const Tensor& a) { TORCH_CHECK(false, "msg ", a.sizes()); return a; }
Tensor k_tostring(const Tensor& a) { TORCH_CHECK(false, std::string("msg ") + std::to_string(a.dim())); return a; }
Tensor k_sstream(const Tensor& a) { std::ostringstream s; s << a.dim(); return a; }
Tensor k_throw_std(const Tensor& a) { throw std::runtime_error("msg std"); }
TORCH_LIBRARY(jedi_probe, m) {
  for (const char* n : {"k_str", "k_dtype", "k_int", "k_int32", "k_sizes", "k_tostring", "k_sstream", "k_throw_std"})
    m.def((std::string(n) + "(Tensor a) -> Tensor").c_str());
}
TORCH_LIBRARY_IMPL(jedi_probe, CPU, m) {
  m.impl("k_str", &k_str); m.impl("k_dtype", &k_dtype); m.impl("k_int", &k_int); m.impl("k_int32", &k_int32);
  m.impl("k_sizes", &k_sizes); m.impl("k_tostring", &k_tostring); m.impl("k_sstream", &k_sstream);
  m.impl("k_throw_std", &k_throw_std);
}
'''
INLINE_OPS = ["k_str", "k_dtype", "k_int", "k_int32", "k_sizes", "k_tostring", "k_sstream", "k_throw_std"]


def inline_main() -> int:
    """Build INLINE_SRC (-O3 -fopenmp, as setup.py builds csrc/) and call each op in a fresh interpreter."""
    from torch.utils.cpp_extension import load_inline

    build = tempfile.mkdtemp(prefix="jedi_probe_")
    load_inline("jedi_probe_ext", cpp_sources=INLINE_SRC, extra_cflags=["-O3", "-fopenmp"], is_python_module=False,
                build_directory=build, verbose=False)
    so = next(os.path.join(build, f) for f in os.listdir(build) if f.endswith(".so"))
    prelude = f"import faulthandler; faulthandler.enable()\nimport torch\ntorch.ops.load_library({so!r})\n"
    crashed = False
    for name in INLINE_OPS:
        res = run_probe(name, f"torch.ops.jedi_probe.{name}(torch.zeros(2))", prelude)
        crashed |= res.startswith("CRASHED")
        print(f"inline {name}: {res}")
    with open("/proc/self/maps") as maps:
        print("libstdc++ loaded:", sorted({w for w in maps.read().split() if "libstdc++" in w}))
    return 1 if crashed else 0


def main() -> int:
    import torch

    if "--inline" in sys.argv[1:]:
        return inline_main()

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
