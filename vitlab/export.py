"""Exporting a trained model for use without vitlab: ONNX (runs under onnxruntime, no PyTorch),
safetensors (weights that cannot run code when loaded, unlike a pickled checkpoint) and a Hugging
Face Hub folder (config.json, model.safetensors and a model card, laid out as timm writes them)."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml

from vitlab import config as configs
from vitlab.config import DataConfig, RunConfig, crop_padding
from vitlab.data.augment import normalize
from vitlab.errors import VitlabError
from vitlab.io import atomic_write, read_checkpoint, read_metric_rows
from vitlab.model import ViT, ViTConfig

FORMATS = ("onnx", "safetensors", "hf")
# A Hub folder holds these two for loaders (timm's, vitlab's); README.md is for people.
HUB_FILES = ("config.json", "model.safetensors")
# timm builds a model from a registered name and its model_args; the args replace every shape argument
# of this one, so the name only says which class builds it (timm's VisionTransformer).
TIMM_ARCHITECTURE = "vit_tiny_patch16_224"
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}  # the Hub's copies
RECORD_KEYS = ("config", "class_names", "image_mean", "image_std")  # of `record`


def record(model: ViT) -> dict:
    """What a user of an exported model needs besides the weights. Not where its weights started
    (model.init): a path on the trainer's machine is no business of the model's users."""
    return {
        "config": {**asdict(model.config), "init": None},
        "class_names": list(model.class_names),
        "image_mean": list(model.image_mean),
        "image_std": list(model.image_std),
    }


def metadata(model: ViT) -> dict[str, str]:
    """`record` as the metadata of an ONNX or safetensors file: JSON strings."""
    return {f"vitlab.{key}": json.dumps(value) for key, value in record(model).items()}


def read_metadata(meta: dict[str, str], path: Path) -> dict:
    """The inverse of `metadata`: {'config', 'class_names', 'image_mean', 'image_std'}."""
    if not all(f"vitlab.{key}" in meta for key in RECORD_KEYS):
        raise VitlabError(f"{path} is not a vitlab export (its metadata has no vitlab config)")
    return {key.removeprefix("vitlab."): json.loads(value) for key, value in meta.items() if key.startswith("vitlab.")}


def export_onnx(model: ViT, out: Path):
    """ONNX graph: normalised float images (batch, C, H, W) -> logits (batch, num_classes); the
    batch axis is dynamic. The metadata of the file carries the class names and normalisation."""
    c = model.config
    example = torch.zeros(2, c.in_channels, c.image_size, c.image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=["images"],
                                output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    graph = program.model_proto
    for key, value in metadata(model).items():
        graph.metadata_props.add(key=key, value=value)
    atomic_write(out, graph.SerializeToString(), "ONNX export")


QUANTIZATIONS = ("int8",)
CALIBRATION_IMAGES = 512  # the default of `export --calibrate-images`
# The ops that get int8 weights and int8 inputs: the convolutions and the linear layers (MatMul with
# a weight; Gemm, the head), where the compute is. LayerNorm, Softmax, GELU, BatchNorm and the
# attention's own products (q.k and attention.v, MatMuls of two activations) stay fp32: onnxruntime
# has no int8 kernels for the former, so quantizing them only adds QuantizeLinear/DequantizeLinear
# work, and the latter are small (16 tokens). Measured on a cpu-hour model (docs/experiments.md,
# "int8 on the CPU"; `benchmarks/inference.py --variants`): held-out accuracy was within 0.2 points
# of fp32 whatever was quantized, so speed decided: every op, about 0.9x fp32's throughput; these
# three with the attention products too, 1.2-1.3x; with weights only (this), 1.3-1.4x.
# Per-channel weights: +0.2 points over per-tensor at the same speed.
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
QUANTIZE_ACTIVATION_MATMULS = False


def activation_matmuls(graph) -> list[str]:
    """The names of the graph's MatMul nodes with no constant input: the attention's q.k and attention.v."""
    constants = {tensor.name for tensor in graph.initializer}
    constants |= {node.output[0] for node in graph.node if node.op_type == "Constant"}
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and not any(name in constants for name in node.input)]


def calibration_images(model: ViT, data: DataConfig, count: int = CALIBRATION_IMAGES,
                       seed: int = 0) -> torch.Tensor:
    """Up to `count` uint8 images (N, C, H, W) from the training part of data.source, at the model's
    image size, a seeded random choice (so every class is likely represented): the images int8
    calibration measures activation ranges on. Never a held-out image: where data.source is the
    source the model was trained on, its run's recorded split (model.data_split) says which images
    were held out. Classes the model does not know are a one-line error."""
    from vitlab.data.sources import align_classes, open_source, same_source

    if count < 1:
        raise VitlabError(f"--calibrate-images must be at least 1, not {count}")
    recorded = model.data_split
    if recorded is None:
        print(f"note: {model.loaded_from} does not record which images its run held out: calibrating on the "
              f"training part of {data.source} as --val-fraction {data.val_fraction} and split seed "
              f"{data.split_seed} leave it", file=sys.stderr)
    elif same_source(recorded["source"], data.source):
        data = replace(data, **{k: recorded[k] for k in ("val_fraction", "split_seed", "skip_bad_images")})
    source = open_source(data, model.config.image_size, model.config.in_channels)
    train = source.train_val()[0]  # an ImageSet, or for a pack the indices of its training items
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    if source.streams:
        chosen = source.decode(sorted(train[i] for i in order.tolist()))
    else:
        chosen = train.subset(order)
    return align_classes(chosen, model.class_names, source.description).images


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over uint8 images: batches normalised as the model was
    trained (model.image_mean/std, as predict and eval normalise them), fed to the graph's input."""

    def __init__(self, images: torch.Tensor, mean, std, batch_size: int = 64):
        self.batches = (normalize(images[i:i + batch_size], mean, std).numpy()
                        for i in range(0, len(images), batch_size))

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch}


