"""JeDi training loop: config, the loss's conditioning drops, checkpoints, exact resume (incl. SIGKILL), DDP."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from jedi.schedule import NoiseSchedule
from jedi.synthetic import write_synthetic_dataset
from jedi.train import (Denoiser, PixelLatent, TrainConfig, apply_overrides, draw_randoms, jedi_loss,
                        latest_checkpoint, load_checkpoint, load_config, load_model, train)

REPO = Path(__file__).resolve().parents[2]
# a small, fast UNet: attention only at 8x8 (16 px input), one res block per level
SMALL = {"channel_mult": [1, 2], "attention_resolutions": [2], "num_res_blocks": 1}


def _cfg(tmp_path, **kw):
    base = dict(data=str(tmp_path / "data"), out=str(tmp_path / "run"), resolution=16, batch_size=2, max_steps=4,
                warmup_steps=2, lr=1e-3, log_every=1, ckpt_every=2, progress=False, deterministic=True,
                unet=dict(SMALL), text={"vocab_size": 64, "max_len": 8})
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    write_synthetic_dataset(d / "data", 8, 3, 16, seed=0)
    return d


def _csv_losses(path):
    with open(path) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


# ---- config ---------------------------------------------------------------------------------------------------
def test_config_yaml_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"lr": 3e-4, "batch_size": 2, "unet": {"model_channels": 64}}))
    cfg = load_config(f, ["max_steps=7", "unet.channel_mult=[1,2]", "adam_betas=[0.9,0.99]", "ema_decay=0",
                          "latent_cache=null", "grad_checkpointing=true"])
    assert cfg.lr == 3e-4 and cfg.batch_size == 2 and cfg.max_steps == 7 and cfg.ema_decay == 0.0
    assert cfg.unet == {"model_channels": 64, "channel_mult": [1, 2]} and cfg.adam_betas == (0.9, 0.99)
    assert cfg.grad_checkpointing is True and cfg.latent_cache is None


@pytest.mark.parametrize("override,match", [
    ("nope=1", "unknown TrainConfig key"),
    ("lr", "key=value"),
    ("batch_size=two", "expects int"),
    ("lr=__import__('os').system('true')", "expects float"),  # values are YAML data, never evaluated
    ("deterministic=1", "true/false"),
    ("lr.x=1", "not a dict field"),
    ("mixed_precision=fp8", "mixed_precision"),
])
def test_config_override_errors(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(TrainConfig(), [override])


# ---- one step -------------------------------------------------------------------------------------------------
class _Recorder(torch.nn.Module):
    """Stand-in denoiser: records its inputs, predicts eps = w * x_t."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x_t, t, captions=None, *, x0, ng_mask, set_size, context=None):
        self.seen = dict(x_t=x_t, t=t, captions=captions, x0=x0, ng_mask=ng_mask, set_size=set_size, context=context)
        return self.w * x_t


def test_timestep_power_favours_high_noise():
    t = draw_randoms(torch.Generator().manual_seed(0), 4000, 1, (1, 1, 1), TrainConfig(timestep_power=2.0))["t"]
    assert t.min() >= 0 and t.max() <= 999 and 0.45 < (t >= 750).float().mean() < 0.55  # uniform: 0.25


def test_draw_randoms_per_set():
    cfg = TrainConfig(p_drop_text=0.5, p_drop_ref=0.5)
    r = draw_randoms(torch.Generator().manual_seed(0), 64, 3, (4, 2, 2), cfg)
    assert r["noise"].shape == (192, 4, 2, 2) and r["ng_mask"].dtype == torch.bool
    for k in ("t", "drop_text", "drop_ref"):  # set-level draws are shared by the images of a set
        v = r[k].view(64, 3)
        assert (v == v[:, :1]).all(), k
    assert 0 < r["drop_text"].float().mean() < 1 and 0 < r["ng_mask"].float().mean() < 1
    t_img = draw_randoms(torch.Generator().manual_seed(0), 64, 3, (4, 2, 2), TrainConfig(timestep_per="image"))["t"]
    assert not (t_img.view(64, 3) == t_img.view(64, 3)[:, :1]).all()


