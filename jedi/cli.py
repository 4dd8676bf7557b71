"""The ``jedi`` command: ``jedi synth``, ``jedi train``, ``jedi demo``, ``jedi sample``, ``jedi eval``.

    jedi synth --out data/ --sets 512 --set-size 3 --resolution 16 [--seed 0]
    jedi train [--config run.yaml] [--set key=value ...] [--resume]
    torchrun --nproc_per_node 2 -m jedi.cli train --config run.yaml        # DDP (gloo on CPU, nccl on CUDA)
    jedi demo --out demo/ [--quick]
    jedi sample --refs a.png b.png --prompt "..." --ckpt sd-v1-5.safetensors --tokenizer DIR --out DIR
    jedi eval ...                                                           # CLIP-T/I, DINO, M-variants
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

__all__ = ["main", "build_parser"]

# subcommands with their own full argparse parsers (``jedi sample --help`` shows theirs)
DELEGATED = {"sample": ("jedi.pipeline", "sample_main"), "eval": ("jedi.metrics", "eval_main")}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``jedi`` (subcommands synth, train, demo; sample and eval are delegated)."""
    p = argparse.ArgumentParser(prog="jedi", description="JeDi: joint-image diffusion for personalization")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write synthetic same-subject image sets (seed's format)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--sets", type=int, required=True, help="number of sets (subjects)")
    s.add_argument("--set-size", type=int, default=3, help="images per set (G)")
    s.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="train a JeDi UNet on a folder of image sets")
    t.add_argument("--config", help="YAML file of TrainConfig fields")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (repeatable), e.g. --set lr=3e-4 --set unet.model_channels=64")
    t.add_argument("--data", help="shortcut for --set data=DIR")
    t.add_argument("--out", help="shortcut for --set out=DIR")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out/checkpoints")

    d = sub.add_parser("demo", help="train a tiny JeDi on synthetic sets on the CPU and personalize unseen subjects")
    d.add_argument("--out", required=True, help="output folder (grid.png, metrics.json, data/, run/)")
    d.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (seconds; metrics not meaningful)")
    d.add_argument("--steps", type=int, help="training steps (default: the DemoConfig's)")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    d.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    d.add_argument("--seed", type=int, default=0)

    sub.add_parser("sample", add_help=False, help="personalize: sample a set's new images from reference images "
                   "with an SD v1 checkpoint (jedi sample --help)")
    sub.add_parser("eval", add_help=False, help="CLIP-T, CLIP-I, MCLIP-I, DINO, MDINO of generated images "
                   "(jedi eval --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jedi`` console script. Returns the exit status (0 on success)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        module, fn = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), fn)(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from jedi.synthetic import write_synthetic_dataset

        write_synthetic_dataset(args.out, args.sets, args.set_size, args.resolution, seed=args.seed)
        print(f"wrote {args.sets} sets of {args.set_size} images ({args.resolution} px) to {args.out}")
    elif args.command == "train":
        from jedi.train import apply_overrides, load_config, train

        cfg = load_config(args.config, args.set)
        # paths are taken verbatim (not YAML-parsed: a folder named "1" or "null" stays a string)
        cfg = apply_overrides(cfg, {k: v for k, v in (("data", args.data), ("out", args.out)) if v})
        if not cfg.data and not cfg.latent_cache:
            print("jedi train: no data: pass --data DIR or --set data=DIR (or data: in --config)", file=sys.stderr)
            return 2
        r = train(cfg, resume=args.resume)
        if r.losses:
            last = max(r.losses)
            print(f"trained to step {last}: loss {r.losses[last]:.4f}; checkpoint {r.checkpoint}")
    elif args.command == "demo":
        from jedi.demo import DemoConfig, run_demo

        cfg = DemoConfig.quick() if args.quick else DemoConfig()
        cfg.threads, cfg.device, cfg.seed = args.threads, args.device, args.seed
        if args.steps:
            cfg.steps = args.steps
        m = run_demo(args.out, cfg)
        print(json.dumps({k: v for k, v in m.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
