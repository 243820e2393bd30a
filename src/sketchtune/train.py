"""Fine-tuning a sketched model: only the `values` tables train, through HF Trainer/accelerate.

The same code runs on one process or data-parallel under `torchrun`/`accelerate launch` (DDP).
Work in progress lives in `<output>.run/` (checkpoints, metrics.jsonl); a checkpoint counts only
once its completion marker is written, so a kill mid-save never poisons `--resume`. The finished
task sketch is written to `<output>` atomically, with metrics.jsonl and loss.png beside it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import checkpointing
from .atomic import atomic_directory, check_output_dir
from .data.overlap import test_overlap
from .data.tasks import load_examples
from .data.tokens import collate, tokenize_examples
from .errors import SketchtuneError, first_line
from .finetune_config import FinetuneConfig
from .hub import load as load_sketched
from .loss import causal_lm_loss
from .plots import plot_loss
from .sources import load_tokenizer
from .task_sketch import (
    VALUES_NAME,
    apply_task_sketch,
    extract_task_sketch,
    load_task_sketch,
    sketched_layers,
    write_task_sketch,
)

COMPLETE_MARKER = "checkpoint-complete"


class NonFiniteLoss(RuntimeError):
    pass


class LeanLossTrainer(Trainer):
    """Trainer whose loss never holds the full logits (`loss.causal_lm_loss`, exact).

    Every method of `sketchtune compare` trains through it, so all pay the same for the loss.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # compute_loss takes num_items_in_batch whatever the model's forward takes: always count
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # evaluation wants the logits
            return super().compute_loss(model, inputs, True, num_items_in_batch)
        loss = causal_lm_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer.compute_loss: the count is global, DDP averages the ranks' gradients
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss


