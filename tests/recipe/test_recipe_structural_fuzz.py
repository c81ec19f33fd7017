"""Structural recipe fuzz (issue 29), next to the value fuzz of tests/recipe/test_recipe_fuzz.py: recipes written
wrong the way a hostile user writes them (wrong nesting, YAML features, cross-key conflicts, paths, the launcher's
own flags), run through `posttrain train` in-process and classified by tests/fuzz_harness.py (traceback / hang /
nonsense exit 0 / wrong error / clean error / valid run).

The fixed core is every case of issue 29; the generator adds seeded mutations of small base recipes. The default
suite runs the core and a sample of generated recipes up to the model load (every refusal here happens before it);
``-m slow`` runs the cases that need a model and a fresh fuzz of >= 300 recipes for real (valid ones train one step).
``python tests/recipe/test_recipe_structural_fuzz.py [N] [SEED]`` prints the classification of a fresh fuzz.
"""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/fuzz_harness.py, also when run as a script
from fuzz_harness import Case, classify, report, run_case  # noqa: E402

SFT = {
    "model": "builtin:tiny-qwen2",
    "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 16}}},
    "method": {"name": "sft"},
    "training": {"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no", "logging_steps": 1,
                 "disable_tqdm": True, "report_to": "none"},
    "output_dir": "{dir}/out",
}
DPO = {**SFT, "model": "builtin:tiny-qwen2-arith", "method": {"name": "dpo", "beta": 0.1},
       "data": {"train": {"source": "builtin:arithmetic-pref", "options": {"num_samples": 16}}}}
GRPO = {**SFT, "model": "builtin:tiny-qwen2-arith", "method": {"name": "grpo"},
        "data": {"train": {"source": "builtin:arithmetic-rl", "options": {"num_samples": 8}}},
        "training": {**SFT["training"], "num_generations": 2, "max_completion_length": 4}}
GA = {**SFT, "model": "builtin:tiny-qwen2-facts", "method": {"name": "ga"},
      "data": {"forget": {"source": "builtin:facts", "split": "forget05"}}}
NPO_RT = {**GA, "method": {"name": "npo_rt"},
          "data": {"forget": {"source": "builtin:facts", "split": "forget01"},
                   "retain": {"source": "builtin:facts", "split": "retain99", "max_samples": 8}}}
TOOLS = {**GRPO, "data": {"train": {"source": "builtin:arithmetic-tool-rl", "options": {"num_samples": 8}}},
         "method": {"name": "grpo", "environment": "posttrain.rl.tools:ArithmeticEnv"}}
BASES = {"sft": SFT, "dpo": DPO, "grpo": GRPO, "ga": GA, "npo_rt": NPO_RT}


def with_(base: dict, **changes) -> dict:
    """``base`` with dotted keys set (``training__learning_rate=1`` sets training.learning_rate)."""
    out = copy.deepcopy(base)
    for dotted, value in changes.items():
        node, parts = out, dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


SFT_TEXT = """model: builtin:tiny-qwen2
data:
  train: {source: builtin:arithmetic-sft, options: {num_samples: 16}}
method: {name: sft}
training: {max_steps: 1, per_device_train_batch_size: 4, save_strategy: "no", logging_steps: 1, disable_tqdm: true}
output_dir: "{dir}/out"
"""
LAUGHS = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
MERGED = """model: builtin:tiny-qwen2
data:
  train: &rows {source: builtin:arithmetic-sft, options: {num_samples: 16}}
  eval: {<<: *rows, max_samples: 4}
method: {name: sft}
training: {max_steps: 1, per_device_train_batch_size: 4, save_strategy: "no", logging_steps: 1, disable_tqdm: true}
output_dir: "{dir}/out"
"""
BAD_JINJA = "{% for m in messages %}{{ m['content'] }{% endfor %}"
SANDBOX_JINJA = "{{ messages.__init__.__globals__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
ROWS = "".join(f'{{"prompt": "{i}+1=", "completion": "{i + 1}"}}\n' for i in range(8))
ENV_FUNCTION = "def calculator(expression: str) -> str:\n    \"\"\"Evaluate.\n\n    Args:\n        expression: a sum\n    \"\"\"\n    return '0'\n"

