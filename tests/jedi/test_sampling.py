"""jedi.sampling: timesteps, DDIM / DPM-Solver++ 2M against exact eps models, image guidance, personalization
(branch stacking, one UNet call per step, references untouched, determinism), bad inputs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from jedi.sampling import (SAMPLERS, STRATEGIES, guidance_branches, guided_eps, personalize, sample_ddim,
                           sample_dpmpp_2m, uniform_timesteps)
from jedi.schedule import NoiseSchedule
from jedi_kernels.testing import assert_close_verbose

SCHED = NoiseSchedule.scaled_linear()


def abar(t) -> float:
    return float(SCHED.alphas_cumprod[int(t)])


# ---- timesteps --------------------------------------------------------------------------------------------------
def test_uniform_timesteps_match_compvis():
    ts = uniform_timesteps(50)
    assert ts == list(range(981, 0, -20)) and len(ts) == 50
    assert uniform_timesteps(1) == [1]
    assert uniform_timesteps(3) == [667, 334, 1]  # LDM's 1000 would index past the schedule: dropped
    assert len(uniform_timesteps(7)) == 8  # c = 142 does not divide 1000: one extra step, as in LDM
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            uniform_timesteps(bad)


# ---- solvers ----------------------------------------------------------------------------------------------------
def oracle(x0: torch.Tensor):
    """The exact eps of x_t for a known x0: (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    def model_fn(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        a = abar(t[0])
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    return model_fn


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_oracle_eps_recovers_x0_exactly(name, steps):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 5, 7, generator=g, dtype=torch.float64)
    x = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = SAMPLERS[name](oracle(x0), x, SCHED, uniform_timesteps(steps), progress=False)
    assert_close_verbose(out, x0, atol=1e-5, name=f"{name} {steps} steps")


def test_ddim_eta_noise_is_seeded_and_still_exact_for_the_oracle():
    x0 = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    x = torch.randn(x0.shape, dtype=torch.float64)
    runs = [sample_ddim(oracle(x0), x, SCHED, uniform_timesteps(10), eta=1.0,
                        generator=torch.Generator().manual_seed(s), progress=False) for s in (0, 0)]
    assert_close_verbose(runs[0], x0, atol=1e-5, name="eta=1")
    assert torch.equal(runs[0], runs[1])
    # mid-run states depend on the eta noise, and on the seed
    seen = {}
    for s in (0, 1):
        sample_ddim(oracle(x0), x, SCHED, uniform_timesteps(10), eta=1.0, generator=torch.Generator().manual_seed(s),
                    callback=lambda d, s=s: seen.setdefault(s, d["x"].clone()) if d["i"] == 3 else None,
                    progress=False)
    assert not torch.equal(seen[0], seen[1])


def test_solvers_converge_at_their_order_on_gaussian_data():
    """x0 ~ N(0, s^2): the ideal eps is linear and the probability-flow ODE scales x_t by std_t / std_T, so the
    exact sample is known. DDIM is first order (error halves as steps double), DPM-Solver++ 2M second order."""
    s = 0.5

    def eps_fn(x, t):
        a = abar(t[0])
        return math.sqrt(1 - a) * x / (a * s * s + 1 - a)

    xT = torch.randn(4000, dtype=torch.float64)
    err = {name: [] for name in SAMPLERS}
    for steps in (10, 20, 40):
        # linear in t away from t = 0: lambda is smooth there (the CompVis grid ends with one big step near t = 0)
        ts = [int(round(v)) for v in torch.linspace(999, 199, steps + 1).tolist()]
        aT, al = abar(ts[0]), abar(ts[-1])
        x_last = xT * math.sqrt(al * s * s + 1 - al) / math.sqrt(aT * s * s + 1 - aT)
        exact = math.sqrt(al) * s * s * x_last / (al * s * s + 1 - al)  # both end with the clean prediction
        for name, fn in SAMPLERS.items():
            err[name].append(float((fn(eps_fn, xT, SCHED, ts, progress=False) - exact).abs().max()))
    for e in (err["ddim"],):
        assert 1.7 < e[0] / e[1] < 2.3 and 1.7 < e[1] / e[2] < 2.3, err
    for e in (err["dpmpp_2m"],):
        assert e[0] / e[1] > 3.5 and e[1] / e[2] > 3.5, err
    assert all(a < b / 5 for a, b in zip(err["dpmpp_2m"], err["ddim"])), err


def test_solvers_share_one_signature_and_call_back():
    calls = []
    x = torch.randn(2, 3)
    for fn in SAMPLERS.values():
        out = fn(lambda x, t: torch.zeros_like(x), x, SCHED, [901, 501, 101], eta=0.0, generator=None,
                 callback=calls.append, progress=False)
        assert out.shape == x.shape and out.dtype == x.dtype
    assert [c["i"] for c in calls] == [0, 1, 2] * 2 and calls[0]["t"] == 901 and set(calls[0]) >= {"x", "denoised"}


@pytest.mark.parametrize("ts, match", [([], "empty"), ([1, 5], "descending"), ([1000, 5], r"\[0, 1000\)"),
                                       ([5, 5], "descending")])
def test_solver_bad_timesteps(ts, match):
    with pytest.raises(ValueError, match=match):
        sample_ddim(lambda x, t: x, torch.randn(2), SCHED, ts, progress=False)


def test_dpmpp_rejects_eta_and_solvers_reject_int_x():
    with pytest.raises(ValueError, match="eta"):
        sample_dpmpp_2m(lambda x, t: x, torch.randn(2), SCHED, [5, 1], eta=0.5, progress=False)
    with pytest.raises(TypeError, match="floating"):
        sample_ddim(lambda x, t: x, torch.ones(2, dtype=torch.long), SCHED, [5, 1], progress=False)


# ---- guidance ---------------------------------------------------------------------------------------------------
def test_guided_eps_formula():
    e0, e1, ef = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([10.0])
    assert guided_eps(e0, e1, ef, 2.0, 5.0).item() == 1 + 2 * (3 - 1) + 5 * (10 - 3)
    # one scale: eps1 cancels, standard CFG
    assert guided_eps(e0, e1, ef, 4.0, 4.0).item() == 1 + 4 * (10 - 1)
    assert guided_eps(e0, e1, ef, 1.0, 1.0).item() == 10.0


def test_guidance_branches_presets_and_shortcuts():
    F, T = False, True
    assert guidance_branches("joint", 3.0)[0] == ((F, F), (T, T))
    assert guidance_branches("text_only", 3.0)[0] == ((F, T), (T, T))
    assert guidance_branches("text_first", 3.0, 5.0)[0] == ((F, F), (F, T), (T, T))  # eps1: references kept
    assert guidance_branches("image_first", 3.0, 5.0)[0] == ((F, F), (T, F), (T, T))  # eps1: text kept
    assert guidance_branches("image_first", 3.0, 3.0)[0] == ((F, F), (T, T))  # eps1 has weight 0
    assert guidance_branches("joint", 1.0)[0] == ((T, T),)  # s = 1: eps_full
    with pytest.raises(ValueError, match="one guidance scale"):
        guidance_branches("joint", 3.0, 5.0)
    with pytest.raises(ValueError, match="strategy"):
        guidance_branches("both", 3.0)


# ---- personalization with a recording UNet ------------------------------------------------------------------------
class FakeUNet(nn.Module):
    """Per-image eps from every input the real UNet reads (x_t, t, context, masked x0, mask); records each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, t, context, *, x0, ng_mask, set_size, set_mask=None, out_positions=None):
        self.calls.append(dict(x_t=x_t.clone(), t=t.clone(), context=context.clone(), x0=x0.clone(),
                               ng_mask=ng_mask.clone(), set_size=set_size, set_mask=set_mask,
                               out_positions=out_positions))
        m = ng_mask.to(x_t.dtype).view(-1, 1, 1, 1)
        c = context.mean((1, 2)).view(-1, 1, 1, 1)
        eps = torch.tanh(0.3 * x_t + 0.5 * x0 * (1 - m) + 0.2 * m + c + t.view(-1, 1, 1, 1) / 1000)
        if out_positions is None:
            return eps
        eps = eps.view(-1, set_size, *eps.shape[1:])[:, list(out_positions)]  # what JeDiUNet returns
        return eps.reshape(-1, *eps.shape[2:])


def _inputs(B=2, R=2, dtype=torch.float64):
    refs = torch.randn(R, 4, 4, 4, dtype=dtype)
    ctx = torch.randn(B, 5, 8, dtype=dtype)
    null = torch.randn(5, 8, dtype=dtype)
    return refs, ctx, null


@pytest.mark.parametrize("strategy, l1, l2", [("joint", 3.0, None), ("text_only", 2.0, 2.0), ("text_first", 2.0, 4.0),
                                               ("image_first", 2.0, 4.0)])
def test_one_unet_call_per_step_with_branch_major_stacking(strategy, l1, l2):
    B, R, K = 2, 2, 3
    G = R + K
    refs, ctx, null = _inputs(B, R)
    unet = FakeUNet()
    steps = 4
    gen = torch.Generator().manual_seed(7)
    out = personalize(unet, refs, ctx, null, num_targets=K, steps=steps, strategy=strategy, l1=l1, l2=l2,
                      generator=gen, progress=False)
    assert out.shape == (B, K, 4, 4, 4) and out.dtype == torch.float64
    assert len(unet.calls) == len(uniform_timesteps(steps))
    branches = STRATEGIES[strategy]
    nb = len(branches)
    g = torch.Generator().manual_seed(7)
    torch.randn(B * K, 4, 4, 4, generator=g, dtype=torch.float64)  # the targets' initial noise comes first
    ref_noise = torch.randn(B * R, 4, 4, 4, generator=g, dtype=torch.float64).view(B, R, 4, 4, 4)
    for c in unet.calls:
        t = int(c["t"][0])
        assert c["set_size"] == G and c["x_t"].shape[0] == nb * B * G and (c["t"] == t).all()
        assert c["out_positions"] == tuple(range(R, G))  # the targets' eps only
        assert c["ng_mask"].tolist() == ([False] * R + [True] * K) * nb * B
        x_t = c["x_t"].view(nb, B, G, 4, 4, 4)
        x0 = c["x0"].view(nb, B, G, 4, 4, 4)
        ctx_in = c["context"].view(nb, B, G, 5, 8)
        for b in range(1, nb):
            assert torch.equal(x_t[b], x_t[0])  # every branch denoises the same state
        want_ref = math.sqrt(abar(t)) * refs + math.sqrt(1 - abar(t)) * ref_noise  # fixed noise, re-noised at t
        assert_close_verbose(x_t[0, :, :R], want_ref, atol=1e-12, name="references' x_t")
        for b, (keep_txt, keep_ref) in enumerate(branches):
            assert torch.equal(x0[b, :, :R], refs.expand(B, R, 4, 4, 4) if keep_ref else torch.zeros(B, R, 4, 4, 4,
                                                                                               dtype=torch.float64))
            assert (x0[b, :, R:] == 0).all()
            for s in range(B):
                assert (ctx_in[b, s] == (ctx[s] if keep_txt else null)).all(), (b, s)


@pytest.mark.parametrize("strategy, l1, l2", [("joint", 3.0, 3.0), ("text_only", 2.5, None), ("text_first", 2.0, 4.0),
                                               ("image_first", 2.0, 4.0)])
def test_guidance_combines_the_branches_as_eq_1(strategy, l1, l2):
    """One DDIM step to the clean image: out = (x - sqrt(1-a) eps_guided) / sqrt(a), with each branch's eps
    recomputed here from its own (text, references) condition."""
    B, R, K, t = 2, 1, 2, 501
    G = R + K
    refs, ctx, null = _inputs(B, R)
    out = personalize(FakeUNet(), refs, ctx, null, num_targets=K, timesteps=[t], strategy=strategy, l1=l1, l2=l2,
                      generator=torch.Generator().manual_seed(3), progress=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B * K, 4, 4, 4, generator=g, dtype=torch.float64).view(B, K, 4, 4, 4)
    ref_noise = torch.randn(B * R, 4, 4, 4, generator=g, dtype=torch.float64).view(B, R, 4, 4, 4)
    a = abar(t)
    xt_ref = math.sqrt(a) * refs.expand(B, R, 4, 4, 4) + math.sqrt(1 - a) * ref_noise
    xt = torch.cat([xt_ref, x], 1).view(B * G, 4, 4, 4)
    mask = torch.tensor([False] * R + [True] * K).repeat(B)

    def eps(text, ref):
        x0 = torch.cat([refs.expand(B, R, 4, 4, 4) * ref, torch.zeros(B, K, 4, 4, 4, dtype=torch.float64)], 1)
        c = (ctx if text else null.expand(B, 5, 8)).repeat_interleave(G, 0)
        e = FakeUNet()(xt, torch.full((B * G,), t), c, x0=x0.view(B * G, 4, 4, 4), ng_mask=mask, set_size=G)
        return e.view(B, G, 4, 4, 4)[:, R:]

    e0, ef = eps(False, False), eps(True, True)
    want = {"joint": e0 + l1 * (ef - e0),
            "text_only": eps(False, True) + l1 * (ef - eps(False, True)),
            "text_first": guided_eps(e0, eps(False, True), ef, l1, l2 or l1),
            "image_first": guided_eps(e0, eps(True, False), ef, l1, l2 or l1)}[strategy]
    assert_close_verbose(out, (x - math.sqrt(1 - a) * want) / math.sqrt(a), atol=1e-10, name=strategy)


def test_references_untouched_and_only_targets_returned():
    refs, ctx, null = _inputs(B=1, R=3)
    keep = refs.clone()
    out = personalize(FakeUNet(), refs, ctx, null, num_targets=2, steps=3, sampler="dpmpp_2m", progress=False)
    assert torch.equal(refs, keep)
    assert out.shape == (1, 2, 4, 4, 4)
    refs5 = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)  # per-set references
    keep = refs5.clone()
    out = personalize(FakeUNet(), refs5, torch.randn(2, 5, 8, dtype=torch.float64), null, num_targets=1, steps=2,
                      progress=False)
    assert torch.equal(refs5, keep) and out.shape == (2, 1, 4, 4, 4)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_determinism_with_seeds(sampler):
    refs, ctx, null = _inputs()

    def run(seed):
        return personalize(FakeUNet(), refs, ctx, null, num_targets=2, steps=3, sampler=sampler, strategy="text_first",
                           l1=2.0, l2=3.0, eta=0.5 if sampler == "ddim" else 0.0,
                           generator=torch.Generator().manual_seed(seed), progress=False)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_set_mask_is_passed_through():
    refs, ctx, null = _inputs(B=1, R=1)
    unet = FakeUNet()
    sm = torch.eye(3, dtype=torch.bool)
    personalize(unet, refs, ctx, null, num_targets=2, steps=1, set_mask=sm, progress=False)
    assert unet.calls[0]["set_mask"] is sm


@pytest.mark.parametrize("edit, match", [
    (dict(refs=torch.randn(0, 4, 4, 4)), "no references"),
    (dict(refs=torch.randn(4, 4, 4)), "refs_latents"),
    (dict(num_targets=0), "num_targets"),
    (dict(num_targets=1.5), "num_targets"),
    (dict(strategy="image"), "strategy"),
    (dict(sampler="euler"), "sampler"),
    (dict(strategy="joint", l1=2.0, l2=3.0), "one guidance scale"),
    (dict(ctx=torch.randn(5, 8)), "context"),
    (dict(null=torch.randn(6, 8)), "null_context"),
    (dict(refs=torch.randn(3, 1, 4, 4, 4)), "refs_latents"),
])
def test_bad_inputs_raise_value_error(edit, match):
    refs, ctx, null = _inputs(dtype=torch.float32)
    args = dict(refs=refs, ctx=ctx, null=null, num_targets=1, strategy="joint", sampler="ddim", l1=2.0, l2=None)
    args.update(edit)
    with pytest.raises(ValueError, match=match):
        personalize(FakeUNet(), args["refs"], args["ctx"], args["null"], num_targets=args["num_targets"], steps=1,
                    strategy=args["strategy"], sampler=args["sampler"], l1=args["l1"], l2=args["l2"], progress=False)


def test_with_the_tiny_jedi_unet():
    """The real UNet: one call per step, determinism, and references that steer the generated images."""
    from jedi import JeDiUNet, UNetConfig

    torch.manual_seed(0)
    unet = JeDiUNet(UNetConfig.tiny(attn_backend="torch")).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():  # LDM's zero-initialised output layers would make eps = 0
                p.normal_(0, 0.05)
    calls = []
    unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    refs = torch.randn(1, 4, 8, 8)
    ctx, null = torch.randn(2, 3, 32), torch.zeros(3, 32)
    kw = dict(num_targets=1, steps=2, strategy="text_first", l1=2.0, l2=3.0, progress=False)
    a = personalize(unet, refs, ctx, null, generator=torch.Generator().manual_seed(0), **kw)
    assert calls == [3 * 2 * 2] * 2  # branches * B * G, once per step
    b = personalize(unet, refs, ctx, null, generator=torch.Generator().manual_seed(0), **kw)
    c = personalize(unet, refs + 1, ctx, null, generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (2, 1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)


class OldStyleUNet(FakeUNet):
    """A UNet without ``out_positions``: every image's eps."""

    def forward(self, x_t, t, context, *, x0, ng_mask, set_size, set_mask=None):
        return super().forward(x_t, t, context, x0=x0, ng_mask=ng_mask, set_size=set_size, set_mask=set_mask)


def test_a_unet_without_out_positions_gets_every_image_and_the_same_result():
    refs, ctx, null = _inputs(B=2, R=2)
    kw = dict(num_targets=2, steps=2, strategy="text_first", l1=2.0, l2=3.0, progress=False)
    new, old = FakeUNet(), OldStyleUNet()
    a = personalize(new, refs, ctx, null, generator=torch.Generator().manual_seed(0), **kw)
    b = personalize(old, refs, ctx, null, generator=torch.Generator().manual_seed(0), **kw)
    assert new.calls[0]["out_positions"] == (2, 3) and old.calls[0]["out_positions"] is None
    assert torch.equal(a, b)


def test_takes_out_positions():
    from jedi import JeDiUNet
    from jedi.sampling import takes_out_positions

    assert takes_out_positions(FakeUNet()) and not takes_out_positions(OldStyleUNet())
    assert takes_out_positions(lambda *a, **kw: None) and not takes_out_positions(lambda x, t, c: None)
    from jedi.unet import UNetConfig

    unet = JeDiUNet(UNetConfig.tiny())
    assert takes_out_positions(unet)
    assert takes_out_positions(torch.compile(unet, backend="eager"))
    assert not takes_out_positions(torch.compile(OldStyleUNet(), backend="eager"))

    class Graphed:  # what jedi.GraphedUNet looks like to the check: it forwards every keyword to .unet
        def __init__(self, unet):
            self.unet = unet

        def __call__(self, x_t, timesteps, context, **kwargs):
            return self.unet(x_t, timesteps, context, **kwargs)

    assert takes_out_positions(Graphed(unet)) and not takes_out_positions(Graphed(OldStyleUNet()))


def test_alphas_cumprod_copied_once_per_device():
    s = NoiseSchedule.scaled_linear()
    assert s.alphas_cumprod_on("cpu") is s.alphas_cumprod
    a = s.alphas_cumprod_on("meta")
    assert a.device.type == "meta" and s.alphas_cumprod_on(torch.device("meta")) is a
    s.alphas_cumprod.mul_(1.0)  # an in-place change (new version): copied again
    assert s.alphas_cumprod_on("meta") is not a
    s.alphas_cumprod = s.alphas_cumprod.clone()  # another tensor: copied again
    b = s.alphas_cumprod_on("meta")
    assert s.alphas_cumprod_on("meta") is b
    assert "_copies" not in repr(s)


def test_q_sample_range_check_can_be_skipped():
    s = NoiseSchedule.scaled_linear()
    x0, noise = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.randn(2, 4, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 999])
    assert torch.equal(s.q_sample(x0, t, noise), s.q_sample(x0, t, noise, check_range=False))
    with pytest.raises(ValueError, match="must lie in"):
        s.q_sample(x0, torch.tensor([0, 1000]), noise)


