"""Fine-tune a VILA checkpoint on a data-engine export with transformers' ``Trainer`` (accelerate underneath).

A run writes one folder::

    <run>/model/                  the fine-tuned checkpoint in the released layout (config.json, llm/,
                                  vision_tower/, mm_projector/) with training_record.json
    <run>/steps/checkpoint-<n>/   resumable checkpoints: each is itself a loadable checkpoint in the
                                  released layout, plus the optimizer, scheduler and RNG state
    <run>/training_record.json    what was trained on what, with which settings, and how it went

The same code runs on one CPU, one GPU, or many GPUs and nodes under ``accelerate launch`` (DDP,
FSDP or DeepSpeed ZeRO-3, configured by the files in ``configs/accelerate/``): distribution is the
Trainer's, nothing is home-made.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from vila_m3.data.privacy import export_privacy_problem
from vila_m3.progress import duration_text, is_terminal
from vila_m3.training.examples import ConversationDataset, DataError, collate
from vila_m3.training.layout import MODEL_DIR, STEPS_DIR
from vila_m3.training.options import TrainingOptions
from vila_m3.training.record import RECORD_NAME, build_record
from vila_m3.vlm.configuration import STAND_IN_FIELD
from vila_m3.vlm.errors import CheckpointError
from vila_m3.vlm.modeling import VilaForConditionalGeneration, inspect_checkpoint
from vila_m3.vlm.templates import detect_template

__all__ = ["MODEL_DIR", "STEPS_DIR", "PrivacyCheckFailed", "TrainingError", "TrainingResult", "fine_tune",
           "latest_step_checkpoint", "require_private_export"]


# The LLM's linear layers that LoRA adapts (attention and MLP of every decoder layer).
LORA_TARGETS = r"llm\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


class TrainingError(RuntimeError):
    """A fine-tuning run cannot start or continue; the message says why."""


class PrivacyCheckFailed(DataError):
    """The export's privacy check failed (or cannot be confirmed): it is not trained on."""


def require_private_export(data: str | Path) -> None:
    """Refuse an export whose privacy check failed (:func:`vila_m3.data.privacy.export_privacy_problem`).

    Raises:
        PrivacyCheckFailed: naming the export and the check.
    """
    problem = export_privacy_problem(data)
    if problem is not None:
        raise PrivacyCheckFailed(problem)


@dataclass
class TrainingResult:
    """A finished run: the checkpoint folder, its record, and the metrics."""

    run_dir: Path
    checkpoint: Path
    record: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record["metrics"]


def latest_step_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``<run>/steps/checkpoint-<n>`` folder, or None."""
    steps = Path(run_dir) / STEPS_DIR
    found = get_last_checkpoint(str(steps)) if steps.is_dir() else None
    return Path(found) if found else None


class _VilaTrainer(Trainer):
    """``Trainer`` whose checkpoints are loadable VILA checkpoints (released layout), also on resume."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        target = model if model is not None else self.model
        if not isinstance(target, VilaForConditionalGeneration):  # peft: the Trainer's adapter loading
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        saved = VilaForConditionalGeneration.from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(saved.state_dict())


def _on_cpu(options: TrainingOptions) -> bool:
    """Whether the run trains on the CPU: asked for (``device: cpu``), or no GPU is there."""
    return options.device == "cpu" or not torch.cuda.is_available()


def _precision(options: TrainingOptions) -> bool:
    """Whether to train in bfloat16 mixed precision."""
    gpu_bf16 = not _on_cpu(options) and torch.cuda.is_bf16_supported()
    if options.precision == "bf16" and not gpu_bf16:
        raise TrainingError("precision bf16 needs a GPU with bfloat16 support; use precision auto or fp32")
    return options.precision == "bf16" or (options.precision == "auto" and gpu_bf16)


def _select_parts(model: VilaForConditionalGeneration, parts: Sequence[str]) -> None:
    """Freeze everything, then unfreeze the chosen parts."""
    modules = {"llm": model.llm, "projector": model.mm_projector, "vision": model.vision_tower}
    for name, module in modules.items():
        module.requires_grad_(name in parts)


