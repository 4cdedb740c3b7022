"""`aigc finetune`: check the flags, lock the output directory (a second run there is refused),
read the data, then run the trainer (apps.finetune) with a progress bar; Ctrl-C and SIGTERM save a
checkpoint and exit 130."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from aigc_cli.core.errors import ExitCode, UsageError
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.frontends.cli import options as o
from aigc_cli.frontends.cli.render import Messages, Streams
from aigc_cli.jobs.textfiles import Problems

if TYPE_CHECKING:
    from aigc_cli.apps.finetune import Schedule, TrainSettings

EPILOG = (
    "Examples:\n\n"
    "  aigc finetune poems.txt -o ./my-poet --model gpt2 --epochs 3 --block-size 256\n\n"
    "  aigc finetune lines.txt -o ./taglines --line-by-line --steps 500 --sample-every 100 --sample-prompt \"Our coffee\"\n\n"
    "  aigc finetune poems.txt -o ./my-poet --model gpt2 --epochs 3 --block-size 256 --resume     (after an interruption)\n\n"
    "  aigc generate \"The moon\" --model ./my-poet\n\n"
    f"{o.EXIT_CODES_HELP}"
)


@o.with_model(quantize=False, fmt=False)
def command(
    spec: ModelSpec,
    data: Annotated[list[str], typer.Argument(help="Text files, JSONL files with a \"text\" field, or '-' for stdin.", show_default=False, metavar="DATA...")],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the fine-tuned model (and its checkpoint and training log).", metavar="DIR")],
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: from --epochs).")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the training data, when --steps is not given.")] = 1.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, linear decay after the warm-up).")] = 5e-5,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    block_size: Annotated[Optional[int], typer.Option(help="Tokens per training block (default: the model's context, at most 1024).")] = None,
    line_by_line: Annotated[bool, typer.Option(help="Each non-empty line is one example (instead of packed blocks).")] = False,
    val_split: Annotated[Optional[float], typer.Option(help="Fraction of the examples held out for validation perplexity (default 0.05).")] = None,
    val: Annotated[Optional[str], typer.Option("--val", help="Validation data file (instead of --val-split).", metavar="FILE")] = None,
    eval_every: Annotated[int, typer.Option(help="Validation perplexity every N steps (0: before and after only).")] = 0,
    sample_every: Annotated[int, typer.Option(help="Print a sample every N steps (0: never).")] = 0,
    sample_prompt: Annotated[str, typer.Option(help="Prompt of the samples (default: the start of the data).", metavar="TEXT")] = "",
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only on Ctrl-C); the last step's checkpoint is also written before the model, and removed once the model is saved.")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in -o DIR (same data and settings), e.g. after Ctrl-C or a full disk.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in -o DIR.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the initial state, data order, split and dropout.")] = 0,
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.")] = 0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases and norms).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this.")] = 1.0,
) -> None:
    """Fine-tune the model on your text; the result is a model directory for --model DIR."""
    from aigc_cli.apps.finetune import OutputLock, Schedule, TrainSettings

    if spec.dtype not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"--dtype: training runs in float32, with bfloat16 autocast on a GPU (got {spec.dtype})")
    for flag, value in (("--eval-every", eval_every), ("--sample-every", sample_every), ("--save-every", save_every)):
        if value < 0:
            raise UsageError(f"{flag}: must be 0 or more (got {value})")
    if val is not None and val_split is not None:
        raise UsageError("--val and --val-split: give one")
    settings = TrainSettings(
        model=spec.name, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, block_size=block_size,
        line_by_line=line_by_line, val_split=0.0 if val is not None else (0.05 if val_split is None else val_split), val_file=val, seed=seed,
        warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
    )
    settings.check()
    schedule = Schedule(eval_every, sample_every, sample_prompt, save_every)
    with OutputLock(Path(output)) as lock:
        _train(spec, settings, schedule, data, val, lock.out, resume, overwrite)


def _train(
    spec: ModelSpec, settings: TrainSettings, schedule: Schedule, data: list[str], val: str | None, out: Path, resume: bool, overwrite: bool
) -> None:
    """The run, in the locked directory: check the data, load the model, tokenize, train, save."""
    from aigc_cli.apps.finetune import Trainer, prepare_output, scan_data

    messages = Messages(Streams())
    problems = Problems("data", messages.warn)
    corpus = scan_data(data, out, problems=problems)
    val_corpus = scan_data([val], out, problems=problems) if val is not None else None
    prepare_output(out, resume, overwrite)
    with messages.status(f"Loading {spec.name} and tokenizing the data..."):
        trainer = Trainer(settings, schedule, out, corpus, val_corpus, spec.device, spec.dtype, messages.info)
    if resume:
        trainer.load_checkpoint()
    messages.info(
        f"training on {len(trainer.train)} examples of up to {trainer.block} tokens ({len(trainer.val)} held out), "
        f"{trainer.total} steps from step {trainer.state.step}"
    )
    try:
        with o.terminate_as_interrupt(), messages.training(trainer.total, trainer.state.step) as update:
            result = trainer.run(update)
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        messages.error(f"interrupted at step {trainer.state.step}; checkpoint saved: rerun the same command with --resume to continue")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    messages.info(f"saved the model to {out} after {result['steps']} steps (training log: {out / 'training_log.jsonl'})")
    if problems:
        messages.warn(f"{len(problems)} items of the data were left out (see above)")
        raise typer.Exit(int(ExitCode.PARTIAL))
