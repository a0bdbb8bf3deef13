"""tunelab eval vs lm-evaluation-harness: same tiny model, same local files, same answers.

lm-eval runs in-process with its HFLM over the transformers model; tunelab scores with its own
Transformer loaded from the same directory. Custom lm-eval task YAMLs read the local files with
the same prompt format as lm-eval's stock ``mmlu`` and ``boolq`` tasks.
"""

from __future__ import annotations

import math

import pytest

from tests.helpers.eval import MMLU_ROWS, write_boolq, write_mmlu

lm_eval = pytest.importorskip("lm_eval")

MAX_LENGTH = 256

_MMLU_YAML = """
task: {task}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {data}/test/{subject}_test.csv
    dev: {data}/dev/{subject}_dev.csv
  column_names: [question, A, B, C, D, answer]
  cache_dir: {cache}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
description: "The following are multiple choice questions (with answers) about {title}.\\n\\n"
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_BOOLQ_YAML = """
task: tl_boolq
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}/dev.jsonl
    train: {data}/train.jsonl
  cache_dir: {cache}
validation_split: validation
training_split: train
fewshot_split: train
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: "{{{{answer | int}}}}"
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def hflm(tiny_hf_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=str(tiny_hf_dir),
        backend="causal",
        batch_size=1,
        device="cpu",
        dtype="float32",
        max_length=MAX_LENGTH,
    )


@pytest.fixture(scope="module")
def lmeval_run(tmp_path_factory, hflm):
    """lm-eval results for both tasks (one HFLM, one evaluator call per shot count)."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lmeval")
    mmlu = write_mmlu(root / "mmlu")
    boolq = write_boolq(root / "boolq")
    yamls = root / "yaml"
    yamls.mkdir()
    for subject in MMLU_ROWS:
        (yamls / f"{subject}.yaml").write_text(
            _MMLU_YAML.format(
                task=f"tl_mmlu_{subject}",
                data=mmlu,
                subject=subject,
                title=subject.replace("_", " "),
                cache=root / "cache",
            )
        )
    (yamls / "boolq.yaml").write_text(_BOOLQ_YAML.format(data=boolq, cache=root / "cache"))
    lm = hflm
    manager = TaskManager(include_path=str(yamls))
    runs = {}
    for shots in (0, 2):
        runs[shots] = evaluator.simple_evaluate(
            model=lm,
            tasks=[f"tl_mmlu_{s}" for s in MMLU_ROWS] + ["tl_boolq"],
            task_manager=manager,
            num_fewshot=shots,
            log_samples=True,
        )
    return {"mmlu": mmlu, "boolq": boolq, "runs": runs}


@pytest.fixture(scope="module")
def tunelab_scorer(tiny_hf_dir):
    from transformers import AutoTokenizer

    from tunelab.eval.harness import LMScorer
    from tunelab.model.hf import load_model

    model = load_model(tiny_hf_dir, dtype="float32")
    tok = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    return LMScorer(tok, forward=lambda ids, pos: model(ids, pos), max_length=MAX_LENGTH)


@pytest.mark.parametrize(
    "context, continuation",
    [
        ("Answer:", " A"),
        ("Answer: ", "A"),  # trailing context space moves into the continuation
        ("Question: is it?\nAnswer:  \n", " yes"),
        ("", "hello world"),  # empty context: conditioned on the prefix (eos) token
        ("数学题：", "答案"),
    ],
)
def test_tokenization_matches_lm_eval(hflm, tunelab_scorer, context, continuation):
    from lm_eval.api.instance import Instance

    from tunelab.eval.harness import LoglikelihoodRequest

    req = LoglikelihoodRequest(context, continuation)
    if context:
        assert tunelab_scorer.encode_pair(req) == tuple(hflm._encode_pair(context, continuation))
    inst = Instance("loglikelihood", {}, (context, continuation), 0)
    [(lm_lp, lm_greedy)] = hflm.loglikelihood([inst], disable_tqdm=True)
    [(lp, greedy)] = tunelab_scorer.loglikelihood([req])
    assert lp == pytest.approx(lm_lp, abs=1e-4) and greedy == lm_greedy


def _compare(task_name, lm_samples, lm_acc, result):
    assert len(lm_samples) == len(result.questions)
    for sample, q in zip(sorted(lm_samples, key=lambda s: s["doc_id"]), result.questions):
        contexts = {args[0] for args in sample["arguments"]}
        assert contexts == {q.prompt}, f"{task_name} {q.source}: prompt differs from lm-eval"
        lm_lps = [r[0] for r in sample["filtered_resps"]]
        assert q.choice_logprobs == pytest.approx(lm_lps, abs=1e-4)
        lm_choice = max(range(len(lm_lps)), key=lambda j: (lm_lps[j], -j))
        ours = q.choice_logprobs.index(max(q.choice_logprobs))
        assert ours == lm_choice, f"{task_name} {q.source}: choice differs from lm-eval"
        assert bool(sample["acc"]) == q.correct
    assert math.isclose(result.overall["accuracy"], lm_acc)


@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_mmlu_matches_lm_eval(lmeval_run, tunelab_scorer, shots, batch_size):
    from tunelab.eval.harness import EvalSettings, evaluate, summarize
    from tunelab.eval.tasks import get_task

    task = get_task("mmlu")
    subjects = task.load(lmeval_run["mmlu"], shots)
    res = evaluate(
        task,
        subjects,
        tunelab_scorer,
        EvalSettings("loglikelihood", shots, batch_size),
        progress=False,
    )
    run = lmeval_run["runs"][shots]
    for subject in MMLU_ROWS:
        name = f"tl_mmlu_{subject}"
        sub = summarize("mmlu", [q for q in res.questions if q.subject == subject])
        _compare(name, run["samples"][name], run["results"][name]["acc,none"], sub)
        assert res.subjects[subject]["accuracy"] == pytest.approx(run["results"][name]["acc,none"])


@pytest.mark.parametrize("shots", [0, 2])
def test_boolq_matches_lm_eval(lmeval_run, tunelab_scorer, shots):
    from tunelab.eval.harness import EvalSettings, evaluate
    from tunelab.eval.tasks import get_task

    task = get_task("boolq")
    subjects = task.load(lmeval_run["boolq"], shots)
    res = evaluate(
        task, subjects, tunelab_scorer, EvalSettings("loglikelihood", shots, 2), progress=False
    )
    run = lmeval_run["runs"][shots]
    _compare("tl_boolq", run["samples"]["tl_boolq"], run["results"]["tl_boolq"]["acc,none"], res)


_GSM8K_YAML = """
task: tl_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/test.jsonl
    train: {data}/train.jsonl
  cache_dir: {cache}
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  do_sample: false
  max_gen_toks: 12
