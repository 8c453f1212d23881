"""Speculative decoding in our loop (speculative.py): `generate(assistant_model=...)` and prompt lookup give exactly
greedy decoding's tokens (dense and MoE targets, drafts that agree always, sometimes or never, batches with left
padding, eos and the length limit inside a drafted run), sampled speculation follows the target's distribution,
and neither HF's assisted loop nor a recompile runs."""

import logging

import pytest
import torch
from transformers.generation.utils import GenerationMixin

from qwen3_accel.configs import build_model, get_config
from qwen3_accel.speculative import MAX_DRAFT_TOKENS, accept_sampled, drafted_tokens

from conftest import CollectStreamer, left_padded_batch, model_pair

GREEDY = dict(do_sample=False, pad_token_id=0)


def _noisy_copy(model, scale: float, seed: int = 1):
    """A draft with the model's weights plus noise on its LM head (`scale` times its spread): it agrees with the
    model on some tokens."""
    draft = build_model(get_config("tiny-moe" if "Moe" in type(model).__name__ else "tiny"), seed=seed)
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = draft.lm_head.weight
        weight.add_(scale * weight.std() * torch.randn(weight.shape, generator=g))
    return draft


def _assistant(model, k: int, confidence: float = 0.0):
    """`model` set to draft k tokens a round; confidence 0 turns off HF's early stop on the assistant's confidence
    (on by default at 0.4, where random tiny models, never confident, would draft one token a round)."""
    model.generation_config.num_assistant_tokens = k
    model.generation_config.assistant_confidence_threshold = confidence
    return model


@pytest.fixture(scope="module")
def dense():
    return model_pair("tiny", compile=False)


@pytest.fixture(scope="module")
def moe():
    return model_pair("tiny-moe", compile=False)


def _hf_assisted_calls(monkeypatch) -> list:
    calls = []
    original = GenerationMixin._assisted_decoding

    def counted(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "_assisted_decoding", counted)
    return calls


def _eos_inside_a_run(reference, ids, mask, new_tokens: int) -> int:
    """A token the greedy output of row 0 emits a few tokens in (an eos inside a drafted run)."""
    out = reference.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None, **GREEDY)
    return int(out[0, ids.shape[1] + 3])


DRAFTS = {
    "itself": lambda model: model,  # every draft kept
    "same weights": lambda model: _noisy_copy(model, 0.0),
    "noisy copy": lambda model: _noisy_copy(model, 0.5),  # some kept
    "other seed": lambda model: build_model("tiny", seed=5),  # almost none kept
    "smaller": lambda model: build_model(get_config("tiny", num_hidden_layers=1, hidden_size=32, head_dim=16,
                                                    intermediate_size=64), seed=3),
}


@pytest.mark.parametrize("draft", sorted(DRAFTS))
@pytest.mark.parametrize("lengths", [[7], [5, 12, 3], [9, 1, 4, 6]])
def test_assistant_greedy_equals_greedy_decoding(dense, draft, lengths, monkeypatch):
    reference, optimized = dense
    assistant = _assistant(DRAFTS[draft](optimized), 3)
    calls = _hf_assisted_calls(monkeypatch)
    ids, mask = left_padded_batch(lengths, 512, seed=len(lengths))
    drafted = accepted = 0
    for kwargs in (dict(max_new_tokens=17, eos_token_id=None), dict(max_length=ids.shape[1] + 9, eos_token_id=None),
                   dict(max_new_tokens=20, eos_token_id=_eos_inside_a_run(reference, ids, mask, 20))):
        want = reference.generate(ids, attention_mask=mask, **kwargs, **GREEDY)
        got = optimized.generate(ids, attention_mask=mask, assistant_model=assistant, **kwargs, **GREEDY)
        assert torch.equal(got, want), kwargs
        stats = optimized.qwen3_accel.runner.speculators["assistant"].stats
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert calls == [], "HF's assisted-decoding loop ran"
    if draft in ("itself", "same weights"):
        assert accepted == drafted > 0
    if draft == "noisy copy":
        assert 0 < accepted < drafted


