"""Run two models on the same real text and compare them: logits, KL, loss, perplexity, greedy text."""

import json
import logging
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from netmorph.errors import NetmorphError

log = logging.getLogger("netmorph")

DEFAULT_PROMPTS = ("The quick brown fox", "The license grants you the right to", "Once upon a time")


@dataclass
class TextComparison:
    """Two models on one text: token count, max and mean |Δlogit| (fp32 logits), mean KL(original ‖ converted) per
    position in nats, and each model's mean next-token cross-entropy loss (nats)."""

    name: str
    tokens: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    mean_kl: float
    loss_original: float
    loss_converted: float

    @property
    def perplexity_original(self) -> float:
        """exp(loss_original); a loss above 700 nats counts as 700 (exp would overflow a float64 past ~709)."""
        return math.exp(min(self.loss_original, 700.0))

    @property
    def perplexity_converted(self) -> float:
        """exp(loss_converted); a loss above 700 nats counts as 700 (exp would overflow a float64 past ~709)."""
        return math.exp(min(self.loss_converted, 700.0))


@dataclass
class GenerationComparison:
    """Both models' greedy continuations of one prompt, as decoded text."""

    prompt: str
    original: str
    converted: str

    @property
    def match(self) -> bool:
        """Whether the two continuations are the same text."""
        return self.original == self.converted


