"""`aigc info`: versions, devices and where --model resolves, without loading the model."""

from __future__ import annotations

import typer

from aigc_cli.frontends.cli import options as o

EPILOG = "Example:\n\n  aigc info --model ./my-finetuned-gpt2"


def command(model: o.ModelOpt = "gpt2", debug: o.DebugOpt = False) -> None:
    """Show versions, available devices and where --model resolves, without loading it."""
    import platform

    import torch
    import transformers

    from aigc_cli import __version__
    from aigc_cli.models.loading import resolve

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    for line in (
        f"aigc {__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"devices: {', '.join(devices)}",
    ):
        typer.echo(line)
    spec = o.model_spec(model, "auto", "auto")
    res = resolve(spec.name)
    where = {
        "builtin": ("built-in tiny random Chinese GPT-2, BERT-style character vocabulary" if spec.name.endswith("-zh") else "built-in tiny random GPT-2")
        + " (no download)",
        "local": f"local directory {res.path}",
        "hub-cache": f"Hugging Face cache {res.path}",
        "hub": "Hugging Face Hub (will be downloaded and cached on first use)",
    }[res.kind]
    typer.echo(f"model {spec.name}: {where}")
    if res.kind != "hub":
        _conventions(spec.name)


def _conventions(name: str) -> None:
    """The model's start, end and pad tokens, and why (models.conventions), from its tokenizer alone."""
    from pathlib import Path

    from aigc_cli.models.conventions import settle
    from aigc_cli.models.loading import load_tokenizer, resolve

    tokenizer, _ = load_tokenizer(name)
    res = resolve(name)
    c = settle(tokenizer, Path(res.path) if res.path else None, name)
    for role, token, token_id in (("start", c.start, c.start_id), ("end", c.end, c.end_id), ("pad", c.pad, c.pad_id)):
        typer.echo(f"{role} token: {token} ({token_id})" if token is not None else f"{role} token: none")
    prefix = ", ".join(tokenizer.convert_ids_to_tokens(list(c.prefix))) if c.prefix else "nothing"
    typer.echo(f"prompts start with: {prefix}")
    for note in c.why:
        typer.echo(f"  ({note})")
