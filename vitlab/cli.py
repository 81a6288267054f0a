"""The `vitlab` command: train, eval, predict, info, attention, plot, export, demo, pack."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
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
    p.add_argument("--preset", help="a named config: cpu-hour, gpu-5min, smoke, ...; or auto: planned from the "
                                    "data, this machine and the budget (the default without --config or key=value)")
    p.add_argument("--config", type=Path, help="a YAML file with sections model/data/optim/trainer")
    p.add_argument("--data", help="cifar10, cifar100, fake[:N] or folder:PATH")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--max-time", help="stop after this wall time, HH:MM:SS")
    p.add_argument("--run-dir", type=Path, help="where the run is written (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from last.ckpt (the same command plus --resume; "
                        "only --max-epochs/--max-time may change)")
    p.add_argument("--seed", type=int)
    p.add_argument("--accelerator", help="cpu, gpu or auto (default: auto)")
    p.add_argument("--devices", type=lambda v: v if v == "auto" else int(v), metavar="N|auto",
                   help="training processes per machine, one per GPU (default 1); more train with DDP")
    p.add_argument("--num-nodes", type=int, help="machines (default 1); launch with torchrun or SLURM (docs/distributed.md)")
    p.add_argument("--val-fraction", type=float, help="held-out fraction when the source has no validation split")
    add_data_options(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")

    p = sub.add_parser("eval", help="accuracy, loss and per-class accuracy of a checkpoint")
    scored = p.add_mutually_exclusive_group(required=True)
    scored.add_argument("--checkpoint", type=Path, help="a vitlab checkpoint, safetensors export or Hub folder export")
    scored.add_argument("--onnx", type=Path, help="an ONNX export (fp32 or int8), run with onnxruntime")
    p.add_argument("--data", required=True, help="cifar10, cifar100 (test split), fake[:N], or folder:PATH (every image)")
    p.add_argument("--held-out", action="store_true",
                   help="score only the part of --data that training holds out for validation")
    p.add_argument("--val-fraction", type=float, help="the held-out fraction the run trained with (default 0.1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="write confusion matrix, per-class accuracy and worst-error figures and report.json")
    p.add_argument("--tta", default="none", metavar="none|flip|flip-shift",
                   help="test-time augmentation: average the logits of each image and its mirror image (flip), "
                        "and of both translated up-left and down-right by a sixteenth of the side, 2 px at 32 (flip-shift)")
    add_data_options(p)

    p = sub.add_parser("predict", help="top-k classes of images")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a vitlab checkpoint, safetensors export or Hub folder export")
    source.add_argument("--onnx", type=Path, help="an ONNX export, run with onnxruntime")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON line per image")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files, folders, or shards:DIR_OR_URL packs")

    p = sub.add_parser("attention", help="attention rollout and per-layer attention over images")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("attention.png"))
    p.add_argument("images", nargs="+", metavar="IMAGE")

    p = sub.add_parser("plot", help="learning curves of a run from RUN_DIR/metrics.csv")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="default: RUN_DIR/curves.png")

    p = sub.add_parser("export", help="export a checkpoint to ONNX, safetensors or a Hugging Face Hub folder")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--format", required=True,
                   help="onnx, safetensors, or hf: a Hub model folder (config.json, model.safetensors, README.md) "
                        "that timm loads for a plain ViT")
    p.add_argument("--out", type=Path, required=True, help="the file to write; for hf, a new or empty folder")
    p.add_argument("--quantize", metavar="int8",
                   help="onnx only: int8 weights and activations (onnxruntime static quantization), "
                        "calibrated on training images of --calibrate")
    p.add_argument("--calibrate", metavar="SOURCE",
                   help="the data source (cifar10, folder:PATH, shards:DIR, fake:N) whose training images "
                        "calibrate --quantize; a run's own source keeps its held-out images out")
    p.add_argument("--calibrate-images", type=int, default=512, metavar="N",
                   help="how many training images calibrate --quantize (default 512)")
    add_data_options(p)

    p = sub.add_parser("pack", help="write a source's images as LitData chunks, to train on with --data shards:DIR")
    p.add_argument("source", help="cifar10, cifar100, fake[:N] or folder:PATH")
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder for the chunks and vitlab.json")
    p.add_argument("--image-size", type=int, default=32, help="side of the stored images in pixels (default 32)")
    p.add_argument("--split", choices=["train", "test"], default="train", help="which part of CIFAR to pack")
    p.add_argument("--jpeg-quality", type=int, help="store re-encoded images as JPEG at this quality (1-95), not PNG")
    p.add_argument("--workers", type=int, default=1, help="processes that encode images (default 1)")
    add_data_options(p)

    p = sub.add_parser("demo", help="a local web page: drop an image, see the top classes and the attention")
    p.add_argument("--checkpoint", type=Path, required=True, help="a vitlab checkpoint, safetensors export or Hub folder export")
    p.add_argument("--examples", type=Path, metavar="DIR", help="a folder of images to show as clickable examples")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", default="none", choices=["none", "gradio"],
                   help="gradio: also open a public gradio.live link (needs the internet)")

    p = sub.add_parser("info", help="parameters and FLOPs per image of a preset or checkpoint; the plan of a run")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="a named config, or auto: the plan of `vitlab train --preset auto` with "
                                        "--data and --max-time or --max-epochs (it measures this machine's speed)")
    group.add_argument("--checkpoint", type=Path)
    p.add_argument("--data", help="with --preset auto: the data to plan for")
    p.add_argument("--max-time", help="with --preset auto: the time budget, HH:MM:SS")
    p.add_argument("--max-epochs", type=int, help="with --preset auto: the epoch budget")
    p.add_argument("--val-fraction", type=float, help="with --preset auto: the held-out fraction")
    p.add_argument("--accelerator", default="auto", choices=["cpu", "gpu", "auto"],
                   help="with --preset auto: where the plan's run would train (default: auto)")
    return parser


def data_flag_values(args) -> dict:
    """The data config set by the shared data flags, as {"data": {key: value}} (flags not given left out)."""
    values = {"root": args.data_root, "skip_bad_images": args.skip_bad_images,
              "val_fraction": getattr(args, "val_fraction", None), "source": getattr(args, "data", None)}
    return {"data": {k: v for k, v in values.items() if v is not None}}


def cmd_train(args):
    from vitlab import config as configs
    from vitlab.api import train
    from vitlab.training.processes import launched_as_rank_zero

    overrides = {f"data.{k}": v for k, v in data_flag_values(args)["data"].items() if k != "source"}
    overrides.update({f"trainer.{k}": v for k in ("accelerator", "devices", "num_nodes")
                      if (v := getattr(args, k)) is not None})
    overrides.update(configs.parse_override(text) for text in args.overrides)
    run = train(args.preset, args.data, config=args.config, max_epochs=args.max_epochs, max_time=args.max_time,
                run_dir=args.run_dir, seed=args.seed, resume=args.resume, overrides=overrides)
    tta = f" with {run.config.trainer.val_tta} TTA" if run.config.trainer.val_tta != "none" else ""
    accuracy = f", held-out accuracy{tta} {100 * run.accuracy:.2f}%" if run.accuracy is not None else ""
    if tta and run.plain_accuracy is not None:
        accuracy += f", without {100 * run.plain_accuracy:.2f}%"
    if launched_as_rank_zero():  # the other training processes, if any, have nothing else to say
        print(f"run written to {run.run_dir} (last checkpoint: {run.last_checkpoint}{accuracy})")


def cmd_eval(args):
    from vitlab import config as configs
    from vitlab.data.sources import load_eval_set
    from vitlab.evaluation import evaluate, write_report
    from vitlab.inference import OnnxModel, load_model

    if args.tta not in configs.TTA_NAMES:
        raise VitlabError(f"--tta must be one of {', '.join(configs.TTA_NAMES)}, not '{args.tta}'")
    model = OnnxModel(args.onnx) if args.onnx else load_model(args.checkpoint)
    data = configs.resolve(flags=data_flag_values(args)).data  # the flags are valid before they meet the record
    if args.held_out:
        data = dataclasses.replace(data, **held_out_split(args, model.data_split))
    image_set = load_eval_set(data, model.config.image_size, model.class_names, held_out=args.held_out,
                              channels=model.config.in_channels)
    result, logits = evaluate(model, image_set, tta=args.tta)
    if args.report:
        write_report(args.report, result, logits, image_set, model.class_names)
    if args.json:
        print(json.dumps({k: result[k] for k in ("accuracy", "loss", "per_class", "n")}))
        return
    print(f"{args.data}: {result['n']} images, accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")
    width = max(map(len, result["per_class"]))
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")


def held_out_split(args, recorded: dict | None) -> dict:
    """The data config keys that fix which images a checkpoint's run held out: those it recorded;
    an export or an older checkpoint records none, and the flags (or the defaults) are assumed."""
    from vitlab.data.sources import same_source

    if recorded is None:
        fraction = args.val_fraction if args.val_fraction is not None else 0.1
        print(f"note: {args.checkpoint or args.onnx} does not record which images its run held out: assuming "
              f"--val-fraction {fraction} and split seed 0", file=sys.stderr)
        return {}
    if not same_source(recorded["source"], args.data):
        raise VitlabError(f"--held-out: {args.checkpoint} was trained on {recorded['source']}, not {args.data}; "
                          f"its held-out images are a part of {recorded['source']}")
    if args.val_fraction is not None and args.val_fraction != recorded["val_fraction"]:
        raise VitlabError(f"--held-out: {args.checkpoint} held out a fraction {recorded['val_fraction']} of its "
                          f"data, not --val-fraction {args.val_fraction} (leave the flag out)")
    return {k: recorded[k] for k in ("val_fraction", "split_seed", "skip_bad_images")}


def cmd_predict(args):
    from vitlab.config import parse_source
    from vitlab.inference import OnnxModel, expand_image_paths, load_model, predict, predict_shards

    if args.top_k < 1:
        raise VitlabError(f"--top-k must be at least 1, not {args.top_k}")
    model = OnnxModel(args.onnx) if args.onnx else load_model(args.checkpoint)
    packs = [parse_source(a)[1] for a in args.images if a.startswith("shards:")]
    files = [a for a in args.images if not a.startswith("shards:")]
    results = itertools.chain(*(predict_shards(model, pack, args.top_k) for pack in packs),
                              predict(model, expand_image_paths(files), args.top_k) if files else ())
    for result in results:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
            print(f"{result['path']}: {top}", flush=True)


def cmd_info(args):
    from vitlab import config as configs
    from vitlab.inference import load_model
    from vitlab.model import ViT

    if args.preset == "auto":
        from vitlab.planning.plan import make_plan

        if not args.data:
            raise VitlabError("info --preset auto needs --data (and --max-time or --max-epochs): the plan is made for them")
        data = configs.resolve(flags={"data": {"source": args.data, **({"val_fraction": args.val_fraction}
                                                                       if args.val_fraction is not None else {})}}).data
        plan = make_plan(data, args.max_time, args.max_epochs, args.accelerator)
        print("plan:", *plan.lines(), sep="\n  ")
        # Every setting, as the key=value that trains it elsewhere (e.g. with --devices: a planned
        # run trains in one process).
        text = {None: "null", True: "true", False: "false"}
        print("  as key=value:", *(f"{k}={text.get(v, v) if isinstance(v, (bool, type(None))) else v}"
                                   for k, v in configs.flatten(plan.settings).items()))
        return
    if args.checkpoint:
        model, what = load_model(args.checkpoint), str(args.checkpoint)
        checkpoint = Path(args.checkpoint).resolve()
        plan = checkpoint.parent.parent / "plan.yaml"  # a planned run's checkpoints/NAME.ckpt sits beside it
        if checkpoint.parent.name == "checkpoints" and plan.is_file():
            try:
                print(f"planned ({plan}):", *configs.read_yaml(plan, "plan")["plan"], sep="\n  ")
            except (VitlabError, KeyError, TypeError) as e:  # the model is still worth describing
                print(f"vitlab: the run's plan is unreadable: {e}", file=sys.stderr)
    else:
        c = configs.resolve(args.preset).model
        # A preset's number of classes comes from the data it trains on: counted here as 10, as CIFAR-10.
        model, what = ViT(dataclasses.replace(c, num_classes=c.num_classes or 10)), f"preset {args.preset}"
    shape, *rest = model.describe()
    print(f"{what}: {shape}", *rest, sep="\n")


def cmd_attention(args):
    from vitlab import plots
    from vitlab.inference import load_model

    plots.plot_attention_of_images(load_model(args.checkpoint), args.images, args.out)
    print(f"attention maps written to {args.out}")


def cmd_plot(args):
    from vitlab import plots

    out = args.out or args.run_dir / "curves.png"
    plots.plot_learning_curves(args.run_dir, out)
    print(f"learning curves written to {out}")


def cmd_export(args):
    from vitlab import config as configs
    from vitlab.export import QUANTIZATIONS, calibration_images, export, export_onnx_int8
    from vitlab.inference import load_model

    if args.quantize is None:
        if args.calibrate is not None:
            raise VitlabError("--calibrate is for --quantize int8: leave it out, or add --quantize int8")
        export(load_model(args.checkpoint), args.format, args.out)
        print(f"exported {args.checkpoint} as {args.format} to {args.out}")
        return
    if args.format != "onnx":
        raise VitlabError(f"--quantize is for --format onnx, not {args.format}")
    if args.quantize not in QUANTIZATIONS:
        raise VitlabError(f"--quantize must be {' or '.join(QUANTIZATIONS)}, not '{args.quantize}'")
    if args.calibrate is None:
        raise VitlabError("--quantize int8 needs --calibrate SOURCE: training images to measure the "
                          "activation ranges on (e.g. the source the model was trained on)")
    model = load_model(args.checkpoint)
    data = configs.resolve(flags={"data": {**data_flag_values(args)["data"], "source": args.calibrate}}).data
    images = calibration_images(model, data, args.calibrate_images)
    export_onnx_int8(model, args.out, images)
    print(f"exported {args.checkpoint} as onnx int8 to {args.out} (calibrated on {len(images)} training "
          f"images of {args.calibrate})")


def cmd_pack(args):
    from vitlab import config as configs
    from vitlab.data.sources import open_source

    data = configs.resolve(flags={"data": {**data_flag_values(args)["data"], "source": args.source}}).data
    manifest = open_source(data, args.image_size).pack(args.out, args.jpeg_quality, args.workers,
                                                       test=args.split == "test")
    print(f"packed {manifest.count} images of {len(manifest.classes)} classes into {args.out}")


def cmd_demo(args):
    from vitlab.demo import serve

    serve(args.checkpoint, args.host, args.port, share=args.share == "gradio", examples=args.examples)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "info": cmd_info,
            "attention": cmd_attention, "plot": cmd_plot, "export": cmd_export, "demo": cmd_demo,
            "pack": cmd_pack}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may come between or after flags (argparse takes positionals only before them).
    late = [a for a in unknown if "=" in a and not a.startswith("-")] if args.command == "train" else []
    if len(late) < len(unknown):
        parser.error(f"unrecognized arguments: {' '.join(a for a in unknown if a not in late)}")
    if late:
        args.overrides += late
    try:
        COMMANDS[args.command](args)
    except VitlabError as e:
        if e.rank_zero_tells:  # every training process raised it: the first of the launch says it
            from vitlab.training.processes import launched_as_rank_zero

            if not launched_as_rank_zero():
                return e.exit_code
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
