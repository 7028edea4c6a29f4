"""Generation that also says how sure the model was: the mean probability of the tokens it chose.

The probability of each chosen token comes from Hugging Face's ``compute_transition_scores`` with
``normalize_logits=True``: the softmax of the (processed) logits at that step, also under beam search, where
``beam_indices`` say which beam each token came from. Tokens after the first end-of-sequence are padding and do
not count; the end-of-sequence token itself does (stopping is a choice the model makes too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Generated:
    """Texts for a batch and, per text, the mean probability of its generated tokens (in [0, 1])."""

    texts: list[str]
    mean_token_probs: list[float]
    # per text, each generated token's probability and where it ends in the text (for per-sentence confidence)
    token_probs: list[list[float]] = field(default_factory=list)
    token_ends: list[list[int]] = field(default_factory=list)
    # the mean token probabilities at temperature 1 (equal to mean_token_probs without a calibration temperature)
    uncalibrated_mean_token_probs: list[float] = field(default_factory=list)


def generate_scored(generate: Callable[..., Any], scorer: Any, tokenizer: Any, eos_token_id: int, /,
                    confidence_temperature: float = 1.0, **generate_kwargs: Any) -> Generated:
    """Run ``generate`` (any HF-style generate function) and score what it chose with ``scorer``.

    ``scorer`` is the module whose ``compute_transition_scores`` matches the scores (the text decoder / language
    model actually generating). Only the new tokens are decoded, whatever prompt ``generate`` echoes back.
    ``confidence_temperature`` divides the scores before they are normalised (temperature scaling: a step's
    scores are its logits up to a constant per row, so this is softmax(logits / T)); generation is untouched.
    """
    output = generate(**generate_kwargs, output_scores=True, return_dict_in_generate=True)
    scores = output.scores if confidence_temperature == 1.0 else tuple(s / confidence_temperature
                                                                        for s in output.scores)
    log_probs = scorer.compute_transition_scores(
        output.sequences, scores, getattr(output, "beam_indices", None), normalize_logits=True
    )
    new_tokens = output.sequences[:, -log_probs.shape[1]:]
    texts = [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    counted = generated_mask(new_tokens, eos_token_id).bool()
    probs = log_probs.to(torch.float64).exp()
    token_probs = [probs[row][counted[row]].tolist() for row in range(len(texts))]
    token_ends = [token_end_offsets(tokenizer, new_tokens[row][counted[row]].tolist()) for row in range(len(texts))]
    means = mean_token_probabilities(log_probs, new_tokens, eos_token_id)
    uncalibrated = means
    if confidence_temperature != 1.0:
        raw = scorer.compute_transition_scores(output.sequences, output.scores, getattr(output, "beam_indices", None),
                                               normalize_logits=True)
        uncalibrated = mean_token_probabilities(raw, new_tokens, eos_token_id)
    return Generated(texts, means, token_probs, token_ends, uncalibrated)


def token_end_offsets(tokenizer: Any, tokens: list[int]) -> list[int]:
    """Where each token ends in the decoded (stripped) text: the length of the decoded prefix through it."""
    return [len(tokenizer.decode(tokens[: k + 1], skip_special_tokens=True).lstrip()) for k in range(len(tokens))]


def mean_token_probabilities(log_probs: torch.Tensor, tokens: torch.Tensor, eos_token_id: int) -> list[float]:
    """Per row, the mean of ``exp(log_probs)`` over the tokens up to and including the first ``eos_token_id``."""
    counted = generated_mask(tokens, eos_token_id)
    probs = log_probs.to(torch.float64).exp() * counted
    return (probs.sum(1) / counted.sum(1).clamp(min=1)).tolist()


def generated_mask(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for the tokens a sequence really generated (through its first EOS), 0 for the padding after it."""
    is_eos = (tokens == eos_token_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).to(torch.float64)
