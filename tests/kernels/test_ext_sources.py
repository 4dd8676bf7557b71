"""The compiled extension's argument checks: their messages, and the rule that keeps them from crashing.

On the H100 machine of 2026-11-27 any ``std::ostream << integer`` compiled into the extension segfaulted (torch
2.11 wheel, Ubuntu g++ 13.3; tools/ext_throw_probe.py --inline), so a TORCH_CHECK whose message held a size or a
shape killed the process instead of raising. The glue formats its messages through JEDI_CHECK (csrc/check.h), which
concatenates strings only. The crash does not happen on this machine, so the rule is checked in the sources, and the
messages JEDI_CHECK builds are checked against the ones the C++ code means to give."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from jedi_kernels import _ext

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
# what formats through a std::ostream inside the extension (c10::str is what TORCH_CHECK's message uses)
FORBIDDEN = re.compile(r"\b(TORCH_CHECK\w*|TORCH_WARN\w*|TORCH_INTERNAL_ASSERT\w*|AT_ASSERT\w*|c10::str)\s*\(|"
                       r"std::(o|i)?stringstream|std::(cout|cerr|clog)|(?<!<)<<(?!<)")


def _torch_sources() -> list[pathlib.Path]:
    """The extension's C++ files that include torch (the torch-free kernels are not linked with c10, and the C++
    tests under csrc/**/tests are programs of their own, not part of the extension)."""
    files = [p for p in sorted(CSRC.rglob("*")) if p.suffix in (".cpp", ".h", ".cu", ".cuh")
             and p.name != "check.h" and "tests" not in p.relative_to(CSRC).parts]
    return [p for p in files if re.search(r"#include <(ATen|torch|c10)/", p.read_text())]


def test_torch_sources_are_found():
    names = {p.name for p in _torch_sources()}
    assert {"set_attention_glue.cpp", "prepare_inputs_glue.cpp", "prepare_inputs.cpp", "schemas.cpp"} <= names, names


@pytest.mark.parametrize("path", _torch_sources(), ids=lambda p: str(p.relative_to(CSRC)))
def test_no_ostream_formatting_in_the_extension(path):
    """Checks go through JEDI_CHECK; nothing else in a torch-including source streams into an ostream."""
    bad = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("//", 1)[0]
        if FORBIDDEN.search(code):
            bad.append(f"{path.name}:{n}: {line.strip()}")
    assert not bad, "use JEDI_CHECK (csrc/check.h), not ostream formatting:\n" + "\n".join(bad)


def test_forbidden_pattern_catches_what_it_should():
    for text in ('TORCH_CHECK(x, "a ", n);', "TORCH_WARN(\"w\");", "c10::str(a, b)", "std::ostringstream s;",
                 "s << n;", "std::cerr"):
        assert FORBIDDEN.search(text), text
    for text in ('JEDI_CHECK(x, "a ", n);', "kernel<<<grid, block>>>(p);", "TORCH_LIBRARY_IMPL(jedi, CPU, m) {"):
        assert not FORBIDDEN.search(text), text


def _ops():
    ops = _ext.ext_ops()
    if ops is None:
        pytest.skip(f"compiled extension not loaded: {_ext.ext_reason()}")
    return ops


@pytest.mark.parametrize("args, message", [
    ((torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8, 8), torch.ones(2)),
     "prepare_inputs: x0 must have x_t's shape [2, 4, 8, 8], got [2, 3, 8, 8]"),
    ((torch.randn(4, 8, 8), torch.randn(4, 8, 8), torch.ones(4)),
     "prepare_inputs: x_t must be (N, C, H, W), got [4, 8, 8]"),
    ((torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.ones(2, 1)),
     "prepare_inputs: ng_mask must be (N,) with N = 3, got [2, 1]"),
    ((torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2).double(), torch.ones(2)),
     "prepare_inputs: x0 must have x_t's dtype"),
])
def test_cpu_op_messages(args, message):
    """A rejected call raises (does not crash) with the sizes and counts written out as Python writes lists."""
    with pytest.raises(RuntimeError) as info:
        _ops().prepare_inputs_ext(*args)
    assert str(info.value).splitlines()[0] == message


def test_cpu_backward_op_message():
    with pytest.raises(RuntimeError) as info:
        _ops().prepare_inputs_backward_ext(torch.randn(2, 8, 3, 3), torch.ones(2), 4)
    assert str(info.value).splitlines()[0] == \
        "prepare_inputs_backward: grad_out must be (N, 2*channels+1, H, W), got [2, 8, 3, 3]"


# ----------------------------------------------------------------------------------------------------------------------
# jedi_kernels/cuda_variants.py against the C++ that defines the Hopper forward's variants
# ----------------------------------------------------------------------------------------------------------------------

_VARIANTS_SRC = r"""
#define JEDI_SET_ATTN_EMULATE 1
#include <cstdio>
#include "set_attention_wgmma.cuh"
using namespace jedi::set_attn;
int main() {
  for (int D = 8; D <= 264; D += 8)
    for (long long keys : {1LL, 512LL, 1024LL, 1025LL, 2048LL, 65536LL}) {
      const int kD = padded_head_dim(D);
      const int rb = kD == 0 ? 0 : fwd_launch_row_blocks(kD, fwd_shape_row_blocks(kD, keys, 1), 1);
      std::printf("rows %d %lld %d %d\n", D, keys, kD, 16 * rb);
    }
  for (int v = 1; v <= kWgmmaVariants; ++v)
    std::printf("variant %d %d %d\n", v, wgmma_variant_block_n(v), wgmma_variant_warpgroups(v));
  for (int D = 8; D <= 256; D += 8)
    for (int v = 0; v <= kWgmmaVariants + 1; ++v)
      if (wgmma_fwd_head_dim(D) && wgmma_variant_compiled(D, v)) std::printf("compiled %d %d\n", D, v);
}
"""


def test_cuda_variant_tables_match_the_header(tmp_path):
    """The Python tables the benchmarks and tools use (variants' tiles, the variants compiled per head dim, the
    default) say what csrc/cuda/set_attention_wgmma.cuh and set_attention_glue.cpp say: the header compiled on the
    host (as the CPU emulators compile it) prints its tables; the glue's default is read from its source."""
    import re
    import shutil
    import subprocess

    from jedi_kernels import cuda_variants as cv

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    src = tmp_path / "variants.cpp"
    src.write_text(_VARIANTS_SRC)
    exe = tmp_path / "variants"
    subprocess.run([cxx, "-std=c++17", f"-I{CSRC / 'cuda'}", str(src), "-o", str(exe)], check=True,
                   capture_output=True, timeout=300)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    variants = {int(v): (int(n), int(w)) for _, v, n, w in (line.split() for line in out if line.startswith("variant"))}
    compiled: dict[int, tuple[int, ...]] = {}
    for _, d, v in (line.split() for line in out if line.startswith("compiled")):
        compiled[int(d)] = compiled.get(int(d), ()) + (int(v),)
    assert variants == cv.WGMMA_VARIANTS
    assert compiled == cv.WGMMA_COMPILED
    for _, d, keys, kd, rows in (line.split() for line in out if line.startswith("rows")):
        assert cv.padded_head_dim(int(d)) == int(kd), d
        if int(kd):
            assert cv.rows_per_warp_default(int(d), int(keys)) == int(rows), (d, keys)
    glue = (CSRC / "cuda" / "set_attention_glue.cpp").read_text()
    default = int(re.search(r"constexpr int kDefaultWgmmaVariant = (\d+);", glue).group(1))
    assert re.search(r"return D != 40 \|\|", glue), "the glue's default no longer applies at head dim 40 only"
    assert cv.WGMMA_DEFAULT == {40: default}
    assert cv.wgmma_labels(80) == {"wg64x2": "1", "wg128x2": "2", "wg64x1": "5"} and cv.wgmma_labels(64) == {}
    assert cv.default_label(40) == "wg64x2" and cv.default_label(80) == "mmasync"
