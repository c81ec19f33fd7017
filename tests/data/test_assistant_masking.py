"""Assistant-only loss for any chat template (issue 23).

The public chat templates of six families (``tests/data/chat_templates.py``; none has ``{% generation %}`` markers) on
the built-in tiny tokenizer with each family's special tokens added: the masked tokens of
:func:`posttrain.data.formatting.assistant_token_mask` are exactly the assistant contents plus each turn's end-of-turn
token (hand-written below), for single- and multi-turn conversations, with a system prompt and with a tool call; and
``posttrain train`` with ``method: sft`` on ``messages`` rows logs a step-1 loss (learning rate 0) equal to an
assistant-only NLL computed here independently (spans located in the rendered text, tokens by character offsets, a
plain forward of the model).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import chat_templates as ct
from posttrain.data.formatting import assistant_token_mask, tokenize_prompt_completion
from posttrain.errors import UserError

# family -> (template, bos, eos, special tokens, plain added tokens)
FAMILIES = {
    "llama3": (ct.LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"], []),
    "qwen2_5": (ct.QWEN2_5, None, "<|im_end|>", ["<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>"]),
    "mistral": (ct.MISTRAL, "<s>", "</s>", ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                            "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], []),
    "gemma": (ct.GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], []),
    "gemma3": (ct.GEMMA3, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], []),
    "phi3": (ct.PHI3, None, "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], []),
    "smollm2": (ct.SMOLLM2, None, "<|im_end|>", ["<|im_start|>", "<|im_end|>"], []),
}
SIX = ("llama3", "qwen2_5", "mistral", "gemma", "phi3", "smollm2")

SYSTEM = {"role": "system", "content": "Be brief."}
U1, A1 = {"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"}
U2, A2 = {"role": "user", "content": "and 4+4="}, {"role": "assistant", "content": "8"}
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "id": "call00001", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
RESULT = {"role": "tool", "name": "add", "tool_call_id": "call00001", "content": "5"}
TOOL_CONVERSATION = [U1, CALL, RESULT, A1]

# the text of each masked run, per family: the assistant content (as the template renders it) + its end-of-turn
EOT = {"llama3": "<|eot_id|>", "qwen2_5": "<|im_end|>", "mistral": "</s>", "gemma": "<end_of_turn>",
       "gemma3": "<end_of_turn>", "phi3": "<|end|>", "smollm2": "<|im_end|>"}
LEAD = {"mistral": " "}  # Mistral has no generation prompt: the space after [/INST] is the model's to write
TOOL_CALL_TEXT = {
    "llama3": '{"name": "add", "parameters": {"a": 2, "b": 3}}<|eot_id|>',
    "qwen2_5": '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>',
    "mistral": '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "call00001"}]</s>',
}


def expected(family: str, *contents: str) -> list[str]:
    return [LEAD.get(family, "") + c + EOT[family] for c in contents]


def family_tokenizer(family: str):
    from transformers import AutoTokenizer

    from posttrain.models import builtin_model_dir

    template, bos, eos, special, plain = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(builtin_model_dir("tiny-qwen2"))
    tok.add_special_tokens({k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v})
    tok.add_tokens(special, special_tokens=True)
    tok.add_tokens(plain)
    tok.chat_template = template
    tok.model_max_length = 4096
    return tok


@pytest.fixture(scope="module")
def tokenizers():
    return {family: family_tokenizer(family) for family in FAMILIES}


def masked_runs(tok, out) -> list[str]:
    """The decoded text of each contiguous run of masked tokens (read from the mask, not from the spans)."""
    runs, start = [], None
    for t, bit in enumerate([*out.mask, 0]):
        if bit and start is None:
            start = t
        elif not bit and start is not None:
            runs.append(tok.decode(out.input_ids[start:t]))
            start = None
    return runs


def check(tok, messages, want, **kwargs):
    out = assistant_token_mask(messages, tok, **kwargs)
    assert masked_runs(tok, out) == want
    # the ids are exactly what TRL / apply_chat_template tokenise
    assert out.input_ids == list(tok.apply_chat_template(messages, tools=kwargs.get("tools"), tokenize=True,
                                                         return_dict=True)["input_ids"])
    return out


@pytest.mark.parametrize("family", SIX)
def test_single_and_multi_turn(tokenizers, family):
    tok = tokenizers[family]
    assert check(tok, [U1, A1], expected(family, "5")).source == "prefix"
    check(tok, [U1, A1, U2, A2], expected(family, "5", "8"))
    check(tok, [U1, A1, U2, A2], expected(family, "8"), turns="last")


@pytest.mark.parametrize("family", ("llama3", "qwen2_5", "gemma3", "phi3", "smollm2"))
def test_system_prompt(tokenizers, family):
    check(tokenizers[family], [SYSTEM, U1, A1, U2, A2], expected(family, "5", "8"))


def test_system_prompt_on_templates_that_move_or_refuse_it(tokenizers):
    # Mistral v0.3 renders the system prompt only into a LAST user turn: a conversation that ends with the assistant
    # has none, unlike the prompt the model sees at inference. That turn cannot be trained as the model will see it.
    mistral = tokenizers["mistral"]
    for messages, kwargs in (([SYSTEM, U1, A1, U2, A2], {}), ([SYSTEM, U1, A1, U2, A2], {"turns": "last"}),
                             ([SYSTEM, U1, A1], {})):
        turn, message = (2, 4) if kwargs else (1, 2)
        with pytest.raises(UserError, match=rf"^row 7: the chat template is not prefix-consistent: assistant turn "
                                            rf"{turn} \(message {message}\) follows a prompt that renders differently"):
            assistant_token_mask(messages, mistral, where="row 7", **kwargs)
    # Gemma 2 has no system role: the template's own error, on one line
    with pytest.raises(UserError, match="^data: the chat template refuses this conversation: System role not"):
        assistant_token_mask([SYSTEM, U1, A1], tokenizers["gemma"])


@pytest.mark.parametrize("family", sorted(TOOL_CALL_TEXT))
def test_tool_calls_are_trained_and_tool_results_never(tokenizers, family):
    out = check(tokenizers[family], TOOL_CONVERSATION, [TOOL_CALL_TEXT[family], *expected(family, "5")], tools=TOOLS)
    assert len(out.spans) == 2


def test_prompt_completion_rows_score_the_completion_turns_only(tokenizers):
    tok = tokenizers["qwen2_5"]
    out = tokenize_prompt_completion([U1, A1, U2], [A2], tok)
    assert masked_runs(tok, out) == ["8<|im_end|>"]
    assert tok.decode(out.input_ids).endswith("<|im_start|>assistant\n8<|im_end|>")  # nothing after the scored turn
    # a multi-message completion (tool call, tool result, answer): both assistant turns, not the tool result
    out = tokenize_prompt_completion([U1], TOOL_CONVERSATION[1:], tok, tools=TOOLS)
    assert masked_runs(tok, out) == [TOOL_CALL_TEXT["qwen2_5"], "5<|im_end|>"]
    # a plain-text completion of a conversational prompt becomes the assistant turn
    out = tokenize_prompt_completion([U1], "5", tokenizers["phi3"])
    assert masked_runs(tokenizers["phi3"], out) == ["5<|end|>"]
    # plain text: prompt, then completion + EOS, all scored
    plain = tokenize_prompt_completion("2+3=", "5", tok)
    assert plain.source == "text" and masked_runs(tok, plain) == ["5<|im_end|>"] and tok.decode(plain.input_ids) == \
        "2+3=5<|im_end|>"


# A template that is not prefix-consistent: an earlier assistant turn loses its reasoning once a user turn follows
# (as Qwen3 / DeepSeek-R1 templates do).
STRIPPING = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' %}{% set c = m.content if loop.last else m.content.split('</think>')[-1] %}"
    "{{ '\n' }}{MARK_OPEN}{{ c }}<|im_end|>{MARK_CLOSE}{{ '\n' }}"
    "{%- else %}{{ '\n' + m.content }}<|im_end|>{{ '\n' }}{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
THINKING = [U1, {"role": "assistant", "content": "<think>2 and 3</think>5"}, U2,
            {"role": "assistant", "content": "<think>4 and 4</think>8"}]


def test_not_prefix_consistent_falls_back_to_generation_markers(tokenizers):
    tok = family_tokenizer("smollm2")
    tok.chat_template = STRIPPING.replace("{MARK_OPEN}", "").replace("{MARK_CLOSE}", "")
    with pytest.raises(UserError, match=r"assistant turn 1 \(message 1\) is rendered differently once "
                                        r".*no \{% generation %\} markers"):
        assistant_token_mask(THINKING, tok)
    # the last turn alone is fine
    assert masked_runs(tok, assistant_token_mask(THINKING, tok, turns="last")) == ["<think>4 and 4</think>8<|im_end|>"]
    tok.chat_template = STRIPPING.replace("{MARK_OPEN}", "{% generation %}").replace("{MARK_CLOSE}",
                                                                                     "{% endgeneration %}")
    out = assistant_token_mask(THINKING, tok)
    assert out.source == "generation markers"
    assert masked_runs(tok, out) == ["5<|im_end|>", "<think>4 and 4</think>8<|im_end|>"]
    assert masked_runs(tok, assistant_token_mask(THINKING, tok, first_message=2)) == [
        "<think>4 and 4</think>8<|im_end|>"]


@pytest.mark.parametrize("family", SIX)
def test_generation_stops_at_the_end_of_turn_token(tokenizers, family):
    from posttrain.data.formatting import end_of_turn_ids
    from posttrain.eval.accuracy import stop_token_ids

    tok = tokenizers[family]
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(EOT[family])]
    assert tok.convert_tokens_to_ids(EOT[family]) in stop_token_ids(None, tok)


def test_conversation_without_an_assistant_turn_has_an_empty_mask(tokenizers):
    out = assistant_token_mask([U1], tokenizers["llama3"])
    assert out.input_ids and not any(out.mask) and out.spans == ()


# --------------------------------------------------------------------------------------------------------------------
# posttrain train: step-1 loss at learning rate 0 == an independent assistant-only NLL, for each of the six families
# --------------------------------------------------------------------------------------------------------------------


def rows_for(family: str) -> list[tuple[list[dict], list[str], list | None]]:
    """(messages, the assistant texts it trains on in order, tools) of the family's training rows."""
    rows = [([U1, A1], expected(family, "5"), None), ([U1, A1, U2, A2], expected(family, "5", "8"), None),
            ([{"role": "user", "content": "7+1="}, {"role": "assistant", "content": "It is 8."}],
             expected(family, "It is 8."), None)]
    if family not in ("mistral", "gemma"):  # their templates move / refuse a system turn (tested above)
        rows.append(([SYSTEM, U2, A2], expected(family, "8"), None))
    if family in TOOL_CALL_TEXT:
        rows.append((TOOL_CONVERSATION, [TOOL_CALL_TEXT[family], *expected(family, "5")], TOOLS))
    return rows