@dataclass(frozen=True)
class Int8Recipe:
    """How export_onnx_int8 quantizes; the defaults are vitlab's (see QUANTIZED_OPS). The others are
    for measuring the choice (benchmarks/inference.py --variants)."""

    op_types: tuple[str, ...] | None = QUANTIZED_OPS  # None: every op onnxruntime can quantize
    activation_matmuls: bool = QUANTIZE_ACTIVATION_MATMULS  # the attention's q.k and attention.v too
    per_channel: bool = True  # a scale per output channel of each weight, else one per tensor
    pre_process: bool = True  # onnxruntime's quant_pre_process first
    calibration: str = "minmax"  # or "percentile": ranges from the 0.001st to 99.999th percentile

    def describe(self) -> str:
        ops = "every op onnxruntime quantizes" if self.op_types is None else "/".join(self.op_types)
        return (f"static, QDQ; {ops}{'' if self.activation_matmuls else ' (MatMuls with a weight)'}; int8 weights "
                f"{'per channel' if self.per_channel else 'per tensor'}, int8 activations calibrated by "
                f"{self.calibration}")


def export_onnx_int8(model: ViT, out: Path, images: torch.Tensor, recipe: Int8Recipe = Int8Recipe()):
    """The ONNX export (export_onnx) statically quantized to int8 by onnxruntime, as `recipe` says (by
    default: int8 weights per output channel and int8 activations of the Conv/MatMul/Gemm ops in QDQ
    format, QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels), the
    activation ranges calibrated on `images`, uint8 training images (calibration_images). The batch
    axis stays dynamic; the metadata is the fp32 export's plus `vitlab.quantization`."""
    import contextlib
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="vitlab-int8-") as tmp:
        fp32, prepared, int8 = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        export_onnx(model, fp32)
        if recipe.pre_process:
            # Shape inference and onnxruntime's basic graph optimisations, as onnxruntime recommends
            # before quantizing (without them its quantizer warns; the int8 file came out 7% larger).
            quant_pre_process(str(fp32), str(prepared))
        else:
            prepared = fp32
        reader = CalibrationReader(images, model.image_mean, model.image_std)
        excluded = [] if recipe.activation_matmuls else activation_matmuls(onnx.load(str(prepared)).graph)
        # Signed int8 activations and weights (S8S8) in QDQ form: onnxruntime's advised first choice
        # on x86 (its U8S8 kernels can saturate).
        with contextlib.redirect_stdout(sys.stderr):  # its histogram calibrations print their progress
            quantize_static(str(prepared), str(int8), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=None if recipe.op_types is None else list(recipe.op_types),
                            nodes_to_exclude=excluded, per_channel=recipe.per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[recipe.calibration])
        graph = onnx.load(str(int8))
    del graph.metadata_props[:]
    quantization = {"format": "int8", "calibration_images": len(images), "method": recipe.describe()}
    for key, value in {**metadata(model), "vitlab.quantization": json.dumps(quantization)}.items():
        graph.metadata_props.add(key=key, value=value)
    atomic_write(out, graph.SerializeToString(), "ONNX int8 export")


