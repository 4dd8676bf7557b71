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


@pytest.mark.parametrize("rung, before, kinds, attr", [
    ("+subpixel_upsample", "+fold_linear_bias", ("Upsample",), "subpixel"),
    ("+residual_add", "+subpixel_upsample", ("ResBlock", "SpatialTransformer"), "residual_add"),
    ("+skip_cat", "+residual_add", ("ResBlock",), "skip_cat"),
])
def test_a_model_switch_rung_turns_it_on_for_itself_and_every_later_rung(rung, before, kinds, attr):
    """Each of these rungs is the first whose modules have the switch on (with the fused ops on before it, it stays
    off there), in the ladder's order; every later rung keeps it (the Hopper attention rungs too)."""
    import jedi.unet as unet_mod
    from jedi import JeDiUNet, UNetConfig

    unet = JeDiUNet(UNetConfig.tiny())
    mods = [m for m in unet.modules() if isinstance(m, tuple(getattr(unet_mod, k) for k in kinds))]
    names = [e for e, _ in sl.LADDER]
    at = names.index(rung)
    assert mods and names[at - 1] == before
    cudnn = torch.backends.cudnn.benchmark
    try:
        for i, (entry, cfg) in enumerate(sl.LADDER):
            sl.configure(unet, {}, dict(cfg, attn="auto"))
            assert all(getattr(m, attr) is (i >= at) for m in mods), entry
    finally:
        torch.backends.cudnn.benchmark = cudnn


def test_frozen_weights_rung_times_inside_the_scope():
    """+frozen_weights and the rungs after it run their steps inside the UNet's frozen_weights() (frozen_scope);
    the rungs before it, and a UNet without the method, outside."""
    from jedi import JeDiUNet, UNetConfig

    unet = JeDiUNet(UNetConfig.tiny())
    names = [e for e, _ in sl.LADDER]
    at = names.index("+frozen_weights")
    assert names[at - 1] == "+skip_cat"
    for i, (entry, cfg) in enumerate(sl.LADDER):
        scope = sl.frozen_scope(unet, cfg)
        assert (scope is not None) is (i >= at), entry
    assert sl.frozen_scope(_StubUNet(), dict(sl.LADDER)["+frozen_weights"]) is None
