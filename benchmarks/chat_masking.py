"""Cost of posttrain's assistant-turn masking (prefix-by-prefix rendering, docs/chat_sft.md) against what TRL does for
``assistant_only_loss`` (one render with ``{% generation %}`` markers, ``return_assistant_tokens_mask=True``) and
against a plain tokenisation of the conversation (no mask): rows per second of data preparation, on the same
conversations and tokenizer.

    OMP_NUM_THREADS=1 python benchmarks/chat_masking.py                    # builtin:arithmetic-chat, 1/4/16 turns
    python benchmarks/chat_masking.py --rows 2000 --out benchmarks/results/chat_masking_cpu.json

The tokenizer is the built-in one, whose ChatML template has generation markers, so that all three can run on it;
posttrain's masks are computed by prefix rendering, as for a template without markers. The masks of the first two
are compared on every row (they must be identical). Methods are interleaved; the median of ``--repeats`` is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500, help="conversations per measurement")
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 4, 16], help="exchanges per conversation")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per method (the median is reported)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import statistics

    from transformers import AutoTokenizer

    from posttrain.data.arithmetic import arithmetic_chat_rows
    from posttrain.data.formatting import assistant_token_mask
    from posttrain.models import builtin_model_dir

    tok = AutoTokenizer.from_pretrained(builtin_model_dir("tiny-qwen2"))
    results = []
    for turns in args.turns:
        rows = [r["messages"] for r in arithmetic_chat_rows("train", args.rows, turns=turns, max_operand=99)]

        def posttrain_masks():
            return [assistant_token_mask(m, tok).mask for m in rows]

        def trl_markers():
            return [tok.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                    ["assistant_masks"] for m in rows]

        def plain():
            return [tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"] for m in rows]

        methods = {"posttrain prefix masks": posttrain_masks, "TRL generation markers": trl_markers,
                   "tokenise only": plain}
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        outputs = {}
        for _ in range(args.repeats):  # interleaved, so that a shared machine's drifts hit every method alike
            for name, fn in methods.items():
                start = time.perf_counter()
                outputs[name] = fn()
                seconds[name].append(time.perf_counter() - start)
        timings = {name: statistics.median(s) for name, s in seconds.items()}
        same = outputs["posttrain prefix masks"] == [list(m) for m in outputs["TRL generation markers"]]
        tokens = sum(len(ids) for ids in outputs["tokenise only"]) / len(rows)
        row = {"turns": turns, "rows": len(rows), "mean_tokens": round(tokens, 1), "same_masks": same,
               **{f"{name} rows/s": round(len(rows) / t, 1) for name, t in timings.items()}}
        results.append(row)
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
