"""A decode loop with almost no host work, behind `model.generate()`.

HF's loop runs logits processors, stopping criteria and bookkeeping in Python and syncs with the GPU
every token. Here one compiled, CUDA-graphed step embeds the last token, runs the decoder, picks the next
token on the device (greedy, or temperature / top-k / top-p sampling by an exponential race), writes it
into an output buffer and updates the finished flags. The host only replays the step and looks at the
finished flags every `CHECK_EVERY` steps; tokens after an eos are the pad token, exactly as in HF, and the
output is trimmed to where HF's loop would have stopped.

Requests that need anything else (beam search, other logits processors, stop strings, scores in the
output, ...) go to HF's loop; `fast_path_reason` says why.
"""

from dataclasses import dataclass
from typing import Any

import torch

CHECK_EVERY = 8  # decode steps between looks at the finished flags (each look is one host sync)

# Generation settings the fast loop implements; everything else must be at HF's default.
_HANDLED = {
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
    # settings of features the loop never uses (assistants, beams, compile of HF's own loop)
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "length_penalty", "early_stopping", "num_beam_groups",
    "compile_config", "disable_compile", "cache_config", "is_assistant",
}
# generate() arguments that are not generation settings: only these may be given (and not None).
_GENERATE_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                  "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")


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


def select_tokens(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next token per row of fp32 logits [B, V], on the device and without a host sync."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        remove_sorted[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, with no multinomial and no sync.
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


@dataclass(frozen=True)
class FastRequest:
    """A generate() call the fast loop serves: HF's effective settings and the inputs."""

    config: Any  # transformers.GenerationConfig with HF's defaults filled in
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    streamer: Any


def fast_path_reason(model, args: tuple, kwargs: dict[str, Any]) -> tuple[str | None, FastRequest | None]:
    """(None, request) when the fast loop serves this generate() call, else (why not, None)."""
    kwargs = dict(kwargs)
    inputs = args[0] if args else kwargs.pop("input_ids", kwargs.pop("inputs", None))
    if len(args) > 1:
        return "positional arguments after the inputs", None
    streamer = kwargs.pop("streamer", None)
    for name in _GENERATE_ARGS:
        if kwargs.pop(name, None) is not None:
            return name, None
    base = kwargs.get("generation_config") or model.generation_config
    if all(kwargs.get(k) is None and getattr(base, k, None) is None for k in ("max_new_tokens", "max_length")):
        return "no max_new_tokens/max_length: HF's default length rule applies", None
    config, model_kwargs = model._prepare_generation_config(kwargs.pop("generation_config", None), **kwargs)
    attention_mask = model_kwargs.pop("attention_mask", None)
    if model_kwargs:
        return f"model arguments {sorted(model_kwargs)}", None
    defaults = config._get_default_generation_params()
    for key, value in config.to_dict().items():
        if key in _HANDLED or value == defaults.get(key) or (key not in defaults and value in (None, False, {}, [])):
            continue
        return f"{key}={value!r}", None
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
        return "no 2-D input_ids tensor", None
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        return f"max_new_tokens={config.max_new_tokens}", None
    if config.max_new_tokens is None and (config.max_length is None or config.max_length <= inputs.shape[1]):
        return f"max_length={config.max_length} does not exceed the prompt", None
    return None, FastRequest(config, inputs, attention_mask, streamer)


class FastDecodeState:
    """Static buffers of the fast loop for one batch bucket: the step's inputs, outputs and flags."""

    def __init__(self, rows: int, max_len: int, device: torch.device):
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # last token of each row
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # its RoPE position
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        self.out = torch.zeros(rows, max_len, dtype=torch.long, device=device)  # generated tokens
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # next column of `out`
        for t in (self.tokens, self.positions, self.unfinished, self.out, self.step):
            torch._dynamo.mark_static_address(t)


def pick(logits: torch.Tensor, unfinished: torch.Tensor, eos: torch.Tensor, pad: int, sampling: Sampling):
    """HF's bookkeeping for one step: finished rows get the pad token; rows that emit an eos finish."""
    tokens = select_tokens(logits, sampling)
    tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
    return tokens, unfinished & ~torch.isin(tokens, eos)


def trim(generated: torch.Tensor, eos: torch.Tensor, steps_done: int) -> int:
    """How many steps HF's loop would have run: until every row has emitted an eos, or all of them."""
    if eos.numel() == 0:
        return steps_done
    hit = torch.isin(generated[:, :steps_done], eos)
    never = torch.full_like(hit[:, 0], steps_done, dtype=torch.long)
    first = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), never)  # each row's first eos
    return min(steps_done, int(first.max()) + 1)


def run_fast_generate(acc, request: FastRequest) -> torch.Tensor:
    """Prefill, then the device-side loop; returns exactly what HF's `generate` returns for this request."""
    model = acc.model
    config, input_ids, attention_mask, streamer = (
        request.config, request.input_ids, request.attention_mask, request.streamer
    )
    batch, prompt_len = input_ids.shape
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len
    sampling = Sampling.from_config(config)
    eos_ids = config.eos_token_id
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    device = input_ids.device
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # HF's positions for left-padded prompts
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids = position_ids.masked_fill(attention_mask == 0, 1)

    cache = acc.cache_for(batch, prompt_len + new_tokens)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with torch.no_grad():
        embeds = model.model.embed_tokens(input_ids)
        hidden = acc._prefill(cache, embeds, attention_mask, position_ids)
        logits = model.lm_head(hidden[:, -1]).float()
        state = acc.fast_state(cache.decode_rows(batch), cache.max_cache_len)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        first, unfinished = pick(logits, unfinished, eos, pad, sampling)
        state.out[:batch, 0] = first
        state.tokens[:batch] = first
        state.positions[:batch] = position_ids[:, -1] + 1
        state.unfinished[:batch] = unfinished
        state.unfinished[batch:] = False
        state.step.fill_(1)
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
                if acc.options.compile:
                    torch.compiler.cudagraph_mark_step_begin()
                acc.fast_step(state.tokens, state.positions, state.unfinished, state.out, state.step,
                              cache.keys, cache.values, cache.kv_valid, cache.seq_start, cache.write_pos, eos,
                              pad=pad, sampling=sampling)
            steps_done += chunk
            cache.seq_length += chunk
        generated = state.out[:batch, : trim(state.out[:batch], eos, steps_done)]
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, generated], dim=1)


def fast_step(acc, tokens, positions, unfinished, out, step, keys, values, kv_valid, seq_start, write_pos, eos,
              *, pad: int, sampling: Sampling) -> None:
    """One decode step for a bucket of rows, all on the device: forward, pick, write, advance."""
    rows = tokens.shape[0]
    embeds = acc.model.model.embed_tokens(tokens)[:, None]
    new_valid = torch.ones(rows, dtype=torch.bool, device=tokens.device)
    logits = acc._decode_step(embeds, positions[:, None], new_valid, keys, values, kv_valid, seq_start, write_pos)
    next_tokens, still = pick(logits[:, 0].float(), unfinished, eos, pad, sampling)
    out[torch.arange(rows, device=tokens.device)[:, None], step[None, :]] = next_tokens[:, None]
    tokens.copy_(next_tokens)
    positions.add_(1)
    unfinished.copy_(still)
    step.add_(1)
