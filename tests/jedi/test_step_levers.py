"""benchmarks/step_levers.py's configuration switches on the CPU: which per-call kernel switch each attention rung
sets (two Gluon rungs share one switch), and which rungs the probe's verdict (JEDI_GLUON_CONFIGS) skips."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import step_levers as sl  # noqa: E402


class _StubUNet(torch.nn.Module):
    """Records the backend configure() picks; the model switches it calls do nothing."""

    def __init__(self):
        super().__init__()
        self.backend = None

    def set_fused_ops(self, on):
        pass

    set_fuse_qkv = set_fuse_context_kv = set_fuse_ff = set_fused_ops

    def set_attn_backend(self, backend):
        self.backend = backend


SWITCHES = ("JEDI_CUDA_FWD_WGMMA", "JEDI_TRITON_FWD_GLUON")


@pytest.mark.parametrize("attn, backend, switches", [
    ("auto", "auto", {}),
    ("triton", "triton", {}),
    ("cuda_wgmma", "cuda", {"JEDI_CUDA_FWD_WGMMA": sl.WGMMA_VARIANT}),
    ("triton_gluon", "triton", {"JEDI_TRITON_FWD_GLUON": sl.GLUON_VARIANT}),
    ("triton_gluon_ws", "triton", {"JEDI_TRITON_FWD_GLUON": "5"}),
])
def test_each_attention_rung_sets_its_own_switch_only(monkeypatch, attn, backend, switches):
    """A rung's switch gets the rung's value and every other switch the user's (here: unset), whatever the order of
    _HOPPER: the two Gluon rungs share JEDI_TRITON_FWD_GLUON, and the later entry must not undo the earlier one."""
    for env in SWITCHES:
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(sl, "_USER_SWITCH", {env: None for env in SWITCHES})
    cudnn = torch.backends.cudnn.benchmark
    unet = _StubUNet()
    try:
        sl.configure(unet, {}, dict(sl.BASE, attn=attn))
        assert unet.backend == backend
        assert {env: os.environ.get(env) for env in SWITCHES} == {env: switches.get(env) for env in SWITCHES}
    finally:
        torch.backends.cudnn.benchmark = cudnn


def test_user_switch_values_come_back_after_a_hopper_rung(monkeypatch):
    monkeypatch.setattr(sl, "_USER_SWITCH", {"JEDI_CUDA_FWD_WGMMA": "2", "JEDI_TRITON_FWD_GLUON": None})
    cudnn = torch.backends.cudnn.benchmark
    unet = _StubUNet()
    try:
        sl.configure(unet, {}, dict(sl.BASE, attn="triton_gluon_ws"))
        assert os.environ["JEDI_TRITON_FWD_GLUON"] == "5" and os.environ["JEDI_CUDA_FWD_WGMMA"] == "2"
        sl.configure(unet, {}, dict(sl.BASE, attn="auto"))
        assert "JEDI_TRITON_FWD_GLUON" not in os.environ and os.environ["JEDI_CUDA_FWD_WGMMA"] == "2"
    finally:
        torch.backends.cudnn.benchmark = cudnn
        for env in SWITCHES:
            os.environ.pop(env, None)


def test_gluon_rungs_skip_configs_the_probe_rejected(monkeypatch):
    """Where the probe found a Gluon config disagreeing (or hanging), gpu_check.sh narrows JEDI_GLUON_CONFIGS and the
    ladder skips the rung of that config, naming why (here on a pretend sm_90 device with Gluon)."""
    from jedi_kernels.ops import set_attention_gluon as sg

    if not sg.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.setattr(sl.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sl.torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(sl, "available_backends", lambda: {"triton": True, "cuda_attention": False, "reasons": {}})
    monkeypatch.setenv("JEDI_GLUON_CONFIGS", "1,2,3,4")
    assert "Gluon config 5 is not among JEDI_GLUON_CONFIGS=1,2,3,4" in sl.attn_available("triton_gluon_ws")
    monkeypatch.setitem(sl._HOPPER, "triton_gluon", ("triton", "JEDI_TRITON_FWD_GLUON", "1"))
    assert sl.attn_available("triton_gluon") is None
    monkeypatch.delenv("JEDI_GLUON_CONFIGS")
    assert sl.attn_available("triton_gluon_ws") is None
    assert [e for e, _ in sl.LADDER][-2:] == ["+attn=triton_gluon", "+attn=triton_gluon_ws"]


def test_targets_only_rung_is_reported_apart(monkeypatch):
    """+targets_only returns the targets' eps only: configure() asks the UNet for the last image of each set, the
    ladder never picks it as the configuration compared with the peers, and the summary reports it apart."""
    cudnn = torch.backends.cudnn.benchmark
    try:
        inp = sl.configure(_StubUNet(), {"ng_mask": torch.tensor([False, True]), "set_size": 2},
                           dict(sl.BASE, targets_only=True))
        assert inp["out_positions"] == (1,)
        inp = sl.configure(_StubUNet(), dict(inp), dict(sl.BASE))
        assert "out_positions" not in inp  # the next rung gets every image again
        inp = sl.configure(_StubUNet(), {"set_size": 1}, dict(sl.BASE, targets_only=True))
        assert "out_positions" not in inp  # plain SD: no references to drop
    finally:
        torch.backends.cudnn.benchmark = cudnn
    rows = [dict(workload="jedi_ng2", entry="+fuse_ff (cuda_graph)", config=dict(sl.BASE), ms=11.3),
            dict(workload="jedi_ng2", entry="+targets_only (cuda_graph)", config=dict(sl.BASE, targets_only=True),
                 ms=10.9),
            dict(workload="jedi_ng2", entry="diffusers eager", config={}, ms=40.0, impl="diffusers")]
    s = sl.summarize(rows)
    assert s["best_ms"] == {"jedi_ng2": 11.3} and s["best_ms_targets_only"] == {"jedi_ng2": 10.9}
    assert s["speedup_vs_best_peer"] == round(40.0 / 11.3, 3) and s["ng2_targets_only_meets_8ms"] is False
    assert "targets' eps only" in sl.markdown(dict(env={}, date="-", rows=rows, summary=s))


def test_subpixel_upsample_rung_switches_only_the_upsamples():
    """+subpixel_upsample is the first rung whose Upsample layers run jk.upsample_conv2d; the rungs before it keep
    interpolate + conv even with the fused ops on, and every rung after it keeps it on."""
    from jedi import JeDiUNet, UNetConfig
    from jedi.unet import Upsample

    unet = JeDiUNet(UNetConfig.tiny())
    ups = [m for m in unet.modules() if isinstance(m, Upsample)]
    names = [e for e, _ in sl.LADDER]
    at = names.index("+subpixel_upsample")
    assert names[at - 1] == "+fold_linear_bias"
    cudnn = torch.backends.cudnn.benchmark
    try:
        for i, (entry, cfg) in enumerate(sl.LADDER):
            if cfg["attn"] != "auto":
                continue
            sl.configure(unet, {}, cfg)
            assert all(m.subpixel is (i >= at) for m in ups), entry
    finally:
        torch.backends.cudnn.benchmark = cudnn


def test_residual_add_rung_comes_after_subpixel_and_stays_on():
    """+residual_add is the first rung whose ResBlocks and SpatialTransformers hand their output biases to
    jk.residual_add; every rung after it (but the Hopper attention options, which keep it too) has it on."""
    from jedi import JeDiUNet, UNetConfig
    from jedi.unet import ResBlock, SpatialTransformer

    unet = JeDiUNet(UNetConfig.tiny())
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    names = [e for e, _ in sl.LADDER]
    at = names.index("+residual_add")
    assert names[at - 1] == "+subpixel_upsample"
    cudnn = torch.backends.cudnn.benchmark
    try:
        for i, (entry, cfg) in enumerate(sl.LADDER):
            sl.configure(unet, {}, dict(cfg, attn="auto"))
            assert all(m.residual_add is (i >= at) for m in blocks), entry
            assert all(m.fold_bias for m in blocks) or i < at
    finally:
        torch.backends.cudnn.benchmark = cudnn


def test_skip_cat_rung_comes_after_residual_add_and_stays_on():
    from jedi import JeDiUNet, UNetConfig
    from jedi.unet import ResBlock

    unet = JeDiUNet(UNetConfig.tiny())
    res = [m for m in unet.modules() if isinstance(m, ResBlock)]
    names = [e for e, _ in sl.LADDER]
    at = names.index("+skip_cat")
    assert names[at - 1] == "+residual_add"
    cudnn = torch.backends.cudnn.benchmark
    try:
        for i, (entry, cfg) in enumerate(sl.LADDER):
            sl.configure(unet, {}, dict(cfg, attn="auto"))
            assert all(m.skip_cat is (i >= at) for m in res), entry
    finally:
        torch.backends.cudnn.benchmark = cudnn
