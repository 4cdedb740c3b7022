"""Every generation setting is declared once (core/settings.py) and the three surfaces derived from
it agree: the same edge values given as a CLI flag, an API request parameter and a JSONL record key
get the same verdict, accepted or refused, except where the registry lists a difference on
purpose (SURFACE_DIFFERENCES)."""

from __future__ import annotations

import json
import math

import pytest

from aigc_cli.core.settings import REGISTRY, SURFACE_DIFFERENCES, Setting
from tests.serving import MODEL, InProcessServer

HUGE = 10**400
EDGES = {"zero": 0, "negative": -1, "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": HUGE, "wrong type": "x", "fine": None}
# Differences on purpose, each explained in SURFACE_DIFFERENCES under the setting's name.
EXPECTED = {
    ("top_k", "negative"): {"api": True, "cli": False, "jsonl": False},  # vLLM's -1: no limit
    ("num_beams", "fine"): {"api": True, "cli": False, "jsonl": False},  # num_beams alone selects beam search in the API
}


def _value(setting: Setting, edge: str):
    """The edge value for a setting (None: the case does not apply to it)."""
    if edge == "fine":
        return {"int": 2, "float": 0.5, "bool": True, "choice": "greedy", "texts": ["end"], "ids": [5]}[setting.kind]
    if edge == "wrong type":
        return "x" if setting.kind not in ("texts", "choice") else 5
    if setting.kind in ("texts",):
        return {"zero": [""], "huge": ["x" * 1001] * 17}.get(edge)
    if setting.kind == "ids":
        return {"negative": [-1], "huge": [HUGE]}.get(edge)
    if setting.kind in ("bool", "choice"):
        return None
    if setting.kind == "int" and isinstance(EDGES[edge], float):
        return None  # an integer flag cannot be NaN; that is the float settings' case
    return EDGES[edge]


CASES = [(s.name, edge) for s in REGISTRY for edge in EDGES if _value(s, edge) is not None]
SETTINGS = {s.name: s for s in REGISTRY}


@pytest.fixture(scope="module")
def server():
    s = InProcessServer()
    yield s
    s.stop()


def _cli_args(setting: Setting, value) -> list[str] | None:
    """The value as flags, or None where the command line cannot express it (a flag takes no value;
    every argument is text, so text settings have no wrong type there)."""
    if setting.kind == "texts" and not isinstance(value, list):
        return None
    if setting.kind == "bool":
        return [setting.flag or ""] if value is True else None  # a flag takes no value: only "fine" applies
    flag = setting.flag or ""
    values = value if isinstance(value, list) else [value]
    args = []
    for v in values:
        args += [flag, "nan" if isinstance(v, float) and math.isnan(v) else str(v)]
    return args


def _cli(cli, setting: Setting, value) -> bool | None:
    args = _cli_args(setting, value)
    if args is None:
        return None
    r = cli("generate", "Hello", "--model", MODEL, "--max-new-tokens", "2", *args, "--format", "jsonl") if setting.name != "max_new_tokens" else cli(
        "generate", "Hello", "--model", MODEL, *args, "--format", "jsonl"
    )
    assert r.exit_code in (0, 2), (setting.name, value, r.exit_code, r.stderr)
    if r.exit_code == 2:  # one line naming the flag (Click's parse errors add its usage line before it)
        assert "Traceback" not in r.stderr and (setting.flag or "") in r.stderr, r.stderr
    return r.exit_code == 0


def _api(server: InProcessServer, setting: Setting, value) -> bool:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, setting.param: value}
    status, _, data = server.raw("POST", "/v1/completions", json.dumps(body).encode())
    assert status in (200, 400), (setting.name, value, status, data[:300])
    return status == 200


def _jsonl_all(cli, tmp_path) -> dict[tuple[str, str], bool]:
    lines, keys = [], []
    for name, edge in CASES:
        setting = SETTINGS[name]
        record = {"prompt": "Hello", "max_new_tokens": 2, setting.key: _value(setting, edge)}
        lines.append(json.dumps(record))
        keys.append((name, edge))
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r = cli("generate", "-f", str(path), "--model", MODEL, "--format", "jsonl")
    assert r.exit_code in (0, 4), r.stderr
    records = [json.loads(x) for x in r.stdout.splitlines()]
    out: dict[tuple[str, str], bool] = {}
    for rec in records:
        out.setdefault(keys[rec["line"] - 1] if "error" in rec else keys[rec["id"] - 1], "error" not in rec)
    return out


def test_the_surfaces_agree_on_every_edge_value(cli, server, tmp_path):
    jsonl = _jsonl_all(cli, tmp_path)
    disagreements = []
    for name, edge in CASES:
        setting, value = SETTINGS[name], _value(SETTINGS[name], edge)
        verdicts = {"api": _api(server, setting, value), "jsonl": jsonl[(name, edge)]}
        on_cli = _cli(cli, setting, value)
        if on_cli is not None:
            verdicts["cli"] = on_cli
        expected = EXPECTED.get((name, edge))
        if expected is not None:
            assert name in SURFACE_DIFFERENCES, f"{name}: a difference must be listed in SURFACE_DIFFERENCES"
            if verdicts != {k: v for k, v in expected.items() if k in verdicts}:
                disagreements.append((name, edge, verdicts, "expected", expected))
        elif len(set(verdicts.values())) != 1:
            disagreements.append((name, edge, verdicts))
    assert not disagreements, "\n".join(map(str, disagreements))


def test_typical_p_and_repetition_penalty_zero_are_refused_everywhere(cli, server):
    for name in ("typical_p", "repetition_penalty"):
        setting = SETTINGS[name]
        assert _api(server, setting, 0) is False and _cli(cli, setting, 0) is False


def test_generation_settings_and_the_registry_are_the_same_fields():
    import dataclasses

    from aigc_cli.core.settings import GenerationSettings

    fields = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in dataclasses.fields(GenerationSettings)}  # type: ignore[misc]
    assert {s.name: s.default for s in REGISTRY} == fields
