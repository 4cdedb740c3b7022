"""`aigc recommend`: rank a catalog for a user with the language model, evaluate the ranking on
users, or suggest generated ideas (apps.recommend), and render the result."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from aigc_cli.apps.recommend import Aggregate, ScoreKind
from aigc_cli.core.errors import ExitCode, UsageError
from aigc_cli.core.settings import MAX_BATCH
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.frontends.cli import options as o
from aigc_cli.frontends.cli.render import Messages, OutputFormat, Streams, render_rows
from aigc_cli.jobs.textfiles import Problems

EPILOG = (
    "Examples:\n\n"
    "  aigc recommend sports technology --catalog sample -k 5\n\n"
    "  aigc recommend --profile me.json --catalog news.tsv --explain\n\n"
    "  aigc recommend --catalog sample --eval sample\n\n"
    "  aigc recommend cooking travel --per-interest 3      (no catalog: generated ideas)\n\n"
    f"{o.EXIT_CODES_HELP}"
)


@o.with_model()
def command(
    spec: ModelSpec,
    interests: Annotated[Optional[list[str]], typer.Argument(help="The user's interests.", show_default=False, metavar="INTEREST...")] = None,
    profile: Annotated[Optional[str], typer.Option(help="JSON user profile: interests, liked and disliked item titles or ids.", metavar="FILE")] = None,
    catalog: Annotated[
        Optional[str], typer.Option(help="Items to rank: JSONL, CSV or TSV with id,title[,description,category], MIND news.tsv, or 'sample'.")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--top", help="How many items to show.")] = 10,
    score_kind: Annotated[
        ScoreKind, typer.Option("--score", help="pmi (log P(item|user) - log P(item|neutral)), loglik or mean (per token).")
    ] = ScoreKind.pmi,
    aggregate: Annotated[Aggregate, typer.Option(help="Combine interests by max or mean.")] = Aggregate.max,
    explain: Annotated[bool, typer.Option(help="Show each interest's score.")] = False,
    template: Annotated[Optional[str], typer.Option(help="User prompt template with $interests.", metavar="FILE")] = None,
    neutral_template: Annotated[Optional[str], typer.Option(help="Neutral prompt for PMI.", metavar="FILE")] = None,
    per_interest: Annotated[int, typer.Option(help="Without --catalog: generated ideas per interest.")] = 3,
    eval_path: Annotated[
        Optional[str], typer.Option("--eval", help="Evaluate on users (JSONL or MIND behaviors.tsv, or 'sample'): HR@k, nDCG@k, MRR, AUC.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="(prompt, item) pairs per forward pass.")] = 16,
    seed: Annotated[Optional[int], typer.Option(help="Seed for generated ideas.")] = None,
    output_format: OutputFormat = OutputFormat.auto,
) -> None:
    """Rank a catalog for a user's interests with the language model (zero-shot), or suggest ideas."""
    from aigc_cli.apps import recommend as rec

    if k < 1:
        raise UsageError(f"-k: must be at least 1 (got {k})")
    o.check_range("--per-interest", per_interest, 1, 100)
    o.check_range("--batch-size", batch_size, 1, MAX_BATCH)
    if eval_path is not None and catalog is None:
        raise UsageError("--eval: needs --catalog (the items the users' candidates refer to)")
    streams = Streams()
    messages = Messages(streams)
    catalog_problems = Problems(f"--catalog {catalog}", messages.warn)
    eval_problems = Problems(f"--eval {eval_path}", messages.warn)
    user = rec.load_profile(profile) if profile else rec.Profile()
    user.interests += interests or []
    items = rec.load_catalog(catalog, catalog_problems) if catalog else None
    users = rec.load_eval(eval_path, eval_problems) if eval_path else None
    prompts = rec.Prompts.load(template, neutral_template)
    if users is None and not user.interests and not (items and user.liked):
        raise UsageError("no user: give interests as arguments, or --profile FILE with interests or liked items")
    engine = o.load_engine(spec, messages)
    if users is not None and items is not None:
        ours, baseline, covered = rec.evaluate(engine, items, users, prompts, k, score_kind, aggregate, batch_size, eval_problems)
        left_out = len(eval_problems)
        rows = [{"ranking": f"aigc ({score_kind.value})", **ours, "users": covered}, {"ranking": "random", **baseline, "users": covered}]
        title = f"{covered} users, k={k}" + (f" ({left_out} left out: see the warnings)" if left_out else "")
        render_rows(streams, output_format, list(rows[0]), rows, title=title)
    elif items is not None:
        _ranking(rec.rank(engine, items, user, prompts, score_kind, aggregate, batch_size)[:k], user, explain, output_format, streams)
    else:
        rows = rec.ideas(engine, user.interests, per_interest, seed)
        render_rows(streams, output_format, ["interest", "idea"], rows, title="Generated ideas (not real items)")
    skipped = len(catalog_problems) + len(eval_problems)
    if skipped:
        messages.warn(f"{skipped} items of the input files were left out (see above)")
        raise typer.Exit(int(ExitCode.PARTIAL))


def _ranking(ranked: list[Any], user: Any, explain: bool, fmt: OutputFormat, streams: Streams) -> None:
    rows = [
        {"rank": n, "id": r.item.id, "title": r.item.title, "score": r.score, "per_interest": r.per_context}
        for n, r in enumerate(ranked, start=1)
    ]
    columns = ["rank", "id", "title", "score"] + (["per_interest"] if explain else [])
    render_rows(streams, fmt, columns, rows, title=f"Top {len(rows)} for {', '.join(user.interests) or 'your liked items'}")
