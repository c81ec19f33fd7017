"""SPO wired into the GRPO trainer: one completion per prompt, a per-prompt success-rate tracker, prioritized prompt
sampling and KL-adaptive forgetting (``method.advantage: spo``; docs/methods/spo.md).

:class:`SPOGRPOTrainer` is :class:`posttrain.families.rl.trainer.PosttrainGRPOTrainer` with ``num_generations = 1`` and:

* **the offline pass** (``posttrain spo-init``, :mod:`posttrain.run.spo_init`, or automatically before the first
  step): the start policy samples ``spo_offline_n`` (n0) completions of every training prompt, scored by the recipe's
  rewards, each round of generation seeded from the run's seed and the round alone (so the command and the automatic
  pass give the same scores on the same number of processes, and the run's own random state is left as it was); each
  prompt's tracker starts from at most n0 of its scores (:func:`posttrain.families.rl.spo_tracker.offline_init`). The
  scores file (``{"pass": record, "scores": {prompt key: [scores]}}``, the record naming the pass: prompts, n0, seed,
  rewards, sampling, start model) is ``method.spo_offline_scores`` when set, else
  ``output_dir/spo_offline_scores.json``: read when it exists (the default file of another pass is sampled again),
  else sampled and written there;
* **prioritized sampling**: each generation batch's prompts are drawn here, at generation time, without replacement
  with weights ``sqrt(p_hat (1 - p_hat)) + eps`` from the tracker as updated up to the previous step, out of the whole
  training set or, with ``spo_candidate_pool: K``, out of the next K rows of a shuffled pass over it (a seeded
  generator shared by every process; the dataloader only paces the steps);
* **the advantage**: the ``spo`` estimator gets each row's ``p_hat``, read before this visit's update;
* **the tracker update**, at the start of the next generation (the policy has then taken this batch's update steps):
  ``D`` = mean ``|log pi_prev - log pi_now|`` on each prompt's previously stored response, ``rho =
  clip(2^(-D / d_half), rho_min, rho_max)`` (or ``spo_rho_value``), ``alpha <- rho alpha + r``, ``beta <- rho beta +
  (1 - r)``, and the new response is stored with its log-probs under the current policy;
* **checkpoints**: the tracker, the sampler's generator, the candidate pools' pass and the pending update are saved
  with the RNG state of every process (``spo_state_<rank>.pt``), so ``--resume`` continues exactly (checkpoints at
  generation boundaries: the default ``steps_per_generation`` = gradient accumulation and ``num_iterations: 1``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from posttrain.errors import UserError
from posttrain.families.rl.common import combine_rewards
from posttrain.families.rl.spo_tracker import (
    SPOTracker,
    check_reward_range,
    forgetting_factor,
    policy_shift,
    prompt_key,
    rescale_rewards,
    sampling_weights,
)
from posttrain.families.rl.trainer import PosttrainGRPOTrainer

logger = logging.getLogger("posttrain")

OFFLINE_SCORES_FILE = "spo_offline_scores.json"


def row_key(prompt: Any) -> str:
    """The tracker key of a dataset row's prompt (text, or a conversation as canonical JSON)."""
    return prompt_key(prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False))


