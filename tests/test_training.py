import dataclasses
import math
import re
import signal
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vitlab import ViT, ViTConfig
from vitlab import config as configs
from vitlab.errors import VitlabError
from vitlab.evaluation import tta_logits
from vitlab.config import OptimConfig
from vitlab.training.callbacks import ProgressBar, RunClock, StopRequests
from vitlab.training.module import Classifier, param_groups, warmup_cosine


def test_decay_rule_spares_biases_norms_and_embeddings():
    model = ViT(ViTConfig(dim=32, depth=2, heads=2, num_classes=10))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decayed == {
        "patch_embed.proj.weight", "head.weight",
        *[f"blocks.{i}.{m}.weight" for i in range(2) for m in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]],
    }
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.bias", "blocks.0.norm1.weight"} <= spared
    assert len(decayed) + len(spared) == len(list(model.parameters()))


def test_warmup_then_cosine_to_minimum():
    assert warmup_cosine(0.0, 0.1, 0.01) == 0.0
    assert warmup_cosine(0.05, 0.1, 0.01) == pytest.approx(0.5)
    assert warmup_cosine(0.1, 0.1, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(0.55, 0.1, 0.01) == pytest.approx(0.505)
    assert warmup_cosine(1.0, 0.1, 0.01) == pytest.approx(0.01)
    assert warmup_cosine(0.0, 0.0, 0.25) == pytest.approx(1.0)


def test_tutorial_presets_build_the_tutorial_model_optimiser_trainer_and_data(tmp_path, monkeypatch):
    """What the tutorial presets set reaches the objects that act on it, built as `vitlab train` builds
    them: the model's shape and dropout, AdamW and its schedule, the Trainer's length, precision and
    early stopping, the loader's batches and the augmentation."""
    from lightning.pytorch.callbacks import EarlyStopping
    from vitlab.data import augment as augments
    from vitlab.data import datamodule as datamodules
    from vitlab.training.callbacks import StopRequests
    from vitlab.training.run import build_callbacks, build_trainer

    built, auto_augment = {}, augments.auto_augment_cifar10
    for name in ("tutorial-gpu", "tutorial-cpu"):
        c = configs.resolve(name, overrides={"data.source": "fake:600"})
        classifier = Classifier(**Classifier.hparams_for(dataclasses.replace(c.model, num_classes=10), c.optim,
                                                         [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3))
        model = classifier.model
        configured = classifier.configure_optimizers()
        optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
        classifier.trainer = SimpleNamespace(estimated_stepping_batches=10, callbacks=[], world_size=1)
        trainer = build_trainer(c, tmp_path / name, build_callbacks(c, tmp_path / name, False, StopRequests()))
        data = datamodules.ImageDataModule(c.data, c.model.image_size, seed=c.trainer.seed)
        data.setup("fit")
        augmented = []  # the sizes of the batches data.autoaugment augmented
        monkeypatch.setattr(augments, "auto_augment_cifar10",
                            lambda x, augmented=augmented: augmented.append(len(x)) or auto_augment(x))
        data.augment(data.train.images[:4])
        built[name] = {
            "blocks, heads, tokens x width": (len(model.blocks), model.blocks[0].attn.heads,
                                              tuple(model.pos_embed.shape)),
            "embedding dropout": model.emb_drop.p,
            "lr, final lr, decay": ({g["initial_lr"] for g in optimizer.param_groups},
                                    pytest.approx(schedule.lr_lambdas[0](10) * c.optim.lr),
                                    {g["weight_decay"] for g in optimizer.param_groups}),
            "epochs, precision, patience": (trainer.max_epochs, trainer.precision,
                                            [cb.patience for cb in trainer.callbacks if isinstance(cb, EarlyStopping)]),
            "batch, autoaugmented": (len(next(iter(data.train_dataloader()))[0]), augmented),
        }
    # The tutorial's ViT: 8x8 patches of 4 pixels and a class token, width 512, 8 heads; AdamW at 1e-4
    # decaying to 2.5e-5, weight decay 1e-6 (none on biases, norms, embeddings); 200 epochs at most.
    assert built["tutorial-gpu"] == {
        "blocks, heads, tokens x width": (6, 8, (1, 65, 512)),
        "embedding dropout": 0.1,
        "lr, final lr, decay": ({1e-4}, 2.5e-5, {1e-6, 0.0}),
        "epochs, precision, patience": (200, "bf16-mixed", [10]),
        "batch, autoaugmented": (512, [4]),
    }
    assert built["tutorial-cpu"] == {
        "blocks, heads, tokens x width": (4, 8, (1, 65, 512)),
        "embedding dropout": 0.16,
        "lr, final lr, decay": ({1e-4}, 2.5e-5, {1e-6, 0.0}),
        "epochs, precision, patience": (200, "32-true", [10]),
        "batch, autoaugmented": (256, []),
    }
    for name in configs.preset_names():
        configs.resolve(name)


def test_resolution_order_and_type_checks(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("model: {dim: 96, heads: 3}\noptim: {lr: 0.01}\n")
    config = configs.resolve("smoke", file, {"trainer": {"max_epochs": 7}},
                             {"optim.lr": 3e-4, "trainer.max_time": "00:01:00"})
    assert config.model.dim == 96 and config.model.depth == 2  # file over preset
    assert config.optim.lr == 3e-4  # override over file
    assert config.trainer.max_epochs == 7 and config.trainer.max_time == "00:01:00"
    with pytest.raises(VitlabError, match="unknown config key 'model.width'"):
        configs.resolve(overrides={"model.width": 3})
    with pytest.raises(VitlabError, match="unknown config section 'modle'"):
        configs.resolve(overrides={"modle.dim": 3})
    with pytest.raises(VitlabError, match="model.depth must be int"):
        configs.resolve(overrides={"model.depth": "deep"})
    with pytest.raises(VitlabError, match="section.key=value"):
        configs.parse_override("lr=3")
    assert configs.parse_override("model.depth=8") == ("model.depth", 8)
    with pytest.raises(VitlabError, match="invalid config in key=value overrides.*heads"):
        configs.resolve(overrides={"model.heads": 5})


def test_saved_config_round_trips(tmp_path):
    config = configs.resolve("tutorial-cpu", overrides={"data.source": "fake"})
    configs.save(config, tmp_path / "config.yaml")
    assert configs.load(tmp_path / "config.yaml") == config


def test_max_time_must_be_a_duration():
    assert configs.parse_duration("01:30:05").total_seconds() == 5405
    assert configs.parse_duration("1:00:00:00").days == 1
    with pytest.raises(VitlabError, match="HH:MM:SS"):
        configs.resolve(flags={"trainer": {"max_time": "90min"}})


def test_decay_rule_spares_batchnorm_of_the_conv_tokenizer():
    model = ViT(ViTConfig(tokenizer="conv", patch_size=4, dim=32, depth=1, heads=2, pool="attention", num_classes=10))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "patch_embed.layers.0.weight" in decayed and "pool.score.weight" in decayed
    assert "patch_embed.layers.2.weight" not in decayed  # BatchNorm scale


MICRO = ViTConfig(image_size=8, patch_size=4, num_classes=3, dim=8, depth=1, heads=2)


def micro_classifier(model: ViTConfig = MICRO, val_tta: str = "none", **optim) -> Classifier:
    return Classifier(**Classifier.hparams_for(model, OptimConfig(**optim), ["a", "b", "c"], [0.5, 0.4, 0.3],
                                               [0.2, 0.25, 0.3], val_tta))


def test_classifier_is_rebuilt_from_the_hyperparameters_it_saves():
    optim = OptimConfig(lr=0.01, label_smoothing=0.1)
    hparams = Classifier.hparams_for(MICRO, optim, ("a", "b", "c"), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), val_tta="flip")
    assert hparams == {"model": dataclasses.asdict(MICRO), "optim": dataclasses.asdict(optim),
                       "class_names": ["a", "b", "c"], "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
                       "val_tta": "flip", "data_split": None}
    assert Classifier.hparams_for(MICRO, optim, ["a"], [0.5], [0.2])["val_tta"] == "none"
    classifier = Classifier(**hparams)
    assert classifier.optim == optim and classifier.val_tta == "flip"
    model = classifier.model
    assert model.config == MICRO and model.class_names == ["a", "b", "c"]
    assert model.image_mean == (0.5, 0.4, 0.3) and model.image_std == (0.2, 0.25, 0.3)
    del hparams["val_tta"]
    assert Classifier(**hparams).val_tta == "none"
    # The epoch's running sums travel in checkpoints apart from the weights (see on_save_checkpoint).
    assert "train_sums" not in classifier.state_dict()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(classifier(x), model(x))


def single_process(classifier: Classifier) -> Classifier:
    """classifier as Lightning's one-process trainer shows it to the hooks that ask for processes."""
    classifier.trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0, log_every_n_steps=50)
    return classifier


def test_training_step_returns_the_loss_and_keeps_the_epoch_sums():
    torch.manual_seed(0)
    classifier = micro_classifier(label_smoothing=0.2)
    with torch.no_grad():
        classifier.model.head.weight.normal_(0, 1)  # not all classes equally likely
    assert single_process(classifier).train_metrics() == {"train_loss": 0.0, "train_acc": 0.0}  # nothing seen yet
    seen, loss_sum, correct = 0, 0.0, 0
    for i, size in enumerate([1, 5, 2]):
        images = torch.randn(size, 3, 8, 8)
        logits = classifier.model(images)
        labels = logits.argmax(-1) if i == 0 else torch.arange(size) % 3  # the lone first image is right
        loss = single_process(classifier).training_step((images, labels), i)  # step 0: nothing to log
        torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.2))
        seen, loss_sum = seen + size, loss_sum + loss.item() * size
        correct += (logits.argmax(-1) == labels).sum().item()
        metrics = single_process(classifier).train_metrics()
        assert metrics["train_loss"] == pytest.approx(loss_sum / seen)
        assert metrics["train_acc"] == pytest.approx(correct / seen)
    assert 0 < correct < seen
    classifier.on_train_epoch_start()
    assert classifier.train_metrics() == {"train_loss": 0.0, "train_acc": 0.0}