metric_list:
  - metric: exact_match
"""


def test_gsm8k_generation_matches_lm_eval(tmp_path, tiny_hf_dir, hflm):
    """Generation mode: same prompts and the same greedy continuations as lm-eval's HFLM."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from tests.helpers.eval import write_gsm8k
    from tunelab.eval.harness import EvalSettings, LMScorer, evaluate
    from tunelab.eval.tasks import get_task
    from tunelab.infer.engine import Engine

    gsm = write_gsm8k(tmp_path / "gsm8k")
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "gsm8k.yaml").write_text(
        _GSM8K_YAML.format(data=gsm, cache=tmp_path / "cache")
    )
    run = evaluator.simple_evaluate(
        model=hflm,
        tasks=["tl_gsm8k"],
        task_manager=TaskManager(include_path=str(tmp_path / "yaml")),
        num_fewshot=2,
        log_samples=True,
    )
    samples = sorted(run["samples"]["tl_gsm8k"], key=lambda s: s["doc_id"])

    task = get_task("gsm8k")
    engine = Engine.from_pretrained(tiny_hf_dir, dtype="float32", device="cpu")
    scorer = LMScorer.from_engine(engine, MAX_LENGTH)
    res = evaluate(
        task, task.load(gsm, 2), scorer, EvalSettings("generate", 2, 2, 12), progress=False
    )
    assert len(samples) == len(res.questions) == 2
    for sample, q in zip(samples, res.questions):
        assert sample["arguments"][0][0] == q.prompt
        assert sample["resps"][0][0] == q.generated
    assert any(len(q.generated) > 3 for q in res.questions)  # real continuations, not empty
