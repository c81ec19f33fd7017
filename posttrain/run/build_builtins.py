"""Rebuild the shipped built-in tokenizer and models from source.

    python -m posttrain.run.build_builtins --out DIR   # build everything into DIR (same layout as the shipped assets)
    python -m posttrain.run.build_builtins --check     # build into a temporary folder, compare with the shipped files
    python -m posttrain.run.build_builtins --write     # replace the shipped assets (maintainers; update the pins in
                                                       # tests/builtin/test_builtin_pins.py and regenerate docs/ tables after)

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the built-in task corpora (digits split one by one).
The random-init models are ``torch.manual_seed(seed)`` + ``from_config``. The trained models start from the *shipped*
``tiny-qwen2`` and run plain SFT through ``posttrain.run.pipeline.run`` on one CPU thread. Every model is stored in
float16.

A rebuild reproduces the shipped bytes only on the kind of CPU (and the torch build) that made them: the manifest
records which. Elsewhere the trained models come out different (float reduction order follows the SIMD path), which is
why the package ships the files instead of building them on first use.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from posttrain.builtin import (
    ASSETS,
    BUILTIN_MODELS,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TINY_ARCH,
    TOKENIZER_FILES,
    TOKENIZER_VOCAB_SIZE,
    BuiltinModel,
    manifest,
    materialise,
    sha256_file,
    type_name_for,
)


def tokenizer_corpus() -> list[str]:
    from posttrain.data import arithmetic, facts

    return [
        *arithmetic.corpus(),
        *facts.corpus(),
        "Question: What is the answer? Answer: The answer is 42. <answer>42</answer>",
        "You are a helpful assistant. Solve the problem and give the final answer.",
    ]


def build_tokenizer(out_dir: Path) -> None:
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
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))


def _random_model(spec: BuiltinModel, tokenizer_dir: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    arch = dict(TINY_ARCH[spec.arch])
    config = AutoConfig.for_model(
        arch.pop("model_type"), vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **arch,
    )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    # stop at the end of the text and at the end of a chat turn
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    return model


def _train_source(spec: BuiltinModel, data_dir: Path) -> dict[str, Any]:
    if not spec.task_splits:
        return spec.train_source
    from posttrain.data.sources import BUILTIN_TASKS

    build_rows, _ = BUILTIN_TASKS[spec.task]
    path = data_dir / f"{spec.task}_train.jsonl"
    rows = [r for split in spec.task_splits for r in build_rows(split)]
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in rows))
    return {"source": str(path)}


def _trained_state(spec: BuiltinModel, base_dir: Path) -> dict:
    """``spec.base`` (a materialised folder) + plain SFT on one CPU thread; returns the trained state dict."""
    import torch
    from safetensors.torch import load_file

    from posttrain.recipe import parse_recipe
    from posttrain.run.pipeline import run

    with tempfile.TemporaryDirectory() as tmp:
        recipe = parse_recipe({
            "model": str(base_dir),
            "data": {"train": _train_source(spec, Path(tmp))},
            "method": {"name": "sft"},
            "training": {
                "max_steps": spec.max_steps, "per_device_train_batch_size": spec.batch_size, "learning_rate": 3e-3,
                "lr_scheduler_type": "cosine", "warmup_steps": 20, "logging_steps": 50, "save_strategy": "no",
                "disable_tqdm": True,
            },
            "output_dir": str(Path(tmp) / "run"),
            "seed": 0,
        })
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one reduction order, whatever the core count
        try:
            run(recipe, quiet=True)
        finally:
            torch.set_num_threads(threads)
        return load_file(str(Path(tmp) / "run" / "model.safetensors"))


def _write_model(out: Path, spec: BuiltinModel, state: dict, config, generation_config, entries: dict) -> None:
    import torch
    from safetensors.torch import save_file

    path = out / f"{spec.name}.safetensors"
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()  # the embedding, stored once
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items() if k not in tied}, str(path),
              metadata={"format": "pt"})
    config = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "dtype", "torch_dtype")}
    config["use_cache"] = True
    config["architectures"] = [type_name_for(config["model_type"])]  # from_config leaves it unset; TRL/HF read it
    gen = {k: v for k, v in generation_config.to_diff_dict().items() if k not in ("transformers_version", "_from_model_config")}
    entries[spec.name] = {"file": path.name, "sha256": sha256_file(path), "config": config, "generation_config": gen}


def build_assets(out: Path, names: list[str] | None = None, log=print) -> dict[str, Any]:
    """Build the tokenizer and the models ``names`` (default: all) into ``out``; write ``out/manifest.json``."""
    import torch
    import transformers

    names = names or list(BUILTIN_MODELS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer").mkdir(exist_ok=True)
    build_tokenizer(out / "tokenizer")
    man: dict[str, Any] = {
        "format": 1,
        "built_with": {
            "command": "python -m posttrain.run.build_builtins",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "tokenizer": {n: sha256_file(out / "tokenizer" / n) for n in TOKENIZER_FILES},
        "models": {},
    }
    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    manifest.cache_clear()
    order = sorted(names, key=lambda n: BUILTIN_MODELS[n].base is not None)  # random-init bases first
    for name in order:
        spec = BUILTIN_MODELS[name]
        log(f"building builtin:{name} ...")
        if spec.base is None:
            model = _random_model(spec, out / "tokenizer")
            _write_model(out, spec, model.state_dict(), model.config, model.generation_config, man["models"])
        else:
            with tempfile.TemporaryDirectory() as base_dir:
                if spec.base not in man["models"]:  # the shipped base (a partial rebuild)
                    man["models"][spec.base] = manifest()["models"][spec.base]
                    shutil.copyfile(ASSETS / f"{spec.base}.safetensors", out / f"{spec.base}.safetensors")
                    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
                    manifest.cache_clear()
                materialise(spec.base, Path(base_dir), out)
                from transformers import AutoConfig, GenerationConfig

                state = _trained_state(spec, Path(base_dir))
                config, gen = AutoConfig.from_pretrained(base_dir), GenerationConfig.from_pretrained(base_dir)
            _write_model(out, spec, state, config, gen, man["models"])
        (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
        manifest.cache_clear()
    return man


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.run.build_builtins",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="models to build (default: all)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the assets to this folder")
    group.add_argument("--check", action="store_true", help="rebuild into a temporary folder and compare")
    group.add_argument("--write", action="store_true", help="replace the shipped assets")
    args = parser.parse_args(argv)
    from posttrain.run.pipeline import setup_logging

    setup_logging(quiet=True)
    if args.check:
        shipped = manifest()
        with tempfile.TemporaryDirectory() as tmp:
            built = build_assets(Path(tmp), args.names or None)
        same = True
        for name, file_hash in built["tokenizer"].items():
            ok = file_hash == shipped["tokenizer"][name]
            same &= ok
            print(f"tokenizer/{name:<24} {'identical' if ok else 'DIFFERENT'}")
        for name, entry in built["models"].items():
            ok = entry["sha256"] == shipped["models"][name]["sha256"]
            same &= ok
            print(f"{name:<34} {'identical' if ok else 'DIFFERENT'}")
        print(f"shipped assets were built on: {shipped['built_with']}")
        return 0 if same else 1
    out = ASSETS if args.write else Path(args.out)
    if args.write and args.names:
        parser.error("--write rebuilds everything; give no names")
    if out.exists() and args.write:
        shutil.rmtree(out)
    build_assets(out, args.names or None)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
