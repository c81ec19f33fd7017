"""The recipe schema: one YAML file that describes a whole run.

Top-level keys: ``model``, ``ref_model``, ``data``, ``method``, ``peft``, ``training``, ``output_dir``, ``seed``.
Everything is validated by pydantic; every user error becomes one :class:`~posttrain.errors.UserError` line that
names the dotted key at fault (with a "did you mean" suggestion for unknown keys).
"""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.errors import UserError, did_you_mean
from posttrain.adapters.spec import GGPOSpec, GOATSpec, PLoRASpec, check_peft_variant
from posttrain.methods import MethodParams, get_method


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: ``3e-3`` and ``1e5`` are numbers, and only ``true``/``false`` are
    booleans (``save_strategy: no`` stays the string ``"no"``)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse recipe YAML (see :class:`RecipeLoader`)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSpec(_Strict):
    """A model: a hub id, a local directory, or a built-in tiny model (``builtin:tiny-qwen2``; see ``posttrain
    init-model --list``)."""

    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on GPUs that support it."
    )
    trust_remote_code: bool = False
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) and value != "none" else value


class DataSource(_Strict):
    """A dataset: a local ``.json``/``.jsonl``/``.parquet`` file, a hub dataset name, or a built-in task
    (``builtin:arithmetic-sft``; see ``posttrain tasks``)."""

    source: str
    split: str = "train"
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns: {name in the file: name posttrain expects}."
    )
    max_samples: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="Built-in task options (size, seed, ...).")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value


class DataSpec(_Strict):
    train: DataSource | None = None
    eval: DataSource | None = None
    test: DataSource | None = Field(
        None,
        description="Prompt + answer rows scored by greedy accuracy before and after training (verifiable tasks).",
    )
    forget: DataSource | None = None
    retain: DataSource | None = None


class MethodSpec(BaseModel):
    """``name`` plus the method's hyperparameters as sibling keys."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PeftSpec(_Strict):
    """Adapter settings: ``peft`` LoRA, or a LoRA variant with its options in a sub-block named after it
    (:mod:`posttrain.adapters.spec`; docs/lora_variants.md)."""

    type: Literal["lora", "plora", "goat", "ggpo"] = "lora"
    r: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    plora: PLoRASpec | None = Field(None, description="PeriodicLoRA options (peft.type: plora).")
    goat: GOATSpec | None = Field(None, description="GOAT mixture-of-LoRA-experts options (peft.type: goat).")
    ggpo: GGPOSpec | None = Field(None, description="LoRA-GGPO perturbation options (peft.type: ggpo).")

    @model_validator(mode="after")
    def _variant(self):
        return check_peft_variant(self)


class Recipe(_Strict):
    model: ModelSpec
    ref_model: ModelSpec | Literal["none"] | None = Field(
        None, description="Frozen reference; default: a frozen copy of `model`. `none`: explicitly no reference."
    )
    data: DataSpec
    method: MethodSpec
    peft: PeftSpec | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    output_dir: str = "runs/run"
    seed: int = 42

    # Filled after validation: the method's typed hyperparameters.
    _params: MethodParams | None = None
    # The directory of the recipe file (set by load_recipe): relative `file.py:function` paths are looked up there.
    _source_dir: Path | None = None

    @property
    def params(self) -> MethodParams:
        assert self._params is not None
        return self._params

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults filled in) as plain data, for ``recipe.yaml``."""
        out = self.model_dump(mode="json")
        out["method"] = {"name": self.method.name, **self.params.model_dump(mode="json")}
        return out


# --------------------------------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------------------------------


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set dotted.key=value`` (value parsed as YAML) to ``data`` in place."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected dotted.key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {assignment}: bad key '{key}'")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"--set {key}: value is not valid YAML ({exc.__class__.__name__})") from None
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and part in {"train", "eval", "test", "forget", "retain"}:
            child = node[part] = {"source": child}
        elif isinstance(child, str) and part in {"model", "ref_model"}:
            child = node[part] = {"path": child}
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a mapping")
        node = child
    node[parts[-1]] = value


def _annotation_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _annotation_model(arg)
        if found is not None:
            return found
    return None


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    cls: type[BaseModel] | None = root
    for part in loc:
        if cls is None or part not in cls.model_fields:
            return []
        cls = _annotation_model(cls.model_fields[part].annotation)
    return list(cls.model_fields) if cls is not None else []


def validation_error_to_user_error(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> UserError:
    """Turn the first pydantic error into one line naming the dotted key."""
    err = exc.errors()[0]
    loc = tuple(
        p for p in err["loc"]
        if not (isinstance(p, str) and (p.startswith(("function-", "literal[")) or p[:1].isupper()))
    )
    key = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(loc))
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _fields_at(root, loc[:-1]))
        return UserError(f"{key}: unknown key{hint}")
    if err["type"] == "missing":
        return UserError(f"{key}: required key is missing")
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return UserError(f"{key}: {err['msg']}{got_text}")


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """Validate recipe data (already loaded and overridden)."""
    if not isinstance(data, dict):
        raise UserError("recipe: expected a mapping of top-level keys (model, data, method, training, ...)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_user_error(exc, Recipe) from None
    info = get_method(recipe.method.name)
    try:
        recipe._params = info.params.model_validate(recipe.method.params)
    except ValidationError as exc:
        raise validation_error_to_user_error(exc, info.params, prefix="method") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML file, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of top-level keys (model, data, method, training, ...)")
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        apply_override(data, assignment)
    recipe = parse_recipe(data)
    recipe._source_dir = path.resolve().parent
    return recipe
