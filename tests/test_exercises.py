"""Exercises that check themselves: every numbered exercise of every chapter has a checker, and every
checker has a solution (in nbs/18_exercises.ipynb, run by nbdev_test) that passes it, beside a typical
wrong answer that it refuses. These tests read the notebooks; the notebook run proves the verdicts.

    python -m pytest tests/test_exercises.py -q
"""
import json, re
from pathlib import Path

import pytest

import scfoundation.exercises as exercises

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "nbs" / "18_exercises.ipynb"
CHAPTERS = sorted(p for p in (ROOT / "nbs").glob("[0-9][0-9]_*.ipynb") if p != SOLUTIONS)


def cells(path: Path) -> list:
    return [("".join(c["source"]), c["cell_type"]) for c in json.loads(path.read_text())["cells"]]


def numbered_exercises(path: Path) -> list:
    "The numbers of the checked exercises: the numbered list between '## Exercises' and '### Projects'."
    markdown = "\n".join(source for source, kind in cells(path) if kind == "markdown")
    section = markdown[markdown.index("## Exercises"):]
    checked = section.split("### Projects")[0]
    return [int(n) for n in re.findall(r"^(\d+)\. ", checked, re.M)]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_numbered_exercise_has_a_checker(chapter):
    number = chapter.name[:2]
    listed = numbered_exercises(chapter)
    registered = sorted(int(id.split(".")[1]) for id in exercises.EXERCISES if id.startswith(number + "."))
    assert len(registered) >= 2, f"{chapter.name}: at least two exercises should be checked, found {registered}"
    assert listed == registered, f"{chapter.name}: numbered exercises {listed}, checkers for {registered}"
    text = "\n".join(source for source, kind in cells(chapter) if kind == "markdown")
    assert f'scf.exercises.check("{number}.' in text, f"{chapter.name}: the Exercises section should say how to check an answer"


def test_every_checker_has_a_folded_solution_and_a_refused_wrong_answer():
    solutions = [source for source, kind in cells(SOLUTIONS)   # (the framework's own demo, exercise 00.1, is no solution)
                 if kind == "code" and re.search(r'assert check\("(0[1-9]|1\d)\.', source)]
    assert all(source.startswith("#| code-fold: true") for source in solutions), "solutions are folded in the docs"
    text = "\n".join(solutions)
    missing = [id for id in exercises.EXERCISES if f'assert check("{id}"' not in text]
    assert not missing, f"exercises without a solution that passes its checker: {missing}"
    unrefused = [id for id in exercises.EXERCISES
                 if not re.search(r'check\("' + re.escape(id) + r'",[^\n]*\)\.status,\s*"(wrong|close)"', text)]
    assert not unrefused, f"exercises whose solution does not show a wrong answer refused: {unrefused}"


def test_ask_and_table_describe_every_exercise():
    everything = exercises.table()
    assert len(everything) == len(exercises.EXERCISES) and everything["asks for"].str.len().min() > 10
    for id in list(exercises.EXERCISES)[:5]: assert exercises.ask(id).startswith(id + ": ")
    with pytest.raises(KeyError, match="chapter 03 has"): exercises.check("03.99", 1)


def test_a_verdict_never_raises_for_an_answer_of_the_wrong_form():
    "A student's answer of another form (text, nothing, an empty list) is 'wrong' with a reason, never a traceback."
    for id in [id for id in exercises.EXERCISES if id.startswith(("03.", "05."))]:
        for answer in (None, "no idea", []):
            verdict = exercises.check(id, answer)
            assert verdict.status == "wrong" and verdict.why, (id, answer, verdict)
