"""A local web page to try a trained model: drop an image, see its top classes and attention rollout.

Gradio is imported only here, and only when the page is built, so the core install does not need it.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vitlab.data.augment import normalize
from vitlab.data.images import read_image
from vitlab.errors import VitlabError
from vitlab.inference import expand_image_paths, load_model
from vitlab.inspection import attention_summary
from vitlab.model import ViT
from vitlab.plots import overlay, to_numpy_image

TOP_K = 5
MAX_UPLOAD = "20mb"  # the largest file the page takes; Gradio refuses bigger ones
MAX_PIXELS = 50_000_000  # a large photo; bigger images are refused before they are decoded
MAX_EXAMPLES = 10
CSS = "#image img {width: 100%; height: 100%; object-fit: contain}"  # small images fill their box


def import_gradio():
    try:
        import gradio
    except ImportError:
        raise VitlabError('the demo needs Gradio: pip install -e ".[demo]"') from None
    return gradio


def pick_examples(folder: Path, count: int = MAX_EXAMPLES) -> list[Path]:
    """Up to count images under folder, taken in turn from each subfolder: one per class first in an
    ImageFolder tree `folder/<class>/<image>`, the first images of a flat folder."""
    by_folder = defaultdict(list)
    for path in expand_image_paths([str(folder)]):
        by_folder[path.parent].append(path)
    in_turn = [p for row in itertools.zip_longest(*by_folder.values()) for p in row if p is not None]
    return in_turn[:count]


def rollout_picture(image: torch.Tensor, rollout: torch.Tensor) -> np.ndarray:
    """The image (uint8 (C, S, S)) as the model sees it, and with its rollout (h, w) laid over it,
    side by side, as an RGB array (H, W, 3)."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    canvas = FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.9, wspace=0.03)  # the top is under the label
    left, right = fig.subplots(1, 2)
    left.imshow(to_numpy_image(image), interpolation="bilinear")
    left.axis("off")
    overlay(right, image, rollout, "")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def check_size(path: str):
    """Refuse an image of over MAX_PIXELS before it is decoded (reading its header only); a file that
    is not an image is left to read_image, which says why."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return
    if width * height > MAX_PIXELS:
        raise VitlabError(f"image {Path(path).name} is {width}x{height} pixels; the demo takes up to "
                          f"{MAX_PIXELS // 1_000_000} megapixels")


@torch.no_grad()
def classify(model: ViT, path: str) -> tuple[dict[str, float], np.ndarray]:
    """The top classes of the image at path ({class: probability}) and its rollout picture."""
    check_size(path)
    image = read_image(path, model.config.image_size, model.config.in_channels)  # (C, S, S)
    summary = attention_summary(model, normalize(image[None], model.image_mean, model.image_std))
    values, indices = summary.logits[0].softmax(-1).topk(min(TOP_K, len(model.class_names)))
    top = {model.class_names[c]: p for p, c in zip(values.tolist(), indices.tolist())}
    return top, rollout_picture(image, summary.rollout[0])


def build(model: ViT, examples: list[Path]):
    """The page (gr.Blocks): an image in; its top classes and attention rollout out, as soon as it
    changes. The API endpoint is /predict."""
    gr = import_gradio()

    def predict(upload: dict | None):
        # Gradio's preprocessing is off, so that a file that is not an image reaches read_image,
        # whose message the page shows, instead of failing inside Gradio: upload is {"path", ...}.
        if upload is None:  # the image was cleared
            return None, None
        try:
            return classify(model, upload["path"])
        except VitlabError as e:  # named as uploaded, not by Gradio's copy
            name = upload.get("orig_name") or Path(upload["path"]).name
            raise gr.Error(str(e).replace(upload["path"], name), print_exception=False) from None

    size, shown = model.config.image_size, min(TOP_K, len(model.class_names))
    with gr.Blocks(title="vitlab demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# vitlab demo\nA ViT trained on {len(model.class_names)} classes, seeing images as "
                    f"{size}x{size} pixels. Drop an image, paste one or pick an example: the page shows "
                    f"the top {shown} classes, and the attention rollout over the image (bright: the "
                    "patches the prediction draws on most).")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 label="image", height=300, elem_id="image")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=image)
            with gr.Column():
                top = gr.Label(num_top_classes=TOP_K, label="top classes")
                rollout = gr.Image(label="as the model sees it | attention rollout", format="png",
                                   interactive=False, elem_id="rollout")
        image.change(predict, image, [top, rollout], preprocess=False, api_name="predict")
    return demo


def serve(checkpoint: Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          examples: Path | None = None, block: bool = True):
    """Serve the demo page of a checkpoint (.ckpt or .safetensors) at http://host:port.

    examples: a folder of images to show as clickable examples (see pick_examples); none if not given.
    share: also open a public gradio.live link (needs the internet). block=False returns the running
    page (call its .close() to stop it) instead of serving until Ctrl-C."""
    model = load_model(checkpoint)
    demo = build(model, pick_examples(examples) if examples else [])
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD, css=CSS,
                ssr_mode=False, show_error=True, quiet=not block, prevent_thread_lock=not block)
    return demo
