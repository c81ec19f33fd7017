"""Data mixtures (issue 12): a data key may be a list of sources, each with its own columns/split/max_samples and
an optional weight; concatenated without weights, interleaved with them; the resolved mixture is logged and written
to recipe.yaml."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from posttrain.errors import UserError
from posttrain.recipe import DataSource, parse_recipe
from posttrain.data.sources import load_source


def _file(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unweighted_sources_are_concatenated_with_their_own_columns_and_caps(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="posttrain")
    other = _file(tmp_path, "q.jsonl", [{"question": f"{i}+1=", "completion": str(i + 1), "extra": 1} for i in range(5)])
    sources = [DataSource(source="builtin:arithmetic-sft", max_samples=7),
               DataSource(source=other, columns={"question": "prompt"}, max_samples=3)]
    ds = load_source(sources, "data.train", "sft")
    assert len(ds) == 10 and ds.column_names == ["prompt", "completion"]
    assert ds[7] == {"prompt": "0+1=", "completion": "1"}  # in order: every row of each source once
    assert "concatenated" in ds.posttrain_mixture and "7 rows" in ds.posttrain_mixture and "3 rows" in ds.posttrain_mixture
    assert any("mixture of 2 sources" in r.getMessage() for r in caplog.records)


def test_weighted_sources_are_interleaved_by_weight(tmp_path):
    a = _file(tmp_path, "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(400)])
    b = _file(tmp_path, "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(400)])
    ds = load_source([DataSource(source=a, weight=3.0), DataSource(source=b, weight=1.0)], "data.train", "sft", seed=1)
    share_a = sum(p.startswith("a") for p in ds["prompt"]) / len(ds)
    assert 0.68 < share_a < 0.82  # 3:1 -> 0.75 (first_exhausted: stops when a runs out)
    assert "interleaved with probabilities 0.75, 0.25" in ds.posttrain_mixture


def test_mixture_errors_name_the_source():
    base = {"model": "builtin:tiny-qwen2", "method": {"name": "sft"}}
    with pytest.raises(UserError, match=r"data.train: give every source of a mixture a weight"):
        parse_recipe({**base, "data": {"train": [{"source": "builtin:arithmetic-sft", "weight": 1.0},
                                                 "builtin:arithmetic-sft"]}})
    with pytest.raises(UserError, match=r"data.train: weight is for the sources of a mixture"):
        parse_recipe({**base, "data": {"train": {"source": "builtin:arithmetic-sft", "weight": 1.0}}})
    with pytest.raises(UserError, match=r"^data.train\[1\].max_samples: Input should be greater than or equal to 1"):
        parse_recipe({**base, "data": {"train": ["builtin:arithmetic-sft", {"source": "x.jsonl", "max_samples": 0}]}})
    with pytest.raises(UserError, match=r"data.train\[1\].source: file 'missing.jsonl' not found"):
        load_source([DataSource(source="builtin:arithmetic-sft"), DataSource(source="missing.jsonl")],
                    "data.train", "sft")


def test_mixture_is_written_to_recipe_yaml(tmp_path):
    from posttrain.train import run

    recipe = parse_recipe({
        "model": "builtin:tiny-qwen2",
        "data": {"train": [{"source": "builtin:arithmetic-sft", "max_samples": 6},
                           {"source": "builtin:arithmetic-sft", "split": "test", "max_samples": 4}]},
        "method": {"name": "sft"},
        "training": {"max_steps": 1, "save_strategy": "no", "disable_tqdm": True},
        "report": False, "output_dir": str(tmp_path / "run"),
    })
    run(recipe, quiet=True)
    text = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "# data.train: mixture of 2 sources, concatenated: builtin:arithmetic-sft (train): 6 rows; " \
           "builtin:arithmetic-sft (test): 4 rows; 10 rows in all" in text
    again = parse_recipe(yaml.safe_load(text))  # the written recipe loads again as the same mixture
    assert [s.max_samples for s in again.data.train] == [6, 4]
