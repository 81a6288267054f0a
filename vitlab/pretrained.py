"""Starting from trained weights (`model.init`): a vitlab checkpoint, safetensors export or Hub folder
export, a timm ViT's state dict on disk (.safetensors, .pth) or Hub folder, `timm:NAME` through timm's
own pretrained loading, or `hf-hub:ORG/NAME`, a Hub folder downloaded by huggingface_hub.

vitlab's parameter names are timm's for the plain ViT, so a timm state dict maps by name. The head
is always made anew (zeros) for the new classes; the position embedding is resampled bicubically
when the token grid differs (as timm's `resample_abs_pos_embed`); any other shape that differs is
an error naming the parameter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError
from vitlab.export import HUB_FILES, read_hub_folder
from vitlab.inference import load_model
from vitlab.io import read_safetensors
from vitlab.model import ViT, ViTConfig

HEAD = ("head.weight", "head.bias")
# What a vitlab checkpoint fixes about the model: the rest (image size, classes) is the new task's.
ARCHITECTURE = ("patch_size", "in_channels", "dim", "depth", "heads", "mlp_ratio", "tokenizer", "conv_channels",
                "conv_depth", "pool")


def read_init(spec: str) -> tuple[dict[str, torch.Tensor], ViTConfig | None]:
    """The weights that `model.init=spec` names, and the model config they came with (None for a
    bare state dict)."""
    if spec.startswith("timm:"):
        return timm_weights(spec[len("timm:"):])
    if spec.startswith("hf-hub:"):
        return folder_weights(hub_folder(spec[len("hf-hub:"):]), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_weights(path, spec)
    if not path.is_file():
        raise VitlabError(f"model.init: {path} does not exist")
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        if "vitlab.config" not in meta:  # a bare state dict (timm's, say)
            return state, None
    if path.suffix in (".ckpt", ".safetensors"):  # vitlab's: weights and the config they fit
        model = load_model(path)
        return model.state_dict(), model.config
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many kinds for files that are not state dicts
        raise VitlabError(f"model.init: {path} is not a state dict that loads without running code") from None
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise VitlabError(f"model.init: {path} holds no state dict of tensors")
    return state, None


def timm_weights(name: str) -> tuple[dict[str, torch.Tensor], ViTConfig]:
    import timm

    try:
        timm_model = timm.create_model(name, pretrained=True)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise VitlabError(f"model.init: timm has no model '{name}'") from None
        raise VitlabError(f"model.init: cannot load timm:{name} ({str(e).splitlines()[0]})") from None
    except OSError as e:  # no network, no cached weights
        raise VitlabError(f"model.init: cannot download the weights of timm:{name} (offline? {e}); "
                          f"give a downloaded .safetensors/.pth file instead") from None
    return timm_model.state_dict(), from_timm(timm_model).config


def hub_folder(name: str) -> Path:
    """The folder of the Hub model ORG/NAME (its config.json and model.safetensors), downloaded into
    the Hugging Face cache or found there, or a one-line error naming the model."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise VitlabError(f"model.init: hf-hub:{name} needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(name, allow_patterns=list(HUB_FILES)))
    except LocalEntryNotFoundError:  # no network (or HF_HUB_OFFLINE), and not in the cache
        raise VitlabError(f"model.init: cannot download hf-hub:{name}: there is no network (or HF_HUB_OFFLINE "
                          f"is set) and it is not in the Hugging Face cache") from None
    except RepositoryNotFoundError:
        raise VitlabError(f"model.init: the Hugging Face Hub has no model {name} (or it is private or gated: "
                          f"log in with `hf auth login`)") from None
    except (OSError, ValueError) as e:  # HTTP errors, names the Hub refuses
        raise VitlabError(f"model.init: cannot download hf-hub:{name} ({' '.join(str(e).split())})") from None


def folder_weights(folder: Path, spec: str) -> tuple[dict[str, torch.Tensor], ViTConfig]:
    """A Hub folder's weights and model config: a vitlab export's, or a timm ViT's (timm builds it
    from the folder, then it is converted)."""
    if read_hub_folder(folder) is not None:
        model = load_model(folder)
        return model.state_dict(), model.config
    try:
        import timm
    except ImportError:
        raise VitlabError(f"model.init: {spec} is a timm model folder; reading it needs timm (pip install timm)") from None
    try:
        timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # timm's kinds for configs it cannot build
        raise VitlabError(f"model.init: timm cannot build the model of {spec} "
                          f"({' '.join(str(e).split()) or type(e).__name__})") from None
    return timm_model.state_dict(), from_timm(timm_model).config


