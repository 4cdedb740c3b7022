"""Prompt templates: the files in prompts/ (a wheel installs them as aigc_cli/prompt_files), or the user's own file."""

from __future__ import annotations

from pathlib import Path

from aigc_cli.core.errors import UsageError

_HERE = Path(__file__).resolve().parent.parent  # the aigc_cli package
# A source checkout or editable install reads the repository's prompts/; a wheel carries a copy.
PROMPTS_DIR = next((d for d in (_HERE.parent / "prompts", _HERE / "prompt_files") if d.is_dir()), _HERE.parent / "prompts")


def load_prompt(name_or_path: str, flag: str) -> str:
    """A user's template file, or one of ours by file name; the file's final newline is dropped."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROMPTS_DIR / name_or_path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {name_or_path}: cannot read the template ({exc.strerror if isinstance(exc, OSError) else exc})") from None
    return text[:-1] if text.endswith("\n") else text
