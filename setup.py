"""Build of jedi_kernels._C (see README "Install" and DESIGN §4).

- Always: the CPU C++ ops (csrc/*.cpp + csrc/cpu/*.cpp).
- With CUDA (torch.version.cuda set and a CUDA toolkit found, or JEDI_FORCE_CUDA=1): + csrc/cuda/*.cu and the
  torch glue csrc/cuda/*.cpp, for JEDI_CUDA_ARCHS / TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). MAX_JOBS caps the
  parallel compile jobs (ninja).
- JEDI_CUDA_EXCLUDE=substring: leave CUDA sources whose file name contains it out of the build.
- JEDI_SKIP_EXT=1: pure Python (Triton kernels + references), no compiler needed.

Install with ``pip install -e . --no-build-isolation`` so the build sees the torch you run with.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _fix_cuda_home(cpp_extension):
    """torch takes CUDA_HOME from the environment, else from ``which nvcc``/../.. without resolving links: an nvcc
    linked into /usr/local/bin gives /usr/local, whose include/ lacks cuda_runtime.h, and the CUDA glue fails to
    compile. Where the toolkit found has no cuda_runtime.h, use the one the real nvcc (links resolved) belongs to."""
    import shutil

    home = cpp_extension.CUDA_HOME
    if home is None or os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for cand in candidates + ["/usr/local/cuda"]:
        if os.path.isfile(os.path.join(cand, "include", "cuda_runtime.h")):
            print(f"jedi-kernels: CUDA_HOME={home} has no include/cuda_runtime.h; using {cand}")
            cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cand
            return


def ext_modules_and_cmdclass():
    if os.environ.get("JEDI_SKIP_EXT") == "1":
        print("jedi-kernels: JEDI_SKIP_EXT=1, building no C++/CUDA extension")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    if torch.version.cuda is not None:
        _fix_cuda_home(cpp_extension)
    force_cuda = os.environ.get("JEDI_FORCE_CUDA") == "1"
    with_cuda = force_cuda or (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None)
    # -fopenmp: at::parallel_for is inline in ATen headers (#pragma omp); without it the CPU kernels run serially.
    # Compile-only: the GOMP symbols resolve to the OpenMP runtime torch already loaded (a second one thrashes).
    cxx = ["-O3", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME) found"
        print(f"jedi-kernels: building the CPU extension only ({why})")
        ext = cpp_extension.CppExtension("jedi_kernels._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx})
    else:
        archs = os.environ.get("JEDI_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        archs = _with_sm90a(archs)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by cpp_extension when it adds -gencode flags
        print(f"jedi-kernels: building CPU + CUDA extension for archs {archs}")
        cuda_sources = _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu")
        exclude = os.environ.get("JEDI_CUDA_EXCLUDE")  # e.g. "set_attention": build the CUDA ops without those
        if exclude:
            cuda_sources = [s for s in cuda_sources if exclude not in os.path.basename(s)]
            print(f"jedi-kernels: JEDI_CUDA_EXCLUDE={exclude}: leaving out CUDA sources matching it")
        sources += cuda_sources
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DJEDI_WITH_CUDA"]
        if any(a.partition("+")[0] == "9.0a" for a in archs.split(";")):
            nvcc.append("-DJEDI_SM90A")  # the Hopper (wgmma) attention forward is compiled: it may be launched
        ext = cpp_extension.CUDAExtension("jedi_kernels._C", sources, include_dirs=include_dirs + [
            os.path.join(ROOT, "csrc", "cuda")], extra_compile_args={"cxx": cxx + ["-DJEDI_WITH_CUDA"], "nvcc": nvcc})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _with_sm90a(archs):
    """The arch list with 9.0 as 9.0a (unless JEDI_NO_SM90A=1): the Hopper attention forward needs the
    arch-specific wgmma instructions, and an sm_90a binary runs on every compute-capability-9.0 device (H100, H200)
    as an sm_90 one does. Only a plain "9.0" changes: "9.0+PTX" asks for PTX that later GPUs can JIT, which
    compute_90a PTX is not, so it stays (and that build runs the mma.sync forward)."""
    if os.environ.get("JEDI_NO_SM90A") == "1":
        return archs
    parts = [a for a in archs.replace(" ", ";").split(";") if a]
    return ";".join(dict.fromkeys("9.0a" if a == "9.0" else a for a in parts))


ext_modules, cmdclass = ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
