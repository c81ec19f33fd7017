"""Running `posttrain train` in-process on hostile input and classifying what happened (the structural recipe fuzz,
tests/recipe/test_recipe_structural_fuzz.py, and the data fuzz, tests/data/test_data_fuzz.py).

Every case ends in exactly one class:

* ``traceback``: an exception escaped `posttrain` (a bug: user input must give one ``error:`` line);
* ``hang``: it ran past its time limit;
* ``nonsense``: it exited 0 although the case is invalid input (the oracle says it must be refused), or it was
  expected to warn and did not;
* ``error``: a clean refusal: exit code 2 (1 for a machine failure) with exactly one ``error:`` line;
* ``valid``: exit 0 (or, with ``load_models=False``, it reached the point where the model loads) on valid input.

A case expected to fail but refused with an error line that lacks its ``needle``, or a valid case that was
refused, are ``wrong`` (a check that fires for the wrong reason).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import resource
import signal
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

CLASSES = ("traceback", "hang", "nonsense", "wrong", "error", "valid")


class ReachedModelLoad(Exception):
    """Raised instead of loading a model: every check that needs no model has passed."""


class _Timeout(BaseException):
    pass


@dataclasses.dataclass
class Case:
    """One hostile run. ``recipe``: a mapping (dumped as YAML) or raw YAML text; ``files``: name -> text (or bytes)
    written next to the recipe; ``argv``: extra `posttrain train` arguments (``{dir}`` is the case folder);
    ``expect``: ``error`` (exit 2), ``exit1`` (a machine failure), ``valid`` or ``warn`` (exit 0 with a ``warning:``
    line holding ``needle``); ``needle``: text the error / warning line must hold; ``needs_model``: only decided
    after a model loads; ``fsize_limit``: RLIMIT_FSIZE (bytes) while it runs; ``check``: fn(case_dir, out) -> str |
    None, a further condition on a valid run (the data fuzz's step count)."""

    name: str
    recipe: Any
    expect: str = "error"
    needle: str = ""
    argv: tuple[str, ...] = ()
    files: dict[str, Any] = dataclasses.field(default_factory=dict)
    needs_model: bool = False
    fsize_limit: int | None = None
    check: Any = None


@dataclasses.dataclass
class Outcome:
    case: Case
    kind: str
    code: Any
    lines: list[str]
    detail: str = ""

    def describe(self) -> str:
        return f"{self.case.name}: {self.kind} (exit {self.code}) {self.detail}".strip()


def write_case(case: Case, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{dir}", str(folder)))
    recipe = folder / "recipe.yaml"
    text = case.recipe if isinstance(case.recipe, str) else yaml.safe_dump(case.recipe, sort_keys=False,
                                                                              allow_unicode=True)
    recipe.write_text(text.replace("{dir}", str(folder)))
    return recipe


@contextlib.contextmanager
def _no_model_loads():
    import posttrain.models

    def refuse(*args, **kwargs):
        raise ReachedModelLoad

    saved = posttrain.models.load_model
    posttrain.models.load_model = refuse
    try:
        yield
    finally:
        posttrain.models.load_model = saved


@contextlib.contextmanager
def _time_limit(seconds: int):
    def expire(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _file_size_limit(limit: int | None):
    if limit is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def run_case(case: Case, folder: Path, load_models: bool = True, timeout: int = 120) -> Outcome:
    """Run ``posttrain train`` on the case in this process and classify the outcome."""
    from posttrain.cli import main

    recipe = write_case(case, folder)
    argv = ["train", str(recipe), *(a.replace("{dir}", str(folder)) for a in case.argv)]
    err, out = io.StringIO(), io.StringIO()
    code: Any
    tb = ""
    loads = contextlib.nullcontext() if load_models else _no_model_loads()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), loads, _time_limit(timeout), \
                _file_size_limit(case.fsize_limit):
            code = main(argv)
    except ReachedModelLoad:
        code = "model"
    except _Timeout:
        code = "timeout"
    except SystemExit as exc:  # argparse
        code = exc.code
    except BaseException:  # noqa: BLE001 - the point of the fuzz
        code = "exception"
        tb = traceback.format_exc()
    lines = (err.getvalue() + out.getvalue()).splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    if code == "timeout":
        return Outcome(case, "hang", code, lines, f"ran past {timeout} s")
    if code == "exception" or any("Traceback" in line for line in lines):
        return Outcome(case, "traceback", code, lines, tb.strip().splitlines()[-1] if tb else "")
    reached = code == 0 or code == "model"
    if case.expect in ("error", "exit1"):
        if reached and not (code == "model" and case.needs_model):
            return Outcome(case, "nonsense", code, lines, "accepted invalid input")
        if code == "model":  # refused only once the model is there: not decided in this mode
            return Outcome(case, "valid", code, lines, "(reached the model load; decided with the model)")
        wanted = 2 if case.expect == "error" else 1
        if code != wanted or len(errors) != 1 or case.needle not in errors[0]:
            return Outcome(case, "wrong", code, lines, " | ".join(errors) or "no error line")
        return Outcome(case, "error", code, lines, errors[0])
    if not reached:
        return Outcome(case, "wrong", code, lines, " | ".join(errors) or "no error line")
    if case.expect == "warn" and code == 0 and not any(line.startswith("warning:") and case.needle in line
                                                       for line in lines):
        return Outcome(case, "nonsense", code, lines, f"no warning holding {case.needle!r}")
    if case.check is not None and code == 0:
        problem = case.check(folder, lines)
        if problem:
            return Outcome(case, "nonsense", code, lines, problem)
    return Outcome(case, "valid", code, lines)


def classify(outcomes: list[Outcome]) -> Counter:
    return Counter({kind: sum(o.kind == kind for o in outcomes) for kind in CLASSES})


def report(outcomes: list[Outcome]) -> str:
    counts = classify(outcomes)
    bad = [o.describe() for o in outcomes if o.kind in ("traceback", "hang", "nonsense", "wrong")]
    return ", ".join(f"{k} {counts[k]}" for k in CLASSES) + "".join(f"\n  {line}" for line in bad)
