"""Sampling text from a trained model with a KV cache, byte by byte."""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterator

import torch

from ..errors import UsageError
from .model import MoETransformer


def check_temperature(temperature: float) -> None:
    """UsageError unless temperature is a finite number >= 0."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"temperature must be a finite number >= 0 (0 picks the likeliest byte), "
                         f"got {temperature}")


def check_generation(prompt: str, max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """What ``generate_text`` checks before it runs the model: a non-empty UTF-8 prompt,
    max_new_tokens >= 0, a finite temperature >= 0, top_k None or >= 1 (UsageError otherwise)."""
    bad = next((i for i, char in enumerate(prompt) if "\ud800" <= char <= "\udfff"), None)
    if bad is not None:  # how Python keeps bytes that were not UTF-8 (a command-line argument)
        byte = ord(prompt[bad]) - 0xDC00  # the surrogateescape of one undecodable byte
        what = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else repr(prompt[bad])
        raise UsageError(f"prompt is not UTF-8 text ({what} at character {bad}); give the prompt "
                         "as UTF-8 text")
    if not prompt:
        raise UsageError("prompt must not be empty")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_temperature(temperature)
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next ids [B] int64: greedy at temperature 0, else sampled
    from softmax(logits / temperature) restricted to the top_k largest logits."""
    check_temperature(temperature)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise UsageError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate_tokens(model: MoETransformer, prompt: torch.Tensor, max_new_tokens: int,
                    temperature: float = 0.8, top_k: int | None = 50,
                    generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield max_new_tokens sampled ids continuing prompt [S] (int64, S >= 1).

    The prompt is run once and every new token then costs one step over the
    cache. When the context reaches ``max_seq_len`` the cache is rebuilt from
    the last half of the context (rotary positions are absolute).
    """
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise UsageError(f"prompt must be a non-empty 1-D tensor of token ids, got shape "
                         f"{tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    device = next(model.parameters()).device
    limit = model.config.max_seq_len
    context = prompt.to(device)[-limit:].tolist()
    cache = model.new_cache()
    pending = torch.tensor([context], device=device)
    for _ in range(max_new_tokens):
        logits = model(pending, cache).logits[:, -1]
        token = int(sample_next(logits, temperature, top_k, generator))
        yield token
        context.append(token)
        if len(context) >= limit:
            context = context[-(limit // 2):]
            cache = model.new_cache()
            pending = torch.tensor([context], device=device)
        else:
            pending = torch.tensor([[token]], device=device)


def generate_text(model: MoETransformer, prompt: str, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int | None = 50, seed: int | None = None,
                  on_text: Callable[[str], None] | None = None) -> str:
    """Continue a text prompt with byte-level sampling; ``on_text`` receives the
    decoded text as it arrives (incomplete UTF-8 sequences wait for their last byte)."""
    check_generation(prompt, max_new_tokens, temperature, top_k)
    data = prompt.encode("utf-8")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    for token in generate_tokens(model, torch.tensor(list(data)), max_new_tokens, temperature,
                                 top_k, generator):
        text = decoder.decode(bytes([token]))
        if text:
            pieces.append(text)
            if on_text is not None:
                on_text(text)
    tail = decoder.decode(b"", final=True)
    if tail:
        pieces.append(tail)
        if on_text is not None:
            on_text(tail)
    return "".join(pieces)
