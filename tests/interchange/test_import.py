"""``unbroken import`` and ``unbroken.import_checkpoint``: each format is written here the way its
framework writes it (real ``torch.save``, a real ``lightning.Trainer``, a real ``transformers.Trainer``),
imported, and resumed with a CheckpointManager; the restored objects equal the originals exactly."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import unbroken
from tests.helpers import assert_exactly_equal, make_mlp, make_optimizer, make_scaler, make_scheduler, train
from unbroken.cli.main import main
from unbroken.storage import step_name


def resume(run: Path, state: dict[str, Any]) -> int:
    with unbroken.CheckpointManager(run, state=state) as manager:
        return manager.restore()


def trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_mlp(seed)
    optimizer = make_optimizer("adam", model)
    train(model, optimizer, steps=2, seed=seed)
    return model, optimizer


def fresh(seed: int = 9) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_mlp(seed)
    return model, make_optimizer("adam", model)


# -- a plain state_dict ---------------------------------------------------------------------------

def test_plain_state_dict_file_resumes_into_the_model_exactly(tmp_path: Path) -> None:
    model, _ = trained()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    record = unbroken.import_checkpoint(tmp_path / "model.pt", tmp_path / "run", step=5)
    assert record.step == 5 and record.path.endswith(step_name(5))
    restored, _ = fresh()
    assert resume(tmp_path / "run", {"model": restored}) == 5
    assert_exactly_equal(restored.state_dict(), model.state_dict())


def test_step_is_read_from_a_step_in_the_file_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, _ = trained()
    save_file(model.state_dict(), tmp_path / "weights_step_12.safetensors")
    assert unbroken.import_checkpoint(tmp_path / "weights_step_12.safetensors", tmp_path / "run").step == 12
    restored, _ = fresh()
    assert resume(tmp_path / "run", {"model": restored}) == 12
    assert_exactly_equal(restored.state_dict(), model.state_dict())


def test_a_model_and_an_optimizer_file_together_make_one_checkpoint(tmp_path: Path) -> None:
    model, optimizer = trained()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    torch.save(optimizer.state_dict(), tmp_path / "optim.pth")
    unbroken.import_checkpoint([tmp_path / "model.pth", tmp_path / "optim.pth"], tmp_path / "run", step=2)
    restored, restored_optimizer = fresh()
    assert resume(tmp_path / "run", {"model": restored, "optimizer": restored_optimizer}) == 2
    assert_exactly_equal(restored_optimizer.state_dict(), optimizer.state_dict())


def test_import_reports_every_byte_it_loads_and_writes(tmp_path: Path) -> None:
    model, optimizer = trained()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    torch.save(optimizer.state_dict(), tmp_path / "optim.pth")
    calls: list[tuple[str, int]] = []
    done: dict[str, int] = {}

    def progress(name: str, total: int) -> Any:
        calls.append((name, total))
        done[name] = 0
        return lambda n: done.__setitem__(name, done[name] + n)

    unbroken.import_checkpoint([tmp_path / "model.pth", tmp_path / "optim.pth"], tmp_path / "run", step=2,
                               progress=progress)
    tensor_bytes = sum(t.nbytes for t in model.state_dict().values()) + sum(
        t.nbytes for s in optimizer.state_dict()["state"].values() for t in s.values() if isinstance(t, torch.Tensor))
    assert calls == [("model.pth", (tmp_path / "model.pth").stat().st_size),
                     ("optim.pth", (tmp_path / "optim.pth").stat().st_size), (step_name(2), tensor_bytes)]
    assert done == dict(calls)  # each one's bytes add up to its total


# -- consistency models ---------------------------------------------------------------------------

def write_consistency_models(directory: Path, step: int) -> dict[str, Any]:
    """The files openai/consistency_models' train loop writes for one step (its savers' names)."""
    directory.mkdir(exist_ok=True)
    model, optimizer = trained(0)
    objects: dict[str, Any] = {"model": model, "optimizer": optimizer, "ema_0.999": trained(1)[0],
                               "ema_0.9999": trained(2)[0], "target_model": trained(3)[0]}
    torch.save(model.state_dict(), directory / f"model{step:06d}.pt")
    for rate in ("0.999", "0.9999"):
        torch.save(objects[f"ema_{rate}"].state_dict(), directory / f"ema_{rate}_{step:06d}.pt")
    torch.save(optimizer.state_dict(), directory / f"opt{step:06d}.pt")
    torch.save(objects["target_model"].state_dict(), directory / f"target_model{step:06d}.pt")
    (directory / "progress.csv").write_text("step,loss\n")
    return objects


def fresh_consistency_models() -> dict[str, Any]:
    model, optimizer = fresh(10)
    return {"model": model, "optimizer": optimizer, "ema_0.999": make_mlp(11), "ema_0.9999": make_mlp(12),
            "target_model": make_mlp(13)}


def assert_same_objects(restored: dict[str, Any], originals: dict[str, Any]) -> None:
    for key, original in originals.items():
        assert_exactly_equal(restored[key].state_dict(), original.state_dict(), key)


def test_consistency_models_directory_resumes_model_emas_optimizer_and_target_exactly(tmp_path: Path) -> None:
    originals = write_consistency_models(tmp_path / "logs", 200)
    record = unbroken.import_checkpoint(tmp_path / "logs", tmp_path / "run")
    assert record.step == 200
    state = fresh_consistency_models()
    assert resume(tmp_path / "run", state) == 200
    assert_same_objects(state, originals)


def test_consistency_models_files_given_one_by_one_are_one_checkpoint(tmp_path: Path) -> None:
    originals = write_consistency_models(tmp_path / "logs", 7)
    files = sorted((tmp_path / "logs").glob("*.pt"))
    assert unbroken.import_checkpoint(files, tmp_path / "run").step == 7
    state = fresh_consistency_models()
    assert resume(tmp_path / "run", state) == 7
    assert_same_objects(state, originals)


def test_consistency_models_directory_of_several_steps_needs_step_to_choose(tmp_path: Path) -> None:
    write_consistency_models(tmp_path / "logs", 100)
    originals = write_consistency_models(tmp_path / "logs", 300)
    with pytest.raises(ValueError, match=r"steps \[100, 300\].*--step"):
        unbroken.import_checkpoint(tmp_path / "logs", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert unbroken.import_checkpoint(tmp_path / "logs", tmp_path / "run", step=300).step == 300
    state = fresh_consistency_models()
    assert resume(tmp_path / "run", state) == 300
    assert_same_objects(state, originals)


def test_files_whose_names_disagree_on_the_step_are_refused(tmp_path: Path) -> None:
    write_consistency_models(tmp_path / "a", 100)
    write_consistency_models(tmp_path / "b", 300)
    with pytest.raises(ValueError, match="disagree on the step.*--step"):
        unbroken.import_checkpoint([tmp_path / "a" / "model000100.pt", tmp_path / "b" / "opt000300.pt"],
                                   tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- MiniMind ---------------------------------------------------------------------------------------

def test_minimind_dict_resumes_model_optimizer_scaler_and_keeps_the_plain_values(tmp_path: Path) -> None:
    model, optimizer = trained()
    scaler = make_scaler(trained=True)
    args = {"lr": 5e-4, "hidden_size": 512, "use_moe": False}
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": 0, "step": 40, "args": args, "world_size": 1, "wandb_id": None},
               tmp_path / "pretrain_512.pth")  # 512 is the width, not a step
    assert unbroken.import_checkpoint(tmp_path / "pretrain_512.pth", tmp_path / "run").step == 40
    restored, restored_optimizer = fresh()
    restored_scaler = make_scaler(trained=False)
    state: dict[str, Any] = {"model": restored, "optimizer": restored_optimizer, "scaler": restored_scaler,
                             "trainer_state": None}
    assert resume(tmp_path / "run", state) == 40
    assert_exactly_equal(restored.state_dict(), model.state_dict())
    assert_exactly_equal(restored_optimizer.state_dict(), optimizer.state_dict())
    assert_exactly_equal(restored_scaler.state_dict(), scaler.state_dict())
    assert_exactly_equal(state["trainer_state"], {"epoch": 0, "step": 40, "args": args, "world_size": 1,
                                                  "wandb_id": None})


def test_minimind_step_within_a_later_epoch_is_not_taken_for_the_global_step(tmp_path: Path) -> None:
    model, _ = trained()
    torch.save({"model": model.state_dict(), "epoch": 2, "step": 40}, tmp_path / "pretrain_512.pth")
    with pytest.raises(ValueError, match=r"epoch=2, step=40.*--step N"):
        unbroken.import_checkpoint(tmp_path / "pretrain_512.pth", tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- refusals ---------------------------------------------------------------------------------------

def test_file_needing_full_unpickling_is_refused_naming_the_type_and_writes_nothing(tmp_path: Path) -> None:
    model, _ = trained()
    torch.save({"model": model.state_dict(), "step": 3, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "ck.pth")
    with pytest.raises(ValueError) as caught:
        unbroken.import_checkpoint(tmp_path / "ck.pth", tmp_path / "run")
    message = str(caught.value)
    assert "argparse.Namespace" in message and "weights_only=True" in message
    assert "add_safe_globals([argparse.Namespace])" in message and "untrusted" in message
    assert "state_dict" in message  # the other fix: re-save the state_dicts only
    assert not (tmp_path / "run").exists()


def test_missing_step_is_an_error_naming_the_step_option(tmp_path: Path) -> None:
    torch.save(trained()[0].state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"no step found.*--step N"):
        unbroken.import_checkpoint(tmp_path / "model.pt", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_existing_step_is_refused_and_the_run_is_unchanged(tmp_path: Path) -> None:
    torch.save(trained(0)[0].state_dict(), tmp_path / "a.pt")
    torch.save(trained(1)[0].state_dict(), tmp_path / "b.pt")
    record = unbroken.import_checkpoint(tmp_path / "a.pt", tmp_path / "run", step=4)
    manifest = (Path(record.path) / "manifest.json").read_bytes()
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(unbroken.CheckpointExistsError, match="never overwrites"):
        unbroken.import_checkpoint(tmp_path / "b.pt", tmp_path / "run", step=4)
    assert (Path(record.path) / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == names


def test_import_refuses_a_run_a_manager_is_writing(tmp_path: Path) -> None:
    torch.save(trained()[0].state_dict(), tmp_path / "model.pt")
    with unbroken.CheckpointManager(tmp_path / "run", state={"model": make_mlp(1)}):
        with pytest.raises(unbroken.RunLockedError, match="in use"):
            unbroken.import_checkpoint(tmp_path / "model.pt", tmp_path / "run", step=1)
    assert not (tmp_path / "run" / step_name(1)).exists()


def test_an_unknown_layout_is_refused_naming_what_it_holds(tmp_path: Path) -> None:
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"not a layout unbroken import knows \(a dict with keys 'weights'\)"):
        unbroken.import_checkpoint(tmp_path / "odd.pt", tmp_path / "run", step=1)


# -- Lightning --------------------------------------------------------------------------------------

def lightning_module(seed: int) -> Any:
    lightning = pytest.importorskip("lightning")

    class Tiny(lightning.LightningModule):
        def __init__(self, hidden: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(seed)
            self.net = nn.Linear(hidden, 2)

        def training_step(self, batch: Any, _index: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)}

    return Tiny()


def test_lightning_ckpt_resumes_into_the_module_optimizer_and_scheduler_exactly(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning")
    module = lightning_module(0)
    data = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.randn(6, 2))
    trainer = lightning.Trainer(max_steps=3, accelerator="cpu", enable_progress_bar=False, logger=False,
                                enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "epoch=1-step=3.ckpt")
    assert unbroken.import_checkpoint(tmp_path / "epoch=1-step=3.ckpt", tmp_path / "run").step == 3

    # Into the LightningModule itself (the .ckpt's keys are its own: net.weight, net.bias) ...
    restored = lightning_module(1)
    optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    state: dict[str, Any] = {"model": restored, "optimizer": optimizer, "scheduler": scheduler, "trainer_state": None}
    assert resume(tmp_path / "run", state) == 3
    assert_exactly_equal(restored.state_dict(), module.state_dict())
    assert_exactly_equal(optimizer.state_dict(), trainer.optimizers[0].state_dict())
    assert_exactly_equal(scheduler.state_dict(), trainer.lr_scheduler_configs[0].scheduler.state_dict())
    assert state["trainer_state"]["global_step"] == 3 and state["trainer_state"]["epoch"] == 1
    assert state["trainer_state"]["hyper_parameters"] == {"hidden": 4}

    # ... or into a plain nn.Module holding the same submodules under the same names.
    plain = nn.Module()
    plain.net = nn.Linear(4, 2)
    state["model"] = plain
    state["optimizer"] = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    state["scheduler"] = torch.optim.lr_scheduler.StepLR(state["optimizer"], 1, 0.5)
    assert resume(tmp_path / "run", state) == 3
    assert_exactly_equal(plain.state_dict(), module.state_dict())
    assert_exactly_equal(state["optimizer"].state_dict(), trainer.optimizers[0].state_dict())


# -- Hugging Face Trainer ---------------------------------------------------------------------------

class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(8) + index) % 32
        return {"input_ids": ids, "labels": ids}


def hf_trainer(tmp_path: Path, seed: int) -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, save_steps=3,
                                          per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                          disable_tqdm=True, logging_strategy="no", seed=seed)
    return transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=_Tokens())


def test_hf_trainer_checkpoint_resumes_model_optimizer_scheduler_and_rng_exactly(tmp_path: Path) -> None:
    from unbroken.interchange.formats.files import numpy_arrays_allowed

    trainer = hf_trainer(tmp_path, seed=0)
    trainer.train()
    checkpoint = tmp_path / "hf" / "checkpoint-3"
    assert unbroken.import_checkpoint(checkpoint, tmp_path / "run").step == 3

    again = hf_trainer(tmp_path, seed=1)  # the user's resume: the same model and optimizer, built anew
    again.create_optimizer_and_scheduler(num_training_steps=3)
    state: dict[str, Any] = {"model": again.model, "optimizer": again.optimizer, "scheduler": again.lr_scheduler,
                             "trainer_state": None}
    assert resume(tmp_path / "run", state) == 3
    assert_exactly_equal(again.model.state_dict(), trainer.model.state_dict())  # the tied lm_head.weight too
    assert_exactly_equal(again.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert_exactly_equal(again.lr_scheduler.state_dict(), trainer.lr_scheduler.state_dict())
    assert state["trainer_state"] == json.loads((checkpoint / "trainer_state.json").read_text())
    with numpy_arrays_allowed():
        saved_rng = torch.load(checkpoint / "rng_state.pth", weights_only=True)
    assert_exactly_equal(torch.get_rng_state(), saved_rng["cpu"])
    assert random.getstate() == saved_rng["python"]
    assert_exactly_equal(np.random.get_state()[1], saved_rng["numpy"][1])


def test_step_given_overrides_the_step_the_files_say(tmp_path: Path) -> None:
    model, optimizer = trained()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 40},
               tmp_path / "ck.pth")
    assert unbroken.import_checkpoint(tmp_path / "ck.pth", tmp_path / "run", step=1000).step == 1000


# -- the command line -------------------------------------------------------------------------------

def test_cli_import_prints_the_step_and_the_entries_and_the_run_resumes(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model, optimizer = trained()
    scheduler = make_scheduler("step", optimizer, steps=2)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": 1}, tmp_path / "ck.pth")
    assert main(["import", str(tmp_path / "ck.pth"), "-o", str(tmp_path / "run"), "--step", "9"]) == 0
    out = capsys.readouterr().out
    assert "imported step 9" in out
    for line in ("model            module", "optimizer        optimizer", "lr_scheduler     stateful",
                 "trainer_state    value"):
        assert line in out
    restored, restored_optimizer = fresh()
    restored_scheduler = make_scheduler("step", restored_optimizer)
    state = {"model": restored, "optimizer": restored_optimizer, "lr_scheduler": restored_scheduler,
             "trainer_state": None}
    assert resume(tmp_path / "run", state) == 9
    assert_exactly_equal(restored_scheduler.state_dict(), scheduler.state_dict())
    assert state["trainer_state"] == {"epoch": 1}


def test_cli_import_without_a_step_exits_2_naming_the_step_option(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(trained()[0].state_dict(), tmp_path / "model.pt")
    assert main(["import", str(tmp_path / "model.pt"), "-o", str(tmp_path / "run")]) == 2
    assert "--step" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_import_takes_storage_options_by_their_long_name(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(trained()[0].state_dict(), tmp_path / "model.pt")
    code = main(["import", str(tmp_path / "model.pt"), "-o", str(tmp_path / "run"), "--step", "1",
                 "--storage-option", "novalue"])
    assert code == 2
    assert "--storage-option 'novalue': expected KEY=VALUE" in capsys.readouterr().err


def test_a_type_the_user_allows_is_imported_and_restored(tmp_path: Path) -> None:
    model, _ = trained()
    args = argparse.Namespace(lr=1e-3, name="exp")
    torch.save({"model": model.state_dict(), "step": 3, "args": args}, tmp_path / "ck.pth")
    with torch.serialization.safe_globals([argparse.Namespace]):  # the user's decision: they trust this file
        unbroken.import_checkpoint(tmp_path / "ck.pth", tmp_path / "run")
    state: dict[str, Any] = {"model": fresh()[0], "trainer_state": None}
    assert resume(tmp_path / "run", state) == 3
    assert_exactly_equal(state["trainer_state"], {"step": 3, "args": args})


def test_hf_tied_weight_that_cannot_be_named_without_transformers_is_warned_about(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    save_file({"transformer.wte.weight": torch.ones(4, 2)}, checkpoint / "model.safetensors")
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                        "tie_word_embeddings": True}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.warns(UserWarning, match="pip install transformers"):
        assert unbroken.import_checkpoint(checkpoint, tmp_path / "run").step == 5
    notes = unbroken.read_info(tmp_path / "run" / step_name(5)).manifest.metadata["imported"]["notes"]
    assert any("ties word embeddings" in note for note in notes)