def export_safetensors(model: ViT, out: Path):
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out, save(state, metadata=metadata(model)), "safetensors export")


def loads_in_timm(config: ViTConfig) -> bool:
    """Whether the model is timm's VisionTransformer: the plain ViT (linear patches, class-token pooling)."""
    return config.tokenizer == "patch" and config.pool == "cls"


def timm_model_args(config: ViTConfig) -> dict:
    """The arguments of timm's VisionTransformer that build vitlab's plain ViT, with the same parameter
    names and maths (pre-norm blocks, exact GELU, q/k/v biases, the head on the class token). Its layer
    norms keep timm's default eps, 1e-6, which is vitlab's (model.LAYER_NORM_EPS)."""
    return {"img_size": config.image_size, "patch_size": config.patch_size, "in_chans": config.in_channels,
            "embed_dim": config.dim, "depth": config.depth, "num_heads": config.heads,
            "mlp_ratio": config.mlp_ratio, "num_classes": config.num_classes, "qkv_bias": True,
            "class_token": True, "global_pool": "token"}


def hub_config(model: ViT) -> dict:
    """config.json as timm's `save_for_hf` writes it (the architecture and its model_args, the labels,
    and the pretrained_cfg that timm's data pipeline reads), plus a `vitlab` section, `record(model)`,
    from which vitlab rebuilds any of its models. Only the plain ViT has model_args: timm cannot
    build the others."""
    c = model.config
    timm = loads_in_timm(c)
    config = {"architecture": TIMM_ARCHITECTURE if timm else "vitlab", "num_classes": c.num_classes,
              "num_features": c.dim, "label_names": list(model.class_names)}
    if timm:
        config["global_pool"] = "token"
        config["model_args"] = timm_model_args(c)
    config["pretrained_cfg"] = {
        "input_size": [c.in_channels, c.image_size, c.image_size],
        "fixed_input_size": True,
        # As vitlab reads an image: the shorter side resized (bicubic) to the input size, the centre kept.
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(model.image_mean),
        "std": list(model.image_std),
        "num_classes": c.num_classes,
        "pool_size": None,
        "first_conv": "patch_embed.proj" if c.tokenizer == "patch" else "patch_embed.layers.0",
        "classifier": "head",
        "custom_load": False,
    }
    config["vitlab"] = record(model)
    return config


