"""The recipe schema: one YAML file that describes a whole run.

Top-level keys: ``model``, ``ref_model``, ``data``, ``method``, ``peft``, ``training``, ``eval``, ``report``,
``output_dir``, ``seed``.
Everything is validated by pydantic; every user error becomes one :class:`~posttrain.errors.UserError` line that
names the dotted key at fault (with a "did you mean" suggestion for unknown keys).
"""

from __future__ import annotations

import copy
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from posttrain.errors import UserError, did_you_mean
from posttrain.families.base import FAMILIES, Family
from posttrain.paths import expand_home, read_text
from posttrain.reference import ReferencePlan, plan_reference
from posttrain.adapters.spec import ADAPTER_VARIANTS, GGPOSpec, GOATSpec, PLoRASpec, check_peft_variant

if typing.TYPE_CHECKING:
    from posttrain.methods import MethodInfo, MethodParams


MAX_NODES = 100_000  # YAML nodes of a recipe with every alias expanded (a recipe has a few hundred)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: ``3e-3`` and ``1e5`` are numbers, and only ``true``/``false`` are
    booleans (``save_strategy: no`` stays the string ``"no"``). A key given twice in one mapping is an error (the
    last would silently win); a ``<<`` merge may still be overridden by the mapping's own keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first on line {first[key].line + 1}); give each key "
                        "once", key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


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
    """Parse recipe YAML (see :class:`RecipeLoader`). Aliases are counted before anything is built: a document that
    expands to more than :data:`MAX_NODES` nodes (a "billion laughs" alias bomb) or refers to itself is an error."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes of ``root`` with every alias (and ``<<`` merge) expanded, without expanding anything."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the node that contains it", node.start_mark)
        active.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"the document expands to more than {MAX_NODES} nodes through its aliases (an alias "
                    "bomb?); a recipe needs a few hundred", node.start_mark)
        active.discard(key)
        sizes[key] = total
        return total

    size(root)


INT32_MAX = 2**31 - 1
MAX_DEPTH = 32  # nesting depth of a recipe (mappings and lists)


class _Strict(BaseModel):
    """Unknown keys are errors; no type coercion (``"yes"`` is not a boolean, ``true`` not a number, ``1.5`` not an
    integer); NaN and infinities are refused for every number."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True, allow_inf_nan=False)


class QuantizationSpec(_Strict):
    """Quantised loading for QLoRA through ``transformers.BitsAndBytesConfig`` (needs a CUDA GPU and the ``qlora``
    extra: ``pip install 'posttrain[qlora]'``)."""

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Default: the model's dtype."
    )
    bnb_4bit_use_double_quant: bool = False

    @model_validator(mode="after")
    def _one(self):
        if self.load_in_4bit == self.load_in_8bit:
            raise ValueError("set exactly one of load_in_4bit / load_in_8bit to true")
        return self


class ModelSpec(_Strict):
    """A model: a hub id, a local directory, or a built-in tiny model (``builtin:tiny-qwen2``; see ``posttrain
    init-model --list``), with the options it is loaded with (checked before anything loads)."""

    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on GPUs that support it."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model (only for models you trust; "
                                    "needed only by architectures transformers does not have).")
    revision: str | None = Field(None, description="Hub branch, tag or commit.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = (
        Field(None, description="transformers' attention kernel; default: transformers' choice (sdpa where it can).")
    )
    device_map: str | None = Field(None, description="transformers/accelerate device_map (e.g. auto) for one-process "
                                   "runs of models larger than one GPU; default: the Trainer places the model.")
    quantization: QuantizationSpec | None = Field(None, description="QLoRA: load the weights quantised (needs peft "
                                                  "type lora, a CUDA GPU and the qlora extra).")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) and value != "none" else value

    @model_validator(mode="after")
    def _check_builtin(self):
        if self.path.startswith("builtin:") and self.revision is not None:
            raise ValueError("revision: built-in models ship with posttrain and have no hub revisions; remove it")
        return self


