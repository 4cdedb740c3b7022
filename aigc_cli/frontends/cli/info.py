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
