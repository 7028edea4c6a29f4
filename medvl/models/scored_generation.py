"""Generation that also says how sure the model was: the mean probability of the tokens it chose.

The probability of each chosen token comes from Hugging Face's ``compute_transition_scores`` with
``normalize_logits=True``: the softmax of the (processed) logits at that step, also under beam search, where
``beam_indices`` say which beam each token came from. Tokens after the first end-of-sequence are padding and do
not count; the end-of-sequence token itself does (stopping is a choice the model makes too).

Serve-time decoding (:func:`decoding`). A served request may ask for sampling (OpenAI's ``temperature`` > 0)
and for its tokens as they are chosen (``stream``). Neither is a recipe's business, so neither travels through the
recipes' ``generate_scored``: the server wraps the call in ``with decoding(temperature=…, on_piece=…)`` and
:func:`generate_scored`, which every recipe's generation goes through, applies it to the ``generate`` call:

* ``temperature`` > 0: each token is drawn from softmax(logits / temperature) over the whole vocabulary (OpenAI's
  semantics: no top-k / top-p cut), one beam; 0 leaves the caller's deterministic decoding (greedy or beam
  search) alone. The draw is a logits processor (:class:`TemperatureSampling`) under greedy search rather than
  ``generate``'s ``do_sample``, so it reaches every recipe's ``generate`` alike, also one that fixes
  ``do_sample=False``. The reported confidence stays the model's own probability of each chosen token (from the
  raw logits, scaled by the calibration temperature only), not its probability under the sampling temperature:
  confidence describes the model, not the dice.
* ``seeds`` (OpenAI's ``seed``, one per row of the batch, ``None`` for a row without one): a seeded row draws from
  its own ``torch.Generator`` seeded with it, so the same request sampled again draws the same tokens (best effort,
  as OpenAI's: the same model, prompt and image, on the same kind of device), whatever ran before it or beside it
  in its batch; torch's global generator is neither read nor moved for it. Rows without a seed draw from the
  global generator, together, as before.
* ``on_piece``: a streamer hands each generated token's text to ``on_piece`` while ``generate`` runs (batch of
  one). Beam search cannot stream (which beam wins is known only at the end): there the streamer is left out
  and the caller gets the whole text at the end.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer


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


@dataclass(frozen=True)
class Decoding:
    """Serve-time decoding choices (see the module docstring); the default changes nothing."""

    temperature: float = 0.0  # > 0: sample at this temperature; 0: the caller's greedy / beam search
    on_piece: Callable[[str], None] | None = None  # streamed text pieces (batch of one)
    max_tokens: int | None = None  # stream at most this many tokens' text
    seeds: tuple[int | None, ...] = ()  # per row of the batch: its sampling seed, or None (global RNG); () = none


_DECODING: ContextVar[Decoding] = ContextVar("medvl_decoding", default=Decoding())


@contextmanager
def decoding(temperature: float = 0.0, on_piece: Callable[[str], None] | None = None,
             max_tokens: int | None = None, seeds: Sequence[int | None] = ()) -> Iterator[None]:
    """Apply sampling and/or streaming to every :func:`generate_scored` call inside (this thread / context).
    ``seeds``: one per row of the batch generated (see the module docstring), or empty."""
    token = _DECODING.set(Decoding(temperature, on_piece, max_tokens, tuple(seeds)))
    try:
        yield
    finally:
        _DECODING.reset(token)


class TemperatureSampling(LogitsProcessor):
    """Draw each row's next token from softmax(scores / temperature) and leave only it possible (every other
    score -inf), so that greedy search takes the draw. It runs after ``generate``'s own processors.

    ``seeds`` (one per row, or empty): a row with a seed draws from its own generator, made on the scores' device
    at the first step; the others draw from torch's global generator in one call. A processor samples one
    ``generate`` call: a new one starts its seeded rows afresh."""

    def __init__(self, temperature: float, seeds: Sequence[int | None] = ()):
        self.temperature, self.seeds = temperature, tuple(seeds)
        self.generators: list[torch.Generator | None] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        generators = self._generators(scores)
        if all(generator is None for generator in generators):
            drawn = torch.multinomial(probs, num_samples=1)
        else:
            drawn = torch.empty((len(generators), 1), dtype=torch.long, device=scores.device)
            unseeded = [row for row, generator in enumerate(generators) if generator is None]
            if unseeded:
                drawn[unseeded] = torch.multinomial(probs[unseeded], num_samples=1)
            for row, generator in enumerate(generators):
                if generator is not None:
                    drawn[row] = torch.multinomial(probs[row], num_samples=1, generator=generator)
        return torch.full_like(scores, float("-inf")).scatter(-1, drawn, 0.0)

    def _generators(self, scores: torch.Tensor) -> list[torch.Generator | None]:
        rows = scores.shape[0]
        if self.generators is None:
            if self.seeds and len(self.seeds) != rows:
                raise ValueError(f"{len(self.seeds)} sampling seeds for a generation of {rows} rows")
            # torch seeds are 64-bit: any integer a client sends maps to one (as Python's own random does)
            self.generators = [None if seed is None else
                               torch.Generator(device=scores.device).manual_seed(seed % 2**64)
                               for seed in self.seeds or [None] * rows]
        return self.generators


SETTLING_TOKENS = 2  # the newest tokens whose text may still change (see PieceStreamer)


class PieceStreamer(BaseStreamer):
    """A ``generate`` streamer for a batch of one: the text goes to ``on_piece`` as the tokens are chosen.

    The text is decoded as :func:`generate_scored` decodes it (special tokens skipped, stripped), and only its
    settled part is handed out: the text of all but the last two tokens, as far as it agrees with the text of all
    of them, without a trailing space or a trailing incomplete character (U+FFFD). Text already sent cannot be
    taken back, and the newest tokens may still change what comes before them: tokenizers clean up spaces around
    punctuation ("it ' s" becomes "it's": the space before a token goes once the token after it arrives), and a
    multi-byte character can span tokens. So the
    pieces join to a prefix of the final text, and the caller sends the rest when generation ends. The first
    ``put`` is the prompt ``generate`` starts from (possibly empty) and is skipped.
    """

    def __init__(self, tokenizer: Any, on_piece: Callable[[str], None], max_tokens: int | None = None):
        self.tokenizer, self.on_piece, self.max_tokens = tokenizer, on_piece, max_tokens
        self.tokens: list[int] = []
        self.emitted = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
                return
            self.tokens.append(int(token))
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
            earlier = self.tokenizer.decode(self.tokens[:-SETTLING_TOKENS], skip_special_tokens=True).strip()
            settled = os.path.commonprefix([text, earlier]).rstrip()
            if settled.endswith("\ufffd") or not settled.startswith(self.emitted) or len(settled) == len(self.emitted):
                continue
            piece, self.emitted = settled[len(self.emitted):], settled
            self.on_piece(piece)

    def end(self) -> None:
        pass


def generate_scored(generate: Callable[..., Any], scorer: Any, tokenizer: Any, eos_token_id: int, /,
                    confidence_temperature: float = 1.0, **generate_kwargs: Any) -> Generated:
    """Run ``generate`` (any HF-style generate function) and score what it chose with ``scorer``.

    ``scorer`` is the module whose ``compute_transition_scores`` matches the scores (the text decoder / language
    model actually generating). Only the new tokens are decoded, whatever prompt ``generate`` echoes back.
    ``confidence_temperature`` divides the scores before they are normalised (temperature scaling: a step's
    scores are its logits up to a constant per row, so this is softmax(logits / T)); generation is untouched.
    Inside :func:`decoding`, the request's sampling and streaming apply (see the module docstring).
    """
    chosen = _DECODING.get()
    sampling = chosen.temperature > 0
    if sampling:  # OpenAI's temperature: sample from softmax(logits / T) over the whole vocabulary
        processors = LogitsProcessorList(generate_kwargs.get("logits_processor") or [])
        processors.append(TemperatureSampling(chosen.temperature, chosen.seeds))
        generate_kwargs |= {"num_beams": 1, "logits_processor": processors, "output_logits": True}
    if chosen.on_piece is not None and generate_kwargs.get("num_beams", 1) == 1:
        generate_kwargs["streamer"] = PieceStreamer(tokenizer, chosen.on_piece, chosen.max_tokens)
    output = generate(**generate_kwargs, output_scores=True, return_dict_in_generate=True)
    # Sampled: the processed scores are the draw (0 / -inf); the confidence is taken from the raw logits.
    model_scores = output.logits if sampling else output.scores
    scores = model_scores if confidence_temperature == 1.0 else tuple(s / confidence_temperature
                                                                       for s in model_scores)
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
        raw = scorer.compute_transition_scores(output.sequences, model_scores, getattr(output, "beam_indices", None),
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