def test_training_step_learns_from_mixed_labels():
    # After mixup/CutMix the targets are class probabilities; accuracy counts each image's larger part.
    torch.manual_seed(0)
    classifier = single_process(micro_classifier(label_smoothing=0.1))
    images = torch.randn(3, 3, 8, 8)
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [0.2, 0.0, 0.8]])
    logits = classifier.model(images)
    loss = classifier.training_step((images, targets), 0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, label_smoothing=0.1))
    assert classifier.train_sums[1] == (logits.argmax(-1) == torch.tensor([0, 2, 2])).sum()
    assert classifier.train_sums[2] == 3


def test_epoch_sums_count_exactly_past_2_to_the_24_images():
    classifier = single_process(micro_classifier())
    classifier.train_sums[2] = 2**24  # where float32 stops counting in ones
    classifier.training_step((torch.randn(1, 3, 8, 8), torch.tensor([0])), 0)
    assert classifier.train_sums[2].item() == 2**24 + 1


def test_checkpoint_carries_the_epoch_sums_and_each_process_random_state():
    saved = single_process(micro_classifier())
    saved.train_sums.copy_(torch.tensor([2.5, 3.0, 4.0], dtype=torch.float64))
    checkpoints, expected = [{}, {}], []
    for seed, checkpoint in zip((1, 2), checkpoints):
        torch.manual_seed(seed)
        saved.on_save_checkpoint(checkpoint)
        expected.append(torch.rand(5))
    resumed = single_process(micro_classifier())
    torch.manual_seed(3)
    resumed.on_load_checkpoint(checkpoints[0])
    assert torch.equal(torch.rand(5), expected[0])  # draws go on where the saved run left off
    assert resumed.train_metrics() == {"train_loss": 2.5 / 4, "train_acc": 0.75}
    # The second of two processes takes the second state.
    of_two = {"rng": checkpoints[0]["rng"] + checkpoints[1]["rng"]}
    resumed.trainer = SimpleNamespace(world_size=2, global_rank=1)
    resumed.on_load_checkpoint(of_two)
    assert torch.equal(torch.rand(5), expected[1])
    # A checkpoint from before they were saved, or of another number of processes, leaves them alone.
    for checkpoint in ({}, of_two):
        older = single_process(micro_classifier())
        state = torch.get_rng_state()
        older.on_load_checkpoint(checkpoint)
        assert older.train_metrics() == {"train_loss": 0.0, "train_acc": 0.0}
        assert torch.equal(torch.get_rng_state(), state)