@pytest.mark.parametrize("lengths", [[6], [4, 10]])
def test_moe_target_greedy_equals_greedy_decoding(moe, lengths):
    reference, optimized = moe
    ids, mask = left_padded_batch(lengths, 512, seed=3)
    for assistant in (optimized, build_model("tiny", seed=2)):  # itself, and a dense draft of the same vocabulary
        _assistant(assistant, 4)
        kwargs = dict(attention_mask=mask, max_new_tokens=15, eos_token_id=None, **GREEDY)
        assert torch.equal(optimized.generate(ids, assistant_model=assistant, **kwargs),
                           reference.generate(ids, **kwargs))
    kwargs = dict(attention_mask=mask, max_new_tokens=15, eos_token_id=None, **GREEDY)
    assert torch.equal(optimized.generate(ids, prompt_lookup_num_tokens=3, **kwargs), reference.generate(ids, **kwargs))


def _repetitive(rows: int, length: int, seed: int):
    """Prompts that repeat a short phrase, so that prompt lookup finds its drafts."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(1, 512, (rows, 5), generator=g)
    ids = phrase.repeat(1, -(-length // 5))[:, :length]
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("num_tokens,ngram", [(1, 2), (4, 2), (6, 3), (5, 1)])
def test_prompt_lookup_greedy_equals_greedy_decoding(dense, num_tokens, ngram, monkeypatch):
    reference, optimized = dense
    calls = _hf_assisted_calls(monkeypatch)
    for ids, mask in (_repetitive(1, 23, seed=num_tokens), _repetitive(3, 17, seed=ngram),
                      left_padded_batch([8, 2, 13], 512, seed=num_tokens)):
        eos = _eos_inside_a_run(reference, ids, mask, 18)
        for kwargs in (dict(max_new_tokens=18, eos_token_id=None), dict(max_new_tokens=18, eos_token_id=[eos, 7])):
            want = reference.generate(ids, attention_mask=mask, **kwargs, **GREEDY)
            got = optimized.generate(ids, attention_mask=mask, prompt_lookup_num_tokens=num_tokens,
                                     max_matching_ngram_size=ngram, **kwargs, **GREEDY)
            assert torch.equal(got, want), kwargs
    assert calls == []


def test_prompt_lookup_drafts_from_the_prompt(dense):
    """On a prompt the model continues by repeating it, the drafts (from the prompt) are kept."""
    _, optimized = dense
    ids, mask = _repetitive(1, 30, seed=0)
    out = optimized.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=None, **GREEDY)
    prompt_again = torch.cat([ids, out[:, 30:]], dim=1)  # the model's own continuation, as the new prompt
    optimized.generate(prompt_again, attention_mask=torch.ones_like(prompt_again), max_new_tokens=20,
                       eos_token_id=None, prompt_lookup_num_tokens=5, **GREEDY)
    stats = optimized.qwen3_accel.runner.speculators["lookup"].stats
    assert stats.accepted > stats.drafted // 2, stats


def test_heuristic_schedule_moves_k_and_keeps_it(dense):
    reference, optimized = dense
    ids, mask = left_padded_batch([6, 9], 512, seed=11)
    kwargs = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=None, **GREEDY)
    want = reference.generate(ids, **kwargs)
    agreeing, disagreeing = _noisy_copy(optimized, 0.0), build_model("tiny", seed=9)
    for assistant, grows in ((agreeing, True), (disagreeing, False)):
        _assistant(assistant, 3).generation_config.num_assistant_tokens_schedule = "heuristic"
        assert torch.equal(optimized.generate(ids, assistant_model=assistant, **kwargs), want)
        k = assistant.generation_config.num_assistant_tokens  # kept for the next call, as HF keeps it
        assert (k > 3) if grows else (k < 3), k
    assert [drafted_tokens(k, "heuristic") for k in (1, 3, 5, 100)] == [1, 4, 8, MAX_DRAFT_TOKENS]


def test_rounds_stop_where_the_assistant_is_not_confident(dense):
    """HF's assistant_confidence_threshold (default 0.4): a round ends after a draft the assistant gave less
    probability; a random tiny model never reaches it (one draft a round), the same one with a sharpened LM head
    does (several); off, every round drafts k. The tokens are greedy decoding's in each case."""
    reference, optimized = dense
    ids, mask = left_padded_batch([7], 512, seed=12)
    kwargs = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=None, **GREEDY)
    want = reference.generate(ids, **kwargs)
    unsure, sure = _noisy_copy(optimized, 0.0), _noisy_copy(optimized, 0.0)
    with torch.no_grad():
        sure.lm_head.weight.mul_(300)
    drafts_per_round = {}
    for name, assistant, confidence in (("unsure", unsure, 0.4), ("sure", sure, 0.4), ("off", unsure, 0.0)):
        _assistant(assistant, 6, confidence)
        assert torch.equal(optimized.generate(ids, assistant_model=assistant, **kwargs), want), name
        stats = optimized.qwen3_accel.runner.speculators["assistant"].stats
        drafts_per_round[name] = stats.drafted / stats.rounds
    assert drafts_per_round["unsure"] == 1 and drafts_per_round["off"] == 6, drafts_per_round
    assert drafts_per_round["sure"] > 1.5, drafts_per_round
    _assistant(unsure, 6, None)  # unset: HF's default applies
    optimized.generate(ids, assistant_model=unsure, **kwargs)
    stats = optimized.qwen3_accel.runner.speculators["assistant"].stats
    assert stats.drafted == stats.rounds


