"""The transformers adapter: a tiny random Llama (built from a config, nothing downloaded)
with its attention run through a pattern.

References are transformers' own SDPA attention: its causal mask for `causal`, no mask for
`full` in a model made bidirectional, and an explicit 4D sink+window mask, one full
forward per generated token, for `streaming`. float64 runs the dense reference of
sparsedsl (exact); one float32 case runs the generated kernels on Triton's interpreter.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sparsedsl
from sparsedsl import InputError

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("sparsedsl.integrations.transformers")

SINKS, WINDOW = 2, 4
PROMPT, NEW = 8, 10  # prompt + new tokens well past sinks + window: the window drops keys


def tiny_config(**overrides) -> transformers.LlamaConfig:
    settings = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=128,
        # Larger than the default 0.02: sharp attention, so that what each query sees
        # changes the logits by much more than the tolerances.
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=None,
    )
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def tiny_model(name: str, dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(**overrides), attn_implementation=name)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def names():
    """The adapter's implementations, registered once for this file."""
    registered = {
        "causal": hf.register(sparsedsl.load("causal"), "sparsedsl_test_causal"),
        "full": hf.register(sparsedsl.compile_source("pattern full() { return full }"), "sparsedsl_test_full"),
        "streaming": hf.register(sparsedsl.load("streaming", sinks=SINKS, window=WINDOW), "sparsedsl_test_streaming"),
    }
    yield registered
    for name in registered.values():
        hf.unregister(name)


def logits_with(model, implementation: str, input_ids, **kwargs) -> torch.Tensor:
    """The model's logits under another attention implementation (switched back after)."""
    own = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(input_ids, **kwargs).logits
    finally:
        model.set_attn_implementation(own)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, new: int, **generate_keywords):
    with torch.no_grad():
        out = model.generate(
            input_ids, max_new_tokens=new, do_sample=False, output_scores=True, return_dict_in_generate=True,
            **generate_keywords,
        )
    return out.sequences, torch.stack(out.scores, 1)


# ---------------------------------------------------------------- causal and full
def test_causal_pattern_matches_sdpa(names):
    model = tiny_model(names["causal"])
    ids = tokens(2, 16)
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours, logits_with(model, "sdpa", ids), atol=1e-10, rtol=0)
    # The layer's own scaling reaches the pattern (Llama's is head_dim ** -0.5, the
    # pattern's default too; other models differ).
    for layer in model.model.layers:
        layer.self_attn.scaling = 0.6
    with torch.no_grad():
        rescaled = model(ids).logits
    torch.testing.assert_close(rescaled, logits_with(model, "sdpa", ids), atol=1e-10, rtol=0)
    assert (rescaled - ours).abs().max() > 1e-2


def test_causal_pattern_with_a_cache_matches_sdpa(names):
    """Later chunks attend to the cached keys (Lq < Lk): a prefix, then 3 tokens at once,
    then 1, as the rows of one SDPA forward over the whole sequence."""
    model = tiny_model(names["causal"])
    ids = tokens(2, 14)
    expected = logits_with(model, "sdpa", ids)
    cache = transformers.DynamicCache(config=model.config)
    pieces = []
    with torch.no_grad():
        for lo, hi in ((0, 10), (10, 13), (13, 14)):
            pieces.append(model(ids[:, lo:hi], past_key_values=cache, use_cache=True).logits)
    # RoPE computes its angles in float32, a last bit apart between call shapes.
    torch.testing.assert_close(torch.cat(pieces, 1), expected, atol=1e-6, rtol=0)


def test_causal_pattern_generates_as_sdpa(names):
    model = tiny_model(names["causal"])
    ids = tokens(1, PROMPT)
    ours, our_scores = greedy(model, ids, NEW)
    model.set_attn_implementation("sdpa")
    theirs, their_scores = greedy(model, ids, NEW)
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(our_scores, their_scores, atol=1e-5, rtol=0)  # generate() keeps float32 scores


def test_full_pattern_matches_bidirectional_sdpa(names):
    """`full` is attention without a mask: the model's own SDPA once the model is made
    bidirectional (config.is_causal = False), and clearly not the causal model."""
    model = tiny_model(names["full"], is_causal=False)
    ids = tokens(2, 12)
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours, logits_with(model, "sdpa", ids), atol=1e-10, rtol=0)
    model.config.is_causal = True
    assert (ours - logits_with(model, "sdpa", ids)).abs().max() > 1e-2


def test_full_pattern_in_a_causal_model_raises(names):
    model = tiny_model(names["full"])
    with pytest.raises(InputError, match=r"model is causal but the pattern lets queries see later keys \(branch `full`\)"):
        model(tokens(1, 8))


