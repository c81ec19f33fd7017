"""Fuzzing the recipe validation: seeded mutations of every shipped recipe (dropped keys, wrong types, NaN/inf,
negative, zero and huge numbers, unicode, deep nesting), validated in-process the way `posttrain train` does before it
loads a model (parse_recipe + preflight: the TRL config object and the data). Every mutation either passes or raises
one UserError line (never another exception), and no accepted recipe holds a value outside its domain."""

import copy
import math
import random
import time
from pathlib import Path

import pytest

from posttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
NUM_MUTATIONS = 800
SEED = 1234


def _deep(levels):
    value = 1
    for _ in range(levels):
        value = {"a": value}
    return value


MUTATIONS = {
    "drop": None, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "negative": -5, "zero": 0,
    "small_negative": -1e-9, "huge_int": 2**40, "huge_float": 1e300, "float_for_int": 2.5, "string": "abc",
    "unicode": "ü€😀", "empty_string": "", "true": True, "list": [1, "x"], "dict": {"a": 1}, "null": None,
    "deep": _deep(40),
}
# keys whose domain excludes 0 / negatives (the oracle; independent of posttrain's own tables)
POSITIVE = {
    "training.per_device_train_batch_size", "training.gradient_accumulation_steps", "training.max_steps",
    "training.num_generations", "training.max_completion_length", "training.logging_steps", "training.save_steps",
    "training.num_train_epochs", "training.max_length", "training.temperature", "peft.r", "peft.lora_alpha",
    "method.beta", "method.poft_beta", "data.train.max_samples", "data.test.max_samples", "data.eval.max_samples",
    "data.train.options.num_samples", "data.train.options.max_operand", "method.epsilon",
}
INTEGER = {
    "seed", "training.per_device_train_batch_size", "training.gradient_accumulation_steps", "training.max_steps",
    "training.num_generations", "training.max_completion_length", "training.max_length", "training.logging_steps",
    "training.save_steps", "training.save_total_limit", "peft.r", "data.train.max_samples", "data.test.max_samples",
    "data.eval.max_samples", "data.train.options.num_samples", "data.train.options.max_operand",
}
NON_NEGATIVE = POSITIVE | {
    "seed", "training.learning_rate", "training.weight_decay", "training.max_grad_norm", "training.warmup_steps",
    "method.gamma", "method.alpha", "method.sft_coef", "method.entropy_coef", "method.asft_kl_coef",
    "peft.lora_dropout", "method.label_smoothing", "method.san_alpha", "method.delta_l_alpha",
}
EXTRA_KEYS = {
    "common": ["seed", "output_dir", "training.learning_rate", "training.max_steps", "training.per_device_train_batch_size",
               "training.gradient_accumulation_steps", "training.logging_steps", "training.save_steps",
               "training.num_train_epochs", "training.weight_decay", "training.max_grad_norm", "training.warmup_steps",
               "training.fp16", "training.eval_strategy", "peft.r", "peft.lora_alpha", "peft.lora_dropout",
               "peft.use_rslora", "data.train.max_samples", "data.forget"],
    "rl": ["training.num_generations", "training.max_completion_length", "training.temperature",
           "method.entropy_coef", "method.beta", "method.epsilon"],
    "sft": ["training.max_length"],
    "preference": ["training.max_length", "method.beta"],
    "unlearning": ["training.max_length", "method.gamma"],
    "unpaired": ["training.max_length", "method.beta", "method.desirable_weight", "method.undesirable_weight"],
    "reward": ["training.max_length", "method.center_rewards_coef"],
    "online": ["training.max_completion_length", "training.temperature", "method.beta", "method.missing_eos_penalty"],
}


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                yield from _leaves(value, path)
            else:
                yield path
    # lists (rewards, target_modules) are mutated as a whole


def _set(data, path, value, drop=False):
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part in ("train", "eval", "test", "forget", "retain"):
            child = node[part] = {"source": child}
        elif isinstance(child, str) and part in ("model", "ref_model"):
            child = node[part] = {"path": child}
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if drop:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = copy.deepcopy(value)


def _get(data, path):
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _non_finite_or_huge(node, where="recipe"):
    """The first number in an accepted recipe outside what any key allows: non-finite, or an integer beyond 2**32."""
    if isinstance(node, bool):
        return None
    if isinstance(node, float) and not math.isfinite(node):
        return where
    if isinstance(node, int) and abs(node) >= 2**32:
        return where
    if isinstance(node, dict):
        for key, value in node.items():
            found = _non_finite_or_huge(value, f"{where}.{key}")
            if found:
                return found
    if isinstance(node, list):
        for i, value in enumerate(node):
            found = _non_finite_or_huge(value, f"{where}[{i}]")
            if found:
                return found
    return None


def _must_reject(path, kind, original, family):
    """Oracle: the mutation puts a value outside the key's domain."""
    if kind in ("nan", "inf", "-inf", "deep"):
        return True
    numeric = isinstance(original, int | float) and not isinstance(original, bool)
    if numeric and kind in ("string", "unicode", "empty_string", "true", "list", "dict"):
        return True
    if isinstance(original, bool) and kind not in ("true", "drop", "null"):
        return True
    if path in INTEGER and kind in ("huge_int", "float_for_int", "huge_float"):
        return True
    if kind in ("negative", "small_negative") and path in NON_NEGATIVE:
        return True
    if kind == "zero" and path in POSITIVE and not (path == "method.beta" and family == "rl"):  # GRPO: KL off
        return True
    if path == "output_dir" and kind == "empty_string":
        return True
    return False


@pytest.fixture(scope="module")
def shipped():
    from posttrain.methods import get_method
    from posttrain.recipe import load_yaml

    out = []
    for path in RECIPES:
        data = load_yaml(path.read_text())
        family = get_method(data["method"]["name"]).family
        out.append((path.name, data, family))
    return out


def test_fuzzed_recipes_fail_with_one_error_line_or_stay_in_domain(shipped, tmp_path):
    from posttrain.recipe import parse_recipe
    from posttrain.train import preflight

    rng = random.Random(SEED)
    start = time.time()
    outcomes = {"accepted": 0, "rejected": 0}
    for i in range(NUM_MUTATIONS):
        name, base, family = rng.choice(shipped)
        data = copy.deepcopy(base)
        data["output_dir"] = str(tmp_path / "out")
        path = rng.choice(sorted(set(_leaves(base)) | set(EXTRA_KEYS["common"]) | set(EXTRA_KEYS[family])))
        kind = rng.choice(sorted(MUTATIONS))
        original = _get(data, path)
        _set(data, path, MUTATIONS[kind], drop=kind == "drop")
        what = f"mutation {i}: {name} {path} <- {kind}"
        try:
            recipe = parse_recipe(data)
            preflight(recipe)
        except UserError as exc:
            message = str(exc)
            assert message and "\n" not in message and "Traceback" not in message, what
            outcomes["rejected"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
        outcomes["accepted"] += 1
        assert not _must_reject(path, kind, original, family), f"{what}: accepted a value outside the domain"
        bad = _non_finite_or_huge({**recipe.resolved(), "training": recipe.training})
        assert bad is None, f"{what}: accepted {bad}"
    elapsed = time.time() - start
    assert outcomes["accepted"] > 50 and outcomes["rejected"] > 200, outcomes
    assert elapsed < 60, f"{NUM_MUTATIONS} mutations took {elapsed:.0f} s"