def test_streamer_receives_the_generated_tokens(dense):
    reference, optimized = dense
    ids, mask = left_padded_batch([7], 512, seed=4)
    streamer = CollectStreamer()
    assistant = _assistant(_noisy_copy(optimized, 0.5), 3)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=None, **GREEDY)
    out = optimized.generate(ids, assistant_model=assistant, streamer=streamer, **kwargs)
    assert torch.equal(out, reference.generate(ids, **kwargs))
    streamed = torch.cat([chunk.reshape(-1) for chunk in streamer.chunks])
    assert torch.equal(streamed, out[0]) and streamer.ended


def test_what_the_loop_does_not_implement_goes_to_hfs_assisted_loop(dense, monkeypatch, caplog):
    reference, optimized = dense
    calls = _hf_assisted_calls(monkeypatch)
    ids, mask = left_padded_batch([6], 512, seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=None, **GREEDY)
    other_vocabulary = build_model("tiny-tied", seed=1)
    with caplog.at_level(logging.DEBUG, logger="qwen3_accel"):
        with pytest.raises(ValueError):  # HF refuses an assistant of another vocabulary without tokenizers
            optimized.generate(ids, assistant_model=other_vocabulary, **kwargs)
    assert "another vocabulary" in caplog.text
    assert calls == [] and not hasattr(other_vocabulary, "qwen3_accel")
    caplog.clear()
    assistant = build_model("tiny", seed=1)
    with caplog.at_level(logging.DEBUG, logger="qwen3_accel"):
        out = optimized.generate(ids, assistant_model=assistant, repetition_penalty=1.3, **kwargs)
    assert "repetition_penalty" in caplog.text and calls == ["Qwen3ForCausalLM"]  # the spy sees HF's loop
    assert torch.equal(out, reference.generate(ids, repetition_penalty=1.3, **kwargs))
    with caplog.at_level(logging.INFO, logger="qwen3_accel"):
        out = optimized.generate(ids, prompt_lookup_num_tokens=3, max_matching_ngram_size=9, **kwargs)
    assert "max_matching_ngram_size above 8" in caplog.text and len(calls) == 2
    assert torch.equal(out, reference.generate(ids, **kwargs))