# --------------------------------------------------------------------------------------------------------------------
# the fixed core: every case of issue 29

CORE = [
    # tracebacks before
    Case("peft_init_bogus", with_(SFT, peft={"r": 4, "init_lora_weights": "bogus"}), needle="peft.init_lora_weights"),
    Case("peft_targets_empty_string", with_(SFT, peft={"r": 4, "target_modules": ""}), needle="peft.target_modules"),
    Case("peft_targets_empty_list", with_(SFT, peft={"r": 4, "target_modules": []}), needle="peft.target_modules"),
    Case("environment_is_a_function", with_(TOOLS, method__environment="env.py:calculator"),
         files={"env.py": ENV_FUNCTION}, needle="method.environment"),
    Case("report_to_unknown", with_(SFT, training__report_to="no_such_tracker"), needle="training.report_to"),
    Case("identity_rename", with_(SFT, data__train__columns={"prompt": "prompt"}), expect="valid"),
    Case("mixture_weights_overflow", with_(SFT, data__train=[
        {"source": "builtin:arithmetic-sft", "options": {"num_samples": 8}, "weight": 1e308},
        {"source": "builtin:arithmetic-sft", "options": {"num_samples": 8, "seed": 1}, "weight": 1e308}]),
        expect="valid"),
    Case("chat_template_malformed", with_(SFT, data__chat_template="bad.jinja"), files={"bad.jinja": BAD_JINJA},
         needle="data.chat_template"),
    Case("chat_template_sandbox", with_(SFT, data__chat_template="evil.jinja"), files={"evil.jinja": SANDBOX_JINJA},
         needle="sandbox"),
    Case("output_dir_unknown_user", with_(SFT, output_dir="~nosuchuser_h29/run"), needle="output_dir"),
    Case("disk_limit_during_save", SFT, expect="exit1", needle="file too large", needs_model=True,
         fsize_limit=1_000_000),
    Case("billion_laughs", LAUGHS + SFT_TEXT, needle="alias"),
    # nonsense accepted with exit 0 before
    Case("learning_rate_string", with_(SFT, training__learning_rate="0.001"), needle="training.learning_rate"),
    Case("duplicate_training_block", SFT_TEXT + "training: {learning_rate: 0.1}\n", needle="duplicate key 'training'"),
    Case("duplicate_learning_rate", SFT_TEXT.replace("max_steps: 1,", "max_steps: 1, learning_rate: 1.0e-3, "
                                                     "learning_rate: 5.0,"), needle="duplicate key 'learning_rate'"),
    Case("duplicate_output_dir", SFT_TEXT + "output_dir: elsewhere\n", needle="duplicate key 'output_dir'"),
    Case("num_processes_zero", SFT, argv=("--num-processes", "0"), needle="--num-processes"),
    Case("num_processes_negative", SFT, argv=("--num-processes", "-3"), needle="--num-processes"),
    Case("distributed_without_processes", SFT, argv=("--distributed", "zero3"), needle="--num-processes"),
    Case("accumulation_int32_max", with_(SFT, training__gradient_accumulation_steps=2147483647),
         needle="training.gradient_accumulation_steps"),
    Case("accumulation_1e6_forget", with_(GA, training__gradient_accumulation_steps=1e6),
         needle="training.gradient_accumulation_steps"),
    Case("clip_range_inverted", with_(GRPO, method__epsilon=0.2, method__epsilon_high=0.1),
         needle="method.epsilon_high"),
    Case("reward_option_string_bool", with_(GRPO, method__rewards=[{"name": "exact_match", "options":
                                                                   {"strict": "yes"}}]), needle="options.strict"),
    Case("load_best_without_eval", with_(SFT, training__load_best_model_at_end=True),
         needle="training.load_best_model_at_end"),
    Case("revision_on_builtin", with_(SFT, model={"path": "builtin:tiny-qwen2", "revision": "main"}),
         needle="revision"),
    Case("retain_on_ga", with_(GA, data__retain={"source": "builtin:facts", "split": "retain95"}),
         needle="data.retain"),
    # to judge (docs/observability.md, README)
    Case("beta_subnormal", with_(DPO, method__beta=1e-320), needle="subnormal"),
    Case("wagle_freezes_everything", with_(NPO_RT, method__mask="wagle", method__mask_sparsity=0.999999),
         needle="method.mask_sparsity", needs_model=True),
    Case("ref_model_other_tokenizer", with_(DPO, ref_model="{dir}/other"), needle="ref_model", needs_model=True),
    Case("precompute_ref_with_lora", with_(DPO, method__precompute_ref_log_probs=True, peft={"r": 4}),
         expect="valid", needs_model=True),
    Case("single_reward_weight_zero", with_(GRPO, method__rewards=[{"name": "exact_match", "weight": 0.0}]),
         needle="method.rewards"),
    Case("output_dir_is_recipe_folder", with_(SFT, output_dir="{dir}"), needle="recipe's own folder"),
    Case("dft_collapse", with_(SFT, model="builtin:tiny-qwen2-arith", method={"name": "dft"}, training__max_steps=6,
                               training__learning_rate=1000.0, training__max_grad_norm=0.0),
         expect="warn", needle="collapsed", needs_model=True),
    # newcomer: relative data paths (next to the recipe; missing: both places named)
    Case("relative_data_next_to_recipe", with_(SFT, data__train="rows.jsonl"), files={"rows.jsonl": ROWS},
         expect="valid"),
    Case("relative_data_missing", with_(SFT, data__train="nowhere/rows.jsonl"), needle="looked next to the recipe"),
    # YAML features that are fine
    Case("merge_key", MERGED, expect="valid"),
]