def test_a_short_fit_logs_its_losses_and_follows_the_schedule():
    torch.manual_seed(0)
    classifier = micro_classifier(val_tta="flip", lr=0.1, min_lr=0.01, warmup=0.5)
    images, labels = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    lrs, losses = [], []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=2, callbacks=[Record()])
    trainer.fit(classifier, DataLoader(TensorDataset(images, labels), batch_size=2),
                DataLoader(TensorDataset(images[:5], labels[:5]), batch_size=3))
    # 4 steps: linear warm-up over the first half, then a cosine from lr down to min_lr at the end.
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 0.5))])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)
    # The training loss at the steps the logs are written (every 2nd here, the last one included),
    # validation loss and accuracy per epoch; only the latter on the progress bar, which reads its
    # values at every step.
    assert set(trainer.logged_metrics) == {"train_loss", "val_loss", "val_acc", "val_acc_plain"}
    assert set(trainer.progress_bar_metrics) == {"val_loss", "val_acc"}
    assert trainer.logged_metrics["train_loss"].item() == pytest.approx(losses[-1])
    assert classifier.train_metrics()["train_loss"] == pytest.approx(sum(losses) / 4)
    # Validation scores the test-time views (here flip), over all 5 images of its two batches.
    with torch.no_grad():
        logits = tta_logits(classifier.model.eval(), images[:5], "flip")
        plain = classifier.model(images[:5])
    loss = F.cross_entropy(logits, labels[:5]).item()
    assert loss != pytest.approx(F.cross_entropy(plain, labels[:5]).item(), rel=1e-4)
    assert trainer.logged_metrics["val_loss"].item() == pytest.approx(loss, rel=1e-5)
    accuracy = (logits.argmax(-1) == labels[:5]).float().mean().item()
    assert trainer.logged_metrics["val_acc"].item() == pytest.approx(accuracy)


def timer(elapsed: float, remaining: float | None) -> RunClock:
    """A run's clock that agreed, after a step, on `elapsed` seconds of training with `remaining`
    left (remaining None: no max_time)."""
    clock = RunClock(None if remaining is None else elapsed + remaining, StopRequests())
    clock.agreed_step, clock.agreed_elapsed = 1, elapsed
    return clock