def read_hub_folder(folder: Path) -> dict | None:
    """The `vitlab` section of a Hub folder's config.json ({'config', 'class_names', 'image_mean',
    'image_std'}); None for a folder that timm or another library wrote. A folder without
    config.json or model.safetensors is a one-line error naming what is missing."""
    missing = [name for name in HUB_FILES if not (folder / name).is_file()]
    if missing:
        raise VitlabError(f"{folder} is not a model folder: it has no {' and no '.join(missing)}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise VitlabError(f"cannot read {folder / 'config.json'}: {' '.join(str(e).split())}") from None
    section = config.get("vitlab") if isinstance(config, dict) else None
    if section is None:
        return None
    if not isinstance(section, dict) or not all(key in section for key in RECORD_KEYS):
        raise VitlabError(f"{folder / 'config.json'} has a damaged vitlab section "
                          f"(no model config, class names or normalisation)")
    return section


@dataclass
class TrainingRun:
    """What the run directory of a checkpoint (RUN_DIR/checkpoints/NAME.ckpt) tells about its weights."""

    config: RunConfig  # RUN_DIR/config.yaml
    row: dict[str, str] | None  # the RUN_DIR/metrics.csv row of the epoch that ended with these weights


def training_run(model: ViT) -> TrainingRun | None:
    """The run the model's checkpoint sits in, if it was loaded from one that is still in its run
    directory; None for a model from an export, or built in code. The weights are matched to their
    epoch by the checkpoint's step."""
    path = model.loaded_from
    if path is None or path.suffix != ".ckpt" or path.parent.name != "checkpoints":
        return None
    run_dir = path.parent.parent
    if not (run_dir / "config.yaml").is_file():
        return None
    step = read_checkpoint(path).get("global_step")
    rows = [row for row in read_metric_rows(run_dir) if row["step"] == str(step)]
    return TrainingRun(configs.load(run_dir / "config.yaml"), rows[-1] if rows else None)


def held_out_accuracy(run: TrainingRun | None) -> tuple[float | None, float | None]:
    """(plain, with test-time augmentation) accuracy of the weights on their run's held-out images, as
    the run measured them (None: not measured). Runs of vitlab before val_acc_plain recorded only
    the accuracy with trainer.val_tta's views."""
    if run is None or run.row is None or not run.row["val_acc"]:
        return None, None
    accuracy, plain = float(run.row["val_acc"]), run.row.get("val_acc_plain")
    if run.config.trainer.val_tta == "none":
        return accuracy, None
    return (float(plain) if plain else None), accuracy


def public_source(source: str) -> str:
    """A data source as a model card shows it: a folder or pack by its name only (its path is the
    trainer's machine's business)."""
    kind, location = configs.parse_source(source)
    return f"{kind}:{Path(str(location)).name}" if kind in ("folder", "shards") else source


def training_command(config: RunConfig) -> str:
    """A `vitlab train` command that resolves to the run's config: every key that differs from
    vitlab's defaults, written as YAML reads it back. Local paths are left out: where data is
    cached, the folder's path, local model.init weights."""
    defaults, values = configs.flatten(RunConfig().to_dict()), configs.flatten(config.to_dict())
    words = ["vitlab", "train", "--data", public_source(config.data.source)]
    for key, value in values.items():
        if key in ("data.source", "data.root", "data.cache_dir") or value == defaults[key]:
            continue
        if key == "model.init" and not value.startswith(("timm:", "hf-hub:")):
            value = "LOCAL_WEIGHTS"
        text = yaml.safe_dump(value).removesuffix("...\n").strip()  # quoted where YAML would misread it
        words.append(shlex.quote(f"{key}={text}"))
    return " ".join(words)


def recipe(model: ViT, run: TrainingRun | None) -> list[str]:
    """The main choices of the run's config, one markdown list item each."""
    m = model.config
    shape, size = model.describe()[:2]
    model_line = f"- Model: {shape}; {size}"
    if m.dropout or m.emb_dropout or m.drop_path:
        model_line += f"; dropout {m.dropout}, embedding dropout {m.emb_dropout}, drop path {m.drop_path}"
    if run is None:
        return [model_line, "- The rest of the recipe is not recorded: the checkpoint was not in its run directory."]
    d, o, t = run.config.data, run.config.optim, run.config.trainer
    lines = [model_line]
    init = run.config.model.init
    if init:
        origin = init if init.startswith(("timm:", "hf-hub:")) else "local weights"
        lines.append(f"- Started from: {origin} (a new head; the pre-trained part at {o.init_lr_scale}x "
                     f"the learning rate)")
    padding = crop_padding(d, run.config.model.image_size)
    augment = [f"{d.augment} (shifts up to {padding} px, mirrored)" if d.augment == "crop-flip" else d.augment]
    if d.autoaugment:
        augment.append("AutoAugment")
    if d.randaugment_ops:
        augment.append(f"RandAugment ({d.randaugment_ops} ops, magnitude {d.randaugment_magnitude})")
    if d.mixup_alpha:
        augment.append(f"mixup (alpha {d.mixup_alpha})")
    if d.cutmix_alpha:
        augment.append(f"CutMix (alpha {d.cutmix_alpha})")
    mean, std = [round(v, 4) for v in model.image_mean], [round(v, 4) for v in model.image_std]
    lines.append(f"- Data: `{public_source(d.source)}`, {d.val_fraction:.0%} held out (split seed {d.split_seed}); "
                 f"augmentation: {', '.join(augment)}; batch {d.batch_size} per process; normalised with mean {mean}, "
                 f"std {std}")
    lines.append(f"- Optimiser: AdamW, learning rate {o.lr} (warm-up {o.warmup:.0%} of training, cosine to "
                 f"{o.min_lr}), weight decay {o.weight_decay} on weight matrices, betas ({o.beta1}, {o.beta2}), "
                 f"label smoothing {o.label_smoothing}")
    limits = [f"{t.max_epochs} epochs"] if t.max_epochs is not None else []
    limits += [f"{t.max_time} (HH:MM:SS)"] if t.max_time is not None else []
    training = f"- Training: at most {' or '.join(limits)}"
    if run.row:
        training += f"; these weights after {int(run.row['epoch']) + 1} epochs, {float(run.row['elapsed_s']):.0f} s"
    training += f"; precision {t.precision}; seed {t.seed}"
    if t.ema_decay:
        training += f"; an exponential moving average of the weights (decay {t.ema_decay})"
    if t.devices != 1 or t.num_nodes != 1:
        training += f"; {t.devices} processes per machine on {t.num_nodes} machine(s)"
    return lines + [training]


def tta_name(run: TrainingRun | None) -> str:
    """The test-time views a card's "with test-time augmentation" accuracy is for."""
    return run.config.trainer.val_tta if run and run.config.trainer.val_tta != "none" else "flip or flip-shift"


def card_metadata(model: ViT, name: str, run: TrainingRun | None) -> dict:
    """A model card's YAML front matter, which the Hub reads: library, tags, license, data set, and
    the measured accuracy as a model-index (only figures the run measured)."""
    timm = loads_in_timm(model.config)
    front = {"library_name": "timm" if timm else "vitlab",
             "tags": ["image-classification", *(["timm"] if timm else []), "vision-transformer", "vitlab"],
             "pipeline_tag": "image-classification",
             "license": "other"}  # a placeholder: only the owner of the weights and data can license them
    if run is None:
        return front
    source = run.config.data.source
    if source in HUB_DATASETS:
        front["datasets"] = [HUB_DATASETS[source]]
    plain, tta = held_out_accuracy(run)
    named = [(plain, "held-out accuracy"), (tta, f"held-out accuracy, test-time {tta_name(run)}")]
    metrics = [{"type": "accuracy", "value": round(value, 4), "name": label} for value, label in named if value is not None]
    if metrics:
        kind = configs.parse_source(source)[0]
        front["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification"},
            "dataset": {"name": public_source(source), "type": HUB_DATASETS.get(source, kind), "split": "held-out"},
            "metrics": metrics}]}]
    return front


