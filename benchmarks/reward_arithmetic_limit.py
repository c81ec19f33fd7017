"""Why a reward model trained by ``recipes/reward.yaml`` stays near chance on unseen arithmetic pairs (issue 26).

    OMP_NUM_THREADS=1 python benchmarks/reward_arithmetic_limit.py                       # the start model only (seconds)
    OMP_NUM_THREADS=1 python benchmarks/reward_arithmetic_limit.py --train-steps 100 1000 # plus reward runs (minutes)

On the pairs of ``builtin:arithmetic-pref`` (``max_operand: 30``; 200 test pairs, problems never trained on, and the
first 200 training pairs) it measures the pairwise accuracy (chosen ranked above rejected) of:

* ``lm_logprob``: the start model's (``builtin:tiny-qwen2-arith``) summed log-probability of the answer after the
  prompt: whether the model knows the sums;
* ``lm_eos_at_last``: its log-probability of ending the text after the answer, read at the last character: the one
  position a sequence-classification head sees (``posttrain.families.reward.trainer``), so what that state holds of the
  answer's correctness without further training;
* with ``--train-steps``: the reward model of ``recipes/reward.yaml`` trained that many steps (``--lr``), on the
  training pairs (``data.eval``: the same 200 training pairs) and on the test pairs (``data.test``).

Results are in docs/methods/reward.md ("Unseen problems: a measured limit").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAIRS = {"max_operand": 30}


def start_model_accuracies() -> dict[str, dict[str, float]]:
    """Pairwise accuracy of the start model's answer log-prob and of its end-of-text log-prob at the last character."""
    import torch
    from transformers import AutoTokenizer

    from posttrain.data.arithmetic import arithmetic_rows
    from posttrain.models import builtin_model_dir, load_model

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("tiny-qwen2-arith"))
    model = load_model("builtin:tiny-qwen2-arith").eval()

    def scores(prompt: str, answer: str) -> tuple[float, float]:
        ids = tokenizer(prompt + answer, add_special_tokens=False).input_ids
        start = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)[0]
        answer_lp = sum(log_probs[i - 1, ids[i]].item() for i in range(start, len(ids)))
        return answer_lp, log_probs[-1, tokenizer.eos_token_id].item()

    out = {}
    for split in ("test", "train"):
        rows = arithmetic_rows("preference", split=split, num_samples=200, **PAIRS)
        wins = [0, 0]
        for row in rows:
            chosen, rejected = scores(row["prompt"], row["chosen"]), scores(row["prompt"], row["rejected"])
            wins = [w + (c > r) for w, c, r in zip(wins, chosen, rejected, strict=True)]
        out[split] = {"lm_logprob": wins[0] / len(rows), "lm_eos_at_last": wins[1] / len(rows)}
    return out


def reward_run(steps: int, lr: float, seed: int) -> dict[str, float]:
    """``recipes/reward.yaml`` for ``steps`` steps: pairwise accuracy on 200 training pairs and on the test pairs."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "posttrain.cli", "train", "recipes/reward.yaml", "--set", f"output_dir={out}",
               "--set", f"training.max_steps={steps}", "--set", f"training.learning_rate={lr}", "--set", f"seed={seed}",
               "--set", "data.eval={source: builtin:arithmetic-pref, max_samples: 200, options: {num_samples: 2000, "
               "max_operand: 30}}", "--set", f"training.logging_steps={steps}", "--set", "training.save_strategy=no",
               "--set", "report=false", "--set", "training.disable_tqdm=true"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        summary = json.loads((Path(out) / "summary.json").read_text())
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r][-1]
    return {"steps": steps, "lr": lr, "train_pairs": train, "test_before": summary["accuracy_before"],
            "test_after": summary["accuracy_after"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, nargs="*", default=[], help="reward runs of these lengths")
    parser.add_argument("--lr", type=float, default=1e-3, help="their learning rate (the recipe's: 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = {"start_model": start_model_accuracies(),
              "reward_runs": [reward_run(steps, args.lr, args.seed) for steps in args.train_steps]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