def test_training_progress_is_the_further_of_steps_and_time():
    classifier = micro_classifier()
    assert classifier.training_progress(0) == 0.0  # asked before the trainer knows its steps: needs no trainer

    def progress(step, total_steps, *callbacks):
        classifier.trainer = SimpleNamespace(estimated_stepping_batches=total_steps, callbacks=list(callbacks),
                                             world_size=1)
        classifier.schedule_start = 0.0  # as if the first step had taken no time
        return classifier.training_progress(step)

    assert progress(3, 12) == 0.25
    assert progress(3, 12, L.Callback(), timer(0.2, None)) == 0.25  # no max_time: by steps
    assert progress(3, math.inf, timer(0.2, 0.6)) == pytest.approx(0.25)  # no max_epochs: by time
    assert progress(6, 12, timer(0.2, 0.6)) == 0.5
    assert progress(3, 12, timer(1.5, 0.5)) == 0.75
    assert progress(15, 12) == 1.0 and progress(3, math.inf, timer(5.0, 0.0)) == 1.0


def test_the_time_schedule_starts_when_the_first_step_ends_and_resumes_from_its_checkpoint():
    # The first step compiles: by time, the schedule spans the training after it.
    classifier = micro_classifier()
    classifier.trainer = SimpleNamespace(estimated_stepping_batches=math.inf, world_size=1,
                                         callbacks=[timer(40.0, 270.0)])  # 40 s compiling, 270 s left
    assert classifier.training_progress(1) == 0.0
    classifier.trainer.callbacks = [timer(175.0, 135.0)]
    assert classifier.training_progress(500) == pytest.approx(0.5)
    checkpoint = {}
    single_process(classifier).on_save_checkpoint(checkpoint)
    resumed = single_process(micro_classifier())
    resumed.on_load_checkpoint(checkpoint)
    resumed.trainer.estimated_stepping_batches, resumed.trainer.callbacks = math.inf, [timer(175.0, 135.0)]
    assert resumed.training_progress(501) == pytest.approx(0.5)  # not restarted by the resumed run's first step


class TwoProcesses:
    """Lightning's strategy as process `rank` of two sees it; `other` is what the other process holds."""

    def __init__(self, rank: int, other):
        self.rank, self.other = rank, other

    def reduce(self, tensor, group=None, reduce_op="mean"):  # in place, as DDP's all-reduce
        if reduce_op.lower() == "max":
            return torch.maximum(tensor, self.other, out=tensor)
        if reduce_op.lower() not in ("sum", "mean", "avg"):
            raise ValueError(f"unsupported reduce_op {reduce_op}")
        tensor += self.other
        return tensor if reduce_op.lower() == "sum" else tensor.div_(2)

    def broadcast(self, obj, src=0):
        return obj if src == self.rank else self.other


def two_processes(classifier: Classifier, rank: int, other=None, **trainer) -> Classifier:
    classifier.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=TwoProcesses(rank, other), **trainer)
    return classifier


def test_training_metrics_are_summed_over_processes():
    classifier = micro_classifier()
    classifier.train_sums.copy_(torch.tensor([3.0, 2.0, 4.0], dtype=torch.float64))
    other = torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64)
    assert two_processes(classifier, 0, other).train_metrics() == {"train_loss": 0.5, "train_acc": 0.25}
    assert classifier.train_sums.tolist() == [3.0, 2.0, 4.0]  # summed from a copy


def test_processes_draw_their_own_random_numbers_from_one_seed():
    classifier = micro_classifier()
    torch.manual_seed(5)
    torch.rand(3)
    state = torch.get_rng_state()
    single_process(classifier).setup("fit")
    two_processes(classifier, 1).setup("validate")
    assert torch.equal(torch.get_rng_state(), state)  # one process, or not training: the stream goes on
    draws = []
    for rank in (0, 1):
        torch.manual_seed(5)
        two_processes(classifier, rank).setup("fit")
        assert torch.initial_seed() == 5 + rank
        draws.append(torch.rand(3))
    torch.manual_seed(5)
    assert torch.equal(draws[0], torch.rand(3)) and not torch.equal(draws[0], draws[1])


def test_checkpoint_gathers_the_random_state_of_every_process(monkeypatch):
    other = (torch.manual_seed(9).get_state(), None)

    def all_gather_object(object_list, obj):  # as process 0 of two
        assert len(object_list) == 2
        object_list[0], object_list[1] = obj, other

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    classifier = two_processes(micro_classifier(), 0)
    checkpoint = {}
    torch.manual_seed(1)
    classifier.on_save_checkpoint(checkpoint)
    expected = torch.rand(3)
    assert len(checkpoint["rng"]) == 2 and checkpoint["rng"][1] is other
    torch.manual_seed(2)
    classifier.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(3), expected)


