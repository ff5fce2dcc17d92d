"""Sampling: the cached loop equals recomputing the whole context; temperature, top-k, seeds."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import UsageError
from moekit.lm.generate import generate_text, generate_tokens, sample_next
from moekit.lm.model import MoETransformer

from .helpers import tiny_model_config


def _model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(tiny_model_config()).eval()


def test_greedy_generation_with_cache_equals_recomputing_the_window():
    """40 tokens from a 4-token prompt pass max_seq_len 32, so the window slides once."""
    model = _model()
    prompt = torch.tensor([100, 101, 102, 32])
    cached = list(generate_tokens(model, prompt, 40, temperature=0.0))
    window, expected = prompt.tolist(), []
    with torch.no_grad():
        for _ in range(40):
            token = int(model(torch.tensor([window])).logits[0, -1].argmax())
            expected.append(token)
            window.append(token)
            if len(window) >= 32:  # the generator's rule: keep the last half
                window = window[-16:]
    assert cached == expected


def test_sampling_is_seeded_and_top_k_restricts_the_choice():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    picks = {int(sample_next(logits, 1.0, 2, torch.Generator().manual_seed(s))) for s in range(200)}
    assert picks == {1, 2}
    assert int(sample_next(logits, 0.0, None, None)) == 1
    a = [int(sample_next(logits, 1.0, None, torch.Generator().manual_seed(3))) for _ in range(5)]
    b = [int(sample_next(logits, 1.0, None, torch.Generator().manual_seed(3))) for _ in range(5)]
    assert a == b
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0, None, None)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, 1.0, 0, None)


def test_generate_text_streams_what_it_returns():
    model = _model()
    streamed = []
    text = generate_text(model, "def ", 30, temperature=1.0, top_k=None, seed=1, on_text=streamed.append)
    assert "".join(streamed) == text
    assert text == generate_text(model, "def ", 30, temperature=1.0, top_k=None, seed=1)
    with pytest.raises(ValueError, match="prompt"):
        generate_text(model, "", 5)


@pytest.mark.parametrize("prompt, max_new_tokens, temperature, top_k, message", [
    ("a\udcffb", 5, 1.0, None, r"prompt is not UTF-8 text \(byte 0xff at character 1\); give the prompt as UTF-8"),
    ("def ", 5, float("nan"), None, r"temperature must be a finite number >= 0 .*got nan"),
    ("def ", 5, float("inf"), None, r"temperature must be a finite number >= 0 .*got inf"),
    ("def ", -1, 1.0, None, r"max_new_tokens must be >= 0, got -1"),
    ("def ", 5, 1.0, 0, r"top_k must be >= 1, got 0"),
])
def test_generate_text_checks_its_arguments_before_running_the_model(prompt, max_new_tokens,
                                                                     temperature, top_k, message):
    class Untouchable:  # any use of the model would raise AttributeError, not the check
        pass

    with pytest.raises(UsageError, match=message):
        generate_text(Untouchable(), prompt, max_new_tokens, temperature, top_k)