def _other_tokenizer_model(folder: Path) -> None:
    """A copy of builtin:tiny-qwen2 whose tokenizer has one more token (for ref_model_other_tokenizer)."""
    import shutil

    from transformers import AutoTokenizer

    from posttrain.models import builtin_model_dir

    src = builtin_model_dir("tiny-qwen2")
    shutil.copytree(src, folder / "other", dirs_exist_ok=True, ignore=shutil.ignore_patterns("DONE"))
    tok = AutoTokenizer.from_pretrained(folder / "other")
    tok.add_tokens(["<extra_token_h29>"])
    tok.save_pretrained(folder / "other")


def _prepare(case: Case, folder: Path) -> None:
    if case.name == "ref_model_other_tokenizer":
        _other_tokenizer_model(folder)


# --------------------------------------------------------------------------------------------------------------------
# the generator: seeded structural mutations of the base recipes, each with its oracle


def _misnest(rng, base):
    """A key at the wrong level: valid keys moved up, down or into another block (refused as unknown keys)."""
    moves = [
        lambda d: d.update(learning_rate=1e-3),
        lambda d: d["method"].update(training={"max_steps": 1}),
        lambda d: d["training"].update(method={"name": "sft"}),
        lambda d: d["data"].update(source="builtin:arithmetic-sft"),
        lambda d: d.update(train=d["data"].pop(next(iter(d["data"])))),
        lambda d: d.update(method=d["method"]["name"]),
        lambda d: d.update(model=[d["model"]]),
        lambda d: d["training"].update(peft={"r": 4}),
        lambda d: d.update(training=[d["training"]]),
        lambda d: d.update(seed={"value": 1}),
        lambda d: d["data"].update(train=[]) if "train" in d["data"] else d["data"].update(forget=[]),
    ]
    data = copy.deepcopy(base)
    rng.choice(moves)(data)
    return data, "error", ""


_YAML_ERRORS = [
    ("tab_indent", "model: builtin:tiny-qwen2\ndata:\n\ttrain: x\n", "invalid YAML"),
    ("python_tag", "model: !!python/object:os.system {}\n", "invalid YAML"),
    ("two_documents", "{base}---\nmodel: builtin:tiny-llama\n", "invalid YAML"),
    ("undefined_alias", "{base}seed: *nothere\n", "invalid YAML"),
    ("self_alias", "x: &x [*x]\n{base}", "invalid YAML"),
    ("non_string_key", "{base}1: one\n", "not a name"),
    ("list_document", "- model: builtin:tiny-qwen2\n", "expected a mapping"),
    ("scalar_document", "just text\n", "expected a mapping"),
    ("string_number", "{base}", "training.learning_rate"),
    ("tagged_string_number", "{base}", "training.learning_rate"),
    ("binary_tag", "{base}", "training.max_steps"),
    ("laughs_small", "{laughs}{base}", "alias"),
    ("merge_bomb", "{mergebomb}{base}", "alias"),
    ("null_key", "{base}~: 1\n", "not a name"),
    ("duplicate_nested", "{base}", "duplicate key"),
]