def test_processes_agree_on_the_first_process_clock_and_any_stop_request_at_log_steps_and_epoch_ends():
    stops = StopRequests()
    clock = RunClock(100.0, stops)
    clock.time_elapsed = lambda stage="train": 20.0  # this process's own clock
    # What the other process brings to the all-reduce: process 0 its time (60 s), no stop request;
    # process 1 no time (-1) and a SIGTERM it alone received.
    others = {0: torch.tensor([-1.0, signal.SIGTERM], dtype=torch.float64),
              1: torch.tensor([60.0, 0.0], dtype=torch.float64)}
    agreed = {0: (20.0, signal.SIGTERM), 1: (60.0, None)}  # process 0's time; the stop request either heard
    for rank in (0, 1):
        trainer = SimpleNamespace(world_size=2, global_rank=rank, log_every_n_steps=50, should_stop=False,
                                  strategy=TwoProcesses(rank, others[rank]))
        trainer.strategy.root_device = torch.device("cpu")
        clock.agreed_step, clock.agreed_elapsed, clock.stop = -1, 0.0, None
        for step in (2, 49, 51):  # no agreement: the process keeps what was last agreed
            trainer.global_step = step
            clock.on_train_batch_end(trainer)
            assert (clock.agreed_step, clock.agreed_elapsed, clock.stop) == (-1, 0.0, None)
        for step, hook in ((1, clock.on_train_batch_end), (50, clock.on_train_batch_end),
                           (63, clock.on_train_epoch_end)):
            trainer.global_step = step
            hook(trainer)
            assert (clock.agreed_step, clock.agreed_elapsed, clock.stop) == (step, *agreed[rank])
        assert trainer.should_stop is False
    # Past the time limit: every process stops at the same step.
    trainer.strategy = TwoProcesses(1, torch.tensor([100.5, 0.0], dtype=torch.float64))
    trainer.strategy.root_device = torch.device("cpu")
    clock.on_train_epoch_end(trainer)
    assert trainer.should_stop is True
    # One process agrees with itself after every step.
    single = SimpleNamespace(world_size=1, global_rank=0, global_step=7, log_every_n_steps=50, should_stop=False)
    stops.signum = signal.SIGUSR1
    clock.on_train_batch_end(single)
    assert (clock.agreed_step, clock.agreed_elapsed, clock.stop) == (7, 20.0, signal.SIGUSR1)
    # Its time is saved where Lightning's Timer saved it: checkpoints from before the clock resume with it.
    assert clock.state_key == "Timer"


def test_the_clock_agrees_when_training_starts_after_a_resume_restored_its_step_and_time():
    """Lightning restores a resumed run's step after on_fit_start: the clock agrees at on_train_start,
    so the first resumed step's LR reads the run's own time, not zero."""
    for saved, stops in ((40.0, False), (100.0, True)):
        clock = RunClock(100.0, StopRequests())
        clock.load_state_dict({"time_elapsed": {"train": saved}})
        trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=500, should_stop=False)
        clock.on_fit_start(trainer, None)
        assert clock.agreed_step == -1  # nothing agreed before the step is restored
        clock.on_train_start(trainer, None)
        assert clock.agreed_step == 500 and clock.agreed_elapsed == pytest.approx(saved, abs=0.5)
        assert trainer.should_stop is stops  # a run whose time is spent stops at once


def test_optimiser_is_adamw_with_the_decay_rule_and_a_per_step_schedule():
    classifier = micro_classifier(lr=0.02, min_lr=0.002, weight_decay=0.1, beta1=0.8, beta2=0.95, warmup=0.2)
    configured = classifier.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and configured["lr_scheduler"]["interval"] == "step"
    expected = param_groups(classifier.model, 0.1)
    assert len(optimizer.param_groups) == len(expected) == 2
    for group, rule in zip(optimizer.param_groups, expected):
        assert group["params"] == rule["params"] and group["weight_decay"] == rule["weight_decay"]
        assert group["initial_lr"] == 0.02 and group["betas"] == (0.8, 0.95) and "lr_scale" not in group
    assert all(p.requires_grad for p in classifier.model.parameters())
    classifier.trainer = SimpleNamespace(estimated_stepping_batches=10, callbacks=[], world_size=1)
    for step in (1, 2, 6, 10):
        assert schedule.lr_lambdas[0](step) == pytest.approx(warmup_cosine(step / 10, 0.2, 0.1))


def test_pretrained_part_learns_at_a_scaled_rate_or_not_at_all():
    pretrained = dataclasses.replace(MICRO, init="timm:vit_tiny")  # only the optimiser reads init here

    def groups(scale):
        classifier = micro_classifier(pretrained, lr=0.01, weight_decay=0.1, init_lr_scale=scale)
        names = {id(p): n for n, p in classifier.model.named_parameters()}
        optimizer = classifier.configure_optimizers()["optimizer"]
        return classifier, [({names[id(p)] for p in g["params"]}, g["initial_lr"], g["weight_decay"])
                            for g in optimizer.param_groups]

    classifier, scaled = groups(0.1)
    body = {n for n, _ in classifier.model.named_parameters() if not n.startswith("head.")}
    # New weights first, at the full rate; the pre-trained ones at lr x init_lr_scale; decay as ever.
    assert scaled[:2] == [({"head.weight"}, 0.01, 0.1), ({"head.bias"}, 0.01, 0.0)]
    assert [(lr, decay) for _, lr, decay in scaled[2:]] == [(pytest.approx(0.001), 0.1), (pytest.approx(0.001), 0.0)]
    assert scaled[2][0] | scaled[3][0] == body
    assert all(p.requires_grad for p in classifier.model.parameters())
    classifier, frozen = groups(0.0)
    assert frozen == [({"head.weight"}, 0.01, 0.1), ({"head.bias"}, 0.01, 0.0)]
    assert {n for n, p in classifier.model.named_parameters() if not p.requires_grad} == body


