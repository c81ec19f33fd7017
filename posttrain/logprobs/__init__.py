"""Log-probs of completions: the engine every family trainer is to call (issue #25), its LM heads, the shared-prompt
layout, the reference computed once, and dataset scoring.

* :mod:`posttrain.logprobs.engine`: :class:`LogProbEngine` -- completion-only per-token log-probs, with what an
  objective :class:`Needs` (entropy, hidden states, full-vocabulary rows, rows for another model's tiled KL), and
  shared prompts for pairs and groups;
* :mod:`posttrain.logprobs.heads`: the LM heads over gathered rows (``chunked`` | ``fused`` | ``liger``) and the
  tiled token KL;
* :mod:`posttrain.logprobs.layout`: packing the rows of a group around their shared prompt, the block mask;
* :mod:`posttrain.logprobs.reference`: reference log-probs of a whole dataset, computed once and cached on disk;
* :mod:`posttrain.logprobs.scoring`: :func:`completion_logps` for evaluation, and TRL's fused-head patch the
  trainers still use.

docs/logprob_engine.md has the guarantees and the measured costs.
"""

from posttrain.logprobs.engine import HeadRows, LogProbEngine, LogProbs, Needs
from posttrain.logprobs.scoring import completion_logps, ensure_fused_head

__all__ = ["HeadRows", "LogProbEngine", "LogProbs", "Needs", "completion_logps", "ensure_fused_head"]