def _yaml_text(rng, base):
    import yaml

    name, template, needle = rng.choice(_YAML_ERRORS)
    text = yaml.safe_dump(base, sort_keys=False)
    if name == "string_number":
        text = text.replace("max_steps: 1", "max_steps: 1\n  learning_rate: '0.001'")
    elif name == "tagged_string_number":
        text = text.replace("max_steps: 1", "max_steps: 1\n  learning_rate: !!str 1e-3")
    elif name == "binary_tag":
        text = text.replace("max_steps: 1", "max_steps: !!binary aGVsbG8=")
    elif name == "duplicate_nested":
        text = text.replace("max_steps: 1", "max_steps: 1\n  max_steps: 2")
    laughs = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 12)}]\n" for i in range(1, 6))
    merge = "m0: &m0 {a: 1, b: 2}\n" + "".join(
        f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 12)}], k{i}: 1}}\n" for i in range(1, 7))
    return (template.replace("{base}", text).replace("{laughs}", "l0: &l0 [x, x, x, x, x, x, x, x, x, x, x, x]\n"
                                                     + laughs).replace("{mergebomb}", merge)), "error", needle


_VALID_YAML = [
    lambda text: "# a comment\n" + text,
    lambda text: "\ufeff" + text,
    lambda text: text.replace("max_steps: 1", "max_steps: 1  # one step"),
    lambda text: "---\n" + text,
    lambda text: text + "...\n",
    lambda text: text.replace("per_device_train_batch_size: 4", "per_device_train_batch_size: !!int 4"),
]


def _valid_yaml(rng, base):
    import yaml

    return rng.choice(_VALID_YAML)(yaml.safe_dump(base, sort_keys=False)), "valid", ""


# (family of the base or "any", changes, needle): cross-key conflicts, each refused by the part that owns the key
_CONFLICTS = [
    ("any", {"training__eval_strategy": "steps"}, "training.eval_strategy"),
    ("any", {"training__fp16": True}, "training.fp16"),
    ("any", {"training__load_best_model_at_end": True}, "training.load_best_model_at_end"),
    ("any", {"training__gradient_accumulation_steps": 1000}, "training.gradient_accumulation_steps"),
    ("any", {"training__output_dir": "x"}, "training.output_dir"),
    ("any", {"training__model_init_kwargs": {"dtype": "float32"}}, "training.model_init_kwargs"),
    ("any", {"model": {"path": "builtin:tiny-qwen2", "revision": "v1"}}, "revision"),
    ("any", {"peft": {"r": 4, "init_lora_weights": "loftq"}}, "peft.init_lora_weights"),
    ("any", {"peft": {"r": 4, "type": "plora", "goat": {"num_experts": 2}}}, "peft"),
    ("any", {"model": {"path": "builtin:tiny-qwen2", "quantization": {"load_in_4bit": True}}}, "model.quantization"),
    ("train", {"eval__steps": 5}, "eval.steps"),
    ("any", {"eval__pass_k": [4], "eval__num_samples": 2}, "eval.pass_k"),
    ("sft", {"ref_model": "builtin:tiny-qwen2"}, "ref_model"),
    ("sft", {"data__forget": "builtin:facts"}, "data.forget"),
    ("dpo", {"ref_model": "none"}, "ref_model"),
    ("dpo", {"method__label_smoothing": 0.5}, "method.label_smoothing"),
    ("dpo", {"method__beta": 1e-320}, "subnormal"),
    ("grpo", {"method__epsilon_high": 0.05}, "method.epsilon_high"),
    ("grpo", {"method__rewards": [{"name": "exact_match", "weight": 0.0}, {"name": "format", "weight": 0.0}]},
     "method.rewards"),
    ("grpo", {"method__rewards": [{"name": "format", "options": {"tag": 5}}]}, "options.tag"),
    ("grpo", {"method__rewards": [{"name": "exact_match", "options": {"strict": "yes"}}]}, "options.strict"),
    ("grpo", {"method__rewards": [{"name": "exact_match", "options": {"strikt": True}}]}, "options.strikt"),
    ("grpo", {"method__loss": "pacs", "method__beta": 0.1}, "method.beta"),
    ("grpo", {"method__use_bias_correction_kl": True}, "method.use_bias_correction_kl"),
    ("grpo", {"method__gppo_beta1": 0.5}, "method.gppo_beta1"),
    ("grpo", {"ref_model": "builtin:tiny-qwen2-arith"}, "ref_model"),
    ("grpo", {"training__num_generations": 1}, "training.num_generations"),
    ("grpo", {"training__beta": 0.1}, "training.beta"),
    ("grpo", {"method__stratum_key": "difficulty", "method__advantage": "stratified"}, "method.stratum_key"),
    ("grpo", {"method__tools": ["posttrain.rl.tools:calculator"]}, "tool calling needs conversational prompts"),
    ("ga", {"data__retain": {"source": "builtin:facts", "split": "retain95"}}, "data.retain"),
    ("ga", {"method__mask_sparsity": 0.5}, "method.mask_sparsity"),
    ("ga", {"method__mask": "wagle", "method__mask_sparsity": 0.5}, "data.retain"),
    ("ga", {"data__train": "builtin:arithmetic-sft"}, "data.train"),
    ("npo_rt", {"method__mask": "wagle"}, "method.mask_sparsity"),
    ("npo_rt", {"method__alpha": 0.0}, "data.retain"),
    ("npo_rt", {"peft": {"r": 4}, "method__mask": "wagle", "method__mask_sparsity": 0.5}, "method.mask"),
]


