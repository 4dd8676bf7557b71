"""``jedi demo --quick`` end to end, the sampler, and the identity feature."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from jedi.cli import main
from jedi.demo import retrieval_accuracy, subject_feature
from jedi.schedule import NoiseSchedule, ddim_sample, ddim_timesteps
from jedi.synthetic import Scene, Subject, make_scene, make_subject, render

KEYS = {"jedi_accuracy", "baseline_accuracy", "chance", "real_accuracy", "K", "n_generated", "final_loss",
        "train_wall_s", "sample_wall_s", "total_wall_s", "config"}


def test_demo_quick_cli(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert KEYS <= set(m)
    assert 0 <= m["jedi_accuracy"] <= 1 and 0 <= m["baseline_accuracy"] <= 1
    assert m["chance"] == 1 / m["K"] and m["n_generated"] == m["K"] * m["config"]["reps"] * 2
    grid = Image.open(tmp_path / "grid.png")
    rows = m["K"] * m["config"]["reps"]
    assert grid.size[1] > rows * 16 and grid.size[0] > 5 * 16  # ref | 2 generated | 2 baseline per row
    assert (tmp_path / "run" / "log.csv").is_file() and "jedi_accuracy" in capsys.readouterr().out


def test_schedule_matches_sd():
    s = NoiseSchedule.scaled_linear()
    assert s.num_steps == 1000
    assert abs(float(s.betas[0]) - 0.00085) < 1e-12 and abs(float(s.betas[-1]) - 0.012) < 1e-12
    assert abs(float(s.alphas_cumprod[-1]) - 0.0046601) < 1e-6  # SD v1's final alpha-bar (diffusers: 0.004660)
    assert ddim_timesteps(4) == [999, 749, 499, 249] and ddim_timesteps(1000)[-1] == 0
    x0, n = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(s.q_sample(x0, torch.zeros(3, dtype=torch.long), n),
                               (1 - 0.00085) ** 0.5 * x0 + 0.00085**0.5 * n)


class _Oracle(torch.nn.Module):
    """Predicts the exact noise for a known clean target: DDIM must then return the target."""

    def __init__(self, target, schedule):
        super().__init__()
        self.target, self.s = target, schedule

    def forward(self, x_t, t, context, *, x0, ng_mask, set_size):
        assert (x0[ng_mask] == 0).all()  # images to generate never leak content
        a = self.s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.target) / (1 - a).sqrt()


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddim_recovers_target_and_returns_generated_only(guidance):
    s = NoiseSchedule.scaled_linear()
    target = torch.randn(4, 4, 2, 2)
    mask = torch.tensor([False, True, True, True])
    oracle = _Oracle(target.repeat(1 if guidance == 1.0 else 2, 1, 1, 1), s)  # guidance runs a 2N batch
    out = ddim_sample(oracle, s, torch.zeros(4, 1, 3), x0=target, ng_mask=mask, set_size=2, steps=10,
                      generator=torch.Generator().manual_seed(0), image_guidance=guidance)
    assert out.shape == (3, 4, 2, 2)
    torch.testing.assert_close(out, target[mask], rtol=1e-4, atol=1e-4)


def test_feature_identifies_real_renders():
    rng = random.Random(3)
    subjects = [make_subject(rng) for _ in range(6)]
    protos = np.stack([np.mean([subject_feature(np.asarray(render(s, make_scene(rng, s), 16))) for _ in range(8)], 0)
                       for s in subjects])
    feats = np.stack([subject_feature(np.asarray(render(s, make_scene(rng, s), 16)))
                      for s in subjects for _ in range(4)])
    assert retrieval_accuracy(feats, np.repeat(np.arange(6), 4), protos) >= 0.8
    flat = subject_feature(np.asarray(render(Subject("circle", "solid", "red", "red", "none", "red"),
                                             Scene(0.5, 0.5, 0.3, "grey"), 16)))
    assert flat[0] > 0.9  # the palette order starts with red
    assert not subject_feature(np.zeros((16, 16, 3), np.uint8)).any()  # no foreground: zero feature
