"""Chunked log-probabilities and entropy (e3.train.logprobs) equal the whole-logits ones, gradients included."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from e3.core.policy_loss import token_entropy, token_logprobs
from e3.train.logprobs import sequence_logprobs_and_entropy

SIZES = dict(vocab_size=23, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


def tiny_llama(tied: bool = False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=tied))


def tiny_qwen2():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SIZES))
    with torch.no_grad():  # transformers starts the q/k/v biases at 0: give them a part to play
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


MODELS = {"llama": tiny_llama, "llama-tied": lambda: tiny_llama(tied=True), "qwen2": tiny_qwen2}


def padded_batch():
    """Three right-padded sequences of lengths 9, 5 and 7, each with its own temperature."""
    generator = torch.Generator().manual_seed(1)
    lengths = [9, 5, 7]
    input_ids = torch.zeros((3, 9), dtype=torch.long)
    attention = torch.zeros((3, 9), dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(1, SIZES["vocab_size"], (n,), generator=generator)
        attention[i, :n] = 1
    return input_ids, attention, torch.tensor([1.0, 0.6, 1.7])


def reference(model, input_ids, attention, temperatures):
    """The whole micro-batch's logits from the model's own forward pass, reduced by e3.core.policy_loss."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    return token_logprobs(logits, input_ids[:, 1:], temperatures), token_entropy(logits, temperatures)


def weighted_sum(logprobs, real):
    # Different weights per position, so a gradient sent to the wrong position shows.
    weights = torch.linspace(-1.0, 2.0, real.numel()).reshape(real.shape)
    return (logprobs * weights * real).sum()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunk", [1, 3, 7, 1024, None])
def test_chunked_logprobs_entropy_and_gradients_equal_the_whole_logits_ones(name, chunk):
    input_ids, attention, temperatures = padded_batch()
    real = attention[:, 1:].float()

    model = MODELS[name]()
    ref_lp, ref_ent = reference(model, input_ids, attention, temperatures)
    weighted_sum(ref_lp, real).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    lp, ent = sequence_logprobs_and_entropy(model, input_ids, attention, temperatures, chunk_tokens=chunk)
    weighted_sum(lp, real).backward()

    assert not ent.requires_grad
    assert torch.allclose(lp * real, ref_lp * real, atol=1e-5, rtol=0)
    assert torch.allclose(ent * real, ref_ent * real, atol=1e-5, rtol=0)
    assert bool((lp[real == 0] == 0).all()) and bool((ent[real == 0] == 0).all())  # padding positions
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-5, rtol=0), n


def test_without_grad_mode_nothing_is_kept_for_a_backward_pass():
    input_ids, attention, temperatures = padded_batch()
    with torch.no_grad():
        lp, ent = sequence_logprobs_and_entropy(tiny_llama(), input_ids, attention, temperatures, chunk_tokens=4)
    assert not lp.requires_grad and not ent.requires_grad


def test_each_sample_is_scaled_by_its_own_temperature():
    input_ids, attention, _ = padded_batch()
    model = tiny_llama()
    with torch.no_grad():
        mixed, _ = sequence_logprobs_and_entropy(model, input_ids, attention, torch.tensor([1.0, 0.5, 2.0]))
        for i, t in enumerate((1.0, 0.5, 2.0)):
            alone, _ = sequence_logprobs_and_entropy(model, input_ids, attention, torch.full((3,), t))
            assert torch.allclose(mixed[i], alone[i], atol=1e-6)


def test_bad_inputs_and_models_whose_logits_are_not_lm_head_are_refused():
    input_ids, attention, temperatures = padded_batch()
    model = tiny_llama()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sequence_logprobs_and_entropy(model, input_ids, attention, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="chunk_tokens"):
        sequence_logprobs_and_entropy(model, input_ids, attention, temperatures, chunk_tokens=0)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        sequence_logprobs_and_entropy(model, input_ids, attention, temperatures)
