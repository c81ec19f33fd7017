"""The ``posttrain`` command line.

User errors print one ``error: ...`` line on stderr and exit with code 2, without a traceback. Expected failures of
the environment (a file-system error such as a full disk or a permission, undecodable text, running out of memory)
print one ``error: ...`` line and exit with code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from posttrain.errors import UserError
from posttrain import launch

EPILOG = "Recipes: see recipes/*.yaml. Docs: README.md."


def _cmd_train(args) -> int:
    num_processes = launch.check_launch_flags(args.num_processes, args.distributed)  # before anything starts
    from posttrain.recipe import load_recipe_stages

    overrides = list(args.set)
    if args.output_dir is not None:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")  # validated like the recipe key
    from posttrain.run.stages import check_stages, run_stages

    loaded = load_recipe_stages(args.recipe, overrides)  # read once; a multi-stage recipe (stages:): pre_dpo.yaml
    stages = loaded if loaded[0][0] is not None else None
    if stages is not None and num_processes > 1 and not launch.already_distributed():
        # every stage checked here (one error line, no process started), then each launched process runs the stages
        check_stages(stages, resume=args.resume, overwrite=args.overwrite, num_processes=num_processes,
                     backend=args.distributed or "ddp")
        return launch.run_launch(num_processes, args.distributed or "ddp", args.argv[args.argv.index("train") + 1:])
    if stages is not None:
        _freeze_imported_objects()
        summaries = run_stages(stages, resume=args.resume, overwrite=args.overwrite, command=_command_line(args))
        if int(os.environ.get("RANK", "0")) == 0:
            for s in summaries:
                state = "already finished" if s.get("already_finished") else f"{s.get('steps')} steps"
                print(f"stage {s['stage']}: {state}, saved to {s['output_dir']}")
                for key, label in (("accuracy_before", "before training: "), ("accuracy_after", "after training:  ")):
                    if isinstance(s.get(key), float):
                        print(f"  test {s.get('test_metric', 'accuracy')} {label}{100 * s[key]:.1f}%")
        return 0
    recipe = loaded[0][1]
    if num_processes > 1 and not launch.already_distributed():
        from posttrain.run.pipeline import prepare_output_dir, preflight

        # bad input: one error line here, before any process starts (the TRL config is checked by the launched
        # processes: its batch checks depend on their number)
        preflight(recipe, build_trainer_config=False, num_processes=num_processes,
                  backend=args.distributed or "ddp")
        if not (args.resume or args.overwrite):
            prepare_output_dir(Path(recipe.output_dir), resume=False, overwrite=False)
        return launch.run_launch(num_processes, args.distributed or "ddp", args.argv[args.argv.index("train") + 1:])
    from posttrain.run.pipeline import run  # torch, transformers, TRL: once the recipe's own keys are checked

    _freeze_imported_objects()
    summary = run(recipe, resume=args.resume, overwrite=args.overwrite, command=_command_line(args))
    if int(os.environ.get("RANK", "0")) == 0 and summary.get("already_finished"):
        print(f"already finished: {summary['output_dir']} holds a complete run ({summary.get('steps')} steps); "
              "nothing to do")
    elif int(os.environ.get("RANK", "0")) == 0:
        loss = summary["train_loss"]
        loss_text = f"{loss:.4f}" if isinstance(loss, int | float) else "n/a"
        lines = [f"done: {summary['steps']} steps, train loss {loss_text}, saved to {recipe.output_dir}"]
        metric = summary.get("test_metric", "accuracy")  # reward models: pairwise accuracy
        if summary.get("accuracy_before") is not None:
            lines.append(f"test {metric} before training: {100 * summary['accuracy_before']:.1f}%")
        if summary.get("accuracy_after") is not None:
            lines.append(f"test {metric} after training:  {100 * summary['accuracy_after']:.1f}%")
        lines += [f"warning: {w}" for w in summary.get("warnings", [])]
        print("\n".join(lines))
    return 0


def _freeze_imported_objects() -> None:
    """Before training: move the objects alive now (mostly the modules, functions and tables of torch, transformers,
    TRL and their imports) to the garbage collector's permanent generation, where its full passes no longer walk them:
    the one at the start of training, those while rows are tokenised and the last at exit (benchmarks/startup.py;
    the only objects never collected are the few reference cycles the imports left behind)."""
    import gc

    gc.freeze()


def _command_line(args) -> str:
    """The command line that ran this command, as ``posttrain ...`` (for the model card)."""
    import shlex

    return "posttrain " + " ".join(shlex.quote(a) for a in args.argv)


def _cmd_check(args) -> int:
    from posttrain.preview import check_recipe

    if args.show < 0:
        raise UserError(f"--show: expected a number of rows >= 0, got {args.show}")
    check_recipe(args.recipe, args.set, args.show)
    return 0


def _cmd_report(args) -> int:
    from posttrain.run.report import write_report

    path = write_report(args.run_dirs, args.output)
    print(f"wrote {path} (plots also in {path.with_name(path.stem + '_plots')}/)")
    return 0


def _method_detail(name: str) -> int:
    """``posttrain methods NAME``: a method, or any part or option a recipe selects (posttrain.catalogue), with its
    page's summary and, for a method, its keys and defaults."""
    import textwrap

    from posttrain.catalogue import find, format_default, page_summary, page_title, parts
    from posttrain.errors import did_you_mean
    from posttrain.methods import METHODS

    wrap = textwrap.TextWrapper(width=100, subsequent_indent="    ")
    if name in METHODS:
        m = METHODS[name]
        print(f"{m.name} [{m.family}]: {m.summary}")
        summary = page_summary(m.doc) if m.doc else None
        if summary:
            print()
            print(textwrap.fill(summary, width=100))
        print()
        print("keys (method.*), with their defaults:")
        for key, field in m.params.model_fields.items():
            default = field.default_factory() if field.default_factory is not None else field.default
            print(wrap.fill(f"  {key}: {format_default(default)}" + (f"  -- {field.description}"
                                                                     if field.description else "")))
        print()
        print(f"paper:  {m.paper}")
        print(f"recipe: {m.recipe}")
        print(f"page:   {m.doc or '(none)'}")
        return 0
    found = find(name)
    for i, part in enumerate(found):
        if i:
            print()
        where = f" ({part.where})" if part.where else ""
        print(f"{part.name}: {part.where}" if part.key == "page" else f"{part.key}: {part.name}{where}")
        title = page_title(part.doc)
        if part.text:
            print(textwrap.fill(part.text, width=100))
        elif title:
            print(title)
        summary = page_summary(part.doc)
        if summary:
            print()
            print(textwrap.fill(summary, width=100))
        options = _part_options(part.key, part.name)
        if options:
            print()
            print("keys (method.*), with their defaults:")
            for key, field in options.items():
                print(wrap.fill(f"  {key}: {format_default(field.default)}" + (f"  -- {field.description}"
                                                                             if field.description else "")))
        recipe = Path(__file__).resolve().parents[1] / "recipes" / f"{part.name}.yaml"
        if recipe.is_file():
            print(f"recipe: recipes/{part.name}.yaml")
        print(f"page:   {part.doc}")
    if found:
        return 0
    known = [*METHODS, *(p.name for p in parts())]
    raise UserError(f"methods: unknown method or part '{name}'{did_you_mean(name, known)}; see `posttrain methods`")