class DataSource(_Strict):
    """A dataset: a local ``.json``/``.jsonl``/``.parquet`` file, a hub dataset name, or a built-in task
    (``builtin:arithmetic-sft``; see ``posttrain tasks``)."""

    source: str
    split: str = "train"
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns: {name in the file: name posttrain expects}."
    )
    max_samples: int | None = Field(None, ge=1, le=INT32_MAX)
    options: dict[str, Any] = Field(default_factory=dict, description="Built-in task options (size, seed, ...).")
    weight: float | None = Field(None, gt=0, description="In a mixture (a list of sources): the sampling weight; "
                                 "weighted mixtures are interleaved, unweighted ones concatenated.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self):
        if not self.source.strip():
            raise ValueError("source must not be empty")
        targets: dict[str, str] = {}
        for old, new in self.columns.items():
            if not new.strip():
                raise ValueError(f"columns.{old}: the new column name must not be empty")
            if new in targets:
                raise ValueError(f"columns: '{targets[new]}' and '{old}' are both renamed to '{new}'")
            targets[new] = old
        if self.source.startswith("builtin:"):
            from posttrain.data.task_options import check_task_options

            self.options = check_task_options(self.source.split(":", 1)[1], self.options)
        return self


# A data key: one source, or a mixture (a list of sources; posttrain.data.sources.load_source combines them).
Sources = DataSource | list[DataSource]


class DataSpec(_Strict):
    train: Sources | None = None
    eval: Sources | None = None
    test: Sources | None = Field(
        None,
        description="Prompt + answer rows scored by greedy accuracy before and after training (verifiable tasks).",
    )
    forget: Sources | None = None
    retain: Sources | None = None
    holdout: Sources | None = Field(
        None, description="Unlearning: rows never trained on (same kind as data.forget), the non-members of the "
        "membership-inference metrics (eval.suites: [unlearning], posttrain eval --suite unlearning); read by "
        "evaluation only. Built-in tasks derive it from the forget split.",
    )
    chat_template: str = Field(
        "auto",
        description="auto | none | path/to/template.jinja: whether plain-text prompts are wrapped as a user turn of "
        "the chat template (auto: when the tokenizer has one, except built-in models; a .jinja file replaces the "
        "tokenizer's template). Conversational rows always use the template (posttrain/data/formatting.py).",
    )
    system_prompt: str | None = Field(
        None, description="Put first as a system turn in every conversational (or wrapped) prompt that has none."
    )
    assistant_turns: Literal["all", "last"] = Field(
        "all",
        description="Which assistant turns of a conversational row carry the loss (SFT messages rows, conversational "
        "completions in every family): all, or the last one only. Tool results and user/system turns never do.",
    )

    @field_validator("train", "eval", "test", "forget", "retain", "holdout")
    @classmethod
    def _check_mixture(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("a mixture needs at least one source")
            weighted = [src.weight is not None for src in value]
            if any(weighted) and not all(weighted):
                raise ValueError("give every source of a mixture a weight, or none (concatenated)")
        elif value is not None and value.weight is not None:
            raise ValueError("weight is for the sources of a mixture (a list of sources)")
        return value

    @field_validator("chat_template")
    @classmethod
    def _check_chat(cls, value: str) -> str:
        if value not in ("auto", "none") and not value.endswith((".jinja", ".j2")):
            raise ValueError(f"expected auto, none or a .jinja template file, got {value!r}")
        expand_home(value, "data.chat_template")
        return value


class MethodSpec(BaseModel):
    """``name`` plus the method's hyperparameters as sibling keys."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# peft.init_lora_weights strings that need no extra peft config (peft's LoraConfig also takes eva / corda / loftq with
# their own config objects)
LORA_INITS = ("gaussian", "olora", "pissa", "orthogonal")


class PeftSpec(_Strict):
    """Adapter settings: ``peft`` LoRA, or a LoRA variant with its options in a sub-block named after it
    (:mod:`posttrain.adapters.spec`; docs/lora_variants.md)."""

    type: Literal[ADAPTER_VARIANTS.names()] = "lora"
    r: int = Field(8, ge=1, le=65536, description="Rank; at most the model's hidden size (checked when it loads).")
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

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, value):
        names = [value] if isinstance(value, str) else value
        if not names or any(not name.strip() for name in names):
            raise ValueError("name at least one module (e.g. all-linear, or [q_proj, v_proj]); an empty name matches "
                             "nothing")
        return value

    @field_validator("init_lora_weights")
    @classmethod
    def _check_init(cls, value):
        if isinstance(value, str) and value not in LORA_INITS and not re.fullmatch(r"pissa_niter_[1-9][0-9]*", value):
            raise ValueError(f"expected true, false or one of {', '.join(LORA_INITS)}, pissa_niter_N, got {value!r} "
                             "(peft's eva, corda and loftq need their own config blocks, which posttrain does not "
                             "pass)")
        return value

    @model_validator(mode="after")
    def _variant(self):
        return check_peft_variant(self)


class EvalSpec(_Strict):
    """Evaluation during training (docs/observability.md): every ``steps`` optimizer steps (and at step 0 and the
    last step) the model is scored on a bounded number of rows and the results are logged like any training metric
    (``metrics.jsonl`` and the trackers of ``training.report_to``), as ``eval_*`` names."""

    steps: int | None = Field(None, ge=1, le=INT32_MAX, description="Evaluate every N optimizer steps; null: no evaluation during "
                              "training (the before/after data.test accuracy lines are printed in any case).")
    max_samples: int = Field(32, ge=1, le=INT32_MAX, description="Rows per evaluation: the first N of data.test, and for unlearning "
                             "the first N of each scored set (forget, retain, holdout, world facts).")
    pass_k: list[int] | None = Field(None, description="Also pass@k on data.test for these k (sampled); default "
                                     "[1, 4] for RL methods, [] (off) otherwise.")
    num_samples: int | None = Field(None, ge=1, le=4096, description="pass@k: samples per prompt (default: the largest k).")
    temperature: float = Field(1.0, gt=0.0, description="pass@k: sampling temperature.")
    max_new_tokens: int | None = Field(None, ge=1, le=65536, description="Generation length of every data.test "
                                       "accuracy (the before/after lines, evaluation during training, pass@k; "
                                       "default 256 for chat prompts, else 4x the longest answer and at least 32; "
                                       "a warning when many completions reach it) and of the unlearning "
                                       "generations (default 48 for the TOFU ROUGE, 128 / 32 for the verbatim / "
                                       "knowledge memorisation of the unlearning suite).")
    unlearning: bool = Field(True, description="Unlearning methods: evaluate the forget/retain data (eval.suites).")
    suites: list[Literal["tofu", "unlearning"]] = Field(
        default_factory=lambda: ["tofu"], min_length=1,
        description="Unlearning methods, every eval.steps: tofu (forget/retain probability, ROUGE, truth ratio, "
        "model utility; forget_quality with retain_model) and/or unlearning (membership-inference AUCs, privleak, "
        "verbatim / knowledge memorisation, extraction strength; docs/unlearning.md).")
    retain_model: str | None = Field(None, description="Unlearning: a model trained without the forget set (hub id, "
                                     "local dir or builtin:); its truth ratios on the same forget rows give "
                                     "forget_quality.")
    batch_size: int = Field(32, ge=1, le=65536, description="Generation / scoring batch size.")


class Recipe(_Strict):
    model: ModelSpec
    ref_model: ModelSpec | Literal["none"] | None = Field(
        None, description="Frozen reference; default: a frozen copy of `model`. `none`: explicitly no reference."
    )
    data: DataSpec
    method: MethodSpec
    peft: PeftSpec | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    report: bool = Field(True, description="Write report.html (curves, recipe, summary) at the end of the run.")
    output_dir: str = "runs/run"
    seed: int = Field(42, ge=0, le=2**32 - 1, description="numpy's seed range.")

    @model_validator(mode="after")
    def _check(self):
        if not self.output_dir.strip() or "\0" in self.output_dir:
            raise UserError(f"output_dir: must be a directory path, got {self.output_dir!r}")
        self.output_dir = str(expand_home(self.output_dir, "output_dir"))
        return self

    # Filled after validation: the method's registry entry (looked up once, here) and its typed hyperparameters.
    _info: MethodInfo | None = None
    _params: MethodParams | None = None
    # The reference model of the run (posttrain.reference.ReferencePlan), decided once, when first asked (preflight);
    # the output folders of the stages before this one (a ref_model among them is an earlier stage's model)
    _reference: ReferencePlan | None = None
    _earlier_stages: tuple[str, ...] = ()
    # The directory of the recipe file (set by load_recipe): relative `file.py:function` paths are looked up there.
    _source_dir: Path | None = None
    # data.chat_template / data.system_prompt resolved against the tokenizer (posttrain.data.formatting.ChatFormat)
    _chat_format: Any = None
    # data keys given as mixtures -> the resolved mixture (rows per source), written to recipe.yaml
    _mixtures: dict[str, str] = PrivateAttr(default_factory=dict)
    # relative paths found next to the recipe file (attach_source_dir), logged by preflight
    _path_notes: list[str] = PrivateAttr(default_factory=list)
    # warnings found before training (a squeezed schedule, ...), repeated in the run summary
    _warnings: list[str] = PrivateAttr(default_factory=list)
    # (info, config, datasets) of a preflight done ahead of the run (every stage of a multi-stage recipe is checked
    # before the first one trains)
    _preflight: Any = None

    @property
    def info(self) -> MethodInfo:
        """The method's registry entry (:data:`posttrain.methods.METHODS`), looked up once by :func:`parse_recipe`."""
        assert self._info is not None
        return self._info

    @property
    def params(self) -> MethodParams:
        assert self._params is not None
        return self._params

    @property
    def reference(self) -> ReferencePlan:
        """Where the run's frozen reference comes from (:func:`posttrain.reference.plan_reference`; decided on first
        use, which refuses a ``ref_model`` the method cannot use)."""
        if self._reference is None:
            self._reference = plan_reference(self, self.info, self._earlier_stages)
        return self._reference

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults filled in) as plain data, for ``recipe.yaml``; it loads again as the same
        recipe (``posttrain train RUN_DIR/recipe.yaml`` reproduces the run)."""
        out = self.model_dump(mode="json")
        out["method"] = {"name": self.method.name, **self._resolved_params()}
        return out

    def _resolved_params(self) -> dict[str, Any]:
        """Every hyperparameter with its default filled in, except defaults that the method refuses when they are
        given (options of a part the recipe does not use, e.g. ``delta_l_alpha`` without ``aggregation: delta_l``)."""
        cls = type(self.params)
        full = self.params.model_dump(mode="json")
        given = dict(self.method.params)
        keep = set(given)
        for key, value in full.items():
            if key in keep:
                continue
            try:
                cls.model_validate({**given, key: value})
            except (UserError, ValidationError):
                continue
            keep.add(key)
        return {key: value for key, value in full.items() if key in keep}


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
    except RecursionError:
        raise UserError(f"--set {key}: value nested more than {MAX_DEPTH} levels deep") from None
    check_structure(value, f"--set {key}")
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
    errors = exc.errors()
    err = errors[0]
    if err["type"] == "model_type" and isinstance(err.get("input"), list):  # a mixture: the error inside the list
        err = next((e for e in errors if any(isinstance(p, str) and p.startswith("list[") for p in e["loc"])), err)
    loc = tuple(
        p for p in err["loc"]
        if not (isinstance(p, str) and (p.startswith(("function-", "literal[", "list[")) or p[:1].isupper()))
    )
    key = ""
    for part in (prefix.split(".") if prefix else []) + list(loc):
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _fields_at(root, loc[:-1]))
        return UserError(f"{key}: unknown key{hint}")
    if err["type"] == "missing":
        return UserError(f"{key}: required key is missing")
    if err["type"] == "value_error" and err.get("ctx", {}).get("error") is not None:
        return UserError(f"{key}: {err['ctx']['error']}")
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return UserError(f"{key}: {err['msg']}{got_text}")


def check_structure(data: Any, where: str = "recipe", limit: int = MAX_DEPTH) -> None:
    """Refuse mappings/lists nested deeper than ``limit`` (no recipe key needs more than a few levels) and subnormal
    numbers (below 2.2e-308 in magnitude: no setting takes them, and arithmetic on them loses precision or
    overflows, e.g. ``beta: 1e-320``)."""
    stack = [(data, 0, where)]
    while stack:
        node, depth, key = stack.pop()
        if depth > limit:
            raise UserError(f"{key}: nested more than {limit} levels deep")
        if isinstance(node, float) and node != 0.0 and abs(node) < sys.float_info.min:
            raise UserError(f"{key}: {node!r} is a subnormal number (smaller than {sys.float_info.min:.3g} in "
                            "magnitude); use 0 or a normal number")
        if isinstance(node, dict):
            odd = next((k for k in node if not isinstance(k, str)), "")
            if odd != "":
                raise UserError(f"{key}: key {odd!r} is not a name (YAML reads unquoted numbers, true/false and null "
                                "as such; every recipe key is text)")
            stack.extend((v, depth + 1, f"{key}.{k}" if key != "recipe" else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, depth + 1, f"{key}[{i}]") for i, v in enumerate(node))


_DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def attach_source_dir(recipe: Recipe, recipe_file: Path) -> Recipe:
    """Tie a parsed recipe to the folder of its file: relative data files and model folders are looked up there
    first, then in the working directory (a hit next to the recipe replaces the value by its absolute path, logged by
    :func:`posttrain.run.preflight.preflight`); a data file found in neither is an error naming both places.
    ``output_dir`` stays relative to the working directory (preflight refuses the recipe's own folder)."""
    source_dir = recipe_file.resolve().parent
    recipe._source_dir = source_dir
    cwd = Path.cwd()

    def locate(text: str, key: str, data_file: bool) -> str:
        if text.startswith(("builtin:", STAGE_REF, "~")) or Path(text).is_absolute():
            return text
        beside, here = source_dir / text, cwd / text
        if beside.exists():
            if not here.exists() or beside.resolve() != here.resolve():
                recipe._path_notes.append(f"{key}: '{text}' is the one next to the recipe: {beside.resolve()}")
                return str(beside.resolve())
            return text
        if data_file and text.endswith(_DATA_FILE_SUFFIXES) and not here.exists():
            raise UserError(f"{key}: file '{text}' not found (looked next to the recipe in {source_dir} and in the "
                            f"working directory {cwd})")
        return text

    for name in ("train", "eval", "test", "forget", "retain"):
        value = getattr(recipe.data, name)
        sources = value if isinstance(value, list) else [value] if value is not None else []
        for i, src in enumerate(sources):
            where = f"data.{name}[{i}]" if isinstance(value, list) else f"data.{name}"
            src.source = locate(src.source, f"{where}.source", data_file=True)
    recipe.model.path = locate(recipe.model.path, "model.path", data_file=False)
    if isinstance(recipe.ref_model, ModelSpec):
        recipe.ref_model.path = locate(recipe.ref_model.path, "ref_model.path", data_file=False)
    return recipe


def _check_family_data(recipe: Recipe, family: Family, method: str) -> None:
    """The data keys the family reads (the others are refused, not silently ignored)."""
    used = family.data_keys
    for key in ("train", "eval", "test", "forget", "retain", "holdout"):
        if getattr(recipe.data, key) is not None and key not in used:
            reads = " and ".join(f"data.{k}" for k in used)
            raise UserError(f"data.{key}: method '{method}' ({family.name} family) reads {reads}, not data.{key}")


def parse_recipe(data: dict[str, Any], earlier_stages: tuple[str, ...] = ()) -> Recipe:
    """Validate recipe data (already loaded and overridden): the schema, the method's hyperparameters, the data keys
    its family reads (``earlier_stages``: the output folders of the stages before this one, for
    :attr:`Recipe.reference`) and the ``training:`` block against its TRL config class
    (:mod:`posttrain.recipe.training_args`)."""
    if not isinstance(data, dict):
        raise UserError("recipe: expected a mapping of top-level keys (model, data, method, training, ...)")
    check_structure(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_user_error(exc, Recipe) from None
    # imports torch (the GRPO parts): after the recipe's own keys are checked
    from posttrain.methods import get_method, methods_with_key

    info = recipe._info = get_method(recipe.method.name)
    try:
        recipe._params = info.params.model_validate(recipe.method.params)
    except ValidationError as exc:
        err = exc.errors()[0]
        owners = methods_with_key(str(err["loc"][-1])) if err["type"] == "extra_forbidden" and err["loc"] else []
        if owners:  # another method's key: say whose
            raise UserError(f"method.{err['loc'][-1]}: not a key of method '{info.name}'; only used by method "
                            f"{' or '.join(owners)}") from None
        raise validation_error_to_user_error(exc, info.params, prefix="method") from None
    family = FAMILIES[info.family]
    _check_family_data(recipe, family, info.name)
    recipe._earlier_stages = earlier_stages
    from posttrain.recipe.training_args import check_training

    recipe.training = check_training(recipe.training, info.family)
    _resolve_eval(recipe, family)
    return recipe


def _resolve_eval(recipe: Recipe, family: Family) -> None:
    """Check the ``eval`` block against the data and the family, and fill in the family's defaults."""
    ev, data = recipe.eval, recipe.data
    explicit_pass_k = ev.pass_k is not None
    if not explicit_pass_k:  # the family's default, when there is a data.test to measure it on
        ev.pass_k = list(family.pass_k) if data.test is not None else []
    ev.pass_k = sorted(set(ev.pass_k))
    if any(k < 1 for k in ev.pass_k):
        raise UserError(f"eval.pass_k: every k must be >= 1, got {ev.pass_k}")
    samples = ev.num_samples or max(ev.pass_k, default=1)
    if ev.pass_k and ev.pass_k[-1] > samples:
        raise UserError(f"eval.pass_k: k={ev.pass_k[-1]} is larger than eval.num_samples={samples}")
    if explicit_pass_k and ev.pass_k and data.test is None:
        raise UserError("eval.pass_k: pass@k is measured on data.test, which is not set")
    unlearning = family.evaluates_forgetting and ev.unlearning
    if ev.retain_model is not None and not family.evaluates_forgetting:
        raise UserError("eval.retain_model: only unlearning methods use a retain model (for forget_quality)")
    if ev.retain_model is not None and (ev.steps is None or not ev.unlearning):
        raise UserError("eval.retain_model: used by the unlearning evaluation during training; set eval.steps "
                        "(and keep eval.unlearning: true)")
    if ev.steps is not None and data.test is None and not unlearning:
        hint = " or eval.unlearning: true" if family.evaluates_forgetting else ""
        raise UserError(
            f"eval.steps: nothing to evaluate during training; set data.test (prompt + answer rows){hint}"
        )


def read_recipe_file(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(path, data)`` of a recipe file: UTF-8 YAML (:func:`load_yaml`) holding a mapping, nested at most
    :data:`MAX_DEPTH` levels."""
    path = expand_home(path, "recipe")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = load_yaml(read_text(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise UserError(f"{path}: nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of top-level keys (model, data, method, training, ...)")
    check_structure(data)
    return path, copy.deepcopy(data)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML file, apply ``--set`` overrides and validate it (a multi-stage recipe: every stage is
    validated, and its last stage is returned)."""
    return load_recipe_stages(path, overrides)[-1][1]


def load_recipe_stages(path: str | Path, overrides: list[str] | None = None) -> list[tuple[str | None, Recipe]]:
    """The recipe file at ``path``, read and validated once: ``[(stage name, Recipe)]`` for a multi-stage recipe
    (``stages:``; every stage validated, an error names the stage), ``[(None, Recipe)]`` for a plain one."""
    path, data = read_recipe_file(path)
    if "stages" in data:
        return load_stage_recipes(path, data, overrides)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return [(None, attach_source_dir(parse_recipe(data), path))]


def load_stage_recipes(path: Path, data: dict[str, Any], overrides: list[str] | None = None) -> list[tuple[str, Recipe]]:
    """``[(name, Recipe)]`` of a multi-stage recipe file, every stage validated (an error names the stage)."""
    out = []
    for name, stage in split_stages(data, overrides):
        try:
            earlier = tuple(recipe.output_dir for _, recipe in out)
            out.append((name, attach_source_dir(parse_recipe(stage, earlier), path)))
        except UserError as exc:
            raise UserError(f"stage '{name}': {exc}") from None
    return out


# Multi-stage recipes (posttrain.run.stages runs them): the stage splitting is pure recipe manipulation, kept here so
# that loading a recipe does not import the runner.
STAGE_REF = "stage:"
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def merge(base: Any, update: Any) -> Any:
    """``update`` deep-merged onto ``base`` (mappings merge key by key; anything else replaces)."""
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for key, value in update.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(update)


def _resolve_refs(data: dict[str, Any], done: dict[str, str], where: str) -> None:
    for key in ("model", "ref_model"):
        value = data.get(key)
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str) or not path.startswith(STAGE_REF):
            continue
        name = path[len(STAGE_REF):]
        if name not in done:
            raise UserError(f"{where}.{key}: '{path}' is not an earlier stage (earlier: {', '.join(done) or 'none'})")
        if isinstance(value, dict):
            data[key] = {**value, "path": done[name]}
        else:
            data[key] = done[name]


def split_stages(data: dict[str, Any], overrides: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, recipe data)]`` of a multi-stage recipe (raw data, before validation)."""
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError("stages: expected a non-empty list of stages, each a mapping with a name")
    base = {k: v for k, v in data.items() if k != "stages"}
    out: list[tuple[str, dict[str, Any]]] = []
    done: dict[str, str] = {}
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            raise UserError(f"{where}.name: every stage is a mapping with a name")
        name = stage["name"]
        if not _STAGE_NAME.match(name):
            raise UserError(f"{where}.name: '{name}' must be letters, digits, '_', '-' or '.' (it names a folder)")
        if name in done:
            raise UserError(f"{where}.name: stage '{name}' appears twice")
        merged = merge(base, {k: v for k, v in stage.items() if k != "name"})
        for assignment in overrides or []:
            apply_override(merged, assignment)
        root = merged.get("output_dir", "runs/recipe")
        if not isinstance(root, str):
            raise UserError("output_dir: expected a folder path")
        merged["output_dir"] = str(expand_home(root, "output_dir") / name)
        _resolve_refs(merged, done, where)
        done[name] = merged["output_dir"]
        out.append((name, merged))
    return out
