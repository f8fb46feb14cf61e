"""One query through AdaComp-RAG: gate -> retrieve k passages -> compress -> the context the model reads.

`Setting` is what a user chooses (the gate, k, the compression budget, the threshold); `prepare` runs it for one
question and times each part (retrieval = encoding the query + searching the index; the gate's own scoring;
compression), so a task or `budgetlm rag ask` adds the model's scoring or generation on top.

The work per gate: `never` none; `always` retrieval; `grad` the model's forward + backward on the question, then
retrieval when it says so; `entropy` one forward on the prompt without retrieval (on the LM's query cache: when it
says "no retrieval", the scoring of that prompt's choices starts from this forward), then retrieval when it says so;
`margin` retrieval always (its score is the retrieval's), the passages used when it says so; `oracle` (tasks only)
the item's own passage, no retrieval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from budgetlm.errors import ConfigError
from budgetlm.rag.gates import GATES, decide, entropy_score, grad_score, margin_score

ALL_GATES = (*GATES, "oracle")


@dataclass(frozen=True)
class Setting:
    gate: str = "always"
    k: int = 3
    budget: int | None = None  # model tokens of compressed context; None: the passages as retrieved
    threshold: float | None = None  # None: calibrated (scored gates)

    def __post_init__(self):
        if self.gate not in ALL_GATES:
            raise ConfigError(f"unknown gate '{self.gate}'; choose one of {', '.join(ALL_GATES)}")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1 passage (got {self.k})")
        if self.budget is not None and self.budget < 1:
            raise ConfigError(f"the compression budget must be at least 1 token (got {self.budget})")

    @property
    def retrieves(self) -> bool:
        return self.gate not in ("never", "oracle")

    def label(self) -> str:
        parts = [f"gate={self.gate}"]
        if self.retrieves:
            parts.append(f"k={self.k}")
        if self.threshold is not None and self.gate not in ("always", "never", "oracle"):
            parts.append(f"threshold={self.threshold:g}")
        if self.budget is not None and self.gate != "never":
            parts.append(f"budget={self.budget}")
        return ":".join(parts)


@dataclass
class Prepared:
    retrieve: bool
    score: float | None
    hits: list = field(default_factory=list)  # index.Hit, best first
    context: str = ""
    compressed: object | None = None  # compress.Compressed
    seconds: dict = field(default_factory=dict)  # retrieve_s, gate_s, compress_s


def warm_up(lm) -> None:
    """Load the encoder and run the model once before anything is timed (the first call of each pays its set-up)."""
    from budgetlm.decode import query
    from budgetlm.models.encoder import embed

    embed(["warm-up"])
    query.loglikelihood(lm, [("Question: warm-up\nAnswer:", " yes")])


def query_vector(question: str) -> np.ndarray:
    from budgetlm.models.encoder import embed

    return embed([question])[0]


def check_gate(lm, gate: str) -> None:
    """The grad gate differentiates the torch model's loss; an LM computed elsewhere (llama.cpp) has none."""
    if gate == "grad" and getattr(lm, "model", None) is None:
        raise ConfigError(
            f"gate 'grad' needs the torch model's input-embedding gradient, which the {getattr(lm, 'runtime', 'this')} "
            "runtime does not give: use gate=entropy or gate=margin there"
        )


def prepare(
    lm,
    index,
    question: str,
    setting: Setting,
    no_rag_prompt: str,
    threshold: float | None = None,
    oracle: str | None = None,
) -> Prepared:
    """Decide, retrieve and compress for one question. `threshold` overrides setting.threshold (a calibrated one);
    `oracle`: the passage the `oracle` gate uses."""
    from budgetlm.rag.compress import compress
    from budgetlm.rag.docs import sentences

    check_gate(lm, setting.gate)
    threshold = setting.threshold if threshold is None else threshold
    if setting.gate in ("grad", "entropy", "margin") and threshold is None:
        raise ConfigError(f"gate '{setting.gate}' needs a threshold (give one, or calibrate it)")
    secs = {"retrieve_s": 0.0, "gate_s": 0.0, "compress_s": 0.0}
    qvec, hits = None, []

    def retrieve():
        nonlocal qvec, hits
        t = time.perf_counter()
        qvec = query_vector(question)
        hits = index.search(qvec, setting.k, question)
        secs["retrieve_s"] += time.perf_counter() - t

    score = None
    t = time.perf_counter()
    if setting.gate == "grad":
        score = grad_score(lm.model, lm.prefix_token, lm.encode(question))
    elif setting.gate == "entropy":
        score = entropy_score(lm, no_rag_prompt)
    secs["gate_s"] = time.perf_counter() - t
    if setting.gate == "margin":
        retrieve()
        score = margin_score(index.dense(qvec, 2)[0][0])  # the dense ranking's, also for a hybrid index
    use = setting.gate == "oracle" or decide(setting.gate, score, threshold)
    if use and setting.gate != "oracle" and not hits:
        retrieve()
    if not use:
        return Prepared(False, score, hits, "", None, secs)
    passages = [oracle or ""] if setting.gate == "oracle" else [h.text for h in hits]
    if setting.budget is None:
        return Prepared(True, score, hits, "\n".join(passages), None, secs)
    t = time.perf_counter()
    if qvec is None:
        qvec = query_vector(question)
    if setting.gate == "oracle":
        parts = [(sentences(oracle or ""), None)]
    else:
        parts = [(h.sentences, h.sentence_vectors) for h in hits]
    comp = compress(qvec, parts, setting.budget, lambda text: len(lm.encode(text)))
    secs["compress_s"] = time.perf_counter() - t
    return Prepared(True, score, hits, comp.text, comp, secs)
