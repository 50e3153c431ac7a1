"""Trial definitions (pydantic): from the ``trials:`` list of the config, or the admin API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kaiyuan.trials.regex_match import check_pattern

# An offline replay marks its calls with this header (value: the trial's name). The gateway then
# leaves them out of live trials (no canary split, no mirror) and logs them with trial
# ``replay:NAME``, so savings projections never count replays as traffic.
REPLAY_HEADER = "x-kaiyuan-trial-replay"
REPLAY_PREFIX = "replay:"

DEFAULT_JUDGE_PROMPT = """You are comparing two answers to the same request. Judge which answer is more \
helpful, correct and complete. Ignore length and style unless they matter for the request.

[Request]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Reply with a short reason, then your verdict on the last line, exactly one of:
[[A]] if A is better, [[B]] if B is better, [[C]] for a tie."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeSettings(_Strict):
    model: str = Field(..., min_length=1, description="a model configured on this gateway")
    prompt: str = Field(DEFAULT_JUDGE_PROMPT, description="with {question}, {answer_a}, {answer_b}")
    both_orders: bool = Field(True, description="judge (incumbent, candidate) and (candidate, incumbent)")
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _placeholders(self) -> JudgeSettings:
        missing = [p for p in ("{question}", "{answer_a}", "{answer_b}") if p not in self.prompt]
        if missing:
            raise ValueError(f"judge prompt must contain {', '.join(missing)}")
        return self


ScorerType = Literal["exact", "normalized", "regex", "numeric", "json_schema", "tool_call", "tool_schema", "tool_agreement",
                     "plugin"]


class ScorerSpec(_Strict):
    type: ScorerType
    name: str | None = Field(None, description="label in reports; defaults to the type (or plugin name)")
    pattern: str | None = Field(None, description="regex scorer: pattern the answer must match (else the item's reference)")
    timeout_s: float = Field(1.0, gt=0, le=30, description="regex scorer: time limit of one match; past it the "
                                                             "answer scores 0 with the reason recorded")
    json_schema: dict[str, Any] | None = Field(
        None, alias="schema", description="json_schema scorer (else the item's 'schema', else the request's response_format)")
    tolerance: float = Field(1e-6, ge=0, description="numeric scorer: absolute tolerance")
    plugin: str | None = Field(None, description="entry point name in the 'kaiyuan.scorers' group")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        return None if v is None else check_pattern(v)  # ValueError naming the problem

    @model_validator(mode="after")
    def _check(self) -> ScorerSpec:
        if self.type == "plugin" and not self.plugin:
            raise ValueError("a plugin scorer needs 'plugin': the entry point name in group kaiyuan.scorers")
        return self

    @property
    def label(self) -> str:
        return self.name or (self.plugin if self.type == "plugin" and self.plugin else self.type)


class GuardSettings(_Strict):
    """Automatic rollback lines for a canary or a promotion (see kaiyuan/trials/guard.py)."""

    max_loss_rate: float | None = Field(None, gt=0, lt=1, description="judged loss rate of the candidate's answers")
    max_error_rate: float | None = Field(None, gt=0, lt=1, description="share of the candidate's requests that fail")
    max_p95_ms: float | None = Field(None, gt=0, description="p95 latency of the candidate's answers, ms")
    min_results: int = Field(20, ge=1, description="results a metric needs before it may trigger a rollback")

    @model_validator(mode="after")
    def _some_line(self) -> GuardSettings:
        if self.max_loss_rate is None and self.max_error_rate is None and self.max_p95_ms is None:
            raise ValueError("a guard needs at least one of max_loss_rate, max_error_rate, max_p95_ms")
        return self


class Price(_Strict):
    input_per_mtok: float = Field(..., ge=0, description="USD per 1M prompt tokens")
    output_per_mtok: float = Field(..., ge=0, description="USD per 1M completion tokens")