# ---------------------------------------------------------------- sink + window
def streaming_mask(length: int) -> torch.Tensor:
    """The sink+window mask written out for SDPA: (1, 1, L, L), True where a query sees a key."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return ((j <= i) & ((j < SINKS) | (i - j < WINDOW)))[None, None]


def greedy_with_dense_mask(model, input_ids, new: int):
    """Greedy decoding by one full SDPA forward per token under the explicit sink+window
    mask: no cache, nothing of sparsedsl."""
    model.set_attn_implementation("sdpa")
    ids, scores = input_ids, []
    with torch.no_grad():
        for _ in range(new):
            last = model(ids, attention_mask=streaming_mask(ids.shape[1])).logits[:, -1]
            scores.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(scores, 1)


def test_streaming_generation_matches_the_dense_mask(names):
    model = tiny_model(names["streaming"])
    ids = tokens(1, PROMPT)
    ours, our_scores = greedy(model, ids, NEW)
    expected, expected_scores = greedy_with_dense_mask(model, ids, NEW)
    assert torch.equal(ours, expected)
    torch.testing.assert_close(our_scores, expected_scores.float(), atol=1e-5, rtol=0)  # generate() keeps float32 scores
    # The window is at work: plain causal attention scores these tokens otherwise.
    causal_scores = logits_with(model, "sdpa", ours)[:, PROMPT - 1 : -1].float()
    assert (our_scores - causal_scores).abs().max() > 1e-2


def test_float32_kernels_match_sdpa(names):
    """float32 on the CPU runs the generated kernels (Triton's interpreter, see conftest)."""
    ids = tokens(2, 24)
    model = tiny_model(names["causal"], dtype=torch.float32)
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours, logits_with(model, "sdpa", ids), atol=1e-4, rtol=0)
    model.set_attn_implementation(names["streaming"])
    with torch.no_grad():
        ours = model(ids).logits
    expected = logits_with(model, "sdpa", ids, attention_mask=streaming_mask(24))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- padding
