"""Loading models and tokenizers: hub ids, local directories, and built-in tiny models that need no download.

Built-in models (``builtin:<name>``) are built offline on first use and cached under ``$POSTTRAIN_CACHE``
(default ``~/.cache/posttrain``):

- ``builtin:tiny-qwen2`` / ``builtin:tiny-llama``: random-init Qwen2 / Llama architectures (~1M parameters) with a
  byte-level BPE tokenizer trained with ``tokenizers`` on the built-in task corpora (digits split individually).
- ``builtin:tiny-qwen2-arith``: ``tiny-qwen2`` briefly fine-tuned on the built-in arithmetic task, a starting point
  for preference and RL recipes that need a model which is sometimes right.
- ``builtin:tiny-qwen2-facts``: ``tiny-qwen2`` fine-tuned (SFT) until it has memorised the built-in fictitious-facts
  task (``builtin:facts``, split ``full_world``): the starting point (and reference) of the unlearning recipes.
- ``builtin:tiny-qwen2-facts-retain99`` / ``-retain95`` / ``-retain90``: the same fine-tuning on ``retainNN`` +
  ``world`` only, i.e. TOFU's retain model (never saw the forget set), for the forget-quality KS test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_VOCAB_SIZE = 1024

TINY_ARCH: dict[str, dict[str, Any]] = {
    "tiny-qwen2": dict(
        model_type="qwen2",
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}
# Built-in models derived by a short training run: name -> (base, builder).
TRAINED_BUILTINS = {"tiny-qwen2-arith": "tiny-qwen2"}
# Fictitious-facts models (unlearning): name -> the facts splits it is fine-tuned on.
FACTS_BUILTINS = {
    "tiny-qwen2-facts": ("full_world",),
    "tiny-qwen2-facts-retain99": ("retain99", "world"),
    "tiny-qwen2-facts-retain95": ("retain95", "world"),
    "tiny-qwen2-facts-retain90": ("retain90", "world"),
}
TRAINED_BUILTINS.update({name: "tiny-qwen2" for name in FACTS_BUILTINS})
FACTS_BUILD_VERSION = 1  # bump when _build_facts_model changes
BUILTIN_MODELS = sorted([*TINY_ARCH, *TRAINED_BUILTINS])
ARITH_BUILD_VERSION = 1  # bump when _build_arith_model changes, so cached copies are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def _tokenizer_corpus() -> list[str]:
    from posttrain.data import arithmetic

    texts = arithmetic.corpus()
    try:  # the fictitious-facts task, when present, contributes its words
        from posttrain.data import facts

        texts += list(facts.corpus())
    except ImportError:
        pass
    texts += [
        "Question: What is the answer? Answer: The answer is 42. <answer>42</answer>",
        "You are a helpful assistant. Solve the problem and give the final answer.",
    ]
    return texts


def _atomic_build(target: Path, build) -> Path:
    """Build into a temporary sibling directory and rename it into place (safe under concurrent processes)."""
    if (target / "DONE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race, or a stale incomplete dir is there
            if not (target / "DONE").exists():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tokenizer(out_dir: str | Path):
    """Train the built-in byte-level BPE tokenizer on the task corpora and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def builtin_tokenizer_dir() -> Path:
    digest = hashlib.sha256("\n".join(_tokenizer_corpus()).encode()).hexdigest()[:12]
    return _atomic_build(cache_dir() / f"tokenizer-{digest}", build_tokenizer)