class TrialConfig(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    incumbent: str = Field(..., min_length=1)
    candidates: list[str] = Field(..., min_length=1)
    mode: Literal["shadow", "canary", "offline"] = "shadow"
    sample_rate: float = Field(0.1, ge=0, le=1, description="shadow: share mirrored; canary: share answered by the candidate")
    keys: list[str] | None = Field(None, description="key ids taking part (default: all)")
    teams: list[str] | None = Field(None, description="team ids taking part (default: all)")
    judge: JudgeSettings | None = None
    scorers: list[ScorerSpec] = Field(default_factory=list)
    margin: float = Field(0.05, ge=0, le=1, description="non-inferiority margin")
    alpha: float = Field(0.05, gt=0, lt=1, description="1 - confidence level")
    primary: str | None = Field(None, description="'judge' or a scorer label; default: judge if set, else the first scorer")
    budget_usd: float | None = Field(None, ge=0, description="cap on the trial's own spend (candidate + judge calls)")
    prices: dict[str, Price] = Field(default_factory=dict, description="per-model prices when the catalog has none")
    max_concurrency: int = Field(4, gt=0, description="background calls in flight at once")
    sticky: Literal["user", "first_message"] = Field("user", description="canary: what keeps a conversation on one arm")
    canary_judge_rate: float = Field(
        0.1, ge=0, le=1, description="canary with a judge: share of candidate-arm answers judged against an incumbent call "
        "made in the background")
    guard: GuardSettings | None = Field(
        None, description="canary / after promotion: roll back automatically when a line is crossed")
    dataset: str | None = Field(None, description="offline: JSONL file")
    order: Literal["shuffled", "dataset"] = Field(
        "shuffled", description="offline: replay in a seeded random order (default) or in the dataset's own order")
    seed: int = Field(0, ge=0, description="offline: seed of the random replay order (shown in the report)")
    planned_n: int | None = Field(
        None, ge=30, description="fixed-horizon verdict: read once at this many results (default: anytime-valid sequence)")
    enabled: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrialConfig:
        if self.incumbent in self.candidates:
            raise ValueError(f"trial {self.name!r}: the incumbent {self.incumbent!r} is also a candidate")
        if self.mode == "canary" and len(self.candidates) != 1:
            raise ValueError(f"trial {self.name!r}: a canary trial has exactly one candidate")
        labels = [s.label for s in self.scorers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"trial {self.name!r}: scorer labels must be unique; name them with 'name'")
        if self.primary is not None and self.primary != "judge" and self.primary not in labels:
            raise ValueError(f"trial {self.name!r}: primary {self.primary!r} is neither 'judge' nor a scorer label")
        if self.guard is not None and self.mode == "offline":
            raise ValueError(f"trial {self.name!r}: a guard watches live traffic; an offline trial has none")
        if self.guard is not None and self.guard.max_loss_rate is not None and self.judge is None:
            raise ValueError(f"trial {self.name!r}: guard.max_loss_rate needs a judge")
        if self.primary == "judge" and self.judge is None:
            raise ValueError(f"trial {self.name!r}: primary is 'judge' but no judge is configured")
        return self

    @property
    def primary_metric(self) -> str | None:
        if self.primary:
            return self.primary
        if self.judge is not None:
            return "judge"
        return self.scorers[0].label if self.scorers else None

    def models_used(self) -> list[tuple[str, str]]:
        """(key path, model) for every model the trial names."""
        out = [("incumbent", self.incumbent)] + [(f"candidates[{i}]", c) for i, c in enumerate(self.candidates)]
        if self.judge is not None:
            out.append(("judge.model", self.judge.model))
        return out


def check_trial_models(trials: list[TrialConfig], models: set[str]) -> None:
    """Raise ValueError naming the key when a trial names a model the gateway does not have."""
    names = [t.name for t in trials]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"trial names must be unique; repeated: {', '.join(dupes)}")
    for i, t in enumerate(trials):
        for path, model in t.models_used():
            if model not in models:
                known = ", ".join(sorted(models)) or "(none configured)"
                raise ValueError(f"trials[{i}].{path}: unknown model {model!r}; configured models: {known}")