def test_right_padding_matches_sdpa_on_real_tokens(names):
    model = tiny_model(names["streaming"])
    ids = tokens(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
    model.set_attn_implementation(names["causal"])
    with torch.no_grad():
        causal = model(ids, attention_mask=mask).logits
    # A causal pattern keeps real queries off the padding on their right.
    expected = logits_with(model, "sdpa", ids, attention_mask=mask)
    torch.testing.assert_close(causal[0], expected[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(causal[1, :7], expected[1, :7], atol=1e-10, rtol=0)
    streaming = logits_with(model, "sdpa", ids, attention_mask=streaming_mask(12))
    torch.testing.assert_close(ours[1, :7], streaming[1, :7], atol=1e-10, rtol=0)


@pytest.mark.parametrize("pad", ["left", "right then generate"])
def test_padding_before_real_tokens_raises(names, pad):
    model = tiny_model(names["streaming"])
    ids = tokens(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    if pad == "left":
        mask[1, :3] = 0
    else:
        mask[1, 5:] = 0
    with pytest.raises(InputError, match="row 1 of attention_mask has real tokens after padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


# ---------------------------------------------------------------- generation through the cache
def left_padded(pads: list[int], length: int = PROMPT):
    """Prompts of ``length - pad`` tokens each, padded on the left, and their attention mask."""
    ids = tokens(len(pads), length)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def test_generation_cache_serves_left_padding_as_sdpa(names):
    """generate() of left-padded prompts of different lengths through sparsedsl's cache
    (prefill, then one step per token) gives SDPA's tokens and scores."""
    model = tiny_model(names["causal"])
    ids, mask = left_padded([0, 3])
    ours, our_scores = greedy(model, ids, NEW, attention_mask=mask, cache=hf.generation_cache(model, 32))
    model.set_attn_implementation("sdpa")
    theirs, their_scores = greedy(model, ids, NEW, attention_mask=mask)
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(our_scores, their_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generation_cache_rows_match_each_prompt_alone(names, dtype, monkeypatch):
    """streaming through the cache, left-padded: every row generates what its prompt alone
    does under the explicit sink+window mask. float32 runs the decode kernels (on Triton's
    interpreter); each step after the prefill is one device-only decode step."""
    from sparsedsl.serving import generation

    real_step, steps = generation.decode_step, []

    def counted_step(pattern, cache, q, *rest):
        steps.append(q.shape[2])
        return real_step(pattern, cache, q, *rest)

    monkeypatch.setattr(generation, "decode_step", counted_step)
    model = tiny_model(names["streaming"], dtype=dtype)
    pads, new = [0, 3], NEW if dtype == torch.float64 else 4
    ids, mask = left_padded(pads)
    ours, our_scores = greedy(model, ids, new, attention_mask=mask, cache=hf.generation_cache(model, 32))
    for row, pad in enumerate(pads):
        alone, alone_scores = greedy_with_dense_mask(model, ids[row : row + 1, pad:], new)
        assert torch.equal(ours[row, PROMPT:], alone[0, PROMPT - pad :])
        torch.testing.assert_close(our_scores[row], alone_scores[0].float(), atol=1e-5 if dtype == torch.float64 else 1e-3, rtol=0)
    if dtype == torch.float32:  # the decode kernels ran every step after the prefill, in both layers
        assert steps.count(1) == 2 * (new - 1)


def test_generation_cache_refuses_what_it_cannot_serve(names):
    model = tiny_model(names["causal"])
    ids, mask = left_padded([0, 3])
    right = mask.flip(1)
    with pytest.raises(InputError, match=r"with sparsedsl's generation cache, padding must come before each row's real tokens"):
        model(ids, attention_mask=right, cache=hf.generation_cache(model, 32), use_cache=True)
    with pytest.raises(InputError, match=r"row 0 holds 0 of 4 positions and cannot take 8 more; allocate a larger cache \(capacity=\)"):
        greedy(model, ids, NEW, attention_mask=mask, cache=hf.generation_cache(model, 4))
    with pytest.raises(InputError, match=r"generation_cache: `capacity` must be a positive integer \(prompt \+ new tokens\), got 0"):
        hf.generation_cache(model, 0)
    with pytest.raises(InputError, match=r"does not reorder rows \(beam search\): use num_beams=1"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False,
                       cache=hf.generation_cache(model, 32))  # fmt: skip


def test_padding_with_a_non_causal_pattern_raises(names):
    model = tiny_model(names["full"], is_causal=False)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    with pytest.raises(InputError, match="attention_mask has padding, which the pattern would let queries see"):
        model(tokens(2, 8), attention_mask=mask)


# ---------------------------------------------------------------- what raises
def test_unsupported_model_features_raise(names):
    model = tiny_model(names["causal"])
    ids = tokens(1, 8)
    with pytest.raises(InputError, match="cannot apply a prepared \\(4D\\) mask"):
        model(ids, attention_mask=streaming_mask(8))
    with pytest.raises(InputError, match="use the default DynamicCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")
    dropping = tiny_model(names["causal"], attention_dropout=0.1).train()
    with pytest.raises(InputError, match=r"attention dropout \(0.1\) is not supported"):
        dropping(ids)
    sliding = tiny_model(names["causal"])
    sliding.config.sliding_window = 4  # as Mistral-style configs do
    with pytest.raises(InputError, match="not plain causal or bidirectional"):
        transformers.masking_utils.create_sliding_window_causal_mask(
            config=sliding.config, inputs_embeds=torch.zeros(1, 8, 64), attention_mask=None, past_key_values=None
        )


def test_register_checks_its_arguments():
    causal = sparsedsl.load("causal")
    with pytest.raises(TypeError, match="`pattern` must be a sparsedsl.Pattern"):
        hf.register("causal", "sparsedsl_x")
    with pytest.raises(TypeError, match="`name` must be a string"):
        hf.register(causal, 3)
    for bad in ("", "org/repo", "paged|x", "has space"):
        with pytest.raises(ValueError, match="`name` .* must be letters, digits"):
            hf.register(causal, bad)
    for taken in ("sdpa", "eager", "my_flash_attention", "flex_like", "Paged"):
        with pytest.raises(ValueError, match="has a meaning of its own in transformers"):
            hf.register(causal, taken)
    with pytest.raises(ValueError, match="`pattern` nsa mixes branches with gate"):
        hf.register(sparsedsl.load("nsa"), "sparsedsl_nsa")
    with pytest.raises(ValueError, match="`pattern` document uses `document`"):
        hf.register(sparsedsl.load("document"), "sparsedsl_document")
    with pytest.raises(ValueError, match="not an attention implementation registered by sparsedsl"):
        hf.unregister("sdpa")


def test_register_and_unregister():
    name = hf.register(sparsedsl.load("causal"), "sparsedsl_test_temporary")
    assert name in transformers.AttentionInterface()
    model = tiny_model(name)
    model(tokens(1, 4))
    hf.register(sparsedsl.load("streaming"), name)  # a name of ours may take another pattern
    assert transformers.AttentionInterface()[name].pattern.name == "streaming"
    hf.unregister(name)
    assert name not in transformers.AttentionInterface()
    with pytest.raises(ValueError, match="is not supported"):
        tiny_model(name)


def test_import_sparsedsl_does_not_import_transformers():
    code = "import sys, sparsedsl, sparsedsl.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