def _part_options(key: str, name: str) -> dict:
    """The method keys a GRPO part reads (its registry entry's ``options_model``), for ``posttrain methods NAME``."""
    from posttrain.families.rl import parts

    registry = {"method.advantage": parts.ADVANTAGES, "method.aggregation": parts.AGGREGATIONS,
                "method.clipping": parts.CLIPPINGS}.get(key)
    model = getattr(registry[name], "options_model", None) if registry is not None and name in registry else None
    return dict(model.model_fields) if model is not None else {}


def _cmd_methods(args) -> int:
    from posttrain.catalogue import parts
    from posttrain.methods import METHODS

    if args.name:
        return _method_detail(args.name)
    from posttrain.families.base import FAMILIES

    order = list(FAMILIES)
    rows = sorted(METHODS.values(), key=lambda m: (order.index(m.family), m.name))
    if args.json:
        print(json.dumps([
            {"name": m.name, "family": m.family, "summary": m.summary, "paper": m.paper, "recipe": m.recipe}
            for m in rows
        ], indent=2))
        return 0
    for m in rows:
        print(f"{m.name:<16} [{m.family}] {m.summary}")
        print(f"{'':<16} paper:  {m.paper}")
        print(f"{'':<16} recipe: {m.recipe}")
    grouped: dict[str, list[str]] = {}
    for part in parts():
        if part.key == "page":  # a docs/methods page that is no single key's value (multi-stage recipes, ...)
            grouped.setdefault("other pages", []).append(f"{part.name} [{part.where}]")
        else:
            grouped.setdefault(part.key + (f" ({part.where})" if part.where else ""), []).append(part.name)
    print()
    print("parts and options (posttrain methods NAME for one of them):")
    for key, names in grouped.items():
        print(f"  {key}: {', '.join(names)}")
    return 0


