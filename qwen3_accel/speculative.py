"""Speculative decoding inside our loop: `generate(assistant_model=draft)` and `prompt_lookup_num_tokens=k`.

A round, all on the device, one host sync at its end:

  draft     k tokens per row: k one-token steps of the assistant (HF's confidence threshold may end the round
            after fewer), or an n-gram match in the row's own tokens (prompt lookup, HF's rule: the earliest
            earlier occurrence of the last n tokens, longest n first)
  verify    one target step over the k + 1 tokens [last, d1 .. dk] of every row
  accept    greedy: the longest prefix of drafts equal to the target's argmax, then the target's token after it;
            sampling: draft i kept with probability min(1, p(d)/q(d)), the first rejected one replaced by a draw
            from max(p - q, 0) (or from p after k kept drafts), so the output follows the target's distribution
            exactly (Leviathan et al. 2023); prompt lookup is the case q = one-hot
  advance   each row by its own count, cut at an eos and at max_new_tokens; rejected positions are forgotten by
            moving the row's length back, nothing is copied. When a running row kept every draft, the assistant
            has not seen the last one yet: one more assistant step stores its keys before the next round.

Rows sit at different positions after a round, so both models keep their KV in a paged layout where row r owns a
fixed run of blocks (`RowPool`): the continuous-batching engine's kernels (paged store, decode and prefill
attention) serve it, with per-row lengths as device tensors. Graph keys (one compiled step each, bounded):
("spec draft", rows, blocks per row, draft slots, do_sample) for the assistant's step, replayed k times a round, and
("spec draft store", rows, blocks per row) for the step after a round whose drafts were all kept;
("spec lookup", rows, blocks per row, k, n) and ("spec verify", rows, blocks per row, draft slots, k, do_sample,
lookup), draft slots sizing the assistant's probabilities (sampling only). k is
HF's `num_assistant_tokens` (assistant's generation config, default 20) or `prompt_lookup_num_tokens`; under HF's
"heuristic" schedules (+2 after a round whose drafts were all kept, else -1) the drafted k is rounded up to a power
of two up to MAX_DRAFT_TOKENS, so at most six verify graphs; a round the confidence threshold cut short verifies
the smallest power of two at or above its drafts, at most k (`verify_width`).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .cache import CacheLayout, next_power_of_two
from .decoder import PagedBatch
from .fast_generate import EOS_SLOTS, FastRequest, Sampling, draw, select_tokens, warped_probs
from .graphs import CompiledSteps, outside_inference_mode

if TYPE_CHECKING:
    from .runner import ModelRunner

BLOCK_SIZE = 16  # token slots per KV block (the paged kernels' tested sizes are 16 and 64)
MAX_DRAFT_TOKENS = 32  # drafts per round under the heuristic schedules (HF's grows without bound)
SCHEDULES = ("constant", "heuristic", "heuristic_transient")
# HF's defaults for an assistant's generation config (GenerationConfig._get_default_generation_params) and for
# prompt lookup's n-gram (PromptLookupCandidateGenerator), where a setting is left unset.
HF_DRAFT_TOKENS, HF_SCHEDULE, HF_CONFIDENCE, HF_LOOKUP_NGRAM = 20, "constant", 0.4, 2


def assistant_settings(config) -> tuple[int, str, float]:
    """(k, schedule, confidence threshold) an assistant's generation config asks for, HF's defaults filled in."""
    k, schedule, threshold = (config.num_assistant_tokens, config.num_assistant_tokens_schedule,
                              config.assistant_confidence_threshold)
    return (HF_DRAFT_TOKENS if k is None else k, schedule or HF_SCHEDULE,
            HF_CONFIDENCE if threshold is None else threshold)


@dataclass(frozen=True)
class Drafter:
    """Where a request's drafts come from: an assistant model's runner, or prompt lookup (runner None)."""

    runner: "ModelRunner | None"
    num_tokens: int  # k of the first round
    schedule: str = "constant"
    max_ngram: int = 2  # prompt lookup: the longest n-gram matched
    confidence: float = 0.0  # a round's drafting stops after a draft the assistant gave less probability (0: off)
    assistant: Any = None  # the assistant model (its generation config keeps a "heuristic" k across calls)

    @property
    def max_tokens(self) -> int:
        """The largest k a round of this request may draft."""
        return self.num_tokens if self.schedule == "constant" else MAX_DRAFT_TOKENS


@dataclass
class SpeculationStats:
    """What the last speculative call did (for benchmarks and tests): rounds, drafted and kept draft tokens."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def drafted_tokens(k: int, schedule: str) -> int:
    """The k a round drafts for HF's requested k: itself under "constant", else the next power of two (capped)."""
    if schedule == "constant":
        return k
    return min(MAX_DRAFT_TOKENS, next_power_of_two(max(1, k)))