def draw_prompts(weights: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    """``count`` prompt indices drawn with probabilities proportional to ``weights``: without replacement (sequential
    draws), or with replacement when the pool is smaller than ``count``."""
    return torch.multinomial(weights.double(), count, replacement=count > weights.numel(),
                             generator=generator).tolist()


def next_candidate_pool(order: list[int], cursor: int, size: int, num_rows: int,
                        generator: torch.Generator) -> tuple[list[int], list[int], int]:
    """The next ``size`` row indices of a shuffled pass over ``num_rows`` rows, as the reference's data loader of
    ``gen_batch_size`` prompts yields them: ``(pool, order, cursor)``. A new seeded permutation starts when fewer than
    ``size`` rows of the current one are left (those are skipped, as a drop-last loader does)."""
    if cursor + size > len(order):
        order, cursor = torch.randperm(num_rows, generator=generator).tolist(), 0
    return order[cursor:cursor + size], order, cursor + size


def check_candidate_pool(pool: int | None, batch: int, num_rows: int) -> str | None:
    """The error line of a ``spo_candidate_pool`` that cannot feed the generation batch, else None."""
    if pool is None:
        return None
    if pool < batch:
        return (f"method.spo_candidate_pool: {pool} is below the generation batch of {batch} prompts "
                "(per_device_train_batch_size x steps_per_generation x processes); the batch is drawn from the pool "
                "without replacement")
    if pool > num_rows:
        return f"method.spo_candidate_pool: {pool} is above the {num_rows} rows of data.train"
    return None


def offline_round_seed(seed: int, round_index: int) -> int:
    """The seed of one round of the offline pass: a function of the run's seed and the round alone, so a pass resumed
    from its partial file samples what an uninterrupted one does."""
    return (seed * 1_000_003 + round_index) % 2**63


@contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Sample under ``torch.manual_seed(seed)`` and restore the global random state of the CPU (and of ``device``)
    afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through a temporary file and a rename: a reader sees the old file or the new one, never
    a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def read_offline_scores(path: Path, where: str) -> tuple[dict[str, list[float]], dict[str, Any] | None]:
    """A scores file and the record of the pass that wrote it: ``{"pass": record, "scores": {prompt key: [scores]}}``
    (what the offline pass writes), or an older plain ``{prompt key: [scores]}`` (record None). A file that cannot be
    read or has another shape is one error naming ``where`` and the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: cannot read '{path}' ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: '{path}' holds a JSON {type(data).__name__}, expected an object of prompt keys to "
                        "score lists (what `posttrain spo-init` writes)")
    record, scores = None, data
    if isinstance(data.get("pass"), dict) and isinstance(data.get("scores"), dict):
        record, scores = data["pass"], data["scores"]
    for key, values in scores.items():
        ok = isinstance(values, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok:
            raise UserError(f"{where}: '{path}': prompt {key}: expected a list of finite scores, got "
                            f"{json.dumps(values)[:80]}")
    return scores, record


def pass_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields of two offline-pass records that differ (a field one of them lacks differs), compared as JSON."""
    current = json.loads(json.dumps(current))
    return [name for name in sorted(set(recorded) | set(current)) if recorded.get(name) != current.get(name)]


class SPOGRPOTrainer(PosttrainGRPOTrainer):
    """GRPO's trainer with SPO's single-stream machinery (see the module docstring)."""

    def __init__(self, *args, start_model: dict[str, Any] | None = None, **kwargs):
        """``start_model``: the start policy's identity recorded with the offline pass (:func:`start_model_record`)."""
        super().__init__(*args, **kwargs)
        p = self.params
        self.spo_start_model = start_model
        if self.num_generations != 1:
            raise ValueError(f"SPO generates one completion per prompt, got num_generations={self.num_generations}")
        self.num_generations_eval = 1
        self.spo_tracker = SPOTracker(rho_min=p.spo_rho_min, rho_max=p.spo_rho_max, d_half=p.spo_d_half)
        self.spo_initialized = False
        self.spo_generator = torch.Generator().manual_seed(self.args.seed)
        self.spo_pending: dict[str, Any] | None = None
        self._spo_drawn: list[str] | None = None  # keys of the generation batch being scored (all processes)
        self._spo_rows = list(self.train_dataset)
        self._spo_keys = [row_key(row["prompt"]) for row in self._spo_rows]
        self._spo_order: list[int] = []  # the shuffled pass over the rows that candidate pools are cut from
        self._spo_cursor = 0
        error = check_candidate_pool(p.spo_candidate_pool, self.args.generation_batch_size, len(self._spo_rows))
        if error is not None:
            raise UserError(error)

    # ---------------------------------------------------------------------------------------------------------------
    # rewards on the tracker's scale

    def _tracker_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """The combined rewards as success probabilities: rescaled with ``spo_reward_range``, else checked to lie in
        [0, 1] (an error naming the rewards otherwise)."""
        p = self.params
        if p.spo_reward_range is not None:
            return rescale_rewards(rewards, *p.spo_reward_range).to(rewards.dtype)
        try:
            check_reward_range(rewards)
        except ValueError as exc:
            raise UserError(f"method.rewards ({', '.join(self.reward_func_names)}): {exc}; set "
                            "method.spo_reward_range: [low, high] to rescale them") from None
        return rewards

    def _advantage_options(self, estimator, rewards: torch.Tensor, mode: str) -> dict[str, Any]:
        if self._spo_drawn is None or len(self._spo_drawn) != rewards.numel():  # eval batches: rows as they come
            return {"p_hat": torch.full((rewards.numel(),), 0.5, dtype=torch.float64)}
        return {"p_hat": self.spo_tracker.p_hat(self._spo_drawn)}

    # ---------------------------------------------------------------------------------------------------------------
    # generation: offline pass, pending update, prioritized draw

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            self._spo_drawn = None
            return super()._generate_and_score_completions(inputs)
        if not self.spo_initialized:
            self._spo_offline_init()
        self._spo_apply_pending()
        rows, keys = self._spo_draw(len(inputs))
        self._spo_drawn = keys
        try:
            output = super()._generate_and_score_completions(rows)
        finally:
            self._spo_drawn = None
        # applied at the start of the next generation, once this batch's policy steps are done
        self.spo_pending = {"keys": keys, "rewards": self._spo_rewards.tolist(), "rows": self._local_responses(output)}
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._spo_drawn is not None:  # the generation batch's rewards, for the tracker update after its steps
            rewards = combine_rewards(rewards_per_func, self.reward_weights.to(rewards_per_func.device))
            self._spo_rewards = self._tracker_rewards(rewards)
        return rewards_per_func

    def _spo_draw(self, local: int) -> tuple[list[dict], list[str]]:
        """This process's rows of the next generation batch and the keys of the whole batch (every process draws the
        same global batch from the same generator and tracker)."""
        p = self.params
        total = local * self.accelerator.num_processes
        if p.spo_candidate_pool is None:
            candidates: list[int] | range = range(len(self._spo_keys))
        else:
            candidates, self._spo_order, self._spo_cursor = next_candidate_pool(
                self._spo_order, self._spo_cursor, p.spo_candidate_pool, len(self._spo_keys), self.spo_generator)
        if p.spo_prioritized:
            weights = sampling_weights(self.spo_tracker.p_hat([self._spo_keys[i] for i in candidates]),
                                       eps=p.spo_sampling_eps)
        else:
            weights = torch.ones(len(candidates), dtype=torch.float64)
        drawn = [candidates[j] for j in draw_prompts(weights, total, self.spo_generator)]
        mine = drawn[self.accelerator.process_index * local:(self.accelerator.process_index + 1) * local]
        keys = [self._spo_keys[i] for i in drawn]
        p_hat = self.spo_tracker.p_hat(keys)
        m = self._metrics["train"]
        m["spo/p_hat_mean"].append(p_hat.mean().item())
        m["spo/sampled_first_visit_frac"].append(sum(k not in self.spo_tracker.visits for k in keys) / len(keys))
        alpha = torch.tensor([self.spo_tracker.alpha.get(k, 0.5) for k in keys], dtype=torch.float64)
        beta = torch.tensor([self.spo_tracker.beta.get(k, 0.5) for k in keys], dtype=torch.float64)
        m["spo/neff_mean"].append((alpha + beta).mean().item())
        return [self._spo_rows[i] for i in mine], keys

    def _generate_and_score_local(self, rows):
        """GRPO's generation and scoring (the parent's, without the advantages) of ``rows``; returns the output and
        the combined rewards of every process."""
        output = GRPOTrainer._generate_and_score_completions(self, rows)
        stash, self._rl_stash = self._rl_stash, None
        rpf = stash["rewards_per_func"]
        return output, combine_rewards(rpf, self.reward_weights.to(rpf.device))

    def _spo_scores_file(self) -> tuple[Path, str] | None:
        """The scores file the offline pass reads, with the name errors give it: ``method.spo_offline_scores``, else
        ``output_dir/spo_offline_scores.json`` when it exists (``posttrain spo-init``'s default ``--out``, or an
        earlier automatic pass of this run); None: sample."""
        p = self.params
        if p.spo_offline_scores is not None:
            return Path(p.spo_offline_scores).expanduser(), "method.spo_offline_scores"
        default = Path(self.args.output_dir) / OFFLINE_SCORES_FILE
        if p.spo_offline_n > 0 and default.is_file():
            return default, f"output_dir/{OFFLINE_SCORES_FILE}"
        return None

    def _spo_read_scores(self, path: Path, where: str, scores: dict[str, list[float]]) -> dict[str, list[float]]:
        """The scores of the training prompts in a scores file (logged: which file, how many prompts it covers; the
        prompts it misses start at the Jeffreys prior); a file with none of them is an error."""
        keys = set(self._spo_keys)
        covered = {key: values for key, values in scores.items() if key in keys}
        if not covered:
            raise UserError(f"{where}: '{path}' holds the scores of {len(scores)} prompts, none of them in data.train "
                            "(written for other data, another chat template or system prompt?)")
        logger.info("spo: offline scores read from %s (%s): %d of %d training prompts; %d missing start at the "
                    "Jeffreys prior (0.5, 0.5); %d prompts of the file are not in data.train (ignored)", path, where,
                    len(covered), len(keys), len(keys) - len(covered), len(scores) - len(covered))
        return covered

    def _spo_offline_init(self) -> None:
        """Each prompt's starting ``(alpha, beta)`` from its offline scores: a scores file (:meth:`_spo_scores_file`),
        or the offline pass sampled now and written to ``output_dir/spo_offline_scores.json``. The default file of
        another pass (its record differs from :meth:`spo_pass_record`) is sampled again and overwritten; an explicit
        ``method.spo_offline_scores`` of another pass is used as set, with a warning."""
        p = self.params
        self.spo_initialized = True
        found = self._spo_scores_file()
        scores: dict[str, list[float]] | None = None
        if found is not None:
            path, where = found
            read, record = read_offline_scores(path, where)
            differs = [] if record is None else pass_differences(record, self.spo_pass_record())
            if record is None:
                logger.info("spo: %s (%s) has no pass record (an older file): read as it is", path, where)
            if differs and where != "method.spo_offline_scores":
                logger.info("spo: %s (%s) was written by another offline pass (%s differ): sampling the pass again",
                            path, where, ", ".join(differs))
            else:
                if differs:
                    logger.warning("spo: %s (%s) was written by another offline pass (%s differ): used as set", path,
                                   where, ", ".join(differs))
                scores = self._spo_read_scores(path, where, read)
        if scores is None and p.spo_offline_n > 0:
            scores = self.spo_offline_scores()
            if self.accelerator.is_main_process:
                out = Path(self.args.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                write_json_atomic(out / OFFLINE_SCORES_FILE, {"pass": self.spo_pass_record(), "scores": scores})
        self.spo_tracker.init_offline(scores or {}, max_scores=p.spo_offline_n, seed=self.args.seed)

    def spo_pass_record(self) -> dict[str, Any]:
        """What makes one offline pass's scores another's: the distinct training prompts, n0, the round size, the seed,
        the rewards (names, weights, range), the sampling settings and the start model."""
        return {"prompts": len(set(self._spo_keys)), "n0": self.params.spo_offline_n,
                "per_round": self.args.per_device_train_batch_size * self.args.steps_per_generation
                * self.accelerator.num_processes, "seed": self.args.seed,
                "rewards": [list(self.reward_func_names), self.reward_weights.tolist(), self.params.spo_reward_range],
                "sampling": [self.temperature, self.top_p, self.top_k, self.max_completion_length],
                "model": self.spo_start_model}

    def spo_offline_scores(self, partial: Path | None = None) -> dict[str, list[float]]:
        """The offline pass: ``spo_offline_n`` (n0) completions of every distinct training prompt by the start policy,
        scored and binarised (``r > 0`` after the tracker's rescaling). It runs in rounds of one generation batch,
        each seeded by :func:`offline_round_seed` (the run's random state is restored afterwards); the work is shared
        by the processes, the result is the same on each. ``partial``: the scores so far are written there after
        every round (atomically), and a pass started again with the same file and settings continues after its last
        complete round, with the same result as an uninterrupted pass."""
        n0 = self.params.spo_offline_n
        first: dict[str, int] = {}
        for i, key in enumerate(self._spo_keys):
            first.setdefault(key, i)
        jobs = [i for i in first.values() for _ in range(n0)]
        real = len(jobs)
        nproc, rank = self.accelerator.num_processes, self.accelerator.process_index
        chunk = self.args.per_device_train_batch_size * self.args.steps_per_generation
        per_round = chunk * nproc
        jobs += jobs[-1:] * (-len(jobs) % per_round)  # equal rounds on every process
        rounds = len(jobs) // per_round
        scores: dict[str, list[float]] = {key: [] for key in first}
        layout = self.spo_pass_record()
        start = 0
        if partial is not None and partial.is_file():
            try:
                saved = json.loads(partial.read_text())
            except (OSError, ValueError):
                saved = None
            same_pass = isinstance(saved, dict) and saved.get("layout") == layout
            if same_pass and set(saved.get("scores", ())) == set(scores):
                scores, start = saved["scores"], int(saved["rounds_done"])
                logger.info("spo-init: continuing the pass in %s after round %d of %d", partial, start, rounds)
            else:
                logger.info("spo-init: %s is another pass's (other prompts, rewards or sampling settings): starting "
                            "again", partial)
        logger.info("spo-init: %d samples (%d prompts x %d) from the start policy, %d rounds of %d", real, len(first),
                    n0, rounds, per_round)
        tokens_seen = self.state.num_input_tokens_seen
        was_training = self.model.training
        self.model.eval()  # GRPO's eval path: no training metrics, no token count
        began = time.time()
        try:
            for r in range(start, rounds):
                batch = jobs[r * per_round:(r + 1) * per_round]
                with seeded_rng(offline_round_seed(self.args.seed, r), self.accelerator.device):
                    _, rewards = self._generate_and_score_local([self._spo_rows[i] for i in
                                                                 batch[rank * chunk:(rank + 1) * chunk]])
                rewards = self._tracker_rewards(rewards)
                for j, (i, reward) in enumerate(zip(batch, rewards.tolist(), strict=True)):
                    if r * per_round + j < real and reward == reward:  # padding and unscorable rows do not count
                        scores[self._spo_keys[i]].append(float(reward > 0))
                if partial is not None and self.accelerator.is_main_process:
                    write_json_atomic(partial, {"layout": layout, "rounds_done": r + 1, "scores": scores})
                done = min((r + 1) * per_round, real)
                logger.info("spo-init: round %d/%d, %d/%d samples (%.0f%%), %.0f s", r + 1, rounds, done, real,
                            100 * done / real, time.time() - began)
        finally:
            self.model.train(was_training)
            self.state.num_input_tokens_seen = tokens_seen
            self._metrics["eval"].clear()
            for log in self._logs.values():
                if hasattr(log, "clear"):
                    log.clear()
        return scores

    # ---------------------------------------------------------------------------------------------------------------
    # the tracker update after the batch's policy steps

    def _local_responses(self, output) -> list[tuple[list[int], list[int]]]:
        """This process's rows of a generation batch as ``(ids, scored mask)``: the unpadded prompt, then the
        completion (its loss tokens scored)."""
        rows = []
        mask = output["completion_mask"] * output.get("tool_mask", 1)
        for pid, pm, cid, cm, lm in zip(output["prompt_ids"], output["prompt_mask"], output["completion_ids"],
                                        output["completion_mask"], mask, strict=True):
            prompt = pid[pm.bool()].tolist()
            n = int(cm.sum())
            rows.append((prompt + cid[:n].tolist(), [0] * len(prompt) + [int(x) for x in lm[:n].tolist()]))
        return rows

    @torch.no_grad()
    def _spo_logps(self, rows: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Per-token log-probs of each row's scored tokens under the current policy (right-padded batches, GRPO's
        fused LM head and temperature)."""
        out: list[list[float]] = []
        size = max(1, self.args.per_device_train_batch_size)
        device = self.accelerator.device
        pad = self.processing_class.pad_token_id if hasattr(self.processing_class, "pad_token_id") else 0
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk], device=device)
            attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
            labels = torch.tensor([[t if m else -100 for t, m in zip(i, mk, strict=True)] + [-100] * (width - len(i))
                                   for i, mk in chunk], device=device)
            logps = self.model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True).log_probs
            for row, (_, mk) in zip(logps.float().cpu(), chunk, strict=True):
                out.append([float(v) for v, m in zip(row.tolist(), mk[1:], strict=False) if m])
        return out

    def _spo_apply_pending(self) -> None:
        """The tracker update of the previous generation batch, with the policy as its steps left it."""
        pending, self.spo_pending = self.spo_pending, None
        if pending is None:
            return
        p = self.params
        keys, rewards, local = pending["keys"], torch.tensor(pending["rewards"], dtype=torch.float64), pending["rows"]
        rank, n = self.accelerator.process_index, len(local)
        mine = keys[rank * n:(rank + 1) * n]
        if p.spo_rho == "constant":  # no policy shift to measure: nothing stored
            self.spo_tracker.update(keys, rewards, torch.full((len(keys),), p.spo_rho_value, dtype=torch.float64))
            return
        from accelerate.utils import gather_object

        stored = [self.spo_tracker.responses.get(k) for k in mine]
        now = iter(self._spo_logps([(ids, mask) for ids, mask, _ in (s for s in stored if s is not None)]))
        local_shift = []
        for s in stored:  # D on the prompt's previous response; a first visit: D = 0
            prev = torch.tensor(s[2] if s is not None else [], dtype=torch.float64)
            cur = torch.tensor(next(now), dtype=torch.float64) if s is not None else prev
            local_shift.append(float(policy_shift(prev[None], cur[None], torch.ones(1, prev.numel()))[0]))
        shift = self.accelerator.gather(torch.tensor(local_shift, dtype=torch.float64,
                                                     device=self.accelerator.device)).cpu()
        rho = forgetting_factor(shift, d_half=p.spo_d_half, rho_min=p.spo_rho_min, rho_max=p.spo_rho_max)
        m = self._metrics["train"]
        m["spo/D_mean"].append(shift.mean().item())
        m["spo/rho_mean"].append(rho.mean().item())
        m["spo/rho_clip_frac"].append(((rho <= p.spo_rho_min) | (rho >= p.spo_rho_max)).double().mean().item())
        new_logps = self._spo_logps(local)
        responses = gather_object([(ids, mask, logps) for (ids, mask), logps in zip(local, new_logps, strict=True)])
        self.spo_tracker.update(keys, rewards, rho)
        self.spo_tracker.store(keys, responses)

    # ---------------------------------------------------------------------------------------------------------------
    # checkpoints

    def spo_state_dict(self) -> dict[str, Any]:
        return {"tracker": self.spo_tracker.state_dict(), "initialized": self.spo_initialized,
                "generator": self.spo_generator.get_state(), "pending": self.spo_pending,
                "pool_order": list(self._spo_order), "pool_cursor": self._spo_cursor}

    def load_spo_state_dict(self, state: dict[str, Any]) -> None:
        self.spo_tracker.load_state_dict(state["tracker"])
        self.spo_initialized = state["initialized"]
        self.spo_generator.set_state(state["generator"])
        self.spo_pending = state["pending"]
        self._spo_order, self._spo_cursor = list(state.get("pool_order", [])), state.get("pool_cursor", 0)

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        torch.save(self.spo_state_dict(), Path(output_dir) / f"spo_state_{self.accelerator.process_index}.pt")

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        path = Path(checkpoint or "") / f"spo_state_{self.accelerator.process_index}.pt"
        if checkpoint is not None and path.is_file():
            self.load_spo_state_dict(torch.load(path, weights_only=False))
