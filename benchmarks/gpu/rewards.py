"""Reward for the GPU benchmark's GRPO runs: the fraction of digit characters in a completion. A random-weights
model's completions differ in it, so group advantages are non-zero and every step updates the policy (the value
itself means nothing)."""


def digit_fraction(prompts, completions, **kwargs) -> list[float]:
    texts = [c if isinstance(c, str) else " ".join(m.get("content", "") for m in c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
