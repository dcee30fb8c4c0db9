"""Attention noise: synthetic multi-needle retrieval in real text, the Differential Transformer paper's measure.

Ye et al. 2024 (arXiv 2410.05258), section "Key Information Retrieval": N needles "The magic number of CITY is NUMBER."
are placed in a haystack at several depths and the model is asked for one of them; a table in the same section
reports how the attention of the question is split between the **answer span** (the needle's number) and the
**noise context** (everything else). Here the haystack is real text, the answer is teacher-forced after the question,
and a trial is correct when every answer token is the model's argmax (what greedy decoding would produce).

Attention mass, per layer and trial: the attention probabilities of the last question token (the position that
predicts the first answer token), averaged over heads, summed over the keys of the answer span (`answer`) and over
the other context keys before the question (`noise`); the question's own tokens take the rest. For differential
attention the positive, negative and differential (positive − λ·negative) maps are reported separately.
"""

import random
from dataclasses import dataclass, field

import torch
from torch import nn

from netmorph.probes.outliers import attention_module, decoder_layers
from netmorph.train.callbacks import attention_input

CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Riga", "Seoul", "Cairo", "Bern",
          "Perth", "Accra", "Sofia", "Kyoto")


@dataclass
class NeedleSample:
    """One retrieval trial: `input_ids` = context (haystack with needles) + question + answer.
    Spans are [start, end) token positions."""

    input_ids: list[int]
    length: int  # requested total length (tokens)
    depth: float  # where the asked needle sits in the haystack, 0 = start, 1 = end
    city: str
    answer: str
    answer_span: tuple[int, int]  # the asked needle's number inside the context
    context_end: int  # the question starts here
    question_end: int  # the answer starts here


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def build_samples(tokenizer, haystack: str, lengths: list[int], depths: list[float], num_needles: int = 3,
                  digits: int = 6, seed: int = 0) -> list[NeedleSample]:
    """One trial per (length, depth): `num_needles` needles ("The magic number of CITY is NUMBER.", distinct cities,
    random `digits`-digit numbers) in `haystack` tokens (repeated when short), the asked one at `depth`, the others
    spread evenly over the rest; then "What is the magic number of CITY? The magic number of CITY is" and the
    answer. Pieces are tokenized separately and concatenated, so every span is exact. Raises ValueError when a
    length cannot hold the needles, question and answer."""
    if not 1 <= num_needles <= len(CITIES):
        raise ValueError(f"num_needles must be 1..{len(CITIES)}")
    rng = random.Random(seed)
    filler = _encode(tokenizer, haystack)
    if not filler:
        raise ValueError("the haystack text has no tokens")
    samples = []
    for length in lengths:
        for depth in depths:
            cities = rng.sample(CITIES, num_needles)
            numbers = [str(rng.randrange(10 ** (digits - 1), 10**digits)) for _ in cities]
            needles = [(_encode(tokenizer, f"\nThe magic number of {city} is"), _encode(tokenizer, f" {number}"),
                        _encode(tokenizer, ".\n")) for city, number in zip(cities, numbers)]
            target = 0
            question = _encode(tokenizer, f"\nWhat is the magic number of {cities[target]}? "
                                          f"The magic number of {cities[target]} is")
            answer = needles[target][1]
            needle_tokens = sum(len(a) + len(b) + len(c) for a, b, c in needles)
            budget = length - needle_tokens - len(question) - len(answer)
            if budget < num_needles:
                raise ValueError(f"context length {length} cannot hold {num_needles} needles, the question and the "
                                 f"answer ({length - budget} tokens): use longer lengths or fewer needles")
            hay = (filler * (budget // len(filler) + 1))[:budget]
            others = [i / (num_needles - 1) for i in range(num_needles - 1)] if num_needles > 1 else []
            others = [d for d in others if abs(d - depth) > 1e-9][: num_needles - 1]
            while len(others) < num_needles - 1:  # the asked depth took one of the evenly spread places
                others.append(1.0 if depth < 1.0 else 0.0)
            placed = sorted(zip([depth] + others, range(num_needles)))
            context, cursor, answer_span = [], 0, None
            for where, index in placed:
                cut = round(where * budget)
                context += hay[cursor:cut]
                cursor = cut
                pre, number, post = needles[index]
                context += pre
                if index == target:
                    answer_span = (len(context), len(context) + len(number))
                context += number + post
            context += hay[cursor:]
            ids = context + question + answer
            samples.append(NeedleSample(ids, length, depth, cities[target], numbers[target], answer_span,
                                        len(context), len(context) + len(question)))
    return samples


@dataclass
class TrialResult:
    """One needle sample of `length` tokens with the asked needle at relative `depth` (0..1): whether every answer
    token was the argmax, and per decoder layer the attention mass (fraction of the last question token's attention,
    mean over heads) on the answer span and on the rest of the context."""
    length: int
    depth: float
    correct: bool
    # per layer: attention mass of the last question token on the answer span and on the rest of the context
    answer_mass: list[float]
    noise_mass: list[float]
    # differential models only: the same for the positive and negative softmax maps (the lists above hold the
    # differential map, positive − λ·negative)
    positive_answer_mass: list[float] | None = None
    positive_noise_mass: list[float] | None = None
    negative_answer_mass: list[float] | None = None
    negative_noise_mass: list[float] | None = None


@dataclass
class RetrievalResult:
    """All trials of the retrieval probe, accuracy overall / by length / by depth (fractions), and the mean
    attention masses per layer (for differential models also of the positive and negative maps, in `components`)."""
    trials: list[TrialResult]
    accuracy: float
    accuracy_by_length: dict[int, float]
    accuracy_by_depth: dict[float, float]
    answer_mass: list[float]  # per layer, mean over trials
    noise_mass: list[float]
    differential: bool
    components: dict[str, list[float]] = field(default_factory=dict)  # positive/negative answer/noise, per layer


def _is_differential(module) -> bool:
    return hasattr(module, "branch_probabilities")


def _lambda_row(module, hidden: torch.Tensor, row: int) -> torch.Tensor:
    """λ for one query position, shaped to broadcast over heads: DIFF V2's per-token, per-head λ (H,), or V1's
    scalar λ_full (mix included) as (1,)."""
    if getattr(module, "layout", None) == "v2":
        return torch.sigmoid(module.lambda_proj(hidden[0, row])).float()  # (H,)
    return module.lambda_full().float().reshape(1)


def _masses(row: torch.Tensor, span: tuple[int, int], context_end: int) -> tuple[float, float]:
    """row: (heads, S) attention of one query → (answer mass, noise mass), each averaged over heads."""
    answer = row[:, span[0]:span[1]].sum(-1)
    noise = row[:, :context_end].sum(-1) - answer
    return answer.mean().item(), noise.mean().item()


@torch.no_grad()
def run_sample(model: nn.Module, sample: NeedleSample) -> TrialResult:
    """Run one trial. The model must use the eager attention backend for stock attention modules (their hooks read the
    attention probabilities the module returns); differential modules recompute their two softmax maps from the
    module's real input (`branch_probabilities`)."""
    layers = decoder_layers(model)
    row = sample.question_end - 1
    rows: dict[int, dict] = {}
    handles = []
    for index, layer in enumerate(layers):
        module = attention_module(layer)
        if _is_differential(module):
            def pre_hook(mod, args, kwargs, i=index):
                hidden, position_embeddings = attention_input(args, kwargs)
                positive, negative = mod.branch_probabilities(hidden[:1], position_embeddings)
                lam = _lambda_row(mod, hidden, row).to(positive.device)
                pos, neg = positive[0, :, row], negative[0, :, row]  # (heads, S)
                rows[i] = {"positive": pos, "negative": neg, "differential": pos - lam[:, None] * neg}

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(mod, args, output, i=index):
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise ValueError("the attention module returned no probabilities: load the model with "
                                     "attn_implementation='eager' for the retrieval probe")
                rows[i] = {"differential": weights[0, :, row].float()}

            handles.append(module.register_forward_hook(hook))
    ids = torch.tensor([sample.input_ids])
    try:
        logits = model(ids, use_cache=False).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    predicted = logits[sample.question_end - 1 : len(sample.input_ids) - 1].argmax(-1)
    correct = predicted.tolist() == sample.input_ids[sample.question_end :]
    result = TrialResult(sample.length, sample.depth, correct, [], [])
    differential = "positive" in rows[0]
    if differential:
        for name in ("positive_answer_mass", "positive_noise_mass", "negative_answer_mass", "negative_noise_mass"):
            setattr(result, name, [])
    for index in range(len(layers)):
        answer, noise = _masses(rows[index]["differential"], sample.answer_span, sample.context_end)
        result.answer_mass.append(answer)
        result.noise_mass.append(noise)
        if differential:
            for component in ("positive", "negative"):
                answer, noise = _masses(rows[index][component], sample.answer_span, sample.context_end)
                getattr(result, f"{component}_answer_mass").append(answer)
                getattr(result, f"{component}_noise_mass").append(noise)
    return result


def _mean(lists: list[list[float]]) -> list[float]:
    return torch.tensor(lists, dtype=torch.float64).mean(0).tolist()


def retrieval_probe(model: nn.Module, samples: list[NeedleSample]) -> RetrievalResult:
    """Run every sample and aggregate: accuracy overall, by length and by depth; mean attention masses per layer."""
    trials = [run_sample(model, sample) for sample in samples]

    def accuracy(selected):
        return sum(t.correct for t in selected) / len(selected)

    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    differential = trials[0].positive_answer_mass is not None
    components = {}
    if differential:
        for name in ("positive_answer_mass", "positive_noise_mass", "negative_answer_mass", "negative_noise_mass"):
            components[name] = _mean([getattr(t, name) for t in trials])
    return RetrievalResult(
        trials=trials, accuracy=accuracy(trials),
        accuracy_by_length={n: accuracy([t for t in trials if t.length == n]) for n in lengths},
        accuracy_by_depth={d: accuracy([t for t in trials if t.depth == d]) for d in depths},
        answer_mass=_mean([t.answer_mass for t in trials]), noise_mass=_mean([t.noise_mass for t in trials]),
        differential=differential, components=components,
    )
