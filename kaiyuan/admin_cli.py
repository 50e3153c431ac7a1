"""``kaiyuan keys|teams|users|budgets|spend``: the admin API from the command line.

The CLI talks to a running gateway over HTTP (so the gateway's caches are invalidated and every
replica sees the same store): ``--url`` / ``KAIYUAN_URL`` (default http://127.0.0.1:4000) and
``--master-key`` / ``KAIYUAN_MASTER_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kaiyuan.cli import EXTRA_COMMANDS


class AdminError(Exception):
    pass


def call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None, query: dict[str, Any] | None = None) -> Any:
    url = (args.url or os.environ.get("KAIYUAN_URL") or "http://127.0.0.1:4000").rstrip("/") + path
    if query:
        q = {k: v for k, v in query.items() if v is not None}
        if q:
            url += "?" + urllib.parse.urlencode(q)
    key = args.master_key or os.environ.get("KAIYUAN_MASTER_KEY")
    if not key:
        raise AdminError("no master key: pass --master-key or set KAIYUAN_MASTER_KEY")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {key}"})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            if resp.headers.get("Content-Type", "").startswith("text/csv"):
                return raw.decode()
            return json.loads(raw or b"null")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except Exception:
            msg = e.reason
        raise AdminError(f"{e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise AdminError(f"cannot reach the gateway at {url}: {e.reason}") from None


def _conn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gateway URL (env KAIYUAN_URL, default http://127.0.0.1:4000)")
    p.add_argument("--master-key", help="the master key (env KAIYUAN_MASTER_KEY)")
    p.add_argument("--json", action="store_true", help="print raw JSON")


def _limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="allowed models, comma separated (default: all)")
    p.add_argument("--policy", help="data policy name")
    p.add_argument("--rpm", type=int)
    p.add_argument("--tpm", type=int)
    p.add_argument("--max-parallel", type=int)


def _limits(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if a.models is not None:
        out["allowed_models"] = [m.strip() for m in a.models.split(",") if m.strip()]
    for k in ("policy", "rpm", "tpm", "max_parallel"):
        if getattr(a, k) is not None:
            out[k] = getattr(a, k)
    return out


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def duration_s(v: str) -> float:
    m = _DURATION.match(v)
    if not m:
        raise argparse.ArgumentTypeError(f"durations look like 90s, 15m, 12h, 30d or 2w; got {v!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def budget_spec(v: str) -> dict[str, Any]:
    period, _, amount = v.partition("=")
    try:
        return {"period": period, "limit_usd": float(amount)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets look like month=50 or day=5; got {v!r}") from None


def _print(a: argparse.Namespace, data: Any) -> None:
    if isinstance(data, str):
        sys.stdout.write(data)
        return
    if a.json or not isinstance(data, dict) or "data" not in data or not isinstance(data["data"], list):
        print(json.dumps(data, indent=2, default=str))
        return
    rows = data["data"]
    if not rows:
        print("(none)")
        return
    cols = [c for c in rows[0] if c not in ("object",)]
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in cols))
    if "total" in data:
        print("total: " + ", ".join(f"{k}={_cell(v)}" for k, v in data["total"].items()))


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


# -- keys ------------------------------------------------------------------------------------------
def keys_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create a key (the secret is printed once)")
    c.add_argument("--name", required=True)
    c.add_argument("--team")
    c.add_argument("--user")
    c.add_argument("--budget", action="append", type=budget_spec, default=[], help="period=USD, e.g. month=50 (repeatable)")
    c.add_argument("--expires-in", type=duration_s, help="e.g. 30d")
    c.add_argument("--admin", action="store_true", help="admin-scoped: may use the admin API and the /ui console as an admin")
    _limit_args(c)
    ls = sub.add_parser("list")
    ls.add_argument("--team")
    for name in ("get", "revoke", "rotate"):
        x = sub.add_parser(name)
        x.add_argument("id")
    u = sub.add_parser("update")
    u.add_argument("id")
    u.add_argument("--name")
    u.add_argument("--expires-in", type=duration_s)
    _limit_args(u)
    for x in (c, ls, u, *[sub.choices[n] for n in ("get", "revoke", "rotate")]):
        _conn_args(x)


def keys_run(a: argparse.Namespace) -> int:
    if a.action == "create":
        body = {"name": a.name, "team_id": a.team, "user_id": a.user, "budgets": a.budget, **_limits(a)}
        if a.expires_in:
            body["expires_in_s"] = a.expires_in
        if a.admin:
            body["admin"] = True
        return _do(a, "POST", "/admin/keys", body)
    if a.action == "list":
        return _do(a, "GET", "/admin/keys", query={"team_id": a.team})
    if a.action == "get":
        return _do(a, "GET", f"/admin/keys/{a.id}")
    if a.action in ("revoke", "rotate"):
        return _do(a, "POST", f"/admin/keys/{a.id}/{a.action}", {})
    body = _limits(a)
    if a.name:
        body["name"] = a.name
    if a.expires_in:
        body["expires_in_s"] = a.expires_in
    return _do(a, "PATCH", f"/admin/keys/{a.id}", body)


# -- teams / users ---------------------------------------------------------------------------------
def teams_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create")
    c.add_argument("--name", required=True)
    _limit_args(c)
    ls = sub.add_parser("list")
    g = sub.add_parser("get")
    g.add_argument("id")
    d = sub.add_parser("delete")
    d.add_argument("id")
    u = sub.add_parser("update")
    u.add_argument("id")
    u.add_argument("--name")
    _limit_args(u)
    for x in (c, ls, g, d, u):
        _conn_args(x)


def teams_run(a: argparse.Namespace) -> int:
    if a.action == "create":
        return _do(a, "POST", "/admin/teams", {"name": a.name, **_limits(a)})
    if a.action == "list":
        return _do(a, "GET", "/admin/teams")
    if a.action == "get":
        return _do(a, "GET", f"/admin/teams/{a.id}")
    if a.action == "delete":
        return _do(a, "DELETE", f"/admin/teams/{a.id}")
    body = _limits(a)
    if a.name:
        body["name"] = a.name
    return _do(a, "PATCH", f"/admin/teams/{a.id}", body)


def users_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create")
    c.add_argument("--name", required=True)
    c.add_argument("--email")
    c.add_argument("--team")
    ls = sub.add_parser("list")
    for x in (c, ls):
        _conn_args(x)


def users_run(a: argparse.Namespace) -> int:
    if a.action == "create":
        return _do(a, "POST", "/admin/users", {"name": a.name, "email": a.email, "team_id": a.team})
    return _do(a, "GET", "/admin/users")


# -- budgets / spend -------------------------------------------------------------------------------
def budgets_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("set", help="create or change a budget")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--key")
    who.add_argument("--team")
    s.add_argument("--period", required=True, choices=["day", "week", "month", "total"])
    s.add_argument("--limit", required=True, type=float, help="USD")
    ls = sub.add_parser("list")
    d = sub.add_parser("delete")
    d.add_argument("id")
    for x in (s, ls, d):
        _conn_args(x)


def budgets_run(a: argparse.Namespace) -> int:
    if a.action == "set":
        scope, sid = ("key", a.key) if a.key else ("team", a.team)
        return _do(a, "POST", "/admin/budgets", {"scope": scope, "scope_id": sid, "period": a.period, "limit_usd": a.limit})
    if a.action == "list":
        return _do(a, "GET", "/admin/budgets")
    return _do(a, "DELETE", f"/admin/budgets/{a.id}")


def spend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", default="model", help="comma separated: key, team, user, model, vendor, deployment, day")
    p.add_argument("--since", help="date, ISO time or unix seconds")
    p.add_argument("--until")
    p.add_argument("--key")
    p.add_argument("--team")
    p.add_argument("--reference", help="savings against this model, e.g. gpt-4o")
    p.add_argument("--csv", action="store_true", help="CSV on stdout")
    _conn_args(p)


def spend_run(a: argparse.Namespace) -> int:
    q = {"group_by": a.by, "since": a.since, "until": a.until, "key_id": a.key, "team_id": a.team, "reference": a.reference}
    if a.csv:
        q["format"] = "csv"
    return _do(a, "GET", "/admin/spend", query=q)


def _do(a: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None, query: dict[str, Any] | None = None) -> int:
    try:
        data = call(a, method, path, {k: v for k, v in body.items() if v is not None} if body else body, query)
    except AdminError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print(a, data)
    return 0


EXTRA_COMMANDS.extend(
    [
        ("keys", "manage virtual keys (admin API)", keys_args, keys_run),
        ("teams", "manage teams (admin API)", teams_args, teams_run),
        ("users", "manage users (admin API)", users_args, users_run),
        ("budgets", "manage budgets (admin API)", budgets_args, budgets_run),
        ("spend", "spend report by key, team, model, vendor, day; --csv; --reference for savings", spend_args, spend_run),
    ]
)