def verify_width(drafted: int, k: int) -> int:
    """The drafts one verify step takes when a round stopped after `drafted` of its `k` (the assistant was not
    confident): k, or the smallest power of two at or above `drafted` when that is less, so that such rounds add
    at most log2(k) graphs."""
    return k if drafted == k else min(k, next_power_of_two(drafted))


class RowPool:
    """Paged keys and values, per layer [rows * blocks_per_row, BLOCK_SIZE, kv_heads, head_dim], where row r owns
    blocks [r * blocks_per_row, (r + 1) * blocks_per_row): the paged kernels read it through a fixed block table."""

    def __init__(self, layout: CacheLayout, rows: int, blocks_per_row: int):
        self.rows, self.blocks_per_row = rows, blocks_per_row
        shape = (rows * blocks_per_row, BLOCK_SIZE, layout.num_kv_heads, layout.head_dim)
        with outside_inference_mode():
            self.keys = [torch.zeros(shape, dtype=layout.dtype, device=layout.device) for _ in
                         range(layout.num_layers)]
            self.values = [torch.zeros(shape, dtype=layout.dtype, device=layout.device) for _ in
                           range(layout.num_layers)]
        for t in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(t)


class SpeculativeState:
    """The loop's device buffers for a bucket of rows: every row's tokens, length, count, flags; the drafts'
    probabilities (sampling with an assistant); the request's settings as device tensors."""

    def __init__(self, rows: int, blocks_per_row: int, draft_slots: int, vocab: int, device: torch.device):
        width = blocks_per_row * BLOCK_SIZE
        self.rows, self.width = rows, width
        long = dict(dtype=torch.long, device=device)
        self.tables = torch.arange(rows * blocks_per_row, dtype=torch.int32, device=device).view(rows, -1)
        self.hist = torch.zeros(rows, width, **long)  # each row's prompt (unpadded) and tokens so far
        self.lengths = torch.zeros(rows, **long)  # index of the row's last token = tokens in the KV cache
        self.prompt_lens = torch.zeros(rows, **long)
        self.emitted = torch.zeros(rows, **long)  # tokens generated so far
        self.unfinished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.accepted = torch.zeros(rows, **long)  # drafts kept in the last round
        self.totals = torch.zeros(2, **long)  # drafted, kept (unfinished rows, whole call)
        self.draft_index = torch.zeros(1, **long)  # the assistant's step within the round
        self.drafted = torch.zeros(1, **long)  # this round's drafts (the verify step may take more positions)
        self.confident = torch.zeros(1, dtype=torch.bool, device=device)  # a running row's last draft was
        self.confidence = torch.zeros(1, dtype=torch.float32, device=device)  # ... given at least this probability
        self.draft_probs = torch.zeros(rows, draft_slots, vocab, dtype=torch.float32, device=device) \
            if draft_slots else None
        self.new_tokens = torch.zeros(1, **long)
        self.eos = torch.full((EOS_SLOTS,), -1, **long)
        self.pad = torch.zeros(1, **long)
        self.temperature = torch.ones(1, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(1, **long)
        self.top_p = torch.ones(1, dtype=torch.float32, device=device)
        for t in vars(self).values():
            if isinstance(t, torch.Tensor):
                torch._dynamo.mark_static_address(t)

    def set_request(self, new_tokens: int, eos_ids: list[int], pad: int, sampling: Sampling,
                    confidence: float) -> None:
        self.new_tokens.fill_(new_tokens)
        self.eos.fill_(-1)
        if eos_ids:
            self.eos[: len(eos_ids)] = torch.tensor(eos_ids, device=self.eos.device)
        self.pad.fill_(pad)
        self.temperature.fill_(sampling.temperature)
        self.top_k.fill_(sampling.top_k)
        self.top_p.fill_(sampling.top_p)
        self.confidence.fill_(confidence)

    def begin(self, prompts: list[list[int]], first: torch.Tensor, unfinished: torch.Tensor, pad: int) -> None:
        """A call's prompts (rows past them get a one-token prompt and stay finished) and its first tokens. Every
        buffer is set on every row, whatever earlier calls left."""
        device = self.hist.device
        rows_used = len(prompts)
        lens = [len(p) for p in prompts] + [1] * (self.rows - rows_used)
        self.hist.fill_(pad)
        for row, prompt in enumerate(prompts):
            self.hist[row, : len(prompt)] = torch.tensor(prompt, device=device)
        self.prompt_lens.copy_(torch.tensor(lens, device=device))
        self.lengths.copy_(self.prompt_lens)
        self.hist[torch.arange(rows_used, device=device), self.lengths[:rows_used]] = first[:rows_used]
        self.emitted.zero_()
        self.emitted[:rows_used] = 1
        self.unfinished.zero_()
        self.unfinished[:rows_used] = unfinished[:rows_used]
        self.accepted.zero_()
        self.totals.zero_()


def _slots(tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Flat cache slots [rows, n] of positions [rows, n] through block tables [rows, blocks]."""
    blocks = tables.gather(1, positions // BLOCK_SIZE).long()
    return blocks * BLOCK_SIZE + positions % BLOCK_SIZE


def accept_greedy(logits: torch.Tensor, drafts: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(drafts kept [rows], the token after them [rows]) for target logits [rows, k + 1, V] over drafts [rows, k]
    (`real` [1, k]: which are drafts): the longest prefix equal to the target's argmax, then the target's argmax
    after it."""
    best = logits.argmax(dim=-1)  # [rows, k + 1]
    accepted = ((drafts == best[:, :-1]) & real).long().cumprod(dim=1).sum(dim=1)
    return accepted, best.gather(1, accepted[:, None])[:, 0]


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling: target probabilities p [rows, k + 1, V], the draft's q [rows, k, V] from which drafts
    [rows, k] were drawn (`real` [1, k]: which are drafts; default all). Draft i is kept with probability
    min(1, p_i(d)/q_i(d)) while all before it were; the first rejected one is replaced by a draw from
    max(p_i - q_i, 0), and after k kept drafts one more comes from p_k. Every emitted token then follows p exactly."""
    rows, k = drafts.shape
    real = torch.ones_like(drafts, dtype=torch.bool) if real is None else real
    q = q * real[..., None]  # past the drafts q holds an earlier round's values: zero, so the residual there is p
    p_draft, q_draft = p[:, :k].gather(2, drafts[..., None])[..., 0], q.gather(2, drafts[..., None])[..., 0]
    kept = (torch.rand_like(p_draft) * q_draft < p_draft) & real  # u < p/q, without dividing
    accepted = kept.long().cumprod(dim=1).sum(dim=1)  # [rows]
    residual = torch.cat([(p[:, :k] - q).clamp(min=0), p[:, k:]], dim=1)
    at = accepted.view(rows, 1, 1).expand(rows, 1, p.shape[-1])
    chosen, fallback = residual.gather(1, at)[:, 0], p.gather(1, at)[:, 0]
    chosen = torch.where(chosen.sum(dim=-1, keepdim=True) > 0, chosen, fallback)  # p == q: never rejected
    return accepted, draw(chosen)


class Speculator:
    """Speculative decoding of one target with one kind of drafter (an assistant's runner, or prompt lookup): the
    two pools, the state buckets and the compiled draft, lookup and verify steps."""

    def __init__(self, target: "ModelRunner", draft: "ModelRunner | None"):
        self.target, self.draft = target, draft
        self.pools: dict[str, RowPool] = {}
        self.states: dict[tuple, SpeculativeState] = {}
        self.draft_steps = CompiledSteps(self.draft_step, target.compile)
        self.store_steps = CompiledSteps(self.draft_store, target.compile)
        self.lookup_steps = CompiledSteps(self.lookup_drafts, target.compile)
        self.verify_steps = CompiledSteps(self.verify, target.compile)
        self.stats = SpeculationStats()

    # ------------------------------------------------------------------------------------- buffers
    def buffers(self, batch: int, total_len: int, draft_slots: int, vocab: int):
        """(state, target pool, draft pool or None) for `batch` rows of up to `total_len` tokens. Rows and blocks
        per row are powers of two; a pool too small for a call is replaced (dropping the graphs that read it), so
        the graph keys stay few."""
        rows = next_power_of_two(batch)
        blocks_per_row = next_power_of_two(-(-total_len // BLOCK_SIZE))
        pool = self.pools.get("target")
        if pool is None or rows > pool.rows or blocks_per_row > pool.blocks_per_row:
            # Grown to cover both the old and this call's shape, unless that is more than twice what this call
            # needs (many short rows, then one long one): then this call's own shape.
            size = rows, blocks_per_row
            if pool is not None:
                both = max(rows, pool.rows), max(blocks_per_row, pool.blocks_per_row)
                if both[0] * both[1] <= 2 * rows * blocks_per_row:
                    size = both
            self._drop_graphs()
            self.pools.clear()  # the old tensors go before the new ones are made
            self.pools["target"] = RowPool(self.target.cache.layout, *size)
            if self.draft is not None:
                self.pools["draft"] = RowPool(self.draft.cache.layout, *size)
        target_pool, draft_pool = self.pools["target"], self.pools.get("draft")
        key = (rows, draft_slots, vocab)
        if key not in self.states:
            with outside_inference_mode():
                self.states[key] = SpeculativeState(rows, target_pool.blocks_per_row, draft_slots, vocab,
                                                    self.target.device)
        return self.states[key], target_pool, draft_pool

    def _drop_graphs(self) -> None:
        for steps in (self.draft_steps, self.store_steps, self.lookup_steps, self.verify_steps):
            steps.clear()
        self.states.clear()

    # ------------------------------------------------------------------------------------------ steps
    @staticmethod
    def prefill(runner: "ModelRunner", pool: RowPool, state: SpeculativeState, prompts: list[list[int]]):
        """Every row's prompt through `runner` into its blocks (eager: shapes vary); logits of each last token."""
        device = state.hist.device
        lens = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lens])
        rows = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(lens, device=device))
        tables = state.tables[: len(prompts)]
        slots = _slots(tables[rows], positions[:, None])[:, 0]
        starts = torch.tensor([0, *lens], device=device).cumsum(0).int()
        batch = PagedBatch.chunks(tokens, positions, slots, tables, starts,
                                  torch.tensor(lens, dtype=torch.int32, device=device), starts[1:].long() - 1)
        return runner.paged_step(pool.keys, pool.values, batch)

    def _assistant_step(self, state: SpeculativeState, keys, values, positions: torch.Tensor) -> torch.Tensor:
        """The assistant over each row's token at `positions` [rows] (its keys stored there): logits [rows, V]."""
        tokens = state.hist.gather(1, positions[:, None])[:, 0]
        slots = _slots(state.tables, positions[:, None])[:, 0]
        return self.draft.paged_step(keys, values, PagedBatch.decode(tokens, positions, slots, state.tables,
                                                                     (positions + 1).int()))

    def draft_step(self, state: SpeculativeState, keys, values, *, do_sample: bool) -> None:
        """One assistant token per row at position lengths + draft_index (compiled; replayed k times a round)."""
        positions = state.lengths + state.draft_index  # [rows]
        logits = self._assistant_step(state, keys, values, positions).float()
        if do_sample:
            probs = warped_probs(logits, state.temperature, state.top_k, state.top_p)
            picked = draw(probs)
            rows = torch.arange(state.rows, device=logits.device)
            state.draft_probs[rows, state.draft_index.expand(state.rows)] = probs
        else:
            probs = logits.softmax(dim=-1)
            picked = logits.argmax(dim=-1)
        # HF's ConfidenceCriteria: the assistant stops drafting after a token it gave less than the threshold.
        sure = probs.gather(1, picked[:, None])[:, 0] >= state.confidence
        state.confident.copy_((sure & state.unfinished).any(dim=0, keepdim=True))
        state.hist.scatter_(1, positions[:, None] + 1, picked[:, None])
        state.draft_index.add_(1)

    def draft_store(self, state: SpeculativeState, keys, values) -> None:
        """The assistant over each row's token before its last (compiled): after a round whose drafts a row kept
        all, that is the last draft, which the assistant has not seen; for the other rows it recomputes keys it
        holds already (the same values)."""
        self._assistant_step(state, keys, values, state.lengths - 1)

    @staticmethod
    def lookup_drafts(state: SpeculativeState, *, k: int, max_ngram: int) -> None:
        """Prompt lookup (compiled): each row's k drafts continue the earliest earlier occurrence of its last n
        tokens, n from max_ngram down to 1 (HF's PromptLookupCandidateGenerator); the last token repeated when
        nothing matches or the continuation runs out (any draft is valid: the verify step decides)."""
        hist, device = state.hist, state.hist.device
        known = state.lengths + 1  # [rows] tokens of the row so far
        starts = torch.arange(state.width, device=device)[None]  # [1, W] where a match may begin
        continuation = torch.full_like(known, -1)
        for n in range(max_ngram, 0, -1):
            tail = hist.gather(1, (known[:, None] - n + torch.arange(n, device=device)).clamp(min=0))  # [rows, n]
            match = starts + n < known[:, None]  # a match must leave at least one token after it
            for i in range(n):
                match = match & (hist.roll(-i, dims=1) == tail[:, i : i + 1])
            first = torch.where(match.any(dim=1), match.long().argmax(dim=1) + n, -1)
            continuation = torch.where(continuation < 0, first, continuation)
        offsets = torch.arange(k, device=device)[None]
        index = torch.where(continuation[:, None] >= 0, continuation[:, None] + offsets, known[:, None] - 1)
        drafts = hist.gather(1, torch.minimum(index, known[:, None] - 1))
        hist.scatter_(1, state.lengths[:, None] + 1 + offsets, drafts)

    def verify(self, state: SpeculativeState, keys, values, *, k: int, do_sample: bool, lookup: bool) -> None:
        """The target over [last, d1 .. dk] of every row, then acceptance and each row's advance (compiled)."""
        rows, device = state.rows, state.hist.device
        offsets = torch.arange(k + 1, device=device)
        positions = state.lengths[:, None] + offsets  # [rows, k + 1]
        tokens = state.hist.gather(1, positions)
        batch = PagedBatch.chunks(tokens.flatten(), positions.flatten(), _slots(state.tables, positions).flatten(),
                                  state.tables, (torch.arange(rows + 1, device=device) * (k + 1)).int(),
                                  (positions[:, -1] + 1).int(), torch.arange(rows * (k + 1), device=device))
        logits = self.target.paged_step(keys, values, batch).float().view(rows, k + 1, -1)
        drafts = tokens[:, 1:]  # [rows, k]
        real = offsets[None, :k] < state.drafted  # positions past this round's drafts hold none
        if do_sample:
            p = warped_probs(logits, state.temperature, state.top_k, state.top_p)  # [rows, k + 1, V]
            q = torch.nn.functional.one_hot(drafts, p.shape[-1]).float() if lookup else state.draft_probs[:, :k]
            accepted, bonus = accept_sampled(p, q, drafts, real)
        else:
            accepted, bonus = accept_greedy(logits, drafts, real)
        new = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, accepted[:, None], bonus[:, None])  # [rows, k+1]
        count = accepted + 1
        is_eos = torch.isin(new, state.eos) & (offsets[None] < count[:, None])
        hit = is_eos.any(dim=1)
        upto_eos = torch.where(hit, is_eos.long().argmax(dim=1) + 1, count)
        running = state.unfinished.clone()
        take = torch.where(running, torch.minimum(upto_eos, state.new_tokens - state.emitted), 0)
        state.hist.scatter_(1, positions + 1, new)  # past a row's taken tokens it holds nothing it reads
        state.lengths.add_(take)
        state.emitted.add_(take)
        state.unfinished.copy_(running & ~(hit & (upto_eos <= take)) & (state.emitted < state.new_tokens))
        state.accepted.copy_(torch.where(running, accepted, state.drafted))
        state.totals.add_(torch.cat([running.sum(dim=0, keepdim=True) * state.drafted,
                                     (accepted * running).sum(dim=0, keepdim=True)]))


