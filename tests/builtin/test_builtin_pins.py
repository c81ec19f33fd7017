"""The built-in models, tokenizer and tasks are pinned bytes: a change to any of them fails here, never silently.

Every number in docs/ and every learning check rests on these, so they must be the same on every machine. The models
ship as files (posttrain/builtin/assets, float16, SHA-256 in manifest.json) rather than being built on first use,
because training gives different weights on different CPUs. If you rebuild them on purpose
(``python -m posttrain.run.build_builtins --write``), update the pins below and regenerate the docs/ tables.
"""

import hashlib
import json
import shutil

import pytest
import torch

from posttrain.builtin import ASSETS, BUILTIN_MODELS, builtin_model_dir, manifest, materialise

# SHA-256 of the shipped files (first 16 hex digits).
MODEL_FILES = {
    "tiny-qwen2": "5ab68cc1a10837f0",
    "tiny-llama": "e4900e18d2ed3ce5",
    "tiny-qwen2-arith": "2590004d393b5523",
    "tiny-qwen2-facts": "93d5922b9147baf8",
    "tiny-qwen2-facts-retain99": "eca004637b446d1c",
    "tiny-qwen2-facts-retain95": "4efb042153c8f892",
    "tiny-qwen2-facts-retain90": "b9e636711916bf5c",
    "tiny-qwen2-news": "3ab59968f39ed982",
    "tiny-qwen2-news-retain": "6e4ccf31820e9464",
}
TOKENIZER_FILES = {
    "tokenizer.json": "152a87a23331ec7f",
    "tokenizer_config.json": "16f84e64c42b7813",
    "chat_template.jinja": "5e182b6348ac64fa",
}
# SHA-256 of the materialised float32 state dict (names and bytes, sorted), i.e. what training starts from.
STATE_DICTS = {
    "tiny-qwen2": "d20b93880a1b27cc",
    "tiny-qwen2-arith": "48919731aaad34ed",
    "tiny-qwen2-facts": "50300dc1d55e2aee",
}
# Built-in tasks with default options: (rows, SHA-256 of the rows as sorted-key JSON).
ARITHMETIC = {
    ("sft", "train"): (761, "c2df8c763db2a8ab"),
    ("sft", "test"): (200, "a85a146a00fcefe5"),
    ("rl", "train"): (761, "345a370ec9fc6746"),
    ("rl", "test"): (200, "b75ad3ed4cb8675a"),
    ("preference", "train"): (761, "2424e99a19394d5c"),
    ("preference", "test"): (200, "2139ad225965229e"),
}
FACTS = {
    "full": (400, "3c389402eb66533a"),
    "forget01": (4, "284185c14ebb70c1"),
    "forget05": (20, "07cf135d8f26cf42"),
    "forget10": (40, "7c03ab4271a2f531"),
    "retain99": (396, "339a08de42fc3cf8"),
    "retain95": (380, "49dee98c7b81a843"),
    "retain90": (360, "03491c4d36b45126"),
    "holdout01": (4, "c93c7e0d17b98136"),
    "holdout05": (20, "bd6b170287a309b4"),
    "holdout10": (40, "a37b42402fe93ec5"),
    "world": (24, "7412512d52ed4990"),
    "full_world": (424, "ccd71181e70cb6d3"),
}

NEWS = {
    "full": (500, "5c676232394062aa"),
    "forget": (50, "831cc22cd6df9f23"),
    "retain": (450, "ad136b9caad947a5"),
    "holdout": (50, "af2a140f224bd0af"),
    "forget_text": (10, "4b8ceb5d4d89c80b"),
    "retain_text": (90, "05c593a2ad2698a6"),
    "holdout_text": (10, "edf28b3df5bf7ca2"),
    "forget_qa": (40, "ed82fa23ac0979a3"),
    "retain_qa": (360, "502b69cbdff80477"),
    "holdout_qa": (40, "eee9516106fab559"),
    "forget_verbmem": (10, "238745fba8301782"),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _rows_hash(rows) -> str:
    return _sha(json.dumps(rows, sort_keys=True).encode())


def _state_dict_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def test_every_builtin_model_and_the_tokenizer_is_pinned():
    shipped = manifest()
    assert set(shipped["models"]) == set(BUILTIN_MODELS) == set(MODEL_FILES)
    for name, pin in MODEL_FILES.items():
        entry = shipped["models"][name]
        assert entry["sha256"][:16] == pin, name
        assert _sha((ASSETS / entry["file"]).read_bytes()) == pin, name
    for name, pin in TOKENIZER_FILES.items():
        assert shipped["tokenizer"][name][:16] == pin, name
        assert _sha((ASSETS / "tokenizer" / name).read_bytes()) == pin, name


@pytest.mark.parametrize("name", sorted(STATE_DICTS))
def test_materialised_weights_are_the_pinned_float32_weights(name):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir(name))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _state_dict_hash(model) == STATE_DICTS[name]


def test_builtin_tokenizer_encodes_as_pinned():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_model_dir("tiny-qwen2"))
    assert len(tok) == 1024 and tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    assert tok("12+7=19")["input_ids"] == [tok.convert_tokens_to_ids(c) for c in "12+7=19"]  # one token per char
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2="}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"


def test_builtin_tasks_are_pinned():
    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.data.facts import facts_rows

    for (fmt, split), (n, pin) in ARITHMETIC.items():
        rows = arithmetic_rows(fmt, split=split)
        assert (len(rows), _rows_hash(rows)) == (n, pin), (fmt, split)
    for split, (n, pin) in FACTS.items():
        rows = facts_rows(split)
        assert (len(rows), _rows_hash(rows)) == (n, pin), split
    from posttrain.data.news import news_rows

    for split, (n, pin) in NEWS.items():
        rows = news_rows(split)
        assert (len(rows), _rows_hash(rows)) == (n, pin), split


def test_a_damaged_asset_is_refused(tmp_path):
    """The SHA-256 in the manifest is checked whenever a model is materialised."""
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS, assets)
    manifest.cache_clear()
    try:
        materialise("tiny-qwen2", (tmp_path / "ok").mkdir() or tmp_path / "ok", assets)
        data = bytearray((assets / "tiny-qwen2.safetensors").read_bytes())
        data[-1] ^= 1
        (assets / "tiny-qwen2.safetensors").write_bytes(bytes(data))
        manifest.cache_clear()
        with pytest.raises(RuntimeError, match="damaged or was edited"):
            materialise("tiny-qwen2", (tmp_path / "bad").mkdir() or tmp_path / "bad", assets)
    finally:
        manifest.cache_clear()
