"""Options of the built-in tasks (``data.<key>.options`` of a ``builtin:<task>`` source), validated with the recipe.

Each task's options are a pydantic model with the real domain of every number, so that a recipe asking for, say,
``max_operand: 1e9`` (a list of 10^18 problems) is one error line at load time instead of a process killed later.
Kept free of heavy imports (parsing a recipe stays cheap).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.errors import did_you_mean


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ArithmeticOptions(_Options):
    """``builtin:arithmetic-sft`` / ``-rl`` / ``-pref`` (:func:`posttrain.data.arithmetic.arithmetic_rows`)."""

    num_samples: int | None = Field(None, ge=1, le=10_000_000)
    max_operand: int = Field(30, ge=1, le=1000, description="Operands 0..max_operand: (n+1)^2 problems per op.")
    ops: str = Field("+", min_length=1)
    test_size: int = Field(200, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _check(self):
        if set(self.ops) - set("+-"):
            raise ValueError(f"ops must be a non-empty subset of '+-', got {self.ops!r}")
        problems = len(set(self.ops)) * (self.max_operand + 1) ** 2
        if self.test_size >= problems:
            raise ValueError(f"test_size={self.test_size} leaves no training problems (max_operand={self.max_operand}"
                             f" gives {problems})")
        return self


class ArithmeticChatOptions(ArithmeticOptions):
    """``builtin:arithmetic-chat`` (:func:`posttrain.data.arithmetic.arithmetic_chat_rows`)."""

    turns: int = Field(2, ge=1, le=16, description="Exchanges (user problem, assistant answer) per conversation.")


class ArithmeticToolOptions(ArithmeticOptions):
    """``builtin:arithmetic-tool-rl`` / ``-sft`` (:func:`posttrain.data.arithmetic.arithmetic_tool_rows`)."""

    tool_fraction: float = Field(0.5, ge=0.0, le=1.0, description="sft: share of the rows that call the tool.")
    tool: Literal["calculate", "calculator"] = "calculate"


class FactsOptions(_Options):
    """``builtin:facts`` (:func:`posttrain.data.facts.facts_rows`)."""

    num_people: int = Field(100, ge=2, le=100_000)
    questions_per_person: int = Field(4, ge=1, le=6)
    num_perturbed: int = Field(3, ge=1, le=5)
    seed: int = Field(0, ge=0, le=2**32 - 1)


class NewsOptions(_Options):
    """``builtin:news`` (:func:`posttrain.data.news.news_rows`)."""

    num_articles: int = Field(100, ge=2, le=149)
    num_forget: int = Field(10, ge=1, le=148)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _check(self):
        if self.num_forget >= self.num_articles or self.num_articles + self.num_forget > 150:
            raise ValueError(f"num_forget must be below num_articles, and num_articles + num_forget at most 150 "
                             f"(one venue per article), got {self.num_forget} and {self.num_articles}")
        return self


TASK_OPTIONS: dict[str, type[_Options]] = {
    "arithmetic-sft": ArithmeticOptions,
    "arithmetic-rl": ArithmeticOptions,
    "arithmetic-pref": ArithmeticOptions,
    "arithmetic-chat": ArithmeticChatOptions,
    "arithmetic-tool-rl": ArithmeticToolOptions,
    "arithmetic-tool-sft": ArithmeticToolOptions,
    "facts": FactsOptions,
    "news": NewsOptions,
}


def check_task_options(task: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate ``options`` of built-in ``task``; return them as given (defaults are the task's own). Raises
    ``ValueError`` (reported by the recipe schema under ``data.<key>``)."""
    model = TASK_OPTIONS.get(task)
    if model is None:  # an unknown task is reported (with a suggestion) when the data loads
        return options
    try:
        model.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ValueError(f"options.{loc}: unknown option for builtin:{task}"
                             f"{did_you_mean(str(err['loc'][-1]), model.model_fields)}; options: "
                             f"{sorted(model.model_fields)}") from None
        got = err.get("input")
        where = f"options.{loc}" if loc else "options"
        raise ValueError(f"{where}: {err['msg']} (got {got!r})") from None
    return options


__all__ = ["TASK_OPTIONS", "ArithmeticChatOptions", "ArithmeticOptions", "ArithmeticToolOptions", "FactsOptions",
           "NewsOptions", "check_task_options"]