def model_card(model: ViT, name: str) -> str:
    """README.md of a Hub folder: the front matter (`card_metadata`), then what the model is, its
    held-out accuracy, its recipe, the command that trained it and how to load it. Every figure
    comes from the checkpoint's own run directory; without one, the card says "not measured"."""
    run = training_run(model)
    timm = loads_in_timm(model.config)
    plain, tta = held_out_accuracy(run)
    source = run.config.data.source if run else None

    def shown(value: float | None) -> str:
        return "not measured" if value is None else f"{value:.2%}"

    if run is None or run.row is None:
        where = ("There is no training run beside the exported checkpoint, so nothing was measured for this card. "
                 if run is None else "The training run did not validate these weights, so nothing was measured. ")
        where += f"`vitlab eval --checkpoint {name} --data SOURCE [--tta flip]` measures it."
    else:
        where = (f"Measured by the training run on the {run.config.data.val_fraction:.0%} of "
                 f"`{public_source(source)}` it held out (split seed {run.config.data.split_seed}"
                 f"{', unless the folder has a sibling val/ folder' if source.startswith('folder:') else ''}), "
                 f"after epoch {int(run.row['epoch']) + 1} (step {run.row['step']}).")
    own = [part for part, used in [("conv tokenizer", model.config.tokenizer == "conv"),
                                   ("attention pooling", model.config.pool == "attention")] if used]
    runs_in = ("It loads in timm itself (timm's `VisionTransformer`, the same weights and logits)." if timm else
               f"It needs vitlab to run: timm has no equivalent of its {' and '.join(own)} "
               f"(config.json's `vitlab` section holds all vitlab needs).")
    body = [f"# {name}", "",
            f"A Vision Transformer image classifier trained with vitlab. {runs_in}", "",
            f"Classes ({len(model.class_names)}): {', '.join(model.class_names)}", "",
            "## Held-out accuracy", "",
            "| | accuracy |", "|---|---|",
            f"| plain | {shown(plain)} |",
            f"| with test-time augmentation ({tta_name(run)}) | {shown(tta)} |", "",
            where, "",
            "## Recipe", "", *recipe(model, run), "",
            "## How it was trained", ""]
    if run is None:
        body += ["Not recorded: the checkpoint was not in its run directory.", ""]
    else:
        body += ["```bash", training_command(run.config), "```", "",
                 "Rebuilt from the run's config.yaml: every key that differs from vitlab's defaults (the preset "
                 "and flags it was started with are not recorded; local paths are left out).", ""]
    body += ["## How to use it", ""]
    if timm:
        mode = "L" if model.config.in_channels == 1 else "RGB"
        body += ["With timm:", "", "```python", "import timm", "from PIL import Image", "",
                 f'model = timm.create_model("hf-hub:ORG/{name}", pretrained=True).eval()  '
                 f'# or "local-dir:PATH/TO/{name}"',
                 "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
                 f'logits = model(transform(Image.open("image.jpg").convert("{mode}")).unsqueeze(0))',
                 "```", ""]
    body += ["With vitlab (`--checkpoint` takes this folder once downloaded; `model.init` starts a run from it):", "",
             "```bash", f"vitlab predict --checkpoint {name} image.jpg",
             f"vitlab train --data folder:NEW_IMAGES model.init=hf-hub:ORG/{name}", "```", "",
             "```python", "import vitlab", "", f'model = vitlab.load_model("{name}")  # a torch.nn.Module, eval mode',
             "```", "",
             "## License", "",
             "`license: other` is a placeholder: set the license of these weights, and of the data they were "
             "trained on, before publishing them.", ""]
    return "---\n" + yaml.safe_dump(card_metadata(model, name, run), sort_keys=False) + "---\n\n" + "\n".join(body)


def export_hf(model: ViT, out: Path):
    """A Hugging Face Hub model folder, as timm writes one: config.json, model.safetensors (the
    safetensors export, its metadata included) and README.md, the model card. timm loads a plain
    ViT's folder itself (timm.create_model("local-dir:OUT", pretrained=True)); vitlab loads any
    (load_model(OUT)). A folder that exists and is not empty is refused: nothing in it is touched."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VitlabError(f"{out} exists and is not an empty folder: export to a new or empty folder")
    card = model_card(model, out.resolve().name)
    export_safetensors(model, out / "model.safetensors")
    atomic_write(out / "config.json", json.dumps(hub_config(model), indent=2) + "\n", "Hub config")
    atomic_write(out / "README.md", card, "model card")


def export(model: ViT, fmt: str, out: Path):
    if fmt not in FORMATS:
        raise VitlabError(f"unknown export format '{fmt}' (expected {' or '.join(FORMATS)})")
    {"onnx": export_onnx, "safetensors": export_safetensors, "hf": export_hf}[fmt](model, out)