def _with_lora(model: VilaForConditionalGeneration, options: TrainingOptions) -> torch.nn.Module:
    """LoRA adapters on the LLM (peft); the projector and vision tower train fully when chosen."""
    from peft import LoraConfig, get_peft_model

    modules_to_save = [name for part, name in (("projector", "mm_projector"), ("vision", "vision_tower"))
                       if part in options.parts]
    config = LoraConfig(r=options.lora.r, lora_alpha=options.lora.alpha, lora_dropout=options.lora.dropout,
                        target_modules=LORA_TARGETS, modules_to_save=modules_to_save or None, bias="none")
    return get_peft_model(model, config)


class _LineLogger(TrainerCallback):
    """One plain line per log event, with the time elapsed and left (for logs and MONAI Label's train
    status, where a bar is unreadable): ``Fine-tuning the VLM: step 120/2000, 2 min 10 s elapsed, ~14 min
    left; loss 1.234, ...``. Time left: the mean pace of this run's steps so far."""

    def __init__(self, emit: Callable[[str], None], description: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.emit = emit
        self.description = description
        self.clock = clock
        self.started = clock()
        self.first_step = 0

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.started, self.first_step = self.clock(), state.global_step  # a resumed run starts past 0
        self.emit(f"{self.description}: {state.max_steps - state.global_step} steps to go")

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (logs or {}).items())
        self.emit(f"{self.description}: step {state.global_step}/{state.max_steps}, {self._time(state)}; {shown}")

    def _time(self, state: Any) -> str:
        elapsed = self.clock() - self.started
        done, left = state.global_step - self.first_step, state.max_steps - state.global_step
        if done <= 0 or left <= 0:
            return f"{duration_text(elapsed)} elapsed"
        return f"{duration_text(elapsed)} elapsed, ~{duration_text(elapsed / done * left)} left"


