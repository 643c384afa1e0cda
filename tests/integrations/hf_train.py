"""Worker for tests/integrations/test_hf_trainer.py: a tiny GPT-2 trained by the Hugging Face Trainer,
made resumable by one line, run as a real process (killed with SIGKILL, then run again).

    python -m tests.integrations.hf_train OUT_DIR RUN_DIR RESULT_PREFIX

Environment: HF_KILL_AT=K kills the process (SIGKILL) at the end of optimizer step K, once the saves
started so far are committed, before step K is logged or saved; HF_SIGNAL=SIGTERM sends that instead
(the adapter saves step K and exits 75).  HF_ADAPTER=0 runs the bare Trainer
(the script without the adapter still works).

Appends to RESULT_PREFIX.steps.jsonl, as it goes, the step it starts from and every optimizer step's
micro-batch losses (kept by a killed run too).  At the end writes RESULT_PREFIX.json (the Trainer's
global_step, epoch, total_flos and log entries; logging_steps=2, so a checkpoint at an odd step holds a
loss not yet logged) and RESULT_PREFIX.safetensors (final weights and optimizer state).
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

SAMPLES, SEQ, VOCAB = 40, 8, 32  # 10 batches of 4 per epoch, 2 per update: 5 updates per epoch


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=gen)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Recording(Trainer):
    """A user's Trainer subclass (resumable() keeps its overrides) that records each micro-batch loss."""

    losses: list[float]

    def training_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


class Record(TrainerCallback):
    def __init__(self, trainer: Recording, path: str) -> None:
        self.trainer, self.path = trainer, path
        trainer.losses = []

    def write(self, line: dict[str, object]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.write({"start": state.global_step})

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.write({"step": state.global_step, "losses": self.trainer.losses})
        self.trainer.losses = []


class KillAt(TrainerCallback):
    """A signal at the end of step K: step K is trained but not yet logged or saved."""

    def __init__(self, trainer: Trainer, step: int, signum: int) -> None:
        self.trainer, self.step, self.signum = trainer, step, signum

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            manager = getattr(getattr(self.trainer, "unbroken", None), "manager", None)
            if manager is not None and self.signum == signal.SIGKILL:
                manager.wait()  # the saves before K are committed: which checkpoint resumes is known
            os.kill(os.getpid(), self.signum)


def main(out_dir: str, run_dir: str, result: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # dropout on: the resumed steps draw the same random numbers only if the RNG streams resume
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16))
    args = TrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[], max_steps=12,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
                             warmup_steps=2, logging_steps=2, save_strategy="steps", save_steps=4,
                             dataloader_num_workers=0, seed=7, disable_tqdm=True)
    trainer = Recording(model=model, args=args, train_dataset=Tokens())
    trainer.add_callback(Record(trainer, result + ".steps.jsonl"))
    adapter = os.environ.get("HF_ADAPTER", "1") == "1"
    if adapter:  # the one added line
        from unbroken.integrations.transformers import resumable
        trainer = resumable(trainer, run_dir, every_steps=3, keep_last=2)
    kill_at = int(os.environ.get("HF_KILL_AT", "0"))
    if kill_at:
        trainer.add_callback(KillAt(trainer, kill_at, signal.Signals[os.environ.get("HF_SIGNAL", "SIGKILL")]))
    # The Trainer's idiom; with the adapter it also starts a run whose directory has no checkpoint yet.
    trainer.train(resume_from_checkpoint=True if adapter else None)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    with open(result + ".json", "w") as f:
        json.dump({"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
                   "total_flos": trainer.state.total_flos, "logged": logged}, f)
    tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for index, per_param in trainer.optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            tensors[f"optimizer/{index}/{key}"] = torch.as_tensor(value).clone().contiguous()
    save_file(tensors, result + ".safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:4])