def from_timm(timm_model: nn.Module) -> ViT:
    """A ViT holding the weights of a timm `VisionTransformer` with class-token pooling.

    Only the plain architecture maps one-to-one; anything else (register tokens, layer scale,
    qk-norm, average pooling ...) is refused rather than silently dropped.
    """
    t = timm_model
    unsupported = {
        "global_pool must be 'token'": t.global_pool != "token",
        "needs a class token": t.cls_token is None or getattr(t, "num_reg_tokens", 0) > 0,
        "position embedding must include the class token": getattr(t, "no_embed_class", False),
        "pre-norm, fc-norm, qk-norm and layer scale are not supported": not all(
            isinstance(m, nn.Identity)
            for m in [t.norm_pre, t.fc_norm]
            + [b.ls1 for b in t.blocks]
            + [b.attn.q_norm for b in t.blocks]
        ),
    }
    for reason, failed in unsupported.items():
        if failed:
            raise VitlabError(f"cannot convert this timm model: {reason}")

    patch = t.patch_embed.proj.kernel_size[0]
    config = ViTConfig(
        image_size=t.patch_embed.img_size[0],
        patch_size=patch,
        in_channels=t.patch_embed.proj.in_channels,
        num_classes=t.head.out_features,
        dim=t.embed_dim,
        depth=len(t.blocks),
        heads=t.blocks[0].attn.num_heads,
        mlp_ratio=t.blocks[0].mlp.fc1.out_features / t.embed_dim,
        # The last block's rate is timm's drop_path_rate as float32 (0.2 reads 0.2000000030), kept
        # so that every block's rate is timm's exactly; with one block it is 0, the same model.
        drop_path=getattr(t.blocks[-1].drop_path1, "drop_prob", 0.0),
    )
    model = ViT(config)

    names = {"patch_embed.proj": "patch_embed.proj", "norm": "norm", "head": "head"}
    for i in range(config.depth):
        for ours, theirs in [("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                             ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
            names[f"blocks.{i}.{ours}"] = f"blocks.{i}.{theirs}"
    mapping = {"cls_token": "cls_token", "pos_embed": "pos_embed"}
    for ours, theirs in names.items():
        mapping[f"{ours}.weight"] = f"{theirs}.weight"
        mapping[f"{ours}.bias"] = f"{theirs}.bias"

    source = t.state_dict()
    target = model.state_dict()
    # Checked with raise, not assert: a conversion must fail loudly under python -O too.
    unmapped = (set(target) ^ set(mapping)) | (set(source) ^ set(mapping.values()))
    if unmapped:
        raise VitlabError(f"cannot convert this timm model: unmapped parameters {', '.join(sorted(unmapped))}")
    for ours, theirs in mapping.items():
        if source[theirs].shape != target[ours].shape:
            raise VitlabError(f"cannot convert this timm model: {theirs} has shape {tuple(source[theirs].shape)} "
                              f"in timm, {tuple(target[ours].shape)} in vitlab")
        target[ours] = source[theirs]
    model.load_state_dict(target)
    return model


def init_config(config: ViTConfig, source: ViTConfig | None) -> ViTConfig:
    """The model config of a run that starts from weights: the source's architecture (when the
    weights came with one), the run's own image size and classes."""
    if source is None:
        return config
    return dataclasses.replace(config, **{k: getattr(source, k) for k in ARCHITECTURE})


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, prefix_tokens: int) -> torch.Tensor:
    """Position embedding (1, prefix + g*g, D) -> (1, prefix_tokens + grid*grid, D): the grid part
    resized bicubically (antialiased when shrinking, as timm); a class-token row is kept if the
    new model has one, dropped otherwise."""
    D = pos_embed.shape[-1]
    old = int(round((pos_embed.shape[1]) ** 0.5))
    old_prefix = pos_embed.shape[1] - old * old
    if old_prefix not in (0, 1) or prefix_tokens > old_prefix:
        raise VitlabError(f"model.init: cannot map a position embedding of {pos_embed.shape[1]} tokens "
                          f"onto {prefix_tokens} + {grid}x{grid}")
    prefix, patches = pos_embed[:, :old_prefix], pos_embed[:, old_prefix:]
    if old != grid:
        patches = patches.reshape(1, old, old, D).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos_embed.dtype)
    return torch.cat([prefix[:, :prefix_tokens], patches], dim=1)


def load_init(model: ViT, state: dict[str, torch.Tensor], spec: str):
    """Copy `state` into `model` (all but the head), resampling the position embedding."""
    target = model.state_dict()
    missing = [k for k in target if k not in state and k not in HEAD]
    if missing:
        raise VitlabError(f"model.init: {spec} has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                          f"(is it a plain ViT with this model's tokenizer and pooling?)")
    loaded = {}
    for key in target:
        if key in HEAD:
            loaded[key] = target[key]  # the new task's head, as initialised
            continue
        value = state[key]
        if key == "pos_embed":
            value = resample_pos_embed(value, model.config.image_size // model.config.patch_size,
                                       int(model.cls_token is not None))
        if value.shape != target[key].shape:
            raise VitlabError(f"model.init: {key} is {tuple(value.shape)} in {spec} but {tuple(target[key].shape)} "
                              f"in this model (set model.* to the pre-trained model's architecture)")
        loaded[key] = value
    model.load_state_dict(loaded)


def is_pretrained(name: str) -> bool:
    """Whether a parameter of a model that started from `model.init` came from the init weights."""
    return not name.startswith("head.")