@dataclass
class VerifyReport:
    """The full verification of a checkpoint against its source: per-text logit figures, greedy generations, the
    tolerance on max |Δlogit| and where it comes from, the tokenizer check and the precision (`dtype`) both models
    ran in."""

    attn_implementation: str
    tolerance: float
    dtype: str = "float32"
    texts: list[TextComparison] = field(default_factory=list)
    generations: list[GenerationComparison] = field(default_factory=list)
    approximate: bool = False  # an approximate mode: the figures are the measured divergence, not a pass/fail check
    tokenizer_match: bool | None = None  # the output's tokenizer encodes the texts as the source's (None: not checked)
    tolerance_basis: str = ""  # where the tolerance comes from, when it is not the command's --tolerance
    # Greedy text must match to pass. Not when the checkpoint is exact only up to rounding to a half dtype: the
    # source itself changes its greedy text at near-ties when run in that dtype.
    generations_required: bool = True

    @property
    def max_abs_logit_diff(self) -> float:
        """The largest max |Δlogit| over the texts (ValueError when there are none)."""
        return max(t.max_abs_logit_diff for t in self.texts)

    @property
    def max_abs_loss_delta(self) -> float:
        """The largest |loss_converted − loss_original| over the texts, in nats."""
        return max(abs(t.loss_converted - t.loss_original) for t in self.texts)

    @property
    def generations_match(self) -> bool:
        """Whether every greedy continuation matches (True when there are none)."""
        return all(g.match for g in self.generations)

    @property
    def passed(self) -> bool:
        """max |Δlogit| ≤ tolerance (NaN fails), greedy text matching where required, and a tokenizer that did not
        fail its check."""
        return (self.max_abs_logit_diff <= self.tolerance and (self.generations_match or not self.generations_required)
                and self.tokenizer_match is not False)

    def to_dict(self) -> dict:
        """The report as plain data, with the derived figures (perplexities, matches, pass) added."""
        data = asdict(self)
        for text, entry in zip(self.texts, data["texts"]):
            entry["perplexity_original"] = text.perplexity_original
            entry["perplexity_converted"] = text.perplexity_converted
        for generation, entry in zip(self.generations, data["generations"]):
            entry["match"] = generation.match
        data.update(
            max_abs_logit_diff=self.max_abs_logit_diff, max_abs_loss_delta=self.max_abs_loss_delta,
            generations_match=self.generations_match, passed=self.passed,
        )
        return data

    def to_json(self) -> str:
        """`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """The report as the text table the CLI prints and the model card embeds."""
        lines = [
            f"attention: {self.attn_implementation}   tolerance: max |Δlogit| ≤ {self.tolerance:.3g} ({self.dtype})"
            + (f" = {self.tolerance_basis}" if self.tolerance_basis else ""),
            f"{'text':<14}{'tokens':>7}{'max|Δlogit|':>13}{'mean|Δlogit|':>14}{'mean KL':>11}"
            f"{'loss orig':>11}{'loss conv':>11}{'ppl orig':>10}{'ppl conv':>10}",
        ]
        for t in self.texts:
            lines.append(
                f"{t.name[:13]:<14}{t.tokens:>7}{t.max_abs_logit_diff:>13.3e}{t.mean_abs_logit_diff:>14.3e}"
                f"{t.mean_kl:>11.3e}{t.loss_original:>11.5f}{t.loss_converted:>11.5f}"
                f" {t.perplexity_original:>9.3f} {t.perplexity_converted:>9.3f}"
            )
        for g in self.generations:
            if g.match:
                lines.append(f"greedy {g.prompt!r}: match → {g.converted!r}")
            else:
                lines.append(f"greedy {g.prompt!r}: DIFFER\n  original:  {g.original!r}\n  converted: {g.converted!r}")
        outcome = ("approximate mode, measured divergence: " if self.approximate else "") + (
            f"max |Δlogit| = {self.max_abs_logit_diff:.3e}, max |Δloss| = {self.max_abs_loss_delta:.3e}"
            if self.approximate
            else f"max |Δlogit| = {self.max_abs_logit_diff:.3e} → {'PASS' if self.passed else 'FAIL'}"
        )
        if self.tokenizer_match is not None:
            lines.append(TOKENIZER_LINES[self.tokenizer_match])
        generations = "Generations match!" if self.generations_match else "Generations differ." + (
            "" if self.generations_required else " (not required: rounding to a half dtype moves near-ties)")
        lines.append(generations + "  " + outcome)
        return "\n".join(lines)


def failure(reports, exact: bool = True) -> str | None:
    """None when the reports pass; otherwise one line saying what failed (the command's FAILED line). An exact mode
    fails on logits over the tolerance, a differing greedy generation or top-1 token, or a tokenizer that encodes
    text differently; an approximate mode (its divergence is measured, not checked) only on the tokenizer."""
    problems = []
    for report in reports:
        if exact and not report.max_abs_logit_diff <= report.tolerance:  # NaN fails too
            problems.append(f"max |Δlogit| {report.max_abs_logit_diff:.3e} exceeds {report.tolerance:g}")
        differing = [g.prompt for g in getattr(report, "generations", []) if not g.match]
        if exact and differing and getattr(report, "generations_required", True):
            problems.append(f"greedy generation differs for {', '.join(map(repr, differing))}")
        if exact and not getattr(report, "top1_match", True):
            problems.append("top-1 tokens differ")
        if getattr(report, "tokenizer_match", None) is False:
            problems.append("the output's tokenizer encodes the verification text differently from the source's")
    return "; ".join(problems) or None


def card_lines(reports, exact: bool = True) -> list[str]:
    """A model card's verification section: each report's table, or why there is none."""
    lines = [f"## Verification ({reports[0].dtype if reports else 'float32'}, real text)", ""]
    if not reports:
        lines.append("Not run (`--no-verify`).")
    problem = failure(reports, exact)
    if problem:
        lines += [f"**Verification FAILED**: {problem}. Please report it with this card.", ""]
    for report in reports:
        lines += ["```", report.table(), "```", ""]
    return lines


@torch.no_grad()
def compare_text(original, converted, input_ids: torch.Tensor, name: str) -> TextComparison:
    """Run both models on `input_ids` (1, T) without a KV cache and compare their logits (`compare_logits`); `name`
    labels the text."""
    logits_a = original(input_ids, use_cache=False).logits.float()[0]  # (T, vocab)
    logits_b = converted(input_ids, use_cache=False).logits.float()[0]
    return compare_logits(logits_a, logits_b, input_ids, name)


def compare_logits(logits_a: torch.Tensor, logits_b: torch.Tensor, input_ids: torch.Tensor, name: str) -> TextComparison:
    """Figures of two models' logits (T, vocab) on the same token ids (1, T)."""
    diff = (logits_a - logits_b).abs()
    log_p, log_q = F.log_softmax(logits_a, -1), F.log_softmax(logits_b, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    labels = input_ids[0, 1:]
    return TextComparison(
        name=name,
        tokens=input_ids.shape[1],
        max_abs_logit_diff=diff.max().item(),
        mean_abs_logit_diff=diff.mean().item(),
        mean_kl=kl.item(),
        loss_original=F.cross_entropy(logits_a[:-1], labels).item(),
        loss_converted=F.cross_entropy(logits_b[:-1], labels).item(),
    )


TOKENIZER_LINES = {True: "tokenizer: the output's encodes every text and prompt to the source's ids",
                   False: "tokenizer: DIFFERS — the output's encodes the texts to other ids than the source's"}


def same_tokenization(tokenizer, directory, texts) -> bool:
    """Whether the tokenizer saved in `directory` loads and encodes every one of `texts` to the ids `tokenizer` gives
    (a tokenizer file left behind, e.g. BERT's vocab.txt, loads silently and maps everything to [UNK])."""
    from transformers import AutoTokenizer

    try:
        written = AutoTokenizer.from_pretrained(str(directory))
    except Exception:  # noqa: BLE001 (any failure to load is a missing or broken tokenizer)
        return False
    return all(written(text).input_ids == tokenizer(text).input_ids for text in texts)


@torch.no_grad()
def own_rounding(model, tokenizer, texts: dict[str, str], dtype: torch.dtype, reference_dtype: torch.dtype,
                 max_tokens: int = 512) -> float:
    """max |Δlogit| between `model` run in `dtype` (e.g. bfloat16) and in `reference_dtype` (e.g. float64) on the
    first `max_tokens` tokens of each text: the error the model makes anyway when run in its own precision. The
    model is left in `reference_dtype` (switching between floating dtypes that hold its weights is lossless)."""
    max_tokens = clip_to_context(max_tokens, context_length(model.config), "rounding texts")
    largest = 0.0
    for text in texts.values():
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
        low = model.to(dtype)(ids, use_cache=False).logits.float()
        high = model.to(reference_dtype)(ids, use_cache=False).logits
        largest = max(largest, (low.to(high.dtype) - high).abs().max().item())
    return largest


def check_tokenizer(report, source, directory) -> None:
    """Set `report.tokenizer_match`: does the tokenizer written to `directory` encode the verification texts and
    prompts as the source's does?"""
    from netmorph.sources import default_texts

    report.tokenizer_match = same_tokenization(source.load_tokenizer(), directory,
                                               [*default_texts().values(), *DEFAULT_PROMPTS])


def context_length(*configs) -> int | None:
    """The longest sequence every model of these configs accepts (`max_position_embeddings`; GPT-2's `n_positions`
    is the same field), None when none of them states one."""
    limits = [getattr(config, "max_position_embeddings", None) for config in configs]
    limits = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return min(limits) if limits else None


def clip_to_context(tokens: int, limit: int | None, what: str) -> int:
    """`tokens`, or the context `limit` when that is shorter (saying so on the log)."""
    if limit is None or tokens <= limit:
        return tokens
    log.info("%s: the model's context is %d tokens, so %d are used instead of %d", what, limit, limit, tokens)
    return limit


@torch.no_grad()
def greedy_batch(model, tokenizer, prompts, new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts`, generated as ONE left-padded batch with the KV cache — the path serving
    takes, so the padding mask, the positions of padded rows and every cache update are exercised. Returns the
    decoded new text of each prompt (special tokens dropped)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else pad_id
    encoded = [tokenizer(prompt).input_ids for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):  # left padding: every prompt ends at the last column
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    out = model.generate(input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]


def compare_models(
    original,
    converted,
    tokenizer,
    texts: dict[str, str],
    prompts=DEFAULT_PROMPTS,
    max_tokens: int = 512,
    new_tokens: int = 32,
    tolerance: float = 1e-4,
) -> VerifyReport:
    """Both models on the same real texts (logits of the first `max_tokens` tokens of each) and the same prompts
    (greedy generation of `new_tokens` tokens, all prompts as one left-padded batch with the KV cache).
    Both models must already be on the attention backend to compare (`attn_implementation` is read from one)."""
    report = VerifyReport(attn_implementation=converted.config._attn_implementation, tolerance=tolerance,
                          dtype=str(next(converted.parameters()).dtype).removeprefix("torch."))
    limit = context_length(original.config, converted.config)
    max_tokens = clip_to_context(max_tokens, limit, "verification texts")
    for name, text in texts.items():
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
        report.texts.append(compare_text(original, converted, ids, name))
    longest_prompt = max((len(tokenizer(prompt).input_ids) for prompt in prompts), default=0)
    if limit is not None and longest_prompt + new_tokens > limit:
        new_tokens = max(limit - longest_prompt, 0)
        log.info("greedy generation: the model's context is %d tokens, so %d new tokens are generated", limit, new_tokens)
    if prompts and new_tokens:
        pairs = zip(prompts, greedy_batch(original, tokenizer, prompts, new_tokens),
                    greedy_batch(converted, tokenizer, prompts, new_tokens))
        report.generations = [GenerationComparison(*pair) for pair in pairs]
    return report


def load_pair(original: str, converted: str, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
              allow_pickle: bool = False):
    """Two fp32 models from any netmorph SOURCEs (model dir, .gguf, YAML) and the tokenizer of the first that has one."""
    import netmorph.auto  # noqa: F401  (registers the differential-attention classes with the Auto classes)
    from netmorph.sources import resolve_source

    sources = [resolve_source(p, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code) for p in (original, converted)]
    models = [source.load_model(attn_implementation) for source in sources]
    for source in sources:
        try:
            return *models, source.load_tokenizer()
        except NetmorphError:
            continue
    raise NetmorphError(f"neither {original} nor {converted} has a tokenizer: copy the tokenizer files into one of them")