def _cmd_init_model(args) -> int:
    import shutil

    from posttrain.models import BUILTIN_MODELS, builtin_model_dir, describe_builtin_models

    if args.list or not args.out_dir:
        rows = describe_builtin_models()
        width = max(len(row["name"]) for row in rows) + 2
        for row in rows:
            print(f"{row['name']:<{width}}{row['description']}")
        return 0
    if args.name not in BUILTIN_MODELS:
        from posttrain.errors import did_you_mean

        raise UserError(f"--name: unknown built-in model '{args.name}'{did_you_mean(args.name, BUILTIN_MODELS)}")
    src = builtin_model_dir(args.name)
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: directory exists and is not empty")
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("DONE"))
    print(f"wrote builtin:{args.name} to {out} (load with AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0


def _cmd_tasks(args) -> int:
    from posttrain.data.sources import BUILTIN_TASKS

    width = max(len(name) for name in BUILTIN_TASKS) + 2
    for name, (_, description) in sorted(BUILTIN_TASKS.items()):
        print(f"builtin:{name:<{width}}{description}")
    return 0


SUITE_ONLY = {"forget": "--forget", "retain": "--retain", "holdout": "--holdout", "forget_split": "--forget-split",
              "retain_model": "--retain-model"}
UNLEARNING_ONLY = {"forget_qa": "--forget-qa", "retain_qa": "--retain-qa", "reference_model": "--reference-model"}


def _check_eval_flags(args) -> None:
    """Refuse flags the chosen suite would ignore (one error line, before anything loads)."""
    suite = args.suite or ("lm-eval" if args.lm_eval and args.data is None else "accuracy")
    args.suite = suite
    unused = []
    if suite not in ("tofu", "unlearning"):
        unused += [flag for key, flag in SUITE_ONLY.items() if getattr(args, key) is not None]
    if suite != "unlearning":
        unused += [flag for key, flag in UNLEARNING_ONLY.items() if getattr(args, key) is not None]
    if suite != "accuracy" and args.pass_k:
        unused.append("--pass-k")
    if args.lm_eval and suite not in ("unlearning", "lm-eval"):
        unused.append("--lm-eval")
    if args.lm_eval_include is not None and not args.lm_eval:
        unused.append("--lm-eval-include")
    if unused:
        raise UserError(f"{unused[0]}: not used by --suite {suite} (--suite tofu/unlearning take the unlearning data "
                        "flags; --lm-eval goes alone or with --suite unlearning; --pass-k with accuracy)")
    if suite in ("tofu", "unlearning") and args.split is not None:
        source = args.forget if args.forget is not None else args.data
        if source is None or source.lstrip().startswith(("{", "[")):
            raise UserError("--split: with --suite tofu/unlearning it is the split of --data / --forget given as a "
                            "name; use --forget '{source: NAME, split: SPLIT}' or --forget-split")
        if args.forget is not None:
            args.forget = {"source": args.forget, "split": args.split}
        else:
            args.data = {"source": args.data, "split": args.split}


def _cmd_eval(args) -> int:
    _check_eval_flags(args)
    if args.suite == "tofu":
        from posttrain.eval.unlearning import cli_eval

        return cli_eval(args)
    if args.suite == "unlearning":
        from posttrain.eval.unlearning_suite import cli_eval_suite

        return cli_eval_suite(args)
    if args.suite == "lm-eval":
        from posttrain.eval.lm_eval import cli_lm_eval

        return cli_lm_eval(args)
    args.data = args.data or "builtin:arithmetic-rl"
    args.split = args.split or "test"
    from posttrain.data.sources import load_source
    from posttrain.eval.accuracy import command_max_new_tokens, greedy_eval
    from posttrain.loading import load_model_or_run as load_model
    from posttrain.models import load_tokenizer
    from posttrain.recipe import DataSource

    from posttrain.data.formatting import apply_chat_format, command_chat_format

    src = DataSource(source=args.data, split=args.split, max_samples=args.max_samples)
    rows = load_source(src, "--data", "test")
    tok = load_tokenizer(args.model, key="MODEL")
    rows = apply_chat_format(rows, command_chat_format(args.model, tok, args.chat_template, args.system_prompt))
    model = load_model(args.model, key="MODEL")
    max_new = command_max_new_tokens(args.model, args.max_new_tokens)
    greedy = greedy_eval(model, tok, rows, max_new_tokens=max_new)
    acc = greedy.accuracy
    result = {"model": args.model, "data": args.data, "split": args.split, "n": len(rows), "accuracy": acc,
              "max_new_tokens": greedy.max_new_tokens, "cut_at_max_new_tokens": sum(greedy.cut) / max(len(rows), 1)}
    warnings = [w for w in [greedy.warning("--data")] if w]
    if args.pass_k:  # RL-style data: pass@k from --num-samples samples per prompt (unbiased estimator)
        from posttrain.eval.sampling import pass_at_k_eval

        result.update(pass_at_k_eval(model, tok, rows, args.pass_k, args.num_samples, args.temperature,
                                     max_new_tokens=max_new, seed=args.seed, where="--data"))
        warnings += result["warnings"]
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<10} {args.model}\n{'data':<10} {args.data} ({args.split}, n={len(rows)})\n"
          f"{'accuracy':<10} {100 * acc:.1f}%")
    if args.pass_k:
        print(f"sampled: {result['num_samples']} per prompt, temperature {result['temperature']}, "
              f"mean sample accuracy {100 * result['mean_sample_accuracy']:.1f}%")
        print("| k | pass@k |\n|---|---|")
        for k, v in result["pass@k"].items():
            print(f"| {k} | {100 * v:.1f}% |")
    for warning in warnings:
        print(f"warning: {warning}")
    return 0