def test_sampling_steps_read_nothing_back_from_the_device():
    """A value read back from a device tensor (item, int(), tolist) waits for the GPU: the host could not queue the
    next step while this one runs. Count read-backs with a dispatch mode: besides the schedule's host-side table
    (abar_t as Python floats), the loop must add none per step (the setup's are fixed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    schedule = NoiseSchedule.scaled_linear()
    table = schedule.alphas_cumprod.untyped_storage().data_ptr()

    class ReadBacks(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "item"):
                self.n += args[0].untyped_storage().data_ptr() != table
            return func(*args, **(kwargs or {}))

    refs, ctx, null = _inputs(B=2, R=1)
    counts = {}
    for sampler in ("ddim", "dpmpp_2m"):
        for steps in (2, 5):
            with ReadBacks() as rb:
                personalize(FakeUNet(), refs, ctx, null, num_targets=1, steps=steps, sampler=sampler,
                            schedule=schedule, generator=torch.Generator().manual_seed(0), progress=False)
            counts[sampler, steps] = rb.n
    assert counts["ddim", 2] == counts["ddim", 5] and counts["dpmpp_2m", 2] == counts["dpmpp_2m", 5], counts


def test_personalize_without_a_schedule_shares_one_default(monkeypatch):
    """Calls that pass no schedule share one SD v1 schedule, so its device copy is made once per process, not once
    per call (a pageable host-to-device copy waits for the GPU); the shared table is SD v1's and stays unmodified."""
    from jedi import sampling

    made = []
    real = NoiseSchedule.scaled_linear.__func__

    def counting(cls, *a, **kw):
        made.append(1)
        return real(cls, *a, **kw)

    sampling._default_schedule.cache_clear()
    monkeypatch.setattr(NoiseSchedule, "scaled_linear", classmethod(counting))
    refs, ctx, null = _inputs(B=1, R=1)
    outs = [personalize(FakeUNet(), refs, ctx, null, num_targets=1, steps=2, progress=False,
                        generator=torch.Generator().manual_seed(0)) for _ in range(3)]
    assert len(made) == 1
    assert torch.equal(outs[0], outs[2])
    sampling._default_schedule.cache_clear()
    assert torch.equal(sampling._default_schedule().alphas_cumprod, real(NoiseSchedule).alphas_cumprod)


