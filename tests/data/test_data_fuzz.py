"""Data fuzz (issue 30): hostile data files for every family (mixed formats, nulls, wrong roles, duplicate keys,
degenerate pairs, unusable answers, broken encodings), run through `posttrain train` in-process and classified by
tests/fuzz_harness.py. A refusal must be one `error:` line naming the file and row (and the column where there is
one) before any model loads; a run that completes must account for every row: with one row per optimizer step and
one epoch, steps = rows in the file - logged skips - logged drops.

The fixed core is every case of issue 30; the generator writes seeded files from a list of row mutations. The
default suite runs the core up to the model load and a handful of complete runs; ``-m slow`` runs a fresh fuzz of
>= 100 files end to end. ``python tests/data/test_data_fuzz.py [N] [SEED]`` prints the classification of a fresh fuzz.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/fuzz_harness.py, also when run as a script
from fuzz_harness import Case, classify, report, run_case  # noqa: E402

TRAINING = {"max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 1, "save_strategy": "no",
            "logging_steps": 1, "disable_tqdm": True, "learning_rate": 1e-4}
FAMILIES = {
    "sft": {"model": "builtin:tiny-qwen2", "method": {"name": "sft"}, "key": "train", "training": {}},
    "preference": {"model": "builtin:tiny-qwen2-arith", "method": {"name": "dpo"}, "key": "train", "training": {}},
    "rl": {"model": "builtin:tiny-qwen2-arith", "method": {"name": "grpo"}, "key": "train",
           "training": {"per_device_train_batch_size": 2, "num_generations": 2, "max_completion_length": 4}},
    "unlearning": {"model": "builtin:tiny-qwen2-facts", "method": {"name": "ga"}, "key": "forget", "training": {}},
}


def good_row(family: str, i: int, conversational: bool = False) -> dict:
    prompt, answer = f"{i}+{i + 1}=", str(2 * i + 1)
    if conversational:
        user = [{"role": "user", "content": prompt}]
        turn = [{"role": "assistant", "content": answer}]
        if family == "sft":
            return {"messages": user + turn}
        if family == "preference":
            return {"prompt": user, "chosen": turn, "rejected": [{"role": "assistant", "content": answer + "1"}]}
        if family == "rl":
            return {"prompt": user, "answer": answer}
        return {"prompt": user, "completion": turn}
    if family == "preference":
        return {"prompt": prompt, "chosen": answer, "rejected": answer + "1"}
    if family == "rl":
        return {"prompt": prompt, "answer": answer}
    return {"prompt": prompt, "completion": answer}


def recipe_for(family: str, source: str = "rows.jsonl", **training) -> dict:
    f = FAMILIES[family]
    return {"model": f["model"], "data": {f["key"]: source}, "method": dict(f["method"]),
            "training": {**TRAINING, **f["training"], **training}, "output_dir": "{dir}/out"}


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


_COUNT = re.compile(r"(?:skipped|dropped) (\d+) of (\d+) rows")


def unusable(family: str, row) -> bool:
    """The oracle's own reading of a row a trainer cannot learn from (independent of posttrain's code): an empty
    answer side, messages without an assistant turn, identical chosen/rejected, an RL answer null / blank / NaN."""
    if isinstance(row, str):
        row = json.loads(row)

    def empty(v):
        if isinstance(v, float):
            return v != v  # NaN
        if isinstance(v, str):
            return not v.strip()
        return v is None or v == []

    if "messages" in row and row["messages"] is not None:
        return not any(t.get("role") == "assistant" for t in row["messages"])
    if family == "preference":
        return empty(row.get("chosen")) or empty(row.get("rejected")) or row.get("chosen") == row.get("rejected")
    if family == "rl":
        return empty(row.get("answer"))
    return empty(row.get("completion"))


def steps_account_for_rows(rows_in: int, expected_removed: int | None = None):
    """The data fuzz's oracle for a completed run: steps = rows in - logged skips - logged drops, and (when the
    generator knows it) the logged skips are exactly the rows the oracle finds unusable: none trained silently."""

    def check(folder: Path, lines: list[str]) -> str | None:
        summary = json.loads((folder / "out" / "summary.json").read_text())
        removed = sum(int(m.group(1)) for line in lines for m in _COUNT.finditer(line))
        if summary["steps"] != rows_in - removed:
            return f"{summary['steps']} steps for {rows_in} rows - {removed} logged skips/drops"
        if expected_removed is not None and removed != expected_removed:
            return f"{removed} rows logged as skipped/dropped, but {expected_removed} are unusable"
        return None

    return check


def data_case(name: str, family: str, rows, expect: str = "error", needle: str = "", raw: bytes | None = None,
              filename: str = "rows.jsonl", **training) -> Case:
    """A case of one data file (``rows``: dicts or raw JSON lines; ``raw``: the file's bytes)."""
    content = raw if raw is not None else jsonl(rows)
    real = [r for r in rows if not (isinstance(r, str) and not r.strip())]
    check = None
    if expect == "valid":
        check = steps_account_for_rows(len(real), sum(unusable(family, r) for r in real))
    return Case(name, recipe_for(family, filename, **training), expect=expect, needle=needle,
                files={filename: content}, check=check)


def _good(family, n=6, conversational=False):
    return [good_row(family, i, conversational) for i in range(n)]


# --------------------------------------------------------------------------------------------------------------------
# the fixed core: every case of issue 30

CORE = [
    # tracebacks after the model loaded before: now one line naming file:row and the column, before it loads
    data_case("null_prompt_4_rows", "sft", [{**r, "prompt": None} if i % 2 else r for i, r in
                                            enumerate(_good("sft", 8))], needle="rows.jsonl:2 (row 1): column 'prompt' is null"),
    data_case("messages_content_null", "sft", _good("sft", 4, True) + [{"messages": [
        {"role": "user", "content": "1+1="}, {"role": "assistant", "content": None}]}],
        needle="rows.jsonl:5 (row 4): column 'messages': turn 1 (assistant) has content null"),
    data_case("prompt_messages_completion_text", "sft", [
        {"prompt": [{"role": "user", "content": "1+1="}], "completion": "2"}] * 3,
        needle="rows.jsonl:1 (row 0): column 'completion' is plain text but 'prompt' is a list of messages"),
    data_case("chosen_messages_rejected_text", "preference", [
        {"prompt": [{"role": "user", "content": "1+1="}], "chosen": [{"role": "assistant", "content": "2"}],
         "rejected": "3"}] * 3, needle="column 'rejected' is plain text but"),
    # accepted without a word before
    data_case("duplicate_key_in_row", "sft", _good("sft", 3) + ['{"prompt": "1+1=", "completion": "2", "completion": '
                                                                '"3"}'], needle="rows.jsonl:4 (row 3): key 'completion' appears twice"),
    data_case("robot_role_sft", "sft", _good("sft", 3, True) + [{"messages": [
        {"role": "robot", "content": "1+1="}, {"role": "assistant", "content": "2"}]}], needle="role 'robot'"),
    data_case("robot_role_rl_prompt", "rl", _good("rl", 3, True) + [{"prompt": [
        {"role": "robot", "content": "1+1="}], "answer": "2"}], needle="role 'robot'"),
    data_case("messages_without_assistant", "sft", _good("sft", 4, True) + [{"messages": [
        {"role": "user", "content": "1+1="}]}], expect="valid"),
    data_case("mixed_row_formats", "sft", [r if i % 2 else {"messages": [{"role": "user", "content": r["prompt"]},
                                                                         {"role": "assistant",
                                                                          "content": r["completion"]}]}
                                           for i, r in enumerate(_good("sft", 24))],
              needle="rows.jsonl:2 (row 1): row has {prompt, completion} but"),
    data_case("chosen_equals_rejected_every_row", "preference", [
        {"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 1)} for i in range(6)],
        needle="identical"),
    data_case("chosen_equals_rejected_some_rows", "preference", _good("preference", 4) + [
        {"prompt": "9+1=", "chosen": "10", "rejected": "10"}], expect="valid"),
    data_case("rl_answer_null_and_nan", "rl", _good("rl", 4) + ['{"prompt": "1+1=", "answer": null}',
                                                               '{"prompt": "2+1=", "answer": NaN}'], expect="valid"),
    data_case("rl_every_answer_null", "rl", ['{"prompt": "1+1=", "answer": null}'] * 3, needle="answer"),
    # checks that came only after the model loaded
    Case("stratum_key_missing_column", {**recipe_for("rl"), "method": {"name": "grpo", "advantage": "stratified",
                                                                       "stratum_key": "difficulty"}},
         files={"rows.jsonl": jsonl(_good("rl"))}, needle="method.stratum_key"),
    Case("tools_need_conversational_prompts", {**recipe_for("rl"), "method": {
        "name": "grpo", "tools": ["posttrain.rl.tools:calculator"]}}, files={"rows.jsonl": jsonl(_good("rl"))},
        needle="conversational prompts"),
    Case("poft_score_column_missing", {**recipe_for("sft"), "method": {"name": "poft"}},
         files={"rows.jsonl": jsonl(_good("sft"))}, needle="poft_ref_score"),
    Case("poft_score_nan", {**recipe_for("sft"), "method": {"name": "poft"}}, files={"rows.jsonl": jsonl(
        [{**r, "poft_ref_score": -1.0} for r in _good("sft", 3)]) + '{"prompt": "1+1=", "completion": "2", '
        '"poft_ref_score": NaN}\n'}, needle="row 3"),
    Case("poft_aligned_model_dev_null", {**recipe_for("sft"), "method": {"name": "poft",
                                                                         "aligned_models": ["/dev/null"]}},
         files={"rows.jsonl": jsonl(_good("sft"))}, needle="method.aligned_models[0]"),
    data_case("max_length_leaves_no_rows", "sft", [{"prompt": "1+" * 40 + "1=", "completion": "41"}] * 3,
              needle="no rows left", max_length=8),
    Case("multi_stage_bad_key_in_stage_2", {
        **recipe_for("sft", "builtin:arithmetic-sft"),
        "stages": [{"name": "first"}, {"name": "second", "training": {"lr_scheduler_type": "cosine\u200b"}}]},
        needle="stage 'second': training.lr_scheduler_type"),
    # what the earlier fuzz found clean, kept so
    data_case("invalid_json", "sft", _good("sft", 2) + ['{"prompt": oops}'], needle="rows.jsonl:3: invalid JSON"),
    data_case("not_utf8", "sft", [], raw=b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "caf\xe9"}\n',
              needle="not UTF-8"),
    data_case("empty_file", "sft", [], raw=b"", needle="holds no rows"),
    data_case("csv_file", "sft", [], raw=b"prompt,completion\n1+1=,2\n", filename="rows.csv",
              needle="unsupported file type"),
]


# --------------------------------------------------------------------------------------------------------------------
# the generator


def _mutations(family: str):
    """(name, expect, needle, fn(rows, rng) -> rows): one hostile change to a list of good rows."""
    text_col = {"sft": "completion", "preference": "rejected", "rl": "answer", "unlearning": "completion"}[family]

    def some(rows, rng, fn, k=None):
        rows = list(rows)
        for i in rng.sample(range(len(rows)), k or rng.randint(1, max(1, len(rows) // 2))):
            rows[i] = fn(rows[i])
        return rows

    def json_line(text):
        return lambda rows, rng: some(rows, rng, lambda r: text, k=1)

    out = [
        ("null_prompt", "error", "column 'prompt' is null", lambda rows, rng: some(rows, rng, lambda r: {**r, "prompt": None})),
        ("wrong_type", "error", "must be", lambda rows, rng: some(rows, rng, lambda r: {**r, text_col: [1, 2]}, k=1)),
        ("number_text", "error", "one type per column" if family == "rl" else f"column '{text_col}'",
         lambda rows, rng: some(rows, rng, lambda r: {**r, text_col: 7}, k=1)),
        ("duplicate_key", "error", "appears twice", json_line('{"prompt": "1+1=", "prompt": "2+2=", "completion": "4", '
                                                              '"chosen": "4", "rejected": "5", "answer": "4"}')),
        ("invalid_json", "error", "invalid JSON", json_line('{"prompt": "1+1=",')),
        ("array_row", "error", "expected a JSON object", json_line('["1+1=", "2"]')),
        ("deep_row", "error", "", json_line('{"prompt": ' + "[" * 3000 + "]" * 3000 + "}")),
        ("missing_column", "error", "missing column", lambda rows, rng: [{"question": r["prompt"]} for r in rows]),
        ("empty_required", "valid", "", lambda rows, rng: some(rows, rng, lambda r: {**r, text_col: " "})),
        ("blank_lines", "valid", "", lambda rows, rng: [x for r in rows for x in (r, "")]),
        ("extra_columns", "valid", "", lambda rows, rng: [{**r, "note": "x", "id": i} for i, r in enumerate(rows)]),
        ("unicode", "valid", "", lambda rows, rng: some(rows, rng, lambda r: {**r, "prompt": r["prompt"] + " ü€😀"})),
        ("robot_role", "error", "",
         lambda rows, rng: some(rows, rng, lambda r: {**r, "prompt": [{"role": "robot", "content": "1+1="}]}, k=1)),
        ("mixed_conversational", "error", "", lambda rows, rng: some(rows, rng, lambda r: {**r, "prompt": [
            {"role": "user", "content": str(r["prompt"])}]}, k=1)),
        ("content_null", "error", "", lambda rows, rng: some(rows, rng, lambda r: {**r, "prompt": [
            {"role": "user", "content": None}]}, k=1)),
        ("all_empty", "error", "no usable rows", lambda rows, rng: [{**r, text_col: ""} for r in rows]),
    ]
    if family == "preference":
        out += [("identical_pairs", "valid", "", lambda rows, rng: some(rows, rng, lambda r: {**r, "rejected": r["chosen"]})),
                ("all_identical", "error", "identical", lambda rows, rng: [{**r, "rejected": r["chosen"]} for r in rows])]
    if family == "rl":
        out += [("answer_null", "valid", "", lambda rows, rng: some(rows, rng, lambda r: {**r, "answer": None})),
                ("answer_nan", "valid", "", json_line('{"prompt": "5+5=", "answer": NaN}'))]
    if family == "sft":
        out += [("no_assistant", "valid", "", lambda rows, rng: some(
                    [{"messages": [{"role": "user", "content": r["prompt"]},
                                   {"role": "assistant", "content": r["completion"]}]} for r in rows], rng,
                    lambda r: {"messages": r["messages"][:1]})),
                ("mixed_formats", "error", "same format", lambda rows, rng: some(rows, rng, lambda r: {"messages": [
                    {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]},
                    k=1))]
    return out


def generate(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        family = rng.choice(sorted(FAMILIES))
        conversational = rng.random() < 0.25
        rows = _good(family, rng.randint(3, 8), conversational)
        name, expect, needle, fn = rng.choice(_mutations(family))
        if conversational and name not in ("invalid_json", "array_row", "deep_row", "blank_lines", "extra_columns"):
            conversational, rows = False, _good(family, len(rows))  # the other mutations write plain-text fields
        rows = fn(rows, rng)
        if name == "no_assistant" and family != "sft":
            expect = "error"
        filename = rng.choice(["rows.jsonl"] * 4 + ["rows.json"])
        if filename == "rows.json":
            if any(isinstance(r, str) for r in rows):
                filename = "rows.jsonl"
            else:
                check = steps_account_for_rows(len(rows), sum(unusable(family, r) for r in rows))
                case = Case(f"gen{i}_{family}_{name}", recipe_for(family, filename), expect=expect, needle=needle,
                            files={filename: json.dumps(rows)}, check=check if expect == "valid" else None)
                cases.append(case)
                continue
        cases.append(data_case(f"gen{i}_{family}_{name}", family, rows, expect=expect, needle=needle))
    return cases


# --------------------------------------------------------------------------------------------------------------------
# tests

DEFAULT_COMPLETE_RUNS = ("messages_without_assistant", "chosen_equals_rejected_some_rows", "rl_answer_null_and_nan")
SLOW_FUZZ = 110


@pytest.mark.parametrize("case", CORE, ids=lambda c: c.name)
def test_issue_30_core_before_any_model_loads(case, tmp_path):
    outcome = run_case(case, tmp_path, load_models=False)
    assert outcome.kind in ("error", "valid"), outcome.describe() + "\n" + "\n".join(outcome.lines[-15:])


@pytest.mark.parametrize("name", DEFAULT_COMPLETE_RUNS)
def test_issue_30_accepted_rows_are_counted_in_a_complete_run(name, tmp_path):
    """The skipped rows are logged with their reason, and the run's steps account for every row."""
    case = next(c for c in CORE if c.name == name)
    outcome = run_case(case, tmp_path, load_models=True)
    assert outcome.kind == "valid", outcome.describe() + "\n" + "\n".join(outcome.lines[-15:])
    reasons = {"messages_without_assistant": "no assistant turn", "chosen_equals_rejected_some_rows": "identical",
               "rl_answer_null_and_nan": "answer is null, empty or NaN"}
    assert any("skipped" in line and reasons[name] in line for line in outcome.lines), outcome.lines


@pytest.mark.slow
def test_fresh_data_fuzz_of_100_files(tmp_path):
    outcomes = [run_case(case, tmp_path / case.name, load_models=True) for case in generate(SLOW_FUZZ, seed=3030)]
    counts = classify(outcomes)
    print("data fuzz:", report(outcomes))
    assert counts["traceback"] == counts["hang"] == counts["nonsense"] == counts["wrong"] == 0, report(outcomes)


if __name__ == "__main__":  # a fresh data fuzz, classified: python tests/data/test_data_fuzz.py [N] [SEED]
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    n, seed = (int(sys.argv[1]) if len(sys.argv) > 1 else SLOW_FUZZ), (int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    with tempfile.TemporaryDirectory() as tmp:
        done = [run_case(c, Path(tmp) / c.name, load_models=True) for c in CORE + generate(n, seed)]
        print(f"{len(done)} data files ({len(CORE)} fixed, {n} generated with seed {seed}):", report(done))
        completed = [o for o in done if o.kind == "valid"]
        print(f"{len(completed)} completed runs, each with steps = rows - logged skips - logged drops")
