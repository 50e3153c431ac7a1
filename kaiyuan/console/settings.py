"""``console:`` in the config: the /ui web console, its sessions and optional OIDC single sign-on."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OIDCSettings(_Strict):
    """Sign in through an OpenID Connect provider (authorization code flow with PKCE).

    A user is an admin when ``admin_claim`` holds one of ``admin_values`` (a string claim or a list
    such as ``groups``); otherwise ``team_claim`` names their team (id or name). Anyone else is refused.
    """

    issuer: str = Field(..., description="https://login.example.com/realms/x; discovery at /.well-known/openid-configuration")
    client_id: str = Field(..., min_length=1)
    client_secret: str = Field(..., min_length=1, description="use ${ENV}")
    redirect_url: str | None = Field(None, description="default: <the URL the console was opened on>/ui/oidc/callback")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile"])
    admin_claim: str = "groups"
    admin_values: list[str] = Field(default_factory=lambda: ["kaiyuan-admins"])
    team_claim: str | None = Field("kaiyuan_team", description="claim holding a team id or name")
    label: str = Field("Sign in with SSO", max_length=100)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError(f"must be the issuer URL (https://...), got {v!r}")
        return v.rstrip("/")


class ConsoleSettings(_Strict):
    enabled: bool = Field(True, description="serve /ui (it still needs server.master_key to sign in)")
    reference_model: str | None = Field(
        None, description="closed model to compare spend against, e.g. gpt-4o (a configured model or a catalog row)"
    )
    session_ttl_s: float = Field(8 * 3600, gt=0, le=30 * 86400, description="how long a sign-in lasts")
    session_secret: str | None = Field(
        None, min_length=32, description="cookie signing secret; default: derived from server.master_key (same on every replica)"
    )
    secure_cookies: bool = Field(False, description="mark cookies Secure (set it when the console is served over HTTPS)")
    rollup_interval_s: float = Field(30.0, gt=0, description="how often the hourly usage rollup catches up")
    oidc: OIDCSettings | None = None
