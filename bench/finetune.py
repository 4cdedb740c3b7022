"""Fine-tuning benchmark: `aigc finetune` against transformers' Trainer on the same data and
hyperparameters, GPT-2 small's shape (random weights), block 256, batch 4; training tokens/s and
each whole process's peak memory. Writes bench/RESULTS-finetune.md.

    .venv/bin/python bench/finetune.py               # 30 steps each, twice, alternating
    .venv/bin/python bench/finetune.py --steps 10    # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from batch import _cpu_name, make_prompts  # noqa: E402
from make_model import build  # noqa: E402

PY = str(ROOT / ".venv" / "bin" / "python")

TRAINER = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from aigc_cli.apps.finetune import make_examples
from aigc_cli.models.loading import load_trainable

model_dir, data, steps, block, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.manual_seed(0)
_, tokenizer, _ = load_trainable(model_dir, "cpu")
model = AutoModelForCausalLM.from_pretrained(model_dir)
examples = make_examples(tokenizer, [open(data).read()], block, False)
dataset = [{"input_ids": e, "labels": e} for e in examples]
args = TrainingArguments(
    output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=5e-5, weight_decay=0.0,
    warmup_steps=0, max_grad_norm=1.0, lr_scheduler_type="linear", logging_steps=10**9, save_strategy="no",
    report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
)
result = Trainer(model=model, args=args, train_dataset=dataset).train()
print(json.dumps({"tokens_per_s": steps * batch * block / result.metrics["train_runtime"]}))
"""


def peak(cmd: list[str]) -> tuple[str, int]:
    """(stdout, peak RSS in MiB) of a whole process."""
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True, check=True)
    rss = int(re.search(r"MAXRSS (\d+)", proc.stderr).group(1)) // 1024  # type: ignore[union-attr]
    return proc.stdout, rss


def run_aigc(model: Path, data: Path, steps: int, block: int, batch: int, tmp: Path) -> tuple[float, int]:
    out = tmp / f"aigc-{len(list(tmp.iterdir()))}"
    _, rss = peak([
        PY, "-m", "aigc_cli", "finetune", str(data), "-o", str(out), "--model", str(model), "--steps", str(steps),
        "--block-size", str(block), "--batch-size", str(batch), "--val-split", "0", "--save-every", "0", "--device", "cpu",
    ])
    log = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    return [x for x in log if "tokens_per_s" in x][-1]["tokens_per_s"], rss


def run_trainer(model: Path, data: Path, steps: int, block: int, batch: int, tmp: Path) -> tuple[float, int]:
    script = tmp / "trainer.py"
    script.write_text(TRAINER)
    out, rss = peak([PY, str(script), str(model), str(data), str(steps), str(block), str(batch), str(tmp / "trainer-out")])
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"], rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "RESULTS-finetune.md"))
    args = ap.parse_args()
    model = build()
    results: dict[str, list[tuple[float, int]]] = {"aigc finetune": [], "transformers Trainer": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data.txt"
        data.write_text("\n".join(make_prompts(4000)) + "\n")
        for r in range(args.rounds):  # alternate, so that the machine's drift hits both alike
            for name, fn in (("aigc finetune", run_aigc), ("transformers Trainer", run_trainer)):
                rate, rss = fn(model, data, args.steps, args.block, args.batch, tmp)
                results[name].append((rate, rss))
                print(f"round {r + 1}, {name}: {rate:.0f} tok/s, peak {rss} MiB", flush=True)
    best = {name: (max(r for r, _ in rs), max(m for _, m in rs)) for name, rs in results.items()}
    ratio = best["aigc finetune"][0] / best["transformers Trainer"][0]
    lines = [
        "# Fine-tuning benchmark (bench/finetune.py)",
        "",
        f"Run {datetime.date.today()} on {_cpu_name()}, {os.cpu_count()} cores, no GPU; GPT-2 small's shape (random weights, "
        f"124M parameters), block {args.block}, batch {args.batch}, {args.steps} optimizer steps, AdamW lr 5e-5, linear decay, "
        "clip 1.0, dropout on, float32; the same packed blocks for both. Tokens/s over the training loop (the model load "
        f"and data preparation excluded); peak memory of the whole process. {args.rounds} rounds, alternating; best round shown.",
        "",
        "| trainer | tokens/s (each round) | best | peak memory |",
        "|---|---|---:|---:|",
        *(
            f"| {name} | {', '.join(f'{r:.0f}' for r, _ in rs)} | {best[name][0]:.0f} | {best[name][1]} MiB |"
            for name, rs in results.items()
        ),
        "",
        f"aigc finetune / Trainer: {ratio:.2f}x the tokens/s, {best['aigc finetune'][1] - best['transformers Trainer'][1]:+d} MiB peak memory.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