def draft_round(speculator: Speculator, state: SpeculativeState, pool: RowPool, planned: int, stop_early: bool,
                key: tuple, do_sample: bool) -> int:
    """Up to `planned` assistant steps; with `stop_early`, the round ends after a draft no running row's assistant
    was confident in (one host sync per draft, as HF's criterion reads it). Returns the number of drafts."""
    state.draft_index.zero_()
    drafted = 0
    while drafted < planned:
        speculator.draft_steps(key, state, pool.keys, pool.values, do_sample=do_sample)
        drafted += 1
        if stop_early and drafted < planned and not bool(state.confident):
            break
    return drafted


def run_speculative(target: "ModelRunner", drafter: Drafter, request: FastRequest) -> torch.Tensor:
    """Prefill both models, then draft / verify rounds until every row is done; returns what HF's `generate`
    returns (the prompt, then each row's tokens, the pad token after its eos)."""
    config, input_ids, attention_mask, streamer = (request.config, request.input_ids, request.attention_mask,
                                                   request.streamer)
    batch, prompt_width = input_ids.shape
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_width
    sampling = Sampling.from_config(config)
    eos_ids = request.eos_ids
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask)]  # left padding dropped
    longest = max(len(p) for p in prompts)
    max_positions = target.cache.max_positions
    if longest + new_tokens > max_positions:
        raise ValueError(f"prompt + new tokens = {longest + new_tokens} exceeds the model's {max_positions} positions")
    speculator = target.speculator(drafter.runner)
    vocab = target.weights.lm_head.weight.shape[0]
    lookup = drafter.runner is None
    draft_slots = drafter.max_tokens if sampling.do_sample and not lookup else 0
    with torch.no_grad():
        state, target_pool, draft_pool = speculator.buffers(batch, longest + new_tokens + drafter.max_tokens + 2,
                                                            draft_slots, vocab)
        state.set_request(new_tokens, eos_ids, pad, sampling, drafter.confidence)
        padded = prompts + [[pad]] * (state.rows - batch)
        logits = Speculator.prefill(target, target_pool, state, padded).float()
        if draft_pool is not None:
            Speculator.prefill(drafter.runner, draft_pool, state, padded)
        first = select_tokens(logits, sampling.do_sample, state.temperature, state.top_k, state.top_p)
        unfinished = ~torch.isin(first, state.eos) & (new_tokens > 1)
        state.begin(prompts, first, unfinished, pad)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        k, drafted, streamed, rounds = drafter.num_tokens, 0, 0, 0
        shape = (state.rows, target_pool.blocks_per_row)
        while True:
            flags = torch.cat([state.unfinished[:batch].long(), state.accepted[:batch], state.emitted[:batch]]).cpu()
            running, accepted, emitted = flags[:batch].bool(), flags[batch : 2 * batch], flags[2 * batch :]
            if streamer is not None and int(emitted[0]) > streamed:
                start = int(state.prompt_lens[0]) + streamed
                streamer.put(state.hist[0, start : start + int(emitted[0]) - streamed][None].cpu())
                streamed = int(emitted[0])
            if rounds and drafter.schedule != "constant":  # HF's heuristic, after every round
                k = k + 2 if bool((accepted == drafted).all()) else max(1, k - 1)
            if not bool(running.any()):
                break
            if rounds and not lookup and bool((running & (accepted == drafted)).any()):
                speculator.store_steps(("spec draft store", *shape), state, draft_pool.keys, draft_pool.values)
            planned = drafted_tokens(k, drafter.schedule)
            if lookup:
                drafted = planned
                speculator.lookup_steps(("spec lookup", *shape, drafted, drafter.max_ngram), state, k=drafted,
                                        max_ngram=drafter.max_ngram)
            else:
                drafted = draft_round(speculator, state, draft_pool, planned, drafter.confidence > 0,
                                      ("spec draft", *shape, draft_slots, sampling.do_sample), sampling.do_sample)
            state.drafted.fill_(drafted)
            width = verify_width(drafted, planned)
            speculator.verify_steps(("spec verify", *shape, draft_slots, width, sampling.do_sample, lookup), state,
                                    target_pool.keys, target_pool.values, k=width, do_sample=sampling.do_sample,
                                    lookup=lookup)
            rounds += 1
        emitted = emitted.to(state.hist.device)
        length = int(emitted.max())
        offsets = torch.arange(length, device=state.hist.device)[None]
        index = (state.prompt_lens[:batch, None] + offsets).clamp(max=state.width - 1)
        generated = torch.where(offsets < emitted[:, None], state.hist[:batch].gather(1, index), pad)
        drafted_total, kept_total = state.totals.tolist()
    speculator.stats = SpeculationStats(rounds, drafted_total, kept_total)
    if drafter.schedule == "heuristic" and drafter.assistant is not None:
        drafter.assistant.generation_config.num_assistant_tokens = k  # HF keeps it for the next call
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, generated.to(input_ids.device)], dim=1)