def test_jedi_loss_drops_and_weights():
    G, B = 3, 4
    x0 = torch.randn(B * G, 4, 2, 2)
    caps = [f"cap {i}" for i in range(B * G)]
    rnd = draw_randoms(torch.Generator().manual_seed(1), B, G, (4, 2, 2), TrainConfig())
    rnd["drop_text"] = torch.tensor([1, 0, 0, 1]).bool().repeat_interleave(G)
    rnd["drop_ref"] = torch.tensor([0, 1, 0, 1]).bool().repeat_interleave(G)
    m = _Recorder()
    s, w = jedi_loss(m, NoiseSchedule.scaled_linear(), x0, caps, G, rnd, TrainConfig())
    seen = m.seen
    assert seen["captions"] == ["" if rnd["drop_text"][i] else caps[i] for i in range(B * G)]
    assert (seen["x0"][rnd["drop_ref"]] == 0).all()
    torch.testing.assert_close(seen["x0"][~rnd["drop_ref"]], x0[~rnd["drop_ref"]])
    assert seen["ng_mask"] is rnd["ng_mask"] and seen["set_size"] == G and float(w) == B * G
    torch.testing.assert_close(seen["x_t"], NoiseSchedule.scaled_linear().q_sample(x0, rnd["t"], rnd["noise"]))
    expected = ((0.5 * seen["x_t"] - rnd["noise"]) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(s, expected.sum())
    s_m, w_m = jedi_loss(m, NoiseSchedule.scaled_linear(), x0, caps, G, rnd, TrainConfig(loss_on="masked"))
    torch.testing.assert_close(s_m, (expected * rnd["ng_mask"]).sum())
    assert float(w_m) == rnd["ng_mask"].sum()
    s_v, _ = jedi_loss(m, NoiseSchedule.scaled_linear(), x0, caps, G, rnd, TrainConfig(loss_weighting="v"))
    abar = NoiseSchedule.scaled_linear().alphas_cumprod[rnd["t"]].float()
    torch.testing.assert_close(s_v, (expected / abar).sum())


def test_jedi_loss_cached_context_drop():
    G = 2
    rnd = draw_randoms(torch.Generator().manual_seed(0), 2, G, (4, 2, 2), TrainConfig())
    rnd["drop_text"] = torch.tensor([1, 1, 0, 0]).bool()
    ctx, null = torch.randn(4, 3, 5), torch.randn(1, 3, 5)
    m = _Recorder()
    jedi_loss(m, NoiseSchedule.scaled_linear(), torch.randn(4, 4, 2, 2), None, G, rnd, TrainConfig(), ctx, null)
    torch.testing.assert_close(m.seen["context"][:2], null.expand(2, 3, 5))
    torch.testing.assert_close(m.seen["context"][2:], ctx[2:])


def test_v_prediction_returns_eps():
    s = NoiseSchedule.scaled_linear()
    x0, eps, t = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2), torch.tensor([0, 10, 500, 900, 999, 3])
    a = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0

    class VUNet(torch.nn.Module):
        def forward(self, x_t, t, context, *, x0, ng_mask, set_size):
            return v

    d = Denoiser(VUNet(), None, "v")
    out = d(s.q_sample(x0, t, eps), t, x0=x0, ng_mask=torch.ones(6), set_size=3, context=torch.zeros(6, 1, 1))
    torch.testing.assert_close(out, eps, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prediction"):
        Denoiser(VUNet(), None, "x0")


def test_pixel_latent():
    lat = PixelLatent(2)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z = lat.encode(x)
    assert z.shape == (2, 4, 4, 4)
    torch.testing.assert_close(z[:, 3], z[:, :3].mean(1))
    torch.testing.assert_close(PixelLatent(1).decode(PixelLatent(1).encode(x)), x)


# ---- the loop -------------------------------------------------------------------------------------------------
def test_train_checkpoint_and_resume_exact(tmp_path, data_dir):
    full = train(_cfg(data_dir, out=str(tmp_path / "full"), max_steps=6, ckpt_every=3))
    assert sorted(full.losses) == list(range(1, 7)) and all(torch.isfinite(torch.tensor(list(full.losses.values()))))
    ck = latest_checkpoint(tmp_path / "full")
    assert ck.name == "step_0000006" and {p.name for p in ck.iterdir()} == {"model.safetensors", "ema.safetensors",
                                                                          "state.pt"}
    assert load_checkpoint(ck)["step"] == 6
    part = train(_cfg(data_dir, out=str(tmp_path / "part"), max_steps=3, ckpt_every=3))
    assert [part.losses[s] for s in (1, 2, 3)] == [full.losses[s] for s in (1, 2, 3)]
    rest = train(_cfg(data_dir, out=str(tmp_path / "part"), max_steps=6, ckpt_every=3), resume=True)
    assert sorted(rest.losses) == [4, 5, 6]
    assert [rest.losses[s] for s in (4, 5, 6)] == [full.losses[s] for s in (4, 5, 6)]
    assert _csv_losses(tmp_path / "part" / "log.csv") == _csv_losses(tmp_path / "full" / "log.csv")
    for (k, a), b in zip(full.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), k
    for k, v in full.ema.shadow.items():
        assert torch.equal(v, rest.ema.shadow[k]), k
    loaded = load_model(latest_checkpoint(tmp_path / "part"))  # rebuilt from the saved config, EMA weights
    for k, p in loaded.named_parameters():
        assert torch.equal(p, full.ema.shadow[k]), k
    with pytest.raises(ValueError, match="earlier run"):  # a fresh run never mixes with old checkpoints
        train(_cfg(data_dir, out=str(tmp_path / "part"), max_steps=1))


def test_grad_accum_checkpointing_bf16_masked(tmp_path, data_dir):
    base = train(_cfg(data_dir, out=str(tmp_path / "a"), max_steps=2, grad_accum=2, loss_on="masked",
                      timestep_per="image"))
    gc = train(_cfg(data_dir, out=str(tmp_path / "b"), max_steps=2, grad_accum=2, loss_on="masked",
                    timestep_per="image", grad_checkpointing=True))
    assert base.model.unet.gradient_checkpointing is False and gc.model.unet.gradient_checkpointing is True
    for s in (1, 2):  # recomputation in backward changes nothing
        assert abs(base.losses[s] - gc.losses[s]) < 1e-6
    bf = train(_cfg(data_dir, out=str(tmp_path / "c"), max_steps=2, mixed_precision="bf16"))
    assert all(torch.isfinite(torch.tensor(list(bf.losses.values()))))


def test_fp16_needs_cuda(tmp_path, data_dir):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train(_cfg(data_dir, out=str(tmp_path / "r"), max_steps=1, mixed_precision="fp16", device="cpu"))


@pytest.mark.gpu
def test_fp16_cuda(tmp_path, data_dir):
    r = train(_cfg(data_dir, out=str(tmp_path / "r"), max_steps=3, mixed_precision="fp16", device="cuda"))
    assert all(torch.isfinite(torch.tensor(list(r.losses.values()))))


def test_train_from_latent_cache(tmp_path, data_dir):
    from jedi.data import ImageSetDataset, cache_latents

    ds = ImageSetDataset(data_dir / "data", 16)
    cache_latents(ds, tmp_path / "cache", PixelLatent(1), lambda caps: torch.randn(len(caps), 4, 32))
    r = train(_cfg(data_dir, out=str(tmp_path / "r"), max_steps=2, latent_cache=str(tmp_path / "cache")))
    assert r.model.text is None and len(r.losses) == 2


# ---- processes: SIGKILL + resume, DDP ---------------------------------------------------------------------------
def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _train_cmd(data, out, steps, *extra):
    sets = ["data=" + str(data), "out=" + str(out), f"max_steps={steps}", "batch_size=2", "resolution=16",
            "log_every=1", "ckpt_every=3", "keep_checkpoints=0", "deterministic=true", "progress=false",
            "warmup_steps=2", "lr=1e-3", "text.vocab_size=64", "text.max_len=8",
            "unet.channel_mult=[1,2]", "unet.attention_resolutions=[2]", "unet.num_res_blocks=1", *extra]
    return [sys.executable, "-m", "jedi.cli", "train"] + [a for s in sets for a in ("--set", s)]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, data_dir):
    data, steps = data_dir / "data", 30
    subprocess.run(_train_cmd(data, tmp_path / "full", steps), env=_env(), check=True, timeout=300)
    want = _csv_losses(tmp_path / "full" / "log.csv")
    assert sorted(want) == list(range(1, steps + 1))

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, out, steps), env=_env())
    deadline = time.time() + 240
    while time.time() < deadline:  # kill as soon as a checkpoint past step 3 exists
        ck = latest_checkpoint(out)
        if ck is not None and ck.name >= "step_0000006":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = latest_checkpoint(out)
    killed_at = int(done.name.split("_")[1])
    assert killed_at < steps
    subprocess.run(_train_cmd(data, out, steps) + ["--resume"], env=_env(), check=True, timeout=300)
    got = _csv_losses(out / "log.csv")
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want, f"resumed from step {killed_at}: losses differ"


