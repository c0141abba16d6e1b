"""Shared training pieces: LR schedule, checkpoints, provenance."""

from __future__ import annotations


import pytest
import torch
import yaml
from accelerate import Accelerator

from shapeflow import training


def test_schedule_warms_up_then_decays_to_the_floor():
    f = training.cosine_schedule(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.fixture()
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def state_of(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_ema_of_a_short_run_follows_the_model_and_survives_a_checkpoint():
    model = torch.nn.Linear(4, 4)
    torch.nn.init.zeros_(model.weight)
    ema = training.EMA(model, 0.999)
    torch.nn.init.ones_(model.weight)
    for _ in range(100):
        ema.update(model)
    target = torch.nn.Linear(4, 4)
    ema.copy_to(target)
    # Without the warm-up 100 updates at 0.999 would leave 1 - 0.999^100 = 0.095 of the way.
    assert target.weight.min().item() > 0.99
    assert ema.current_decay() == pytest.approx(101 / 110)
    resumed = training.EMA(torch.nn.Linear(4, 4), 0.999)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.current_decay() == ema.current_decay()
    for _ in range(10_000):
        resumed.update(model)
    assert resumed.current_decay() == 0.999  # the cap, once warmed up


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
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    ckpts = training.Checkpoints(tmp_path / "ck", keep=3)
    ckpts.save(accelerator, 4, {})
    # A kill during save leaves a temporary folder, or a step folder without trainer.json.
    (tmp_path / "ck" / ".tmp-step_00000008").mkdir()
    (tmp_path / "ck" / "step_00000012").mkdir()
    assert ckpts.latest().step == 4


def test_dvc_hash_is_read_from_the_lock_for_the_stage_output(tmp_path, monkeypatch):
    lock = {
        "schema": "2.0",
        "stages": {"sample": {"cmd": "x", "outs": [{"path": "data/samples", "md5": "abc.dir", "size": 1}]}},
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "data" / "samples").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert training.dvc_hash("data/samples") == "abc.dir"
    assert training.dvc_hash(tmp_path / "data" / "samples") == "abc.dir"
    assert training.dvc_hash("data/other") is None
    monkeypatch.chdir(tmp_path / "data")
    assert training.dvc_hash("samples") is None  # no dvc.lock here


def test_flatten_nests_with_dots():
    assert training.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3, "f": {}}) == {"a.b": 1, "a.c.d": 2, "e": 3, "f": {}}


def test_precision_auto_is_full_precision_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert training.pick_precision("auto") == "no"
    assert training.pick_precision("bf16") == "bf16"


def test_git_commit_outside_a_repository_is_unknown(tmp_path):
    assert training.git_commit(tmp_path) == "unknown"


def test_cpu_training_shares_the_cores_among_the_processes_of_a_machine(monkeypatch):
    monkeypatch.delenv("SHAPEFLOW_THREADS", raising=False)
    monkeypatch.setattr(training.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert [training.cpu_threads(n) for n in (1, 2, 3, 8)] == [4, 2, 1, 1]
    monkeypatch.setenv("SHAPEFLOW_THREADS", "3")  # an explicit budget wins
    assert [training.cpu_threads(n) for n in (1, 8)] == [3, 3]


def test_one_cpu_process_uses_every_core_even_when_the_launcher_set_one_thread(monkeypatch):
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
    with pytest.raises(ParamsError, match=r"train_vae: 3 training object\(s\) give none of the 2 processes a batch of 8; lower train_vae.batch_size"):
        training.require_batches(empty, 3, 8, 2, "train_vae")
    training.require_batches(accelerator.prepare(DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=8)), 8, 8, 1, "train_vae")