def test_decay_rule_needs_no_embedding_list_and_skips_frozen_parameters():
    layers = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    layers[0].weight.requires_grad_(False)
    decay, no_decay = param_groups(layers, 0.1)
    assert decay["params"] == [layers[2].weight]
    assert no_decay["params"] == [layers[0].bias, layers[1].weight, layers[1].bias, layers[2].bias]
    assert decay["lr_scale"] == no_decay["lr_scale"] == 1.0


def test_schedule_stays_at_its_minimum_after_the_end():
    assert warmup_cosine(1.5, 0.1, 0.01) == pytest.approx(0.01)


def test_trainer_settings_are_checked_with_messages_naming_key_and_value():
    refused = {
        "max_time": ("90min", "trainer.max_time must look like HH:MM:SS, not '90min'"),
        "checkpoint_every": ("soon", "trainer.checkpoint_every must look like HH:MM:SS, not 'soon'"),
        "val_every_n_epochs": (0, "trainer.val_every_n_epochs must be 1 or more, not 0"),
        "val_tta": ("mirror", "trainer.val_tta must be one of none, flip, flip-shift, not 'mirror'"),
        "accelerator": ("tpu", "trainer.accelerator must be cpu, gpu or auto, not 'tpu'"),
        "devices": (0, "trainer.devices must be a number of processes (1 or more) or auto, not 0"),
        "num_nodes": (0, "trainer.num_nodes must be 1 or more, not 0"),
    }
    for key, (value, message) in refused.items():
        with pytest.raises(VitlabError, match=f"^{re.escape(message)}$"):
            configs.TrainerConfig(**{key: value})
    for decay in (0.0, 1.0, 1.5, -0.5):
        with pytest.raises(VitlabError, match=f"^trainer.ema_decay must be between 0 and 1, not {decay}$"):
            configs.TrainerConfig(ema_decay=decay)
    for decay in (None, 1e-6, 0.999):
        assert configs.TrainerConfig(ema_decay=decay).ema_decay == decay
    for accelerator in ("cpu", "gpu", "auto"):
        assert configs.TrainerConfig(accelerator=accelerator).accelerator == accelerator


def test_durations_need_three_or_four_numbers():
    assert configs.parse_duration("00:00:90").total_seconds() == 90
    for text in ("1:30", "1:00:00:00:00", "aa:bb:cc", "1:-2:00", ""):
        with pytest.raises(VitlabError, match=f"^max_time must look like HH:MM:SS, not '{text}'$"):
            configs.parse_duration(text)


def test_config_files_that_cannot_be_used_are_named_with_the_reason(tmp_path):
    def refused(text: str | bytes) -> str:
        path = tmp_path / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(VitlabError) as error:
            configs.resolve(config_file=path)
        return str(error.value).replace(str(path), "FILE")

    assert refused("model: [1, 2") == "config file FILE is not valid YAML: while parsing a flow sequence"
    assert refused("a: !!python/object/apply:os.system [echo]") == (
        "refused config file FILE: it has a YAML tag vitlab does not read "
        "('tag:yaml.org,2002:python/object/apply:os.system'); configs are plain data")
    assert refused(b"model: {dim: \xff}").startswith("cannot read config file FILE: 'utf-8' codec can't decode")
    assert refused("- model\n- data") == "config file FILE must be a mapping of sections (model, data, optim, trainer)"
    assert refused("model: 3") == "config section 'model' in FILE must be a mapping"
    assert refused("model: {width: 3}") == (
        "unknown config key 'model.width' in FILE (known: "
        f"{', '.join(sorted(f.name for f in dataclasses.fields(ViTConfig)))})")
    with pytest.raises(VitlabError, match=f"^config file {re.escape(str(tmp_path / 'no.yaml'))} does not exist$"):
        configs.resolve(config_file=tmp_path / "no.yaml")
    with pytest.raises(VitlabError, match="^unknown config key 'model.width' in command-line flags "):
        configs.resolve(flags={"model": {"width": 3}})
    with pytest.raises(VitlabError, match=r"^unknown config section 'modle' in key=value overrides "
                                          r"\(known: model, data, optim, trainer\)$"):
        configs.resolve(overrides={"modle.dim": 3})


def test_presets_are_named_in_errors(tmp_path, monkeypatch):
    with pytest.raises(VitlabError, match=f"^unknown preset 'huge' \\(known: {', '.join(configs.preset_names())}\\)$"):
        configs.resolve("huge")
    monkeypatch.setattr(configs, "PRESETS_DIR", tmp_path)
    (tmp_path / "typo.yaml").write_text("model: {width: 3}")
    (tmp_path / "broken.yaml").write_text("model: [")
    with pytest.raises(VitlabError, match="^unknown config key 'model.width' in preset typo "):
        configs.resolve("typo")
    with pytest.raises(VitlabError, match=f"^preset {re.escape(str(tmp_path / 'broken.yaml'))} is not valid YAML"):
        configs.resolve("broken")