class SketchTrainer(LeanLossTrainer):
    """Trainer whose checkpoints hold only the task sketch, and which stops on a NaN/inf loss.

    A checkpoint is marked complete (good to resume from) only once the next step's loss,
    computed from its values, is finite; one with non-finite values is never written, and an
    unconfirmed one is removed when the loss goes non-finite.
    """

    _unconfirmed: Path | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            if self._unconfirmed is not None:
                shutil.rmtree(self._unconfirmed, ignore_errors=True)
            raise NonFiniteLoss(f"loss became {loss.item()} at step {self.state.global_step + 1}")
        if self._unconfirmed is not None:
            (self._unconfirmed / COMPLETE_MARKER).touch()
            self._unconfirmed = None
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            write_task_sketch(extract_task_sketch(self.accelerator.unwrap_model(self.model)),
                              output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        if not values_finite(self.accelerator.unwrap_model(self.model)):
            return  # the next step's loss is non-finite too and stops the run
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            self._unconfirmed = folder

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        apply_task_sketch(self.accelerator.unwrap_model(model),
                          load_task_sketch(resume_from_checkpoint))


def values_finite(model: torch.nn.Module) -> bool:
    """Whether every sketch table of `model` is free of NaN and inf."""
    return all(bool(layer.values.isfinite().all()) for layer in sketched_layers(model).values())


class MetricsLog(TrainerCallback):
    """Appends every logged step (loss, lr, tokens/s) to metrics.jsonl.

    It runs before the progress callback (which Trainer adds last), so the tokens/s it adds to
    `logs` also shows on the progress bar.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: tuple[float, int] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), int(state.num_input_tokens_seen or 0)
        if self._last is not None and now > self._last[0]:
            logs["tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 1)
        self._last = (now, tokens)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    done = [p for p in checkpoints.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def freeze_all_but_values(model: torch.nn.Module) -> int:
    """Only the sketch tables train. Returns the number of trainable parameters."""
    for param in model.parameters():
        param.requires_grad_(False)
    layers = sketched_layers(model)
    if not layers:
        raise SketchtuneError("model has no sketched layers to fine-tune (compress it first)")
    for layer in layers.values():
        layer.values.requires_grad_(True)
    return sum(layer.values.numel() for layer in layers.values())


def prepare_data(data: str, tokenizer, config: FinetuneConfig, data_root: str | None = None):
    """Tokenized training set plus a report of what was read, skipped and overlaps test sets."""
    examples, report = load_examples(data, "train", data_root)
    if config.limit:
        examples = examples[: config.limit]
    try:
        overlap = test_overlap(examples, data_root)
    except SketchtuneError as exc:  # no shared test sets here: nothing to be contaminated with
        overlap = {"not checked": str(exc)}
    if overlap:
        warnings.warn(
            f"training data {data!r} overlaps test sets: {overlap}; scores on them are inflated",
            stacklevel=2,
        )
    dataset, token_report = tokenize_examples(examples, tokenizer, config.seq_len)
    if len(dataset) == 0:
        raise SketchtuneError(f"no usable training example in {data!r} (report: {report})")
    return dataset, {**report, **token_report, "test_overlap": overlap, "used": len(dataset)}


def model_weights(model: torch.nn.Module) -> int:
    """Weights of `model` as its dense form counts them (a sketched layer: d_in x d_out)."""
    sketched = sum(m.in_features * m.out_features for m in sketched_layers(model).values())
    return sketched + sum(p.numel() for p in model.parameters())


def native_bf16() -> bool:
    """CUDA with bf16, or a CPU with bf16 instructions (elsewhere bf16 autocast is slower)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_defaults(config: FinetuneConfig, model: torch.nn.Module) -> FinetuneConfig:
    """`config` with the settings left to the machine or model ("auto" checkpointing, None bf16)
    decided for `model` here."""
    mode = checkpointing.resolve(config.gradient_checkpointing, model_weights(model))
    bf16 = native_bf16() if config.bf16 is None else config.bf16
    return replace(config, gradient_checkpointing=mode, bf16=bf16)


def training_arguments(config: FinetuneConfig, run_dir: Path, steps: int, progress: bool):
    """HF TrainingArguments for a `config` whose defaults were resolved (resolve_defaults)."""
    warmup = config.warmup if config.warmup is not None else min(100, steps // 10)
    use_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_schedule,
        warmup_steps=warmup,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.checkpoints else "no",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        activation_checkpointing=config.gradient_checkpointing != "off",
        activation_checkpointing_kwargs=checkpointing.checkpoint_kwargs(
            config.gradient_checkpointing),
        use_cpu=not use_cuda,
        bf16=config.bf16,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def train_model(
    model: torch.nn.Module,
    tokenizer,
    dataset,
    config: FinetuneConfig,
    run_dir: Path,
    trainer_cls: type[Trainer] = SketchTrainer,
    callbacks: list[TrainerCallback] | None = None,
    checkpoint: Path | None = None,
    progress: bool = True,
):
    """Run the Trainer on `model`'s trainable parameters. Returns (trainer, result, seconds).

    Shared by sketch fine-tuning and the LoRA baselines, so every method gets the same loop,
    schedule, batches, seed and loss (pass a LeanLossTrainer subclass as `trainer_cls`).
    """
    config = resolve_defaults(config, model)
    per_step = config.batch_size * config.grad_accum * max(1, int(os.environ.get("WORLD_SIZE", 1)))
    steps = config.max_steps if config.max_steps > 0 else math.ceil(
        config.epochs * len(dataset) / per_step
    )
    trainer = trainer_cls(
        model=model,
        args=training_arguments(config, run_dir, steps, progress),
        train_dataset=dataset,
        data_collator=collate(tokenizer),
        callbacks=[MetricsLog(run_dir / "metrics.jsonl"), *(callbacks or [])],
    )
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLoss as exc:
        last = last_complete_checkpoint(run_dir / "checkpoints")
        kept = f"last good checkpoint kept: {last}" if last else "no good checkpoint was reached"
        raise SketchtuneError(f"{exc}; training stopped ({kept}); try a lower --lr") from None
    except OSError as exc:  # checkpoints and metrics are the only files a run writes
        raise SketchtuneError(
            f"could not write the run's files in {run_dir}: {exc.strerror or first_line(exc)}"
        ) from None
    return trainer, result, time.perf_counter() - start


def start_run(output: Path, run_dir: Path, resume: bool, force: bool, main: bool) -> Path | None:
    """Check `output` and claim `run_dir`; returns the checkpoint to resume from, if any.

    A run folder without a complete checkpoint (a run that failed or was killed before its
    first good checkpoint) holds nothing to resume, so it is replaced without asking.
    """
    checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
    if resume:
        if checkpoint is None:
            raise SketchtuneError(
                f"nothing to resume: no complete checkpoint under {run_dir} (run without --resume)"
            )
        return checkpoint
    if not main:  # other ranks never touch the run folder (no race with rank 0's checks)
        return None
    check_output_dir(output, force)
    if checkpoint is not None and not force:
        raise SketchtuneError(
            f"{run_dir} holds an unfinished run: pass --resume to continue it "
            "or --force to start over"
        )
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return None


def finetune(
    base: str | os.PathLike,
    data: str,
    output: str | os.PathLike,
    config: FinetuneConfig | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    data_root: str | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> dict:
    """Fine-tune the values of the sketched model at `base` on `data`; write a task sketch.

    A failure before the first good checkpoint leaves no run folder behind: rerunning the same
    command starts afresh. After one, `resume=True` continues from the last good checkpoint.
    """
    config = config or FinetuneConfig()
    output = Path(output)
    run_dir = output.with_name(output.name + ".run")
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 owns the files
    checkpoint = start_run(output, run_dir, resume, force, main_process)
    try:
        return _finetune_run(base, data, output, run_dir, config, checkpoint, progress,
                             data_root, callbacks)
    except BaseException:
        if main_process and last_complete_checkpoint(run_dir / "checkpoints") is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _finetune_run(base, data, output: Path, run_dir: Path, config: FinetuneConfig,
                  checkpoint: Path | None, progress: bool, data_root, callbacks) -> dict:
    model = load_sketched(base)  # checks the folder first: the tokenizer is read from it next
    tokenizer = load_tokenizer(base)
    trainable = freeze_all_but_values(model)
    dataset, data_report = prepare_data(data, tokenizer, config, data_root)
    trainer, result, seconds = train_model(
        model, tokenizer, dataset, config, run_dir, callbacks=callbacks, checkpoint=checkpoint,
        progress=progress,
    )
    if not values_finite(model):
        raise SketchtuneError(
            f"the values became non-finite at step {trainer.state.global_step}; try a lower --lr"
        )
    summary = {
        "base": str(base),
        "data": data,
        "trainable_parameters": trainable,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_seconds": seconds,
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "settings": asdict(resolve_defaults(config, model)),  # as trained: auto resolved
        "data_report": data_report,
    }
    if trainer.args.should_save:
        sketch = extract_task_sketch(model, info={"training": summary})
        with atomic_directory(output, force=True) as temp:
            write_task_sketch(sketch, temp)
            shutil.copy(run_dir / "metrics.jsonl", temp / "metrics.jsonl")
            plot_loss(temp / "metrics.jsonl", temp / "loss.png")
        shutil.rmtree(run_dir, ignore_errors=True)
        summary["task_sketch_bytes"] = (output / VALUES_NAME).stat().st_size
    return summary
