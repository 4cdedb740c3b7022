"""`aigc score --tokens --html FILE`: the token view as one self-contained HTML page (no scripts,
no external styles or fonts): tokens coloured by GLTR bucket, each one's details on hover and on
keyboard focus, a bucket histogram per text; written atomically."""

from __future__ import annotations

import math
import os
import tempfile
from html import escape
from pathlib import Path
from typing import Any

from aigc_cli.core.errors import OutputError, UsageError
from aigc_cli.frontends.cli.render import GLTR_COLOURS

_STYLE = """
body { font: 16px/1.6 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #1f2937; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 2em; }
.meta, .summary { color: #4b5563; }
.legend { display: flex; gap: .5em; flex-wrap: wrap; list-style: none; padding: 0; }
.legend li { padding: 0 .5em; border-radius: 3px; color: #000; }
.tokens { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .95em; line-height: 1.9; }
.tok { position: relative; border-radius: 2px; color: #000; outline-offset: 1px; }
.tok:focus { outline: 2px solid #1d4ed8; }
.b-none { color: #6b7280; }
.tip { display: none; position: absolute; left: 0; top: 1.7em; z-index: 10; min-width: 16em; padding: .5em .7em;
  background: #111827; color: #f9fafb; border-radius: 4px; white-space: normal; font: 13px/1.4 system-ui, sans-serif; box-shadow: 0 2px 8px rgba(0,0,0,.3); }
.tok:hover .tip, .tok:focus .tip { display: block; }
.tip table { border-collapse: collapse; margin-top: .3em; }
.tip td { padding: 0 .6em 0 0; white-space: pre; }
.tip code { color: #fde68a; }
svg.chart text { font: 12px system-ui, sans-serif; fill: #374151; }
"""
_BAR_W, _BAR_GAP, _CHART_H = 70, 20, 120


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before the model loads, a page path that cannot be written (exit 2 naming the flag)."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def page(records: list[dict[str, Any]], names: list[str], title: str, model: str) -> str:
    """The HTML page of `aigc score --tokens` records (apps.tokenview)."""
    from aigc_cli.apps.tokenview import BUCKET_LABELS

    colours = "".join(f".b-{b} {{ background: {c}; }}\n" for b, c in GLTR_COLOURS.items())
    legend = "".join(f'<li class="b-{b}">{escape(label)}</li>' for b, label in BUCKET_LABELS.items())
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{_STYLE}{colours}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">Model: {escape(model)}. Each token is coloured by the rank the model gave it '
        "(GLTR, Gehrmann et al. 2019); hover over a token or move to it with Tab for its probability, rank and "
        "the model's most likely alternatives.</p>",
        f'<ul class="legend" aria-label="legend">{legend}<li class="b-none">not scored</li></ul>',
    ]
    for number, (record, name) in enumerate(zip(records, names)):
        parts.append(_section(number, record, name))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _section(number: int, record: dict[str, Any], name: str) -> str:
    from aigc_cli.apps.tokenview import BUCKET_LABELS, fractions

    shares = fractions(record)
    summary = ", ".join(f"{BUCKET_LABELS[b]} {shares[b]:.1%}" for b in shares)
    tokens = "".join(_token(t) for t in record["tokens"])
    return (
        f'<section class="text" id="text-{number}"><h2>{escape(name)}</h2>'
        f'<p class="summary">Perplexity {record["perplexity"]:.2f} over {record["token_count"]} tokens; {escape(summary)}.</p>'
        f"{_chart(record['buckets'], shares)}"
        f'<div class="tokens">{tokens}</div></section>'
    )


def _shown(piece: str) -> str:
    """A token as the details show it: whitespace made visible."""
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") or "(part of a character)"


def _token(t: dict[str, Any]) -> str:
    from aigc_cli.apps.tokenview import BUCKET_LABELS

    piece = escape(t["token"])
    if t["logprob"] is None:
        tip = "not scored: the first token of a window (--stride equals the context)"
        return f'<span class="tok b-none" tabindex="0">{piece}<span class="tip" role="tooltip">{tip}</span></span>'
    rows = "".join(
        f"<tr><td><code>{escape(_shown(a['token']))}</code></td><td>{math.exp(a['logprob']):.2%}</td></tr>" for a in t["top"]
    )
    tip = (
        f"<code>{escape(_shown(t['token']))}</code> (id {t['id']})<br>"
        f"probability {math.exp(t['logprob']):.2%} (logprob {t['logprob']:.3f})<br>"
        f"rank {t['rank']} ({escape(BUCKET_LABELS[t['bucket']])}), entropy {t['entropy']:.2f} nats"
        + (f"<table><tr><td>most likely:</td><td></td></tr>{rows}</table>" if rows else "")
    )
    return f'<span class="tok b-{t["bucket"]}" tabindex="0">{piece}<span class="tip" role="tooltip">{tip}</span></span>'


def _chart(counts: dict[str, int], shares: dict[str, float]) -> str:
    """A bar chart of the buckets' shares as inline SVG."""
    from aigc_cli.apps.tokenview import BUCKET_LABELS

    width = len(counts) * (_BAR_W + _BAR_GAP)
    bars = []
    for i, (b, count) in enumerate(counts.items()):
        h = round(shares[b] * _CHART_H)
        x = i * (_BAR_W + _BAR_GAP)
        label = f"{BUCKET_LABELS[b]}: {count} tokens ({shares[b]:.1%})"
        bars.append(
            f'<g class="bar" data-bucket="{b}"><title>{escape(label)}</title>'
            f'<rect x="{x}" y="{20 + _CHART_H - h}" width="{_BAR_W}" height="{h}" fill="{GLTR_COLOURS[b]}" stroke="#6b7280"/>'
            f'<text x="{x + _BAR_W / 2}" y="{14 + _CHART_H - h}" text-anchor="middle">{shares[b]:.0%}</text>'
            f'<text x="{x + _BAR_W / 2}" y="{_CHART_H + 38}" text-anchor="middle">{escape(BUCKET_LABELS[b])}</text></g>'
        )
    return (
        f'<svg class="chart" role="img" aria-label="tokens by rank bucket" width="{width}" height="{_CHART_H + 46}" '
        f'viewBox="0 0 {width} {_CHART_H + 46}">{"".join(bars)}</svg>'
    )


def write_page(path: Path, records: list[dict[str, Any]], names: list[str], title: str, model: str) -> None:
    """The page, written atomically: a temporary file beside it, synced, given the file's mode (an
    existing file's, else what the umask allows) and renamed over it; OutputError naming the flag."""
    data = page(records, names, title, model).encode("utf-8")
    directory = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), _mode(path))
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"--html {path}: cannot write ({exc.strerror or exc}); the file is as it was") from None


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