def test_values_are_checked_against_the_field_types():
    def value(key, raw):
        section, name = key.split(".")
        return getattr(getattr(configs.resolve(overrides={key: raw}), section), name)

    assert value("optim.lr", "3e-4") == 3e-4  # YAML reads 3e-4 (no dot) as a string
    assert value("optim.lr", 1) == 1.0 and isinstance(value("optim.lr", 1), float)
    assert value("trainer.precision", 32) == "32"
    assert value("trainer.max_epochs", None) is None and value("trainer.devices", "auto") == "auto"
    assert value("trainer.compile", True) is True
    refused = {"model.depth": [True, 3.5, "3"], "optim.lr": [True, "fast"], "trainer.compile": [1, "yes"],
               "data.source": [True, None]}
    for key, values in refused.items():
        for raw in values:
            with pytest.raises(VitlabError, match=f"^config key {re.escape(key)} must be "):
                configs.resolve(overrides={key: raw})
    with pytest.raises(VitlabError, match="^config key trainer.max_epochs must be int or null, not 'ten'$"):
        configs.resolve(overrides={"trainer.max_epochs": "ten"})


def test_overrides_must_name_a_section_and_a_key():
    assert configs.parse_override("data.source=folder:a=b") == ("data.source", "folder:a=b")
    assert configs.parse_override("data.source=[a") == ("data.source", "[a")  # not YAML: the text itself
    assert configs.parse_override("trainer.max_time=") == ("trainer.max_time", None)
    for text in ("model=3", "model.=3", "model.depth"):
        with pytest.raises(VitlabError, match=f"^override '{re.escape(text)}' must look like section.key=value"):
            configs.parse_override(text)
    for key in ("model", "model."):
        with pytest.raises(VitlabError, match=f"^override key '{key}' must look like section.key, e.g. optim.lr$"):
            configs.resolve(overrides={key: 3})
    with pytest.raises(VitlabError, match="^unknown config key 'model.depth.x' in key=value overrides"):
        configs.resolve(overrides={"model.depth.x": 3})


def test_resume_may_change_only_the_length_of_the_run(tmp_path):
    saved = configs.resolve("smoke", overrides={"optim.lr": 0.002})
    assert configs.resolve_resume(saved, "smoke", overrides={"optim.lr": 0.002}) == saved
    longer = configs.resolve_resume(saved, "smoke", overrides={"optim.lr": 0.002, "trainer.max_epochs": 9,
                                                               "trainer.max_time": "00:05:00"})
    assert longer == dataclasses.replace(saved, trainer=dataclasses.replace(saved.trainer, max_epochs=9,
                                                                             max_time="00:05:00"))
    with pytest.raises(VitlabError, match=r"^--resume: optim.lr is 0.01 here but 0.002 in the run's config.yaml; "
                                          r"only --max-epochs and --max-time may change when resuming$"):
        configs.resolve_resume(saved, "smoke", overrides={"optim.lr": 0.01})
    with pytest.raises(VitlabError, match="^--resume: model.dim is 16 here"):
        configs.resolve_resume(saved, "smoke", flags={"model": {"dim": 16, "heads": 2}},
                               overrides={"optim.lr": 0.002})
    with pytest.raises(VitlabError, match="^--resume: model.dim is 512 here"):
        configs.resolve_resume(saved, "tutorial-cpu", overrides={"optim.lr": 0.002})
    file = tmp_path / "c.yaml"
    file.write_text("optim: {lr: 0.5}")
    with pytest.raises(VitlabError, match="^--resume: optim.lr is 0.5 here"):
        configs.resolve_resume(saved, "smoke", file)
    # The command resolves on top of the saved config: a time budget given to an earlier resume stays.
    resumed = dataclasses.replace(saved, trainer=dataclasses.replace(saved.trainer, max_time="00:05:00"))
    assert configs.resolve_resume(resumed, "smoke", overrides={"optim.lr": 0.002}) == resumed


