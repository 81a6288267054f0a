"""The `vitlab` command: train, eval, predict, info."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from vitlab.errors import VitlabError


def add_data_options(p: argparse.ArgumentParser):
    p.add_argument("--data-root", help="where CIFAR is downloaded to / looked for (default: ./data)")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="skip unreadable images in folders (and count them) instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlab", description="Train and use Vision Transformers on small image datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a ViT (or resume a run)")
    p.add_argument("--preset", help="a named config: smoke, tutorial-cpu, tutorial-gpu, ...")
    p.add_argument("--config", type=Path, help="a YAML file with sections model/data/optim/trainer")
    p.add_argument("--data", help="cifar10, cifar100, fake or folder:PATH")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--max-time", help="stop after this wall time, HH:MM:SS")
    p.add_argument("--run-dir", type=Path, help="where the run is written (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from last.ckpt")
    p.add_argument("--seed", type=int)
    p.add_argument("--val-fraction", type=float, help="held-out fraction when the source has no validation split")
    add_data_options(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")

    p = sub.add_parser("eval", help="accuracy, loss and per-class accuracy of a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", required=True, help="cifar10, cifar100 (test split), fake, or folder:PATH (every image)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_options(p)

    p = sub.add_parser("predict", help="top-k classes of images")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON line per image")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")

    p = sub.add_parser("info", help="parameters and FLOPs per image of a preset or checkpoint")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset")
    group.add_argument("--checkpoint", type=Path)
    return parser


def flag_values(args, sections=("data", "trainer")) -> dict:
    """The config values set by CLI flags, as {section: {key: value}} (flags not given are left out)."""
    flags = {
        "data": {
            "source": getattr(args, "data", None),
            "root": args.data_root,
            "skip_bad_images": args.skip_bad_images,
            "val_fraction": getattr(args, "val_fraction", None),
        },
        "trainer": {
            "max_epochs": getattr(args, "max_epochs", None),
            "max_time": getattr(args, "max_time", None),
            "seed": getattr(args, "seed", None),
        },
    }
    return {s: {k: v for k, v in flags[s].items() if v is not None} for s in sections}


def cmd_train(args):
    from vitlab import config as configs
    from vitlab.training.run import train

    if args.resume:
        if args.run_dir is None:
            raise VitlabError("--resume needs --run-dir (the run to continue)")
        if args.preset or args.config or args.overrides or args.data or args.seed is not None:
            raise VitlabError("--resume continues the run's saved config; only --max-epochs/--max-time may change")
        config = configs.load(args.run_dir / "config.yaml")
        length = {k: v for k, v in flag_values(args, ["trainer"])["trainer"].items() if k.startswith("max_")}
        config = configs.apply(config, {"trainer": length}, "--max-epochs/--max-time")
    else:
        config = configs.resolve(args.preset, args.config, flag_values(args), args.overrides)
    run_dir = args.run_dir or Path("runs") / f"{args.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    last = train(config, run_dir, resume=args.resume)
    print(f"run written to {run_dir} (last checkpoint: {last})")


def cmd_eval(args):
    from vitlab import config as configs
    from vitlab.data.datamodule import load_eval_set
    from vitlab.evaluation import evaluate
    from vitlab.inference import load_model

    model = load_model(args.checkpoint)
    data = configs.resolve(flags=flag_values(args, ["data"])).data
    image_set = load_eval_set(args.data, data, model.config.image_size, model.class_names)
    result = evaluate(model, image_set)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.data}: {result['n']} images, accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")
    width = max(map(len, result["per_class"]))
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")


def cmd_predict(args):
    from vitlab.inference import expand_image_paths, load_model, predict

    if args.top_k < 1:
        raise VitlabError(f"--top-k must be at least 1, not {args.top_k}")
    model = load_model(args.checkpoint)
    for result in predict(model, expand_image_paths(args.images), args.top_k):
        if args.json:
            print(json.dumps(result))
        else:
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
            print(f"{result['path']}: {top}")


def cmd_info(args):
    from vitlab import config as configs
    from vitlab.inference import load_model
    from vitlab.model import ViT

    if args.checkpoint:
        model, what = load_model(args.checkpoint), str(args.checkpoint)
    else:
        model, what = ViT(configs.resolve(args.preset).model), f"preset {args.preset}"
    c = model.config
    print(f"{what}: ViT dim {c.dim}, depth {c.depth}, heads {c.heads}, {c.tokenizer} tokenizer, patch {c.patch_size}, "
          f"{c.pool} pooling, image {c.image_size}, {c.num_patches} tokens, {c.num_classes} classes")
    print(f"parameters: {model.num_parameters():,}")
    print(f"forward FLOPs per image: {model.flops_per_image() / 1e9:.3f} GFLOP")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # num_workers=0 is deliberate for in-memory data; Lightning's advice about it is noise here.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    try:
        COMMANDS[args.command](args)
    except VitlabError as e:
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
