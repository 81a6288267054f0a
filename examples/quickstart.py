# %% [markdown]
# # vitlab from Python: train, plot, evaluate, look at attention
#
# A notebook in script form (each `# %%` is a cell; VS Code and Jupytext open it as a notebook).
# It trains the `smoke` preset on an image folder for a few minutes, then draws the learning
# curves, scores the held-out images and draws what the model attends to.
#
#     python examples/quickstart.py            # CIFAR-10 JPEGs in /tmp/cifar10-jpeg/train
#
# VITLAB_DATA, VITLAB_MAX_TIME and VITLAB_RUN_DIR change where the images are, how long it trains
# and where the run goes (the tests run it on a tiny folder).

# %%
import os
from pathlib import Path

import vitlab
from vitlab import plots
from vitlab.data.sources import load_eval_set
from vitlab.evaluation import evaluate

data = os.environ.get("VITLAB_DATA", "folder:/tmp/cifar10-jpeg/train")
max_time = os.environ.get("VITLAB_MAX_TIME", "00:03:00")
run_dir = Path(os.environ.get("VITLAB_RUN_DIR", "runs/quickstart"))

# %% Train: the same as `vitlab train --preset smoke --data ... --max-time ...`.
run = vitlab.train(preset="smoke", data=data, max_time=max_time, run_dir=run_dir, resume=run_dir.exists(),
                   overrides={"trainer.max_epochs": None})
print(f"{len(run.metrics)} epochs, held-out accuracy {run.accuracy:.1%}")

# %% Learning curves, from the run's metrics.csv.
plots.plot_learning_curves(run.run_dir, run.run_dir / "curves.png")

# %% Evaluate the final weights on the held-out images (what `vitlab eval --held-out` does).
model = vitlab.load_model(run.last_checkpoint)
held_out = load_eval_set(run.config.data, model.config.image_size, model.class_names, held_out=True,
                         channels=model.config.in_channels)
result, _ = evaluate(model, held_out)
print(f"eval on {result['n']} held-out images: accuracy {result['accuracy']:.1%}")
for name, accuracy in result["per_class"].items():
    print(f"  {name:<12} {accuracy:.1%}")

# %% What the model attends to, for the first four held-out images.
plots.plot_attention_of_images(model, held_out.paths[:4], run.run_dir / "attention.png")
print(f"pictures in {run.run_dir}: curves.png, attention.png")