def independent_nll(model, tok, rows) -> float:
    """Mean NLL of the tokens inside the hand-written assistant texts, located in the rendered conversation."""
    total, count = 0.0, 0
    for messages, texts, tools in rows:
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, at = [], 0
        for piece in texts:
            at = text.index(piece, at)
            spans.append((at, at + len(piece)))
            at += len(piece)
        labelled = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
        assert tok.decode([i for i, keep in zip(enc["input_ids"], labelled) if keep]) == "".join(texts)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        for t in range(1, ids.shape[1]):
            if labelled[t]:
                total -= float(logps[t - 1, ids[0, t]])
                count += 1
    return total / count


@pytest.mark.parametrize("family", SIX)
def test_posttrain_train_sft_loss_is_the_assistant_only_nll(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from posttrain.cli import main
    from posttrain.models import builtin_model_dir

    tok = family_tokenizer(family)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir("tiny-qwen2"))
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tok))
    model.config.max_position_embeddings = 4096
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = rows_for(family)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m, "tools": json.dumps(tools) if tools else None}) + "\n"
                            for m, _, tools in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": str(model_dir), "data": {"train": str(data)}, "method": {"name": "sft"},
        "training": {"max_steps": 1, "learning_rate": 0.0, "per_device_train_batch_size": len(rows),
                     "logging_steps": 1, "save_strategy": "no", "max_length": 4096, "disable_tqdm": True},
        "report": False, "output_dir": str(tmp_path / "run"), "seed": 0}))
    assert main(["train", str(recipe)]) == 0
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    want = independent_nll(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tok, rows)
    assert math.isclose(logged["loss"], want, rel_tol=1e-4), (logged["loss"], want)
