"""Scoring tasks with a model: log-likelihood over answer choices, or generation + extraction.

Everything model-specific hides behind the two methods of `Scorer`, so tasks, prompts and the
comparison with lm-eval are independent of how a model is loaded. `LMScorer` implements them
over any ``forward(input_ids [B,S], position_ids [B,S]) -> logits [B,S,V]`` and any
``generate(prompt_ids, max_new_tokens) -> new ids`` function.

Tokenization follows lm-eval's HFLM exactly, so numbers are comparable: trailing spaces of the
context move to the continuation, ``context + continuation`` is encoded as a whole and split
at the length of the encoded context, and sequences longer than the model are cut on the left.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from tunelab.eval.tasks.base import Doc, Subject, Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``continuation`` after ``context`` (text, or token ids already rendered)."""

    context: str | tuple[int, ...]
    continuation: str


@dataclass(frozen=True)
class GenerateRequest:
    context: str | tuple[int, ...]
    max_new_tokens: int
    stop: tuple[str, ...] = ()


class Scorer(Protocol):
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation tokens, whether greedy decoding gives them)."""
        ...

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        """Greedy continuation text, cut before the first stop string."""
        ...


ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (prompt ids, max_new_tokens, stop strings) -> new ids per prompt (greedy)
GenerateFn = Callable[[list[list[int]], int, tuple[str, ...]], list[list[int]]]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class LMScorer:
    """`Scorer` over a tokenizer, a forward function and (for generation) a generate function.

    One `loglikelihood` call is one forward pass over all its requests, right-padded (requests
    with identical inputs share a row); the harness passes one batch of questions with all
    their choices per call.
    """

    def __init__(
        self,
        tokenizer,
        forward: ForwardFn,
        generate: GenerateFn | None = None,
        max_length: int = 2048,
        device: str | torch.device = "cpu",
    ) -> None:
        self.tokenizer = tokenizer
        self.forward = forward
        self._generate = generate
        self.max_length = max_length
        self.device = torch.device(device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_engine(cls, engine, max_length: int | None = None) -> LMScorer:
        """Score with a `tunelab.infer.engine.Engine`: its model's forward, its greedy decoding."""
        from tunelab.infer.sampling import GenerationConfig

        def generate(prompts: list[list[int]], max_new: int, stop: tuple[str, ...]):
            config = GenerationConfig(max_new_tokens=max_new, temperature=0.0, stop=stop)
            return engine.generate(prompts, config)

        return cls(
            engine.tokenizer,
            forward=lambda ids, pos: engine.model(ids, pos),
            generate=generate,
            max_length=max_length or engine.context_len,
            device=engine.device,
        )

    # -- tokenization (lm-eval's HFLM rules) --------------------------------------------------

    def encode(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):  # an already rendered chat prompt carries its BOS
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    @property
    def prefix_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode_pair(self, req: LoglikelihoodRequest) -> tuple[list[int], list[int]]:
        context, continuation = req.context, req.continuation
        if isinstance(context, tuple):
            return list(context), self.tokenizer.encode(continuation, add_special_tokens=False)
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_id:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        num_spaces = len(context) - len(context.rstrip())
        if num_spaces:
            continuation = context[-num_spaces:] + continuation
            context = context[:-num_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    # -- scoring --------------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        if not requests:
            return []
        # Requests with the same model input share one row: e.g. the one-token choices " A".." D"
        # of a question all read their log-prob from the forward pass over the question alone.
        rows: list[list[int]] = []
        row_of: dict[tuple[int, ...], int] = {}
        which, conts = [], []
        for req in requests:
            ctx, cont = self.encode_pair(req)
            if not cont:
                raise ValueError(f"continuation {req.continuation!r} encodes to no tokens")
            row = (ctx + cont)[-(self.max_length + 1) :][:-1]
            key = tuple(row)
            if key not in row_of:
                row_of[key] = len(rows)
                rows.append(row)
            which.append(row_of[key])
            conts.append(cont)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        # right padding: every row's real tokens keep positions 0..len-1 and never see padding
        pos = torch.arange(width, dtype=torch.long).expand(len(rows), width)
        logits = self.forward(ids.to(self.device), pos.to(self.device))  # [B, S, V]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for i, cont in zip(which, conts):
            row, n = rows[i], len(cont)
            lp = logprobs[i, len(row) - n : len(row)]  # [n, V]: predictions of the cont tokens
            target = torch.tensor(cont, device=lp.device)
            total = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            out.append((total, greedy))
        return out

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        if self._generate is None:
            raise RuntimeError("this scorer was built without a generate function")
        # one call per distinct (max_new_tokens, stop) (a task uses one)
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault((req.max_new_tokens, tuple(req.stop)), []).append(i)
        texts: dict[int, str] = {}
        for (max_new, stop), idx in groups.items():
            # like lm-eval, keep the end of a prompt that leaves no room for the answer
            keep = max(1, self.max_length - max_new)
            prompts = [
                (list(c) if isinstance(c := requests[i].context, tuple) else self.encode(c))[-keep:]
                for i in idx
            ]
            new_ids = self._generate(prompts, max_new, stop)
            for i, ids in zip(idx, new_ids):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                texts[i] = cut_at_stop(text, stop)
        return [texts[i] for i in range(len(requests))]


# ---- the evaluation loop ----------------------------------------------------------------------


@dataclass
class EvalSettings:
    scoring: str  # "loglikelihood" | "generate"
    shots: int
    batch_size: int = 1
    max_new_tokens: int = 32
    limit: int | None = None  # questions per subject


@dataclass
class QuestionResult:
    subject: str
    source: str
    prompt: str
    gold: str
    prediction: str
    correct: bool
    choice_logprobs: list[float] | None = None
    generated: str | None = None
    detail: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    task: str
    subjects: dict[str, dict]  # subject -> {"num_questions", "num_correct", "accuracy"}
    overall: dict  # micro (all questions) and macro (mean over subjects) accuracy
    questions: list[QuestionResult]
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "overall": self.overall,
            "subjects": self.subjects,
            "config": self.config,
            "questions": [asdict(q) for q in self.questions],
        }

    def table(self) -> str:
        width = max([len(s) for s in self.subjects] + [len("overall (micro)")])
        lines = [f"{'subject':<{width}}  {'n':>6}  {'accuracy':>8}", "-" * (width + 18)]
        for name, s in self.subjects.items():
            lines.append(f"{name:<{width}}  {s['num_questions']:>6}  {s['accuracy']:>8.4f}")
        lines.append("-" * (width + 18))
        o = self.overall
        lines.append(
            f"{'overall (micro)':<{width}}  {o['num_questions']:>6}  {o['accuracy']:>8.4f}"
        )
        if len(self.subjects) > 1:
            lines.append(f"{'overall (macro)':<{width}}  {'':>6}  {o['macro_accuracy']:>8.4f}")
        return "\n".join(lines)