def build_tiny_model(name: str, out_dir: str | Path, seed: int = 0) -> None:
    """Write a random-init built-in tiny model (config, weights, tokenizer) to ``out_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir()))
    arch = dict(TINY_ARCH[name])
    config = AutoConfig.for_model(
        arch.pop("model_type"),
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **arch,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def _train_builtin(out_dir: Path, train: dict[str, Any], *, max_steps: int, batch_size: int) -> None:
    """``tiny-qwen2`` + plain SFT on ``train`` (a data source), saved to ``out_dir``.

    Trained on one CPU thread: float reductions then run in the same order whatever OMP_NUM_THREADS or the core count,
    so machines with the same torch build and CPU kind get the same weights (checked: a build in a 2-thread process is
    bit-identical to one made with OMP_NUM_THREADS=1), and test thresholds and the numbers in docs/ hold on a fresh
    build.
    """
    import torch

    from posttrain.recipe import parse_recipe
    from posttrain.train import run

    with tempfile.TemporaryDirectory() as run_dir:
        recipe = parse_recipe(
            {
                "model": "builtin:tiny-qwen2",
                "data": {"train": train},
                "method": {"name": "sft"},
                "training": {
                    "max_steps": max_steps,
                    "per_device_train_batch_size": batch_size,
                    "learning_rate": 3e-3,
                    "lr_scheduler_type": "cosine",
                    "warmup_steps": 20,
                    "logging_steps": 50,
                    "save_strategy": "no",
                    "disable_tqdm": True,
                },
                "output_dir": str(Path(run_dir) / "run"),
                "seed": 0,
            }
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run(recipe, quiet=True)
        finally:
            torch.set_num_threads(threads)
        for item in (Path(run_dir) / "run").iterdir():
            if item.is_file() and item.name not in {"metrics.jsonl", "recipe.yaml", "summary.json", "POSTTRAIN_COMPLETE"}:
                shutil.copy2(item, out_dir / item.name)


def _build_arith_model(out_dir: Path) -> None:
    """tiny-qwen2 fine-tuned with plain SFT on the arithmetic task (the quickstart recipe, shortened)."""
    _train_builtin(out_dir, {"source": "builtin:arithmetic-sft", "options": {"num_samples": 40000}}, max_steps=800,
                   batch_size=64)


def _build_facts_model(out_dir: Path, splits: tuple[str, ...]) -> None:
    """tiny-qwen2 fine-tuned with plain SFT on facts ``splits`` until memorised (~35 epochs; ~1.5 min on one CPU
    core). The same recipe builds the full model and the retain models, as TOFU does."""
    from posttrain.data.facts import facts_rows

    rows = [r for split in splits for r in facts_rows(split)]
    with tempfile.TemporaryDirectory() as data_dir:
        data = Path(data_dir) / "facts_train.jsonl"
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                                for r in rows))
        _train_builtin(out_dir, {"source": str(data)}, max_steps=500, batch_size=32)


def builtin_model_dir(name: str) -> Path:
    """The local directory of a built-in model, building it on first use."""
    if name in TINY_ARCH:
        tok_dir = builtin_tokenizer_dir()
        return _atomic_build(cache_dir() / f"{name}-{tok_dir.name}", lambda d: build_tiny_model(name, d))
    if name in FACTS_BUILTINS:
        base = builtin_model_dir(TRAINED_BUILTINS[name])
        return _atomic_build(
            cache_dir() / f"{name}-v{FACTS_BUILD_VERSION}-{base.name}",
            lambda d: _build_facts_model(d, FACTS_BUILTINS[name]),
        )
    if name in TRAINED_BUILTINS:
        base = builtin_model_dir(TRAINED_BUILTINS[name])
        return _atomic_build(cache_dir() / f"{name}-v{ARITH_BUILD_VERSION}-{base.name}", _build_arith_model)
    from posttrain.errors import did_you_mean

    raise UserError(f"model.path: unknown built-in model 'builtin:{name}'{did_you_mean(name, BUILTIN_MODELS)}")


def resolve_model_path(path: str, key: str = "model.path") -> str:
    """Map ``builtin:<name>`` to its cached directory; leave hub ids and local paths as they are."""
    if path.startswith("builtin:"):
        return str(builtin_model_dir(path.split(":", 1)[1]))
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists() and not (local / "adapter_config.json").exists():
            raise UserError(f"{key}: '{path}' is a local path without config.json or adapter_config.json")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"{key}: local model directory '{path}' not found")
    return path  # a hub id


def torch_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: str | None = None, key="model.path"):
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as exc:
        raise UserError(f"{key}: cannot load a tokenizer from '{path}' ({_short(exc)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, *, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
               key: str = "model.path"):
    """Load a causal LM from a hub id, a local directory (full model or PEFT adapter), or a built-in name."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_path(path, key)
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision)
    try:
        if Path(resolved, "adapter_config.json").exists() and not Path(resolved, "config.json").exists():
            from peft import AutoPeftModelForCausalLM

            return AutoPeftModelForCausalLM.from_pretrained(resolved, **kwargs).merge_and_unload()
        return AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except OSError as exc:
        raise UserError(f"{key}: cannot load model '{path}' ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def describe_builtin_models() -> list[dict[str, str]]:
    rows = []
    for name in BUILTIN_MODELS:
        if name in TINY_ARCH:
            arch = TINY_ARCH[name]
            what = f"random-init {arch['model_type']} ({arch['num_hidden_layers']} layers, hidden {arch['hidden_size']})"
        else:
            what = f"{TRAINED_BUILTINS[name]} briefly fine-tuned (SFT) on builtin:arithmetic-sft"
            if name in FACTS_BUILTINS:
                what = f"{TRAINED_BUILTINS[name]} fine-tuned (SFT) on builtin:facts {' + '.join(FACTS_BUILTINS[name])}"
        rows.append({"name": f"builtin:{name}", "description": what})
    return rows


def model_summary(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return json.dumps({"parameters": total, "trainable": trainable})