def test_ddp_two_processes_match_single(tmp_path, data_dir):
    data = data_dir / "data"
    single = _train_cmd(data, tmp_path / "single", 2, "batch_size=4", "ema_decay=0")
    subprocess.run(single, env=_env(), check=True, timeout=300)
    ddp = _train_cmd(data, tmp_path / "ddp", 2, "batch_size=2", "ema_decay=0")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run(launcher + ddp[1:], env=_env(), check=True, timeout=300)
    from safetensors.torch import load_file

    a = load_file(str(latest_checkpoint(tmp_path / "single") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ddp") / "model.safetensors"))
    # AdamW's first steps move each weight by about +-lr (1e-3) whatever the gradient's size, so float-summation
    # noise (2 partial sums vs 1) in near-zero gradients shows up as ~1e-6 of the weights: 2e-5 is 2% of one step
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=lambda m: f"{k}: {m}")
    la, lb = _csv_losses(tmp_path / "single" / "log.csv"), _csv_losses(tmp_path / "ddp" / "log.csv")
    assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) < 1e-5 for s in la)


def test_cli_train_config_file(tmp_path, data_dir, capsys):
    from jedi.cli import main

    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"max_steps": 1, "batch_size": 2, "progress": False, "unet": SMALL,
                                 "text": {"vocab_size": 64, "max_len": 8}}))
    out = tmp_path / "1"  # a folder named like a number stays a path
    assert main(["train", "--config", str(f), "--data", str(data_dir / "data"), "--out", str(out),
                 "--set", "lr=1e-3"]) == 0
    assert "trained to step 1" in capsys.readouterr().out and latest_checkpoint(out).name == "step_0000001"
    assert main(["train", "--config", str(f), "--out", str(out)]) == 2  # no data
