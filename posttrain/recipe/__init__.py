"""The recipe: one YAML file that describes a whole run (:mod:`posttrain.recipe.schema`), its ``training:`` block
checked against the family's TRL config (:mod:`posttrain.recipe.training_args`) and the generated reference page
(:mod:`posttrain.recipe.reference_page`). Importing it imports no torch (tests/test_architecture.py)."""

from posttrain.recipe.schema import (  # noqa: F401 (the package's interface)
    MAX_NODES,
    STAGE_REF,
    DataSource,
    DataSpec,
    EvalSpec,
    MethodSpec,
    ModelSpec,
    PeftSpec,
    QuantizationSpec,
    Recipe,
    apply_override,
    attach_source_dir,
    check_structure,
    load_recipe,
    load_recipe_stages,
    load_stage_recipes,
    load_yaml,
    merge,
    parse_recipe,
    read_recipe_file,
    read_text,
    split_stages,
    validation_error_to_user_error,
)
