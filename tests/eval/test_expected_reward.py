"""posttrain.eval.expected_reward: the exact probability of sampling the reference answer, batched with padding, equals
a row-by-row product of softmax probabilities; temperature and chat prompts are honoured."""

import math

import torch

from fp32 import assert_fp32_close
from posttrain.eval.expected_reward import answer_probabilities, expected_exact_match


def _by_hand(model, tok, prompt_ids, answer, temperature):
    ids = prompt_ids + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double() / temperature
    total = 0.0
    for t in range(len(prompt_ids), len(ids)):  # P(token t | tokens < t)
        total += torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
    return math.exp(total)


def test_batched_probabilities_equal_row_by_row_products(arith_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    model = AutoModelForCausalLM.from_pretrained(arith_model_dir)
    rows = [{"prompt": "12+7=", "answer": "19"}, {"prompt": "3+25=", "answer": 28}, {"prompt": "30+30=", "answer": "5"}]
    for temperature in (1.0, 0.7):
        got = answer_probabilities(model, tok, rows, temperature=temperature, batch_size=2)  # two batches, padded
        want = [_by_hand(model, tok, tok(r["prompt"])["input_ids"], str(r["answer"]), temperature) for r in rows]
        assert_fp32_close(got, want, scale=1.0, reductions=1024, msg=f"T={temperature}")
        assert got[0] > 0.5 > got[2]  # the trained model knows 12+7 and does not think 30+30 is 5
    assert expected_exact_match(model, tok, rows) == sum(answer_probabilities(model, tok, rows)) / 3


def test_conversational_prompts_go_through_the_chat_template(arith_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(arith_model_dir)
    model = AutoModelForCausalLM.from_pretrained(arith_model_dir)
    messages = [{"role": "user", "content": "12+7="}]
    [got] = answer_probabilities(model, tok, [{"prompt": messages, "answer": "19"}])
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert_fp32_close(got, _by_hand(model, tok, tok(text, add_special_tokens=False)["input_ids"], "19", 1.0),
                      scale=1.0, reductions=1024)
