"""The pieces of the training loop: LR schedule, EMA, checkpoints, CSV logs, CPU threads, batches."""

from __future__ import annotations

import csv

import pytest
import torch
from accelerate import Accelerator

from shapeflow import training


def test_schedule_warms_up_then_decays_to_the_floor():
    f = training.cosine_schedule(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.fixture()
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def state_of(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_ema_decay_warms_up_to_its_cap():
    assert [training.ema_decay(0.999, n) for n in (0, 1, 100)] == pytest.approx([1 / 10, 2 / 11, 101 / 110])
    assert training.ema_decay(0.999, 10_000) == 0.999  # the cap, once warmed up
    with pytest.raises(ValueError, match="EMA decay"):
        training.ema(torch.nn.Linear(2, 2), 1.0)


def test_ema_of_a_short_run_follows_the_model():
    model = torch.nn.Linear(4, 4)
    torch.nn.init.zeros_(model.weight)
    ema = training.ema(model, 0.999)
    torch.nn.init.ones_(model.weight)
    ema.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update_parameters(model)
    # The first update copies the model; the second moves the average by 1 - 2/11 of the way.
    torch.testing.assert_close(ema.module.weight, torch.full((4, 4), 1.0 + 9 / 11))
    for _ in range(98):
        ema.update_parameters(model)
    # Without the warm-up, 100 updates at 0.999 would leave the average 1 - 0.999^100 = 0.095 of the way.
    assert ema.module.weight.min().item() > 1.99 and int(ema.n_averaged) == 100
    target = torch.nn.Linear(4, 4)
    target.load_state_dict(ema.module.state_dict())
    torch.testing.assert_close(target.weight, ema.module.weight)


def test_ema_resumes_from_a_checkpoint_with_its_weights_and_count(tmp_path, accelerator):
    model = torch.nn.Linear(3, 2)
    ema = training.ema(model, 0.99)
    accelerator.register_for_checkpointing(ema)
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
    saved = ema.module.weight.clone()
    accelerator.save_state(str(tmp_path / "ck"))
    for _ in range(3):
        ema.update_parameters(torch.nn.Linear(3, 2))
    accelerator.load_state(str(tmp_path / "ck"))
    assert int(ema.n_averaged) == 5
    torch.testing.assert_close(ema.module.weight, saved)


def test_checkpoints_restore_the_model_and_keep_only_the_newest(tmp_path, accelerator):
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    ckpts = training.Checkpoints(tmp_path / "ck", keep=2)
    saved = {}
    for step in (5, 10, 15):
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpts.save(accelerator, step, {"run": "abc"})
        saved[step] = state_of(model).clone()
    assert [c.step for c in ckpts.complete()] == [10, 15]
    latest = ckpts.latest()
    assert latest.state == {"step": 15, "run": "abc"}
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(latest.path))
    assert torch.equal(state_of(model), saved[15])


def test_a_checkpoint_cut_off_while_writing_is_never_picked(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(3, 2))
    ckpts = training.Checkpoints(tmp_path / "ck", keep=3)
    ckpts.save(accelerator, 4, {})
    # A kill during save leaves a temporary folder, or a step folder without trainer.json.
    (tmp_path / "ck" / ".tmp-step_00000008").mkdir()
    (tmp_path / "ck" / "step_00000012").mkdir()
    assert ckpts.latest().step == 4


def test_a_csv_log_resumed_at_a_step_drops_the_rows_after_it(tmp_path):
    path = tmp_path / "loss.csv"
    log = training.CsvLog(path, ("step", "loss"), 0)
    for step in (2, 4, 6):
        log.append({"step": step, "loss": 1 / 3, "other": "not a column"})
    training.CsvLog(path, ("step", "loss"), 4).append({"step": 6, "loss": 0.5})
    with open(path, newline="") as fh:
        assert list(csv.DictReader(fh)) == [
            {"step": "2", "loss": "0.333333"},
            {"step": "4", "loss": "0.333333"},
            {"step": "6", "loss": "0.5"},
        ]


def test_the_fingerprint_leaves_out_the_settings_named_and_covers_the_rest():
    from shapeflow import config

    p = config.TrainVAEParams()
    base = training.fingerprint(p, ("val_objects",), seed=0)
    # log_every: one of the loop's own settings (training.LOOP_SETTINGS); val_objects: named.
    assert training.fingerprint(config.replace(p, log_every=3, val_objects=2), ("val_objects",), seed=0) == base
    assert training.fingerprint(config.replace(p, lr=0.5), ("val_objects",), seed=0) != base
    assert training.fingerprint(p, ("val_objects",), seed=1) != base


def test_precision_auto_is_full_precision_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert training.pick_precision("auto") == "no"
    assert training.pick_precision("bf16") == "bf16"


def test_cpu_training_shares_the_cores_among_the_processes_of_a_machine(monkeypatch):
    monkeypatch.delenv("SHAPEFLOW_THREADS", raising=False)
    monkeypatch.setattr(training.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert [training.cpu_threads(n) for n in (1, 2, 3, 8)] == [4, 2, 1, 1]
    monkeypatch.setenv("SHAPEFLOW_THREADS", "3")  # an explicit budget wins
    assert [training.cpu_threads(n) for n in (1, 8)] == [3, 3]


def test_one_cpu_process_uses_every_core_even_when_the_launcher_set_one_thread(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the accelerator trains there and sets no CPU threads")
    # `accelerate launch` exports OMP_NUM_THREADS=1 for a config without use_cpu.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SHAPEFLOW_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        training.make_accelerator("auto", 1, seed=0)
        assert torch.get_num_threads() == training.cpu_threads(1)
    finally:
        torch.set_num_threads(before)


def test_too_few_objects_for_the_batch_and_processes_is_a_params_error_naming_the_fix(accelerator):
    from torch.utils.data import DataLoader, TensorDataset

    from shapeflow.config import ParamsError

    # What a process sees when 8 objects are sharded over 2 processes at batch 8 with drop_last.
    empty = DataLoader(TensorDataset(torch.zeros(3, 1)), batch_size=8, drop_last=True)
    message = r"train_vae: 3 training object\(s\) give none of the 2 processes a batch of 8; lower train_vae.batch_size"
    with pytest.raises(ParamsError, match=message):
        training.require_batches(empty, 3, 8, 2, "train_vae")
    training.require_batches(
        accelerator.prepare(DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=8)), 8, 8, 1, "train_vae"
    )


# -- category-balanced epochs (train_vae.balance / train_dit.balance) -------------------------------


def prepared(loader, seed: int, rank: int = 0, world: int = 1):
    """`loader` as accelerator.prepare hands it to process `rank` of `world`, with the dataloader
    settings of make_accelerator (seedable sampler, data_seed)."""
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(
        loader, num_processes=world, process_index=rank, use_seedable_sampler=True, data_seed=seed
    )


UNBALANCED = ["tree"] * 600 + ["rock"] * 300 + ["fish"] * 100


def test_a_balanced_epoch_draws_every_category_about_equally_often():
    from collections import Counter

    sampler = training.WeightedEpochSampler(training.category_weights(UNBALANCED), seed=0)
    drawn = list(sampler)
    assert len(drawn) == len(UNBALANCED)  # an epoch is as long as the data set
    counts = Counter(UNBALANCED[i] for i in drawn)
    # 1000 draws, a third each expected: the binomial's standard deviation is about 15.
    assert set(counts) == {"tree", "rock", "fish"} and all(abs(n - 1000 / 3) < 60 for n in counts.values()), counts


def test_a_balanced_epoch_is_a_function_of_the_seed_and_the_epoch():
    weights = training.category_weights(UNBALANCED)

    def epoch(seed: int, number: int) -> list[int]:
        sampler = training.WeightedEpochSampler(weights, seed)
        sampler.set_epoch(number)
        return list(sampler)

    assert epoch(0, 3) == epoch(0, 3)
    assert epoch(0, 3) != epoch(0, 4) and epoch(0, 3) != epoch(1, 3)
    assert training.epoch_seed(0, 1) != training.epoch_seed(1, 0)  # not seed + epoch


def test_ranks_share_a_balanced_epoch_and_a_resumed_run_draws_the_batches_it_stopped_at(accelerator):
    from torch.utils.data import TensorDataset

    dataset = TensorDataset(torch.arange(16))
    weights = training.category_weights(["tree"] * 12 + ["rock"] * 4)
    sampler = training.WeightedEpochSampler(weights, seed=3)
    sampler.set_epoch(1)
    drawn = list(sampler)
    batches = [drawn[i : i + 2] for i in range(0, 16, 2)]

    def rank_batches(rank: int, step: int) -> list[list[int]]:
        # A fresh loader, as a (resumed) run builds it; 4 batches a rank, so step 4 starts epoch 1.
        loader = prepared(training.data_loader(dataset, 2, weights, seed=3), 3, rank, world=2)
        assert len(loader) == 4
        return [b[0].tolist() for b in training.epoch_batches(accelerator, loader, step, grad_accum=1)]

    # Accelerate hands the processes the batches of one draw in turn.
    assert [rank_batches(r, 4) for r in (0, 1)] == [batches[0::2], batches[1::2]]
    assert rank_batches(0, 0) != batches[0::2]  # epoch 0 is another draw
    # Resumed two steps into epoch 1: the same epoch, less the batches already trained on.
    assert [rank_batches(r, 6) for r in (0, 1)] == [batches[4::2], batches[5::2]]


def test_without_weights_the_loader_gives_the_batches_of_a_plain_shuffle():
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(torch.arange(10))
    before = DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True)  # what fit built before weights
    ours, theirs = prepared(training.data_loader(dataset, 4, None, seed=5), 5), prepared(before, 5)
    for epoch in (0, 1):
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert [b[0].tolist() for b in ours] == [b[0].tolist() for b in theirs]


def test_sampling_weights_must_match_the_dataset():
    from torch.utils.data import TensorDataset

    with pytest.raises(ValueError, match="3 sampling weights for 4 items"):
        training.data_loader(TensorDataset(torch.zeros(4)), 2, [1.0, 1.0, 1.0], seed=0)


class Planted:
    """A pickle that runs code when it is loaded: it writes a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_a_pickle_that_runs_code_is_refused(tmp_path, accelerator):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.cosine_schedule(2, 10, 0.1))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    ckpts = training.Checkpoints(tmp_path / "ck", keep=2)
    ckpts.save(accelerator, 5, {"fingerprint": "f"})
    assert training.resume(accelerator, ckpts, "f", 10)[0] == 5  # a checkpoint of our own loads
    marker = tmp_path / "ran"
    torch.save(Planted(str(marker)), ckpts.latest().path / "custom_checkpoint_0.pkl")
    with pytest.raises(training.CheckpointError, match=r"custom_checkpoint_0\.pkl: holds more than tensors"):
        training.resume(accelerator, ckpts, "f", 10)
    assert not marker.exists()
