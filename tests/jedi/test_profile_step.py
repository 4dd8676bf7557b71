"""benchmarks/profile_step.py on the CPU: kernel-name categories, the GPU event path on synthetic events, a tiny
end-to-end profile, and the analytic floors of the full SD step (meta tensors) against table6's FLOP counts."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import profile_step as ps  # noqa: E402

@pytest.fixture
def one_thread():
    """Tiny CPU models gain nothing from intra-op threads, and on a shared machine an OpenMP barrier waiting on a
    descheduled thread makes each op ~100x slower: profile them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Kernel names as cuDNN, cuBLAS, CUTLASS, PyTorch, inductor and our kernels spell them, and CPU operator names.
NAMES = [
    ("flash_fwd_kernel", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::half_t>>",
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t>::Params)",
     "attention"),
    ("_set_attn_fwd_kernel", "attention"),
    ("void set_attn_fwd_kernel<__half, 40>(SetAttnFwdParams)", "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "attention"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "gemm"),
    ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_64x64_64x4_nn_align8>(Params)", "gemm"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN", "gemm"),
    ("triton_tem_fused_addmm_0", "gemm"),
    ("sm80_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x32_stage4_warpsize2x2x1_g1",
     "conv"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_execute",
     "conv"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true>", "conv"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*)", "norm"),
    ("void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<float>", "norm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>", "norm"),
    ("_gn_partial_kernel", "norm"),
    ("_gn_apply_kernel", "norm"),
    ("triton_red_fused__to_copy_native_group_norm_silu_0", "norm"),
    ("_geglu_fwd_kernel", "elementwise"),
    ("triton_poi_fused_add_mul_0", "elementwise"),
    ("triton_poi_fused_convolution_silu_3", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>, "
     "at::detail::Array<char*, 3>>(int, at::native::CUDAFunctor_add<c10::Half>, at::detail::Array<char*, 3>)",
     "elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2>>",
     "elementwise"),
    ("void prepare_nhwc_kernel<__half>(__half const*, __half const*, float const*, __half*, long, long)",
     "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "elementwise"),
    ("aten::convolution", "conv"),
    ("aten::mkldnn_convolution", "conv"),
    ("aten::addmm", "gemm"),
    ("aten::mm", "gemm"),
    ("aten::linear", "gemm"),
    ("aten::native_group_norm", "norm"),
    ("aten::native_layer_norm", "norm"),
    ("jedi::group_norm", "norm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("jedi::set_attention", "attention"),
    ("aten::add", "elementwise"),
    ("aten::copy_", "elementwise"),
    ("aten::gelu", "elementwise"),
    ("jedi::geglu", "elementwise"),
    ("aten::upsample_nearest2d", "elementwise"),
    ("aten::empty", "other"),
    ("aten::view", "other"),
    ("aten::normal_", "other"),
]


@pytest.mark.parametrize("name,expected", NAMES, ids=[n[:48] for n, _ in NAMES])
def test_categorize(name, expected):
    assert ps.categorize(name) == expected, f"{name!r} -> {ps.categorize(name)!r}, expected {expected!r}"


def _evt(name, device_type, us, self_us=0.0, annotation=False):
    return SimpleNamespace(name=name, device_type=device_type, time_range=SimpleNamespace(elapsed_us=lambda: us),
                           self_cpu_time_total=self_us, is_user_annotation=annotation, is_python_function=False)


def test_gpu_event_path_on_synthetic_events():
    """The CUDA branch of kernel_times (never run on a CPU machine otherwise): only device events count, by duration;
    CPU-side ops, runtime calls and annotation ranges mirrored onto the device timeline are ignored."""
    prof = SimpleNamespace(events=lambda: [
        _evt("aten::conv2d", DeviceType.CPU, 50.0, 5.0),
        _evt("cudaLaunchKernel", DeviceType.CPU, 3.0, 3.0),
        _evt("sm90_xmma_fprop_implicit_gemm_f16f16", DeviceType.CUDA, 600.0),
        _evt("sm90_xmma_fprop_implicit_gemm_f16f16", DeviceType.CUDA, 400.0),
        _evt("flash_fwd_kernel", DeviceType.CUDA, 300.0),
        _evt("_gn_apply_kernel", DeviceType.CUDA, 100.0),
        # ranges on the device timeline that span kernels (the compiled H200 profile counted the first as 32.5 ms)
        _evt("## Call CompiledFxGraph fnaxbtitoq354sg575wxadmqznmlnwgghicstobxtqctks6nog77 ##", DeviceType.CUDA, 900.0),
        _evt("ProfilerStep#3", DeviceType.CUDA, 950.0),
        _evt("my_range", DeviceType.CUDA, 800.0, annotation=True),
    ])
    times = ps.kernel_times(prof, torch.device("cuda"))
    assert times == {"sm90_xmma_fprop_implicit_gemm_f16f16": [1000.0, 2], "flash_fwd_kernel": [300.0, 1],
                     "_gn_apply_kernel": [100.0, 1]}
    total, cats = ps.breakdown(times, steps=2)
    assert total == pytest.approx(0.7)
    assert cats["conv"]["ms_per_step"] == pytest.approx(0.5) and cats["conv"]["calls_per_step"] == 1
    assert cats["conv"]["top_kernels"][0] == ("sm90_xmma_fprop_implicit_gemm_f16f16", 0.5, 1.0)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    assert cats["gemm"]["ms_per_step"] == 0 and cats["gemm"]["top_kernels"] == []


def _avg(key, shapes, count, device_us, cpu_us=0.0):
    return SimpleNamespace(key=key, input_shapes=shapes, count=count, device_time_total=device_us,
                           self_cpu_time_total=cpu_us)


def test_gemm_shapes_on_synthetic_averages():
    """gemm_shapes reads M, K, N (and batch) from each leaf matmul op's recorded input shapes, skips nested and
    shapeless ops, and rates each shape against its own roofline (FLOPs or bytes, whichever bounds it)."""
    prof = SimpleNamespace(key_averages=lambda group_by_input_shape: [
        _avg("aten::addmm", [[1280], [4096, 320], [320, 1280], [], []], 10, 1000.0),  # bias, A, B, beta, alpha
        _avg("aten::mm", [[308, 768], [768, 20480]], 2, 200.0),
        _avg("aten::bmm", [[8, 64, 40], [8, 40, 64]], 4, 40.0),
        _avg("aten::baddbmm", [[8, 64, 64], [8, 64, 40], [8, 40, 64], [], []], 2, 10.0),
        _avg("aten::linear", [[4096, 320], [1280, 320], [1280]], 10, 1000.0),  # nested: its addmm is counted
        _avg("aten::mm", [], 1, 5.0),  # shapes not recorded
        _avg("aten::add", [[4, 4], [4, 4]], 1, 99.0),
    ])
    rows = ps.gemm_shapes(prof, 2, torch.device("cuda"), torch.float16)
    assert [(r["op"], r["M"], r["K"], r["N"], r["batch"]) for r in rows] == [
        ("aten::addmm", 4096, 320, 1280, 1), ("aten::mm", 308, 768, 20480, 1), ("aten::bmm", 64, 40, 64, 8),
        ("aten::baddbmm", 64, 40, 64, 8)]
    a = rows[0]
    assert a["calls_per_step"] == 5 and a["ms_per_step"] == pytest.approx(0.5) and a["us_per_call"] == 100
    flop = 2 * 4096 * 320 * 1280
    assert a["tflops"] == pytest.approx(flop / 100e-6 / 1e12, abs=0.1)
    # 3.36 GFLOP at 724 TFLOP/s = 4.6 µs; 2 * (4096*320 + 320*1280 + 4096*1280) bytes at 3 TB/s = 4.6 µs as well
    roof = max(flop / 724e12, 2 * (4096 * 320 + 320 * 1280 + 4096 * 1280) / 3e12) * 1e6
    assert a["roofline_us"] == pytest.approx(roof, abs=0.01)
    assert a["fraction_of_roofline"] == pytest.approx(roof / 100, abs=1e-3)
    cpu = ps.gemm_shapes(prof, 2, torch.device("cpu"), torch.float32)  # the CPU rehearsal: self CPU time
    assert all(r["ms_per_step"] == 0 and r["tflops"] is None for r in cpu)
    assert len(ps.gemm_shapes(prof, 2, torch.device("cuda"), torch.float16, top=2)) == 2


def test_profile_tiny_cpu_end_to_end(tmp_path, one_thread):
    out = tmp_path / "prof.json"
    ps.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["workload"] == "jedi_ng2" and r["mode"] == "eager" and r["flags"]["dtype"] == "float32"
    assert set(r["categories"]) == set(ps.CATEGORIES)
    assert sum(c["share"] for c in r["categories"].values()) == pytest.approx(1.0, abs=1e-6)
    assert r["step_ms"] > 0 and r["device_total_ms"] > 0
    for cat in ("conv", "gemm", "attention", "norm", "elementwise"):  # the tiny UNet runs every kind of op
        assert r["categories"][cat]["ms_per_step"] > 0, cat
        top = r["categories"][cat]["top_kernels"]
        assert 1 <= len(top) <= ps.TOP_K and all(ps.categorize(name) == cat for name, _, _ in top)
    md = out.with_suffix(".md").read_text()
    assert "| category | ms/step | share |" in md and "| conv |" in md


def test_profile_optimized_configuration_cpu(tmp_path, one_thread):
    """--fused --fuse-projections --channels-last: optimize()'s configuration (fused ops, folded biases, q/k/v and
    context k/v projections fused) profiles, and the flags are on the record."""
    out = tmp_path / "prof.json"
    ps.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--fused", "--fuse-projections",
             "--channels-last", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["flags"]["fused"] and r["flags"]["fuse_projections"] and r["flags"]["channels_last"]
    assert r["categories"]["gemm"]["ms_per_step"] > 0
    md = out.with_suffix(".md").read_text()
    assert "fuse_projections" in md and "Matmuls by shape" in md
    # the step's matmuls by shape, among them the one GEMM of every cross-attention's context keys/values (M = UNet
    # batch x context tokens), once a step
    gemms = r["gemm_shapes"]
    assert gemms and all(g["M"] > 0 and g["K"] > 0 and g["N"] > 0 and g["calls_per_step"] > 0 for g in gemms)
    ctx = [g for g in gemms if g["M"] == r["unet_batch"] * r["context_tokens"]]
    assert len(ctx) == 1 and ctx[0]["calls_per_step"] == 1, ctx


def test_floor_column_in_report(one_thread):
    """The full-size report path (per-category floors beside the measured times), here on a tiny CPU profile."""
    r = ps.profile_step("blipd", device="cpu", tiny=True, steps=1, warmup=1, with_floors=True)
    assert r["floors"]["workload"] == "blipd"
    assert all(c["floor_ms"] >= 0 for c in r["categories"].values())
    assert r["categories"]["conv"]["floor_ms"] > 0
    md = ps.markdown(r)
    assert "floor ms (est.)" in md and f"{r['floors']['floor_ms_total']:.3f}" in md


def test_gpu_modes_refused_on_cpu():
    with pytest.raises(SystemExit):
        ps.main(["--tiny", "--device", "cpu", "--mode", "cuda_graph"])
    with pytest.raises(ValueError, match="only on CUDA"):
        ps.build_step("jedi_ng2", device="cpu", dtype=torch.float32, tiny=True, mode="compile")


# table6.py --flops (benchmarks/README.md): total TFLOP per step of the full SD v1 workloads
TABLE6_TFLOP = {"jedi_ng2": 3.704, "blipd": 1.607}


@pytest.mark.parametrize("workload", sorted(TABLE6_TFLOP))
def test_floors_full_sd_meta(workload, tmp_path):
    out = tmp_path / "floors.json"
    fl = ps.main(["--floors", "--workload", workload, "--out", str(out)])
    assert fl["flops"]["total"] / 1e12 == pytest.approx(TABLE6_TFLOP[workload], rel=0.01)
    assert json.loads(out.read_text())["tflop_total"] == fl["tflop_total"]
    assert "ESTIMATE" in out.with_suffix(".md").read_text()
    b = fl["bytes"]
    assert all(b[k] > 0 for k in ("group_norm", "layer_norm", "geglu", "residual_adds", "skip_concat", "upsample",
                                  "silu_after_norm", "layout_copies"))
    assert b["silu_after_norm"] < b["group_norm"]  # SpatialTransformer norms have no SiLU after them
    by_cat = fl["floor_ms_by_category"]
    assert sum(by_cat.values()) == pytest.approx(fl["floor_ms_total"], rel=1e-3)
    assert by_cat["conv"] == pytest.approx(fl["flops"]["conv"] / (ps.PEAK_TFLOPS * 1e12) * 1e3, rel=1e-3)
    assert ps.count_pass_bytes(workload, channels_last=True)["layout_copies"] == 0


def test_profile_step_inside_frozen_weights_cpu():
    """--frozen-weights builds and runs the step inside JeDiUNet.frozen_weights() (the scope is left afterwards)."""
    r = ps.profile_step("jedi_ng2", device="cpu", tiny=True, steps=1, warmup=1, fused=True, channels_last=True,
                        fuse_projections=True, frozen_weights=True, with_floors=False)
    assert r["flags"]["frozen_weights"] is True and r["step_ms"] > 0
    assert "frozen_weights" in ps.markdown(r)