def _conflict(rng, base_name):
    tags = ("any", base_name) + (("train",) if base_name in ("sft", "dpo", "grpo") else ())
    family, changes, needle = rng.choice([c for c in _CONFLICTS if c[0] in tags])
    return with_(BASES[base_name], **changes), "error", needle


_PATHS = [
    ({"output_dir": "~nosuchuser_h29/x"}, "output_dir"),
    ({"output_dir": "{dir}"}, "recipe's own folder"),
    ({"output_dir": "{dir}/afile"}, "output_dir"),
    ({"output_dir": "/proc/h29/out"}, "output_dir"),
    ({"output_dir": ""}, "output_dir"),
    ({"output_dir": "a\u0000b"}, "output_dir"),
    ({"data__train": "missing.jsonl"}, "looked next to the recipe"),
    ({"data__train": "~nosuchuser_h29/rows.jsonl"}, "cannot expand"),
    ({"data__train": "rows.txt"}, "data.train"),
    ({"data__train": "emptyfile.jsonl"}, "data.train"),
    ({"model": "runs/nope_h29"}, "model.path"),
    ({"model": "/dev/null"}, "model.path"),
    ({"model": "./no_model_here"}, "model.path"),
    ({"model": "~nosuchuser_h29/model"}, "model.path"),
    ({"data__chat_template": "missing.jinja"}, "data.chat_template"),
    ({"data__chat_template": "template.txt"}, "data.chat_template"),
    ({"data__chat_template": "bad.jinja"}, "data.chat_template"),
    ({"method__aligned_models": ["/dev/null"], "method__name": "poft"}, "method.aligned_models"),
]
_PATH_FILES = {"afile": "not a folder\n", "rows.txt": ROWS, "emptyfile.jsonl": "", "bad.jinja": BAD_JINJA,
               "rows.jsonl": ROWS}


def _path(rng, base_name):
    changes, needle = rng.choice(_PATHS)
    reads_train = base_name in ("sft", "dpo", "grpo")
    base = SFT if "method__name" in changes or ("data__train" in changes and not reads_train) else BASES[base_name]
    return with_(base, **changes), "error", needle


_FLAGS = [
    (("--num-processes", "0"), "--num-processes"),
    (("--num-processes", "-1"), "--num-processes"),
    (("--num-processes", "two"), "--num-processes"),
    (("--num-processes", "1", "--distributed", "zero2"), "--distributed"),
    (("--distributed", "ddp"), "--num-processes"),
    (("--distributed", "bogus", "--num-processes", "2"), "--distributed"),
    (("--resume", "--overwrite"), "--overwrite"),
    (("--resume",), "--resume"),
    (("--set", "training.max_steps"), "--set"),
    (("--set", "training..x=1"), "--set"),
    (("--set", "training.max_steps=[1"), "--set"),
    (("--set", "seed.x=1"), "seed"),
    (("--unknown-flag",), "--unknown-flag"),
]