def test_speculative_sampling_rule_keeps_the_target_distribution():
    """accept_sampled on drafts drawn from q: the first and second emitted tokens follow p (chi-square)."""
    torch.manual_seed(0)
    rows, vocab = 60_000, 6
    p = torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.1, 0.0], [0.05, 0.05, 0.3, 0.3, 0.2, 0.1],
                      [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]]).expand(rows, -1, -1)
    q = torch.tensor([[0.1, 0.1, 0.5, 0.1, 0.1, 0.1], [0.3, 0.0, 0.3, 0.2, 0.1, 0.1]]).expand(rows, -1, -1)
    drafts = torch.stack([torch.multinomial(q[0, i], rows, replacement=True) for i in range(2)], dim=1)
    accepted, bonus = accept_sampled(p, q, drafts)
    new = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, accepted[:, None], bonus[:, None])
    assert 0 < int((accepted == 0).sum()) < rows and int((accepted == 2).sum()) > 0
    for position, picked in ((0, new[:, 0]), (1, new[accepted >= 1, 1])):
        expected = p[0, position]
        counts = torch.bincount(picked, minlength=vocab).double()
        assert (counts[expected == 0] == 0).all()
        kept = expected > 0
        n = counts.sum()
        chi2 = ((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum().item()
        dof = int(kept.sum()) - 1
        assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10, (position, chi2)


def test_a_round_cut_short_draws_its_last_token_from_the_target():
    """A verify step wider than the round's drafts (the confidence stop): past them q holds an earlier round's
    probabilities, which must not enter the residual; after the real drafts the token follows p (chi-square)."""
    torch.manual_seed(1)
    rows = 40_000
    p = torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.2, 0.8]]).expand(rows, -1, -1)
    q = torch.tensor([[0.3, 0.7], [1.0, 0.0]]).expand(rows, -1, -1)  # position 1: stale, not a draft
    drafts = torch.stack([torch.multinomial(q[0, 0], rows, replacement=True), torch.zeros(rows, dtype=torch.long)], 1)
    real = torch.tensor([[True, False]])
    accepted, bonus = accept_sampled(p, q, drafts, real)
    assert int(accepted.max()) == 1 and bool((accepted == 1).all())  # p == q at the real draft: always kept
    counts = torch.bincount(bonus, minlength=2).double()
    chi2 = ((counts - rows * p[0, 1]) ** 2 / (rows * p[0, 1])).sum().item()
    assert chi2 < 1 + 6 * 2 ** 0.5 + 10, counts


@pytest.mark.parametrize("drafter", ["assistant", "prompt lookup"])
def test_sampled_speculation_matches_the_targets_sampling(drafter):
    """Tokens 1-3 of 2,048 sampled continuations with and without speculation: a two-sample chi-square test per
    position over the tokens both saw. The LM head is scaled up so that the target's distributions are peaked and
    the draft's differ from them (random tiny models are near uniform, where any acceptance rule looks right)."""
    _, optimized = model_pair("tiny", compile=False)
    with torch.no_grad():
        optimized.lm_head.weight.mul_(40)
    prompt = _repetitive(1, 12, seed=6)[0].expand(64, -1)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, eos_token_id=None, do_sample=True,
                  temperature=1.0, top_k=8, pad_token_id=0)
    spec = dict(prompt_lookup_num_tokens=3) if drafter == "prompt lookup" else dict(
        assistant_model=_noisy_copy(optimized, 0.2))
    if "assistant_model" in spec:
        _assistant(spec["assistant_model"], 3)
    torch.manual_seed(0)
    plain = torch.cat([optimized.generate(prompt, **kwargs)[:, 12:] for _ in range(32)])
    speculated = torch.cat([optimized.generate(prompt, **spec, **kwargs)[:, 12:] for _ in range(32)])
    stats = optimized.qwen3_accel.runner.speculators["lookup" if drafter == "prompt lookup" else "assistant"].stats
    assert 0 < stats.accepted < stats.drafted, stats
    for position in range(1, 4):
        a = torch.bincount(plain[:, position], minlength=512).double()
        b = torch.bincount(speculated[:, position], minlength=512).double()
        seen = (a + b) > 0
        a, b = a[seen], b[seen]
        chi2 = (((a - b) ** 2) / (a + b)).sum().item()  # equal sample sizes
        dof = int(seen.sum()) - 1
        assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10, (position, chi2, dof)