PromptWrap = Callable[[str], "str | tuple[int, ...]"]


def evaluate(
    task: Task,
    subjects: list[Subject],
    scorer: Scorer,
    settings: EvalSettings,
    wrap: PromptWrap | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score every (limited) question of ``subjects``.

    ``wrap`` renders the task prompt as the fine-tuned model expects it (a chat template); the
    answer choices are then scored without the leading delimiter, as the assistant's reply.
    """
    from tqdm import tqdm

    work = [
        (s, d) for s in subjects for d in (s.docs[: settings.limit] if settings.limit else s.docs)
    ]
    results: list[QuestionResult] = []
    bar = tqdm(total=len(work), desc=f"eval {task.name}", disable=not progress, unit="q")
    step = max(1, settings.batch_size)
    for start in range(0, len(work), step):
        chunk = work[start : start + step]
        prompts = [task.prompt(doc, subject.shots) for subject, doc in chunk]
        contexts = [wrap(p) if wrap else p for p in prompts]
        if settings.scoring == "loglikelihood":
            results.extend(_score_choices(task, chunk, prompts, contexts, scorer, wrap is not None))
        elif settings.scoring == "generate":
            reqs = [GenerateRequest(c, settings.max_new_tokens, task.stop) for c in contexts]
            for (_, doc), prompt, text in zip(chunk, prompts, scorer.generate(reqs)):
                pred = task.extract(text, doc)
                correct, detail = task.judge(pred, doc)
                results.append(
                    QuestionResult(
                        doc.subject,
                        doc.source,
                        prompt,
                        task.gold_text(doc),
                        pred,
                        correct,
                        generated=text,
                        detail=detail,
                    )
                )
        else:
            raise ValueError(f"unknown scoring mode {settings.scoring!r}")
        bar.update(len(chunk))
    bar.close()
    return summarize(task.name, results)


def _score_choices(
    task: Task,
    chunk: list[tuple[Subject, Doc]],
    prompts: list[str],
    contexts: list,
    scorer: Scorer,
    wrapped: bool,
) -> list[QuestionResult]:
    reqs, spans = [], []
    for (_, doc), ctx in zip(chunk, contexts):
        choices = task.choices(doc)
        delim = "" if wrapped else task.target_delimiter
        spans.append((len(reqs), len(choices)))
        reqs.extend(LoglikelihoodRequest(ctx, delim + c) for c in choices)
    scores = scorer.loglikelihood(reqs)
    out = []
    for (_, doc), prompt, (first, n) in zip(chunk, prompts, spans):
        lps = [scores[first + j][0] for j in range(n)]
        best = max(range(n), key=lambda j: (lps[j], -j))  # ties: the first, like numpy argmax
        choices = task.choices(doc)
        gold = task.gold(doc)
        out.append(
            QuestionResult(
                doc.subject,
                doc.source,
                prompt,
                choices[gold],
                choices[best],
                best == gold,
                choice_logprobs=lps,
            )
        )
    return out


def summarize(task_name: str, results: list[QuestionResult]) -> EvalResult:
    per: dict[str, dict] = {}
    for r in results:
        s = per.setdefault(r.subject, {"num_questions": 0, "num_correct": 0})
        s["num_questions"] += 1
        s["num_correct"] += int(r.correct)
    for s in per.values():
        s["accuracy"] = s["num_correct"] / s["num_questions"]
    total = sum(s["num_questions"] for s in per.values())
    correct = sum(s["num_correct"] for s in per.values())
    overall = {
        "num_questions": total,
        "num_correct": correct,
        "accuracy": correct / total if total else math.nan,
        "macro_accuracy": (sum(s["accuracy"] for s in per.values()) / len(per))
        if per
        else math.nan,
    }
    return EvalResult(task_name, per, overall, results)