def _flags(rng, base_name):
    argv, needle = rng.choice(_FLAGS)
    return BASES[base_name], "error", needle, argv


def generate(n: int, seed: int) -> list[Case]:
    """``n`` seeded structural mutations of the base recipes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base_name = rng.choice(sorted(BASES))
        kind = rng.choice(["misnest", "yaml", "valid_yaml", "conflict", "conflict", "path", "flags"])
        argv: tuple = ()
        files: dict = {}
        if kind == "misnest":
            recipe, expect, needle = _misnest(rng, BASES[base_name])
        elif kind == "yaml":
            recipe, expect, needle = _yaml_text(rng, BASES[base_name])
        elif kind == "valid_yaml":
            recipe, expect, needle = _valid_yaml(rng, BASES[base_name])
        elif kind == "conflict":
            recipe, expect, needle = _conflict(rng, base_name)
        elif kind == "path":
            recipe, expect, needle = _path(rng, base_name)
            files = dict(_PATH_FILES)
        else:
            recipe, expect, needle, argv = _flags(rng, base_name)
        out.append(Case(f"gen{i}_{kind}_{base_name}", recipe, expect=expect, needle=needle, argv=argv, files=files))
    return out


# --------------------------------------------------------------------------------------------------------------------
# tests

DEFAULT_SAMPLE = 40  # generated recipes in the default suite (each fails or passes preflight in well under a second)
SLOW_FUZZ = 320


@pytest.mark.parametrize("case", [c for c in CORE if not c.needs_model], ids=lambda c: c.name)
def test_issue_29_core_before_any_model_loads(case, tmp_path):
    _prepare(case, tmp_path)
    outcome = run_case(case, tmp_path, load_models=False)
    assert outcome.kind in ("error", "valid"), outcome.describe() + "\n" + "\n".join(outcome.lines[-15:])


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CORE if c.needs_model], ids=lambda c: c.name)
def test_issue_29_core_with_the_model(case, tmp_path):
    _prepare(case, tmp_path)
    outcome = run_case(case, tmp_path, load_models=True)
    assert outcome.kind in ("error", "valid"), outcome.describe() + "\n" + "\n".join(outcome.lines[-15:])


def test_generated_structural_sample_up_to_the_model(tmp_path):
    outcomes = [run_case(case, tmp_path / case.name, load_models=False)
                for case in generate(DEFAULT_SAMPLE, seed=29)]
    counts = classify(outcomes)
    assert counts["traceback"] == counts["hang"] == counts["nonsense"] == counts["wrong"] == 0, report(outcomes)
    assert counts["error"] > DEFAULT_SAMPLE // 2 and counts["valid"] > 0, report(outcomes)


@pytest.mark.slow
def test_fresh_structural_fuzz_of_300_recipes(tmp_path):
    """>= 300 fresh recipes (a seed the default suite does not use), valid ones trained for real."""
    outcomes = [run_case(case, tmp_path / case.name, load_models=True)
                for case in generate(SLOW_FUZZ, seed=2929)]
    counts = classify(outcomes)
    print("structural fuzz:", report(outcomes))
    assert counts["traceback"] == counts["hang"] == counts["nonsense"] == counts["wrong"] == 0, report(outcomes)


if __name__ == "__main__":  # a fresh fuzz, classified: python tests/recipe/test_recipe_structural_fuzz.py [N] [SEED]
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    n, seed = (int(sys.argv[1]) if len(sys.argv) > 1 else SLOW_FUZZ), (int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    with tempfile.TemporaryDirectory() as tmp:
        cases = CORE + generate(n, seed)
        done = []
        for case in cases:
            _prepare(case, Path(tmp) / case.name)
            done.append(run_case(case, Path(tmp) / case.name, load_models=True))
        print(f"{len(done)} recipes ({len(CORE)} fixed, {n} generated with seed {seed}):", report(done))