def fine_tune(
    base: str | Path,
    data: str | Path,
    run_dir: str | Path,
    options: TrainingOptions | None = None,
    resume: bool | str | Path = False,
    note: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    description: str = "Fine-tuning the VLM",
) -> TrainingResult:
    """Fine-tune ``base`` on the export ``data``; write the run into ``run_dir``.

    Args:
        base: a checkpoint folder in the released layout.
        data: a data-engine export (``train.json``, ``val.json``, ``images/``, ``manifest.json``).
        run_dir: the run folder (see the module docstring); must not hold an earlier run unless resuming.
        options: hyper-parameters (default: ``configs/training.yaml``).
        resume: ``True`` continues from the newest checkpoint in ``run_dir/steps``; a path, from that one.
        note: when set, the saved checkpoint is marked as a stand-in with this text (demo models): the
            server then shows it with every answer. A base that is a stand-in keeps its mark.
        progress: show a progress bar on a terminal (stderr is one); else, and with False, one log line
            per logging step with the time elapsed and left.
        log: where log lines go (default: print).
        description: the run in words, at the start of its progress lines.

    Raises:
        PrivacyCheckFailed: the export failed its privacy check (see :func:`require_private_export`);
            nothing is loaded or written.
        TrainingError / DataError / CheckpointError: with a message naming the problem.
    """
    options = options or TrainingOptions.from_config()
    emit = log or (lambda line: print(line, flush=True))
    require_private_export(data)
    run = Path(run_dir)
    base_dir = Path(base).expanduser()
    inspect_checkpoint(base_dir, require_tokenizer=True)
    resume_from = _resume_point(run, resume)

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir / "llm"), local_files_only=True)
    template = detect_template(tokenizer)
    model = VilaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    if note:
        setattr(model.config, STAND_IN_FIELD, note)
    max_length = options.max_length or model.context_length
    datasets = {
        split: ConversationDataset(data, split, tokenizer, template, model.image_processor,
                                   model.tokens_per_image, max_length)
        for split in ("train", "val")
    }
    if not len(datasets["train"]):
        raise DataError(f"{data}/train.json has no record that fits in {max_length} tokens")
    for split, dataset in datasets.items():
        if dataset.skipped:
            emit(f"{split}: {dataset.skipped} record(s) longer than {max_length} tokens left out")

    _select_parts(model, options.parts)
    trained: torch.nn.Module = _with_lora(model, options) if options.lora.enabled else model
    if options.gradient_checkpointing and options.lora.enabled:
        model.llm.enable_input_require_grads()  # checkpointed layers need inputs that carry gradients

    has_val = len(datasets["val"]) > 0
    bar = progress and is_terminal(sys.stderr)
    interval = "steps" if options.save_steps else "epoch"
    args = TrainingArguments(
        output_dir=str(run / STEPS_DIR),
        num_train_epochs=float(options.epochs),
        max_steps=options.max_steps or -1,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation,
        learning_rate=options.learning_rate,
        lr_scheduler_type=options.lr_scheduler,
        warmup_steps=options.warmup_ratio,
        weight_decay=options.weight_decay,
        bf16=_precision(options),
        activation_checkpointing=options.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy=_eval_strategy(options.eval_steps) if has_val else "no",
        eval_steps=options.eval_steps if options.eval_steps > 0 else None,
        save_strategy=interval,
        save_steps=options.save_steps or 500,
        save_total_limit=options.save_total_limit,
        logging_steps=options.logging_steps,
        seed=options.seed,
        data_seed=options.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=not bar,
        use_cpu=_on_cpu(options),
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = _VilaTrainer(
        model=trained,
        args=args,
        data_collator=lambda batch: collate(batch, pad_id),
        train_dataset=datasets["train"],
        eval_dataset=datasets["val"] if has_val else None,
        callbacks=[] if bar else [_LineLogger(emit, description)],
    )
    if not bar:
        trainer.remove_callback(PrinterCallback)  # _LineLogger prints the same, readably

    started = time.time()
    if has_val and resume_from is None:
        emit(f"{description}: the loss on {len(datasets['val'])} validation records before training")
    before = trainer.evaluate() if has_val and resume_from is None else {}
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if has_val:
        emit(f"{description}: the loss on {len(datasets['val'])} validation records after training")
    after = trainer.evaluate() if has_val else {}
    finished = time.time()

    final = trained.merge_and_unload() if options.lora.enabled else model
    checkpoint = run / MODEL_DIR
    metrics = {
        "train_loss": output.training_loss,
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss": after.get("eval_loss"),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_records": len(datasets["train"]),
        "val_records": len(datasets["val"]),
        "skipped_records": {split: d.skipped for split, d in datasets.items()},
        "log_history": trainer.state.log_history,
    }
    record = build_record(base_dir, Path(data), options, metrics, started, finished,
                          resumed_from=resume_from, world_size=trainer.args.world_size)
    if trainer.is_world_process_zero():
        final.save_pretrained(checkpoint, tokenizer=tokenizer)
        for folder in (checkpoint, run):
            (folder / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        emit(f"saved the fine-tuned checkpoint to {checkpoint} (steps {metrics['steps']}, "
             f"eval loss {_fmt(metrics['eval_loss_before'])} -> {_fmt(metrics['eval_loss'])})")
    return TrainingResult(run_dir=run, checkpoint=checkpoint, record=record)


def _eval_strategy(eval_steps: int) -> str:
    """``eval_steps`` > 0: every so many steps; 0: each epoch; -1: only before and after training."""
    return "steps" if eval_steps > 0 else "epoch" if eval_steps == 0 else "no"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _resume_point(run: Path, resume: bool | str | Path) -> Path | None:
    """Where to resume from, or None for a fresh run (which needs an empty run folder)."""
    if resume is True:
        found = latest_step_checkpoint(run)
        if found is None:
            raise TrainingError(f"nothing to resume: {run / STEPS_DIR} has no checkpoint-<step> folder")
        return found
    if resume:
        path = Path(resume)
        if not path.is_dir():
            raise TrainingError(f"cannot resume from {path}: no such folder")
        try:
            inspect_checkpoint(path)
        except CheckpointError as err:
            if not (path / "adapter_config.json").is_file():
                raise TrainingError(f"cannot resume from {path}: {err}") from None
        return path
    if (run / MODEL_DIR).exists() or (run / STEPS_DIR).exists():
        raise TrainingError(f"{run} holds an earlier run: choose a new run folder, or resume the run in it (--resume)")
    os.makedirs(run, exist_ok=True)
    return None
