"""A decode loop with almost no host work, behind `model.generate()`.

HF's loop runs logits processors, stopping criteria and bookkeeping in Python and syncs with the GPU
every token. Here one compiled, CUDA-graphed step embeds the last token, runs the decoder, picks the next
token on the device (greedy, or temperature / top-k / top-p sampling by an exponential race), writes it
into an output buffer and updates the finished flags. The host only replays the step and looks at the
finished flags every `CHECK_EVERY` steps; tokens after an eos are the pad token, exactly as in HF, and the
output is trimmed to where HF's loop would have stopped.

Requests that need anything else (beam search, other logits processors, stop strings, scores in the
output, ...) go to HF's loop; router.py decides, and says why.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .parallel import SingleDevice

if TYPE_CHECKING:  # the runner imports this module for the loop's buffers
    from .runner import ModelRunner

CHECK_EVERY = 8  # decode steps between looks at the finished flags (each look is one host sync)

EOS_SLOTS = 8  # eos ids a request may list (a static buffer size); more go to HF's loop


@dataclass(frozen=True)
class Sampling:
    """Token selection, as HF's warpers apply it: temperature, then top-k, then top-p."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float

    @classmethod
    def from_config(cls, config) -> "Sampling":
        if not config.do_sample:
            return cls(False, 1.0, 0, 1.0)
        return cls(True, config.temperature if config.temperature is not None else 1.0,
                   config.top_k or 0, config.top_p if config.top_p is not None else 1.0)


def select_tokens(logits: torch.Tensor, do_sample: bool, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Next token per row of fp32 logits [B, V], on the device and without a host sync.

    The sampling settings are device tensors of shape [1] (top_k 0 = off, top_p 1 = off), so one compiled graph
    serves every request of a mode; neutral values leave the distribution unchanged.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    return draw(warped_probs(logits, temperature, top_k, top_p))


def warped_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    """The distribution HF's warpers define over fp32 logits [..., V] (temperature, then top-k, then top-p)."""
    vocab = logits.shape[-1]
    logits = logits / temperature
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # [1]
    kth = sorted_logits.index_select(-1, vocab - k)  # [..., 1]: the k-th largest logit
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    remove_sorted[..., -1] = False  # keep at least the most likely token
    logits = logits.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))
    return logits.softmax(dim=-1)


def draw(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of non-negative weights [..., V] (not necessarily normalised), drawn in proportion.

    Exponential race: argmax(w / E) with E ~ Exp(1) is a draw from w / sum(w), with no multinomial and no sync."""
    return (weights / torch.empty_like(weights).exponential_(1)).argmax(dim=-1)


@dataclass(frozen=True)
class FastRequest:
    """A generate() call the fast loop serves: HF's effective settings and the inputs."""

    config: Any  # transformers.GenerationConfig with HF's defaults filled in
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    streamer: Any
    eos_ids: list[int]
    # speculative decoding (speculative.py): an assistant model, or prompt lookup's k
    assistant: Any = None
    prompt_lookup: int | None = None

    @property
    def speculative(self) -> bool:
        return self.assistant is not None or self.prompt_lookup is not None


class FastDecodeState:
    """Static buffers of the fast loop for one batch bucket: the step's inputs, outputs, flags and the request's
    settings (device tensors, so that a new pad id, eos list or sampling setting never needs a new graph)."""

    def __init__(self, rows: int, max_len: int, device: torch.device):
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # last token of each row
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # its RoPE position
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        self.out = torch.zeros(rows, max_len, dtype=torch.long, device=device)  # generated tokens
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # next column of `out`
        self.eos = torch.full((EOS_SLOTS,), -1, dtype=torch.long, device=device)  # the request's eos ids, -1 after
        self.pad = torch.zeros(1, dtype=torch.long, device=device)
        self.temperature = torch.ones(1, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(1, dtype=torch.long, device=device)
        self.top_p = torch.ones(1, dtype=torch.float32, device=device)
        for t in self.tensors():
            torch._dynamo.mark_static_address(t)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.tokens, self.positions, self.unfinished, self.out, self.step, self.eos, self.pad,
                self.temperature, self.top_k, self.top_p)

    def begin(self, first_tokens: torch.Tensor, positions: torch.Tensor, unfinished: torch.Tensor) -> None:
        """Start a call on the first `len(first_tokens)` rows. Every per-call buffer is set on every row: rows this
        call does not use restart at position 0, finished, with the pad token, so whatever earlier calls ran,
        nothing they hold grows past one call's length (they once kept counting from call to call until their
        positions left the RoPE table)."""
        batch = first_tokens.shape[0]
        self.tokens.copy_(self.pad.expand_as(self.tokens))
        self.tokens[:batch] = first_tokens
        self.positions.zero_()
        self.positions[:batch] = positions
        self.unfinished.zero_()
        self.unfinished[:batch] = unfinished
        self.out[:, 0] = self.tokens
        self.step.fill_(1)

    def set_request(self, eos_ids: list[int], pad: int, sampling: Sampling) -> None:
        self.eos.fill_(-1)
        if eos_ids:
            self.eos[: len(eos_ids)] = torch.tensor(eos_ids, dtype=torch.long)
        self.pad.fill_(pad)
        self.temperature.fill_(sampling.temperature)
        self.top_k.fill_(sampling.top_k)
        self.top_p.fill_(sampling.top_p)


def pick(logits: torch.Tensor, unfinished: torch.Tensor, state: FastDecodeState, do_sample: bool, tp: SingleDevice):
    """HF's bookkeeping for one step: finished rows get the pad token; rows that emit an eos finish.

    Under tensor parallelism every rank has the same logits; a sampled token is rank 0's draw, broadcast.
    """
    tokens = select_tokens(logits, do_sample, state.temperature, state.top_k, state.top_p)
    if do_sample:
        tokens = tp.broadcast(tokens)
    tokens = torch.where(unfinished, tokens, state.pad)
    return tokens, unfinished & ~torch.isin(tokens, state.eos)


def trim(generated: torch.Tensor, eos: torch.Tensor, steps_done: int) -> int:
    """How many steps HF's loop would have run: until every row has emitted an eos, or all of them."""
    if eos.numel() == 0:
        return steps_done
    hit = torch.isin(generated[:, :steps_done], eos)
    never = torch.full_like(hit[:, 0], steps_done, dtype=torch.long)
    first = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), never)  # each row's first eos
    return min(steps_done, int(first.max()) + 1)