@pytest.mark.gpu
def test_gpu_graphed_sampling_loop_never_waits_for_the_device():
    """On the GPU with the UNet replayed as CUDA graphs: no step synchronizes with the device (torch's sync debug
    mode warns on every synchronizing call: the count must not grow with the number of steps), and after the first
    call no call does."""
    import warnings

    from jedi import JeDiUNet, UNetConfig
    from jedi.runtime import GraphedUNet
    from jedi.testing import randomize_weights_

    torch.manual_seed(0)
    unet = randomize_weights_(JeDiUNet(UNetConfig.tiny(attn_backend="torch"))).cuda().half().eval()
    graphed = GraphedUNet(unet)
    refs = torch.randn(1, 4, 8, 8, device="cuda", dtype=torch.float16)
    ctx, null = torch.randn(2, 3, 32, device="cuda", dtype=torch.float16), torch.zeros(3, 32, device="cuda")
    kw = dict(num_targets=1, strategy="text_first", l1=2.0, l2=3.0, progress=False)
    personalize(graphed, refs, ctx, null, steps=2, **kw)  # capture first
    counts = {}
    for steps in (2, 5):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                personalize(graphed, refs, ctx, null, steps=steps, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # (only the per-call warning: the first set_sync_debug_mode call also warns that the mode is a prototype
        # feature, and that message says "synchronization" too)
        counts[steps] = sum("called a synchronizing" in str(w.message) for w in caught)
    assert graphed.captures == 1
    assert counts[2] == counts[5], counts
    # and none per call either: on the H200 (2026-11-28) the only two were the set-position mask built from a list
    # and the schedule table's device copy, both gone since
    assert counts[5] == 0, counts
