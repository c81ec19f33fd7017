"""``python -m posttrain.recipe_reference > docs/recipe_reference.md``: kept for that command; the generator is
:mod:`posttrain.recipe.reference_page`."""

from posttrain.recipe.reference_page import generate  # noqa: F401

if __name__ == "__main__":
    print(generate(), end="")