def test_saved_config_reads_in_field_order_and_errors_name_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    configs.save(configs.RunConfig(), path)
    text = path.read_text()
    assert [line for line in text.splitlines() if not line.startswith(" ")] == ["model:", "data:", "optim:", "trainer:"]
    assert text.index("  image_size:") < text.index("  patch_size:") < text.index("  in_channels:")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(VitlabError, match=f"^cannot write run config {re.escape(str(blocker / 'config.yaml'))}: "):
        configs.save(configs.RunConfig(), blocker / "config.yaml")
    with pytest.raises(VitlabError, match=f"^run config {re.escape(str(tmp_path / 'no.yaml'))} does not exist$"):
        configs.load(tmp_path / "no.yaml")
    path.write_text("model: {width: 3}")
    with pytest.raises(VitlabError, match=f"^unknown config key 'model.width' in {re.escape(str(path))} "):
        configs.load(path)


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """On a GPU every read of a tensor on the host (.item(), bool(), ...) waits for all queued work:
    a training step that reads nothing lets the GPU run ahead. Counted here on the CPU for every
    read between one step's start and the next (loading, augmentation, mixup, step, callbacks,
    Lightning's logging), except at the steps where Lightning writes its logs and the epochs' ends."""
    import traceback

    import vitlab

    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            stack = traceback.extract_stack()[:-1]
            # Reads of tensors made on the host by design: the optimiser's step counts, mixup's λ and box.
            on_host = any(f.filename.endswith(("optimizer.py", "adam.py", "adamw.py"))
                          or (f.filename.endswith("augment.py") and f.name == "mix") for f in stack)
            if not on_host:
                reads.append(f"{_name} at {stack[-1].filename}:{stack[-1].lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    steps: dict[int, list[str]] = {}

    def on_train_batch_start(module, batch, batch_idx):
        if 0 < batch_idx and module.global_step % module.trainer.log_every_n_steps != 0:
            steps[module.global_step] = list(reads)  # what the step before this one read
        reads.clear()

    monkeypatch.setattr(Classifier, "on_train_batch_start", on_train_batch_start)
    vitlab.train("smoke", "fake:800", max_epochs=2, run_dir=tmp_path / "run",
                 overrides={"data.batch_size": 16, "data.augment": "tutorial", "data.autoaugment": True,
                            "data.randaugment_ops": 2, "data.mixup_alpha": 0.8, "data.cutmix_alpha": 1.0,
                            "model.drop_path": 0.1, "trainer.checkpoint_every": "01:00:00"})
    assert len(steps) > 60
    assert {step: r for step, r in steps.items() if r} == {}


def test_the_gpu_5min_preset_trains_in_fp32_on_a_cpu(tmp_path, monkeypatch):
    """The 5-minute GPU recipe, a few steps on the CPU (uncompiled, to keep the test short): its model
    (conv tokenizer, sequence pooling, stochastic depth), batched RandAugment and mixup/CutMix at its
    batch of 512, and the final validation with its test-time augmentation."""
    import vitlab
    from vitlab import load_model
    from vitlab.data.sources import load_eval_set
    from vitlab.evaluation import evaluate
    from vitlab.training import run as training_run

    trainers = []  # the Trainer that `vitlab.train` builds
    build_trainer = training_run.build_trainer
    monkeypatch.setattr(training_run, "build_trainer",
                        lambda *args: trainers.append(build_trainer(*args)) or trainers[-1])
    run = vitlab.train("gpu-5min", "fake:1200", max_epochs=1, run_dir=tmp_path / "run",
                       overrides={"trainer.max_time": None, "trainer.compile": False})
    assert [trainer.precision for trainer in trainers] == ["32-true"]  # precision auto, on a CPU
    rows = run.metrics
    assert [int(r["step"]) for r in rows] == [2]  # 1,080 training images: two full batches of 512
    assert math.isfinite(float(rows[0]["train_loss"]))
    # The model trained is the preset's (conv tokenizer, attention pooling, stochastic depth) ...
    model = load_model(run.last_checkpoint)
    assert model.config == dataclasses.replace(configs.resolve("gpu-5min").model, num_classes=10)
    # ... and the final validation scored it with the preset's flip-shift TTA: an independent
    # evaluation of the held-out images gives its loss and accuracy, and without the TTA another loss.
    held_out = load_eval_set(run.config.data, model.config.image_size, model.class_names, held_out=True)
    assert len(held_out.labels) == 120
    scores = {tta: evaluate(model, held_out, tta=tta)[0] for tta in ("flip-shift", "none")}
    assert scores["flip-shift"]["accuracy"] == pytest.approx(float(rows[0]["val_acc"]), abs=1e-6)
    assert scores["flip-shift"]["loss"] == pytest.approx(float(rows[0]["val_loss"]), abs=1e-4)
    assert scores["none"]["loss"] != pytest.approx(float(rows[0]["val_loss"]), abs=1e-4)
    assert scores["none"]["accuracy"] == pytest.approx(float(rows[0]["val_acc_plain"]), abs=1e-6)
    assert run.plain_accuracy == pytest.approx(scores["none"]["accuracy"], abs=1e-6)


@pytest.mark.parametrize("max_epochs, label", [(-1, "Epoch 3"), (10, "Epoch 3/9")])
def test_progress_bar_counts_epochs_only_when_there_is_a_count(tmp_path, max_epochs, label):
    # A run with only a time limit has max_epochs -1: Lightning's own bar says "Epoch 3/-2".
    bar = ProgressBar()
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[bar], default_root_dir=tmp_path,
                        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path), enable_checkpointing=False)
    bar.setup(trainer, None, "fit")
    assert bar._get_train_description(3).strip() == label
    assert "v_num" not in bar.get_metrics(trainer, None)  # the loggers' version: one run per directory