def run_fast_generate(runner: "ModelRunner", request: FastRequest) -> torch.Tensor:
    """Prefill, then the device-side loop; returns exactly what HF's `generate` returns for this request."""
    config, input_ids, attention_mask, streamer = (
        request.config, request.input_ids, request.attention_mask, request.streamer
    )
    batch, prompt_len = input_ids.shape
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len
    sampling = Sampling.from_config(config)
    eos_ids = request.eos_ids
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    device = input_ids.device
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # HF's positions for left-padded prompts
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids = position_ids.masked_fill(attention_mask == 0, 1)

    runner.tp.check_same_request("generate", input_ids, attention_mask, new_tokens, sampling, eos_ids, pad)
    cache = runner.cache_for(batch, prompt_len + new_tokens)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with torch.no_grad():
        embeds = runner.embed(input_ids)
        hidden = runner.prefill(cache, embeds, attention_mask, position_ids)
        logits = runner.logits(hidden[:, -1]).float()
        # Compiled, rows are padded to the bucket's power of two (one graph per bucket). Eager, they are not, so
        # the random draws are exactly HF's: seeded sampling then gives HF's tokens.
        rows = cache.decode_rows(batch) if runner.compile else batch
        state = runner.fast_state(rows, cache.max_cache_len)
        state.set_request(eos_ids, pad, sampling)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        first, unfinished = pick(logits, unfinished, state, sampling.do_sample, runner.tp)
        state.begin(first, position_ids[:, -1] + 1, unfinished)
        key = ("fast", rows, cache.max_batch_size, cache.max_cache_len, sampling.do_sample)
        steps_done, streamed = 1, 0
        while True:
            done = steps_done >= new_tokens or (eos.numel() > 0 and not bool(state.unfinished[:batch].any()))
            if streamer is not None:  # stream what HF would have streamed by now, one column per step
                limit = trim(state.out[:batch], eos, steps_done) if done else steps_done
                for column in state.out[:batch, streamed:limit].cpu().unbind(1):
                    streamer.put(column)
                streamed = limit
            if done:
                break
            chunk = min(CHECK_EVERY, new_tokens - steps_done)
            for _ in range(chunk):  # no host sync in here: the GPU runs behind the queued replays
                runner.fast_steps(key, state, cache.keys, cache.values, cache.kv_valid, cache.seq_start,
                                  cache.write_pos, do_sample=sampling.do_sample)
            steps_done += chunk
            cache.advance(chunk)
        generated = state.out[:batch, : trim(state.out[:batch], eos, steps_done)]
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, generated], dim=1)