def test_compiled_rounds_replay_without_recompiles():
    """Compiled: varied k and batches give greedy decoding's tokens; each graph key compiles once, none runs eagerly
    after a failure, and repeating the calls compiles nothing (any recompile an error)."""
    reference, optimized = model_pair("tiny")
    assistant = _assistant(_noisy_copy(optimized, 0.5), 3)
    # The largest batch first: the pools only grow, and a growth drops the graphs that read the old ones.
    cases = [([4, 9, 2], 3, None), ([5], 3, None), ([6, 3], 2, None), ([3, 8], None, 4), ([7], None, 4)]

    def run_all():
        for lengths, k, lookup in cases:
            ids, mask = left_padded_batch(lengths, 512, seed=len(lengths))
            kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=None, **GREEDY)
            if k is not None:
                _assistant(assistant, k, confidence=0.4 if k == 3 else 0.0)  # early stops: narrower verify steps
                got = optimized.generate(ids, assistant_model=assistant, **kwargs)
            else:
                got = optimized.generate(ids, prompt_lookup_num_tokens=lookup, **kwargs)
            assert torch.equal(got, reference.generate(ids, **kwargs)), (lengths, k, lookup)
        ids, mask = left_padded_batch([6, 4], 512, seed=9)  # sampled: the draft slots' keys
        sampled = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=None, do_sample=True, top_k=20,
                       pad_token_id=0)
        for k in (2, 3):
            assert optimized.generate(ids, assistant_model=_assistant(assistant, k), **sampled).shape == (2, 16)
        assert optimized.generate(ids, prompt_lookup_num_tokens=3, **sampled).shape == (2, 16)

    run_all()
    speculators = optimized.qwen3_accel.runner.speculators
    steps = [s for spec in speculators.values() for s in (spec.draft_steps, spec.store_steps, spec.verify_steps,
                                                           spec.lookup_steps)]
    keys = {key for s in steps for key in s.compiled}
    assert not any(s.eager_keys for s in steps)
    assert {key[0] for key in keys} == {"spec draft", "spec draft store", "spec verify", "spec lookup"}
    calls = sum(sum(s.calls.values()) for s in steps)
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_all()
    assert {key for s in steps for key in s.compiled} == keys
    assert sum(sum(s.calls.values()) for s in steps) > calls  # the second pass replayed the graphs


def test_bad_speculation_settings_are_clear_errors(dense):
    _, optimized = dense
    ids = torch.randint(1, 512, (1, 5))
    with pytest.raises(ValueError):
        optimized.generate(ids, max_new_tokens=4, prompt_lookup_num_tokens=0, **GREEDY)
    with pytest.raises(ValueError, match="positions"):
        optimized.generate(ids, max_new_tokens=5000, prompt_lookup_num_tokens=2, **GREEDY)


def test_unoptimizable_assistant_leaves_the_request_to_hf(dense, caplog):
    """An assistant we cannot optimize (here: sliding-window attention) is HF's to run."""
    reference, optimized = dense
    assistant = build_model(get_config("tiny", use_sliding_window=True, sliding_window=4, max_window_layers=0))
    ids, mask = left_padded_batch([5], 512, seed=1)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=None, **GREEDY)
    with caplog.at_level(logging.INFO, logger="qwen3_accel"):
        assert torch.equal(optimized.generate(ids, assistant_model=assistant, **kwargs),
                           reference.generate(ids, **kwargs))
    assert "cannot be optimized" in caplog.text
    assert not hasattr(assistant, "qwen3_accel")