def _cmd_merge(args) -> int:
    from posttrain.merge import merge_run

    print(merge_run(args.run_dir, args.out_dir, trust_remote_code=args.trust_remote_code))
    return 0


def _cmd_poft_score(args) -> int:
    from posttrain.families.sft.scoring import score_rows
    from posttrain.data.sources import load_source
    from posttrain.recipe import DataSource

    ds = load_source(DataSource(source=args.data, split=args.split), "--data", "sft")
    if "prompt" not in ds.column_names:
        raise UserError("--data: poft-score needs prompt/completion rows")
    scores = score_rows(list(ds["prompt"]), list(ds["completion"]), args.aligned_model, args.batch_size,
                        chat_template=args.chat_template, system_prompt=args.system_prompt)
    with open(args.output, "w") as fh:
        for row, s in zip(ds, scores, strict=True):
            fh.write(json.dumps({**row, "poft_ref_scores": s}) + "\n")
    print(f"wrote {len(scores)} scored rows to {args.output}")
    return 0


def _cmd_spo_init(args) -> int:
    from posttrain.recipe import load_recipe_stages
    from posttrain.families.rl.parts import ADVANTAGES

    loaded = load_recipe_stages(args.recipe, args.set)
    if loaded[0][0] is not None:
        raise UserError(f"{args.recipe}: spo-init takes a one-stage recipe (this one has stages: "
                        f"{', '.join(name for name, _ in loaded)})")
    recipe = loaded[0][1]
    p = recipe.params
    advantage = getattr(p, "advantage", None)
    entry = ADVANTAGES[advantage] if advantage in ADVANTAGES else None
    if entry is None or "spo_offline_n" not in entry.options_model.model_fields:  # the estimator reads no offline pass
        what = f"method.advantage is {p.advantage}" if entry is not None else f"method.name is {recipe.method.name}"
        raise UserError(f"{args.recipe}: spo-init samples SPO's offline pass, for a recipe with method.name: grpo and "
                        f"method.advantage: spo ({what})")
    if p.spo_offline_n == 0:
        raise UserError("method.spo_offline_n: 0 starts every prompt at the Jeffreys prior without sampling; set the "
                        "samples per prompt (n0) for spo-init")
    read_by_train = Path(p.spo_offline_scores or Path(recipe.output_dir) / "spo_offline_scores.json").expanduser()
    out = Path(args.out).expanduser() if args.out else read_by_train
    if out.is_dir():
        raise UserError(f"--out: '{out}' is a directory; name the scores file")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out: '{out}' exists (`posttrain train` reads it as it is); pass --overwrite to sample "
                        "again")
    from posttrain.run.spo_init import spo_init

    written = spo_init(recipe, out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out}: {written['prompts']} prompts x {p.spo_offline_n} samples, success rate "
              f"{100 * written['success_rate']:.1f}%")
        print(f"`posttrain train {args.recipe}` reads it" if out.resolve() == read_by_train.resolve() else
              f"set method.spo_offline_scores: {out} for `posttrain train` to read it")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``error:`` line (exit code 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_chat_template_arguments(p: argparse.ArgumentParser) -> None:
    """``--chat-template`` / ``--system-prompt`` of the commands that format prompts outside a recipe."""
    p.add_argument("--chat-template", metavar="auto|none|FILE.jinja", help="plain-text prompts: wrap them as a user "
                   "turn of the chat template (auto: when the model has one; default: the run's data.chat_template, "
                   "else auto); conversational rows always use the template")
    p.add_argument("--system-prompt", help="system turn put first in every conversational prompt without one")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="posttrain",
        description="Post-train LLMs from one recipe YAML: SFT variants, preference optimisation, RLVR, unlearning.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="run a recipe", description="Train from a recipe YAML. Every run leaves "
                       "recipe.yaml (resolved), metrics.jsonl, the final model and checkpoints in output_dir.")
    p.add_argument("recipe", help="path to the recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, value parsed as YAML (e.g. --set training.max_steps=5); repeatable")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest complete "
                   "checkpoint (a finished run is left as it is)")
    p.add_argument("--overwrite", action="store_true", help="replace another run's outputs in output_dir (without "
                   "it, a folder holding another run is refused)")
    p.add_argument("--output-dir", help="override the recipe's output_dir")
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="train on N processes: starts `accelerate launch` itself (default: this one process)")
    p.add_argument("--distributed", default=None, metavar="BACKEND",
                   help=f"with --num-processes N >= 2: {' | '.join(launch.BACKENDS)} (default ddp; the DeepSpeed "
                   "backends need the deepspeed extra; docs/distributed.md)")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("check", help="check a recipe without training (--show N: rendered training rows)",
                       description="Run every check of `posttrain train` that needs no model; with --show N, also "
                       "print the first N training rows as the trainer sees them: the rendered text (chat template, "
                       "system turn) with the tokens the loss is on marked, token counts and truncation. Loads the "
                       "tokenizer only; writes nothing.")
    p.add_argument("recipe", help="path to the recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as for train; repeatable")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N training rows")
    p.set_defaults(fn=_cmd_check)

    p = sub.add_parser("report", help="HTML page of a run's curves (several runs: overlaid)",
                       description="Draw one self-contained HTML page (plots embedded, opens offline) of one or more "
                       "runs' metrics.jsonl, with their resolved recipes and summaries as tables; the plots are also "
                       "written as PNGs to <output>_plots/. Every run writes its own report.html at the end.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run output directories (several: overlaid)")
    p.add_argument("--output", help="page to write (default RUN_DIR/report.html for one run, else report.html)")
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("methods", help="list methods", description="List every method with its description, "
                       "paper and recipe; with NAME, that method's page summary (docs/methods/) and keys.")
    p.add_argument("name", nargs="?", help="a method (or a GRPO advantage / aggregation / clipping, a peft.type)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=_cmd_methods)

    p = sub.add_parser("init-model", help="write a built-in tiny model to a directory",
                       description="Build a tiny offline model + tokenizer (no download) and copy it to OUT_DIR. "
                       "Recipes can also name built-in models directly (model: builtin:tiny-qwen2).")
    p.add_argument("out_dir", nargs="?", help="directory to write")
    p.add_argument("--name", default="tiny-qwen2", help="built-in model (default tiny-qwen2; see --list)")
    p.add_argument("--list", action="store_true", help="list built-in models")
    p.set_defaults(fn=_cmd_init_model)

    p = sub.add_parser("tasks", help="list built-in tasks", description="List the built-in, procedurally "
                       "generated tasks a recipe can name as a data source (builtin:<task>).")
    p.set_defaults(fn=_cmd_tasks)

    p = sub.add_parser("eval", help="score a model: greedy accuracy, unlearning suites, lm-evaluation-harness",
                       description="Score a model (run directory, local path, hub id or builtin:): greedy accuracy on "
                       "prompt/answer data (default), --suite tofu / --suite unlearning on the run's own forget/retain "
                       "data, or lm-evaluation-harness tasks (--lm-eval).")
    p.add_argument("model", help="model directory, hub id or builtin:<name>")
    p.add_argument("--data", help="accuracy: data source (default builtin:arithmetic-rl); --suite tofu/unlearning: "
                   "the forget set (as --forget)")
    p.add_argument("--split", help="split of --data (accuracy default: test)")
    p.add_argument("--max-samples", type=int, default=None, help="at most N rows of each set")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length (accuracy default: the run's "
                   "eval.max_new_tokens for a run directory, else 256 for chat prompts and 4x the longest answer, at "
                   "least 32, for plain ones, with a warning when many completions reach it; tofu: 48; unlearning: "
                   "128 for verbatim, 32 for knowledge memorisation, as MUSE)")
    p.add_argument("--output", help="write the result as JSON to this file")
    p.add_argument("--suite", choices=["accuracy", "tofu", "unlearning"], default=None,
                   help="accuracy (default): greedy accuracy on --data; tofu: TOFU metrics (answer probability, "
                   "ROUGE-L, truth ratio, forget_quality, model_utility; JSON in MODEL/unlearning_eval.json); "
                   "unlearning: membership-inference AUCs, privleak, verbatim / knowledge memorisation, extraction "
                   "strength, utility (JSON in MODEL/unlearning_suite_eval.json). Both score the run's data.forget / "
                   "data.retain / data.holdout unless given --forget / --retain / --holdout (docs/unlearning.md)")
    p.add_argument("--forget", help="tofu/unlearning: the forget set (a file, hub name or builtin:task, or a YAML "
                   "mapping as in a recipe: '{source: builtin:facts, split: forget05}'); default: the run's data.forget")
    p.add_argument("--retain", help="tofu/unlearning: the retain set (default: the run's data.retain)")
    p.add_argument("--holdout", help="tofu/unlearning: rows never trained on, for membership inference (default: the "
                   "run's data.holdout, or the built-in task's holdout split)")
    p.add_argument("--forget-qa", help="unlearning: questions about the forget data, for knowmem_f (default: the "
                   "forget set)")
    p.add_argument("--retain-qa", help="unlearning: questions about the retain data, for knowmem_r (default: the "
                   "retain set)")
    p.add_argument("--forget-split", help="tofu/unlearning: the split of a built-in forget source (forget01 | "
                   "forget05 | forget10 for builtin:facts); alone: builtin:facts with that split")
    p.add_argument("--retain-model", help="tofu/unlearning: model trained without the forget set (e.g. "
                   "builtin:tiny-qwen2-facts-retain95), or an earlier JSON result of it; tofu: forget_quality; "
                   "unlearning: every metric's reference value and privleak's AUC")
    p.add_argument("--reference-model", help="unlearning: the reference model of the mia_reference attack (default: "
                   "--retain-model)")
    p.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated (e.g. "
                   "mmlu,wmdp_bio; needs pip install -e '.[lm-eval]'; hub tasks download their data); alone or with "
                   "--suite unlearning (as utility)")
    p.add_argument("--lm-eval-include", metavar="DIR", help="a folder of extra lm-eval task YAMLs")
    p.add_argument("--lm-eval-limit", type=int, default=None, metavar="N", help="lm-eval: at most N examples per "
                   "task (for a quick look; not a benchmark number)")
    p.add_argument("--batch-size", type=int, default=32, help="tofu/unlearning/lm-eval: scoring / generation batch "
                   "size")
    p.add_argument("--pass-k", type=int, nargs="+", metavar="K",
                   help="accuracy: also pass@k for these k (unbiased estimator from --num-samples samples per prompt)")
    p.add_argument("--num-samples", type=int, default=None, help="pass@k: samples per prompt (default: max k)")
    p.add_argument("--temperature", type=float, default=1.0, help="pass@k: sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="pass@k: sampling seed")
    _add_chat_template_arguments(p)
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("poft-score", help="score SFT data with aligned models for PoFT",
                       description="Compute each row's mean response log-prob under each aligned model "
                       "(poft_ref_scores), for method poft.")
    p.add_argument("--data", required=True, help="data source with prompt/completion rows")
    p.add_argument("--split", default="train")
    p.add_argument("--aligned-model", action="append", required=True, help="aligned model; repeatable")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", required=True, help="output .jsonl")
    _add_chat_template_arguments(p)
    p.set_defaults(fn=_cmd_poft_score)

    p = sub.add_parser("spo-init", help="SPO's offline pass: score the start policy on every training prompt",
                       description="Sample method.spo_offline_n completions of every prompt of data.train with the "
                       "recipe's start policy, score them with its rewards and write the per-prompt scores (JSON, "
                       "prompt key -> scores) that `posttrain train` then reads instead of sampling them before its "
                       "first step (docs/methods/spo.md). Progress is kept in OUT.partial: running the command again "
                       "continues an interrupted pass.")
    p.add_argument("recipe", help="path to an SPO recipe (method.advantage: spo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as for train; repeatable")
    p.add_argument("--out", help="scores file to write (default: method.spo_offline_scores when set, else "
                   "output_dir/spo_offline_scores.json: the files `posttrain train` reads)")
    p.add_argument("--overwrite", action="store_true", help="sample again when the scores file exists")
    p.set_defaults(fn=_cmd_spo_init)

    p = sub.add_parser("merge", help="write a full model from an adapter run",
                       description="Merge a finished run's adapter (peft.type lora, ggpo; plora runs are saved merged "
                       "already and are copied) into its base model and write a full model to OUT_DIR, loadable "
                       "with AutoModelForCausalLM.from_pretrained. GOAT routes per token and cannot be merged.")
    p.add_argument("run_dir", help="a finished run's output_dir")
    p.add_argument("out_dir", help="directory to write (must not exist or be empty)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code to run "
                   "(needed when the run's recipe.yaml has model.trust_remote_code: true; only for runs you trust)")
    p.set_defaults(fn=_cmd_merge)
    return parser


def _close_progress_bars() -> None:
    """Close a training progress bar left open by an error, so that the error is the last line on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# errno values of file-system failures (anything else an OSError carries is left to its traceback)
_FS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
              errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOTEMPTY,
              errno.EXDEV, errno.ELOOP, errno.EFBIG}


# how libraries that write files themselves (safetensors' Rust writer, torch's zip writer) report a full disk or a
# file-size limit: text in their message -> what happened
_WRITE_FAILURES = (
    ("No space left on device", "no space left on device"), ("os error 28", "no space left on device"),
    ("Disk quota exceeded", "disk quota exceeded"), ("os error 122", "disk quota exceeded"),
    ("File too large", "file too large (a file-size limit, e.g. ulimit -f)"),
    ("os error 27", "file too large (a file-size limit, e.g. ulimit -f)"),
    ("file write failed", "a file write failed (a full disk or a file-size limit?)"),
    ("iostream error", "a file write failed (a full disk or a file-size limit?)"),
    ("inline_container.cc", "a file write failed (a full disk or a file-size limit?)"),
)


def expected_failure(exc: BaseException) -> str | None:
    """The ``error:`` line for an expected failure of the environment, or None for anything else (a bug)."""
    if isinstance(exc, OSError) and exc.errno in _FS_ERRNOS:
        where = exc.filename if exc.filename is not None else "file system"
        return f"{where}: {exc.strerror or os.strerror(exc.errno)}"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return expected_failure(cause)
    chain, seen = [], set()
    node = exc
    while node is not None and id(node) not in seen:  # the failing write may be a cause of what was raised last
        seen.add(id(node))
        chain.append(node)
        node = node.__cause__ or node.__context__
    text = " ".join(str(exc).split())
    for needle, what in _WRITE_FAILURES:
        if any(needle in str(e) for e in chain):
            return (f"file system: {what} while writing ({type(exc).__name__}: {text[:160]}); the run is not marked "
                    "complete: free space (or raise the limit) and rerun; --resume continues from the newest complete "
                    "checkpoint")
    if isinstance(exc, UnicodeDecodeError):
        return f"text is not UTF-8 ({exc.reason} at byte {exc.start}); save the file as UTF-8"
    if isinstance(exc, MemoryError):
        return "out of memory (lower the batch size, the sequence lengths or peft.r)"
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and ("not enough memory" in str(exc) or "out of memory" in str(exc).lower())
    ):
        first = " ".join(str(exc).split())[:160]
        return f"out of memory: {first} (lower the batch size, the sequence lengths or peft.r)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: the program's arguments); its exit code. As the program itself (no
    ``argv``: the ``posttrain`` script, ``python -m posttrain.cli``), a finished ``posttrain train`` ends the process
    at once (:func:`end_process`)."""
    parser = build_parser()
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    code = _run_command(args)
    if program and args.fn is _cmd_train:
        end_process(code)
    return code


def end_process(code: int) -> None:
    """End the process with ``code`` once the exit handlers have run (loggers, trackers) and the output is flushed,
    skipping the interpreter's teardown of every imported module, which after a training run takes seconds (torch,
    transformers, TRL and their imports; benchmarks/startup.py) and writes nothing. A thread that is not a daemon
    (which the interpreter would wait for) keeps the ordinary exit."""
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_command(args) -> int:
    try:
        return args.fn(args)
    except UserError as exc:
        return _fail(f"error: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `posttrain methods | head`: the reader went away; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - machine failures become one line; anything else keeps its traceback
        message = expected_failure(exc)
        if message is not None:
            return _fail(f"error: {' '.join(message.split())}", 1)
        if launch.another_process_failed():  # a consequence (e.g. a collective whose peer exited): its error is shown
            launch.exit_launched_process(1)
        raise  # a bug: keep the traceback


def _fail(line: str, code: int) -> int:
    """Print the one ``error:`` line; in a process of a ``--num-processes`` launch, also record it for the launch and
    exit at once (posttrain.launch)."""
    _close_progress_bars()
    recorded = launch.record_error(line, code)  # before printing: the launch holds back what follows
    print(line, file=sys.stderr)
    if recorded:
        launch.exit_launched_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
