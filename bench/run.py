"""The benchmark, in one command: direct-to-upstream vs through Kaiyuan (vs LiteLLM's proxy).

    python bench/run.py            # full run, about 6-9 minutes
    python bench/run.py --quick    # about 2 minutes
    python bench/run.py --with anthropic --with auth   # extra scenarios / Kaiyuan variants

It starts bench/fast_upstream.py, Kaiyuan (``python -m kaiyuan serve --config <generated yaml>``
with the request log on a temporary SQLite file, as deployed) and, when bench/.venv-litellm exists,
LiteLLM's proxy against the same upstream; pins them with taskset (upstream and load generators on
one CPU, the gateway under test on the other); measures every cell with the same tools; prints a
Markdown report and writes it, with the raw numbers, to bench/out/. Every child is killed on exit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.report import Cell, HoldResult, WrkResult, render  # noqa: E402
from bench.scenarios import (  # noqa: E402
    HOLD,
    MODELS,
    SCENARIOS,
    STREAM_CHUNKS,
    VARIANTS,
    Scenario,
    Variant,
    deep_merge,
)

BENCH = ROOT / "bench"
PY = sys.executable
LITELLM_VENV = BENCH / ".venv-litellm"
PORTKEY_DIR = BENCH / ".portkey"  # bench/install-portkey.sh
FLOORS = {  # name -> (module under bench/floors, the Python packages it needs)
    "floor-aiohttp": ("aiohttp_floor", ("aiohttp",)),
    "floor-granian": ("granian_floor", ("granian", "pyreqwest")),
}
MIXED_FLOORS = {  # one leg swapped (--mixed-floors): what each leg alone would save
    "floor-aiohttp-pyreqwest": ("aiohttp_pyreqwest_floor", ("aiohttp", "pyreqwest")),
    "floor-aiohttp-pyqwest": ("aiohttp_pyqwest_floor", ("aiohttp", "pyqwest")),
    "floor-granian-aiohttp": ("granian_aiohttp_floor", ("granian", "aiohttp")),
}
CONCURRENCY = (1, 16, 64, 256)
HOLD_STREAMS = 1000


# -- processes ------------------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    cpus: str
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Target:
    name: str  # "direct", "kaiyuan", "kaiyuan+...", "litellm", "portkey", "floor-..."
    port: int
    proc: Proc
    headers: dict[str, str] = field(default_factory=dict)
    family: str = "kaiyuan"  # which Scenario.targets entry covers it
    db: Path | None = None  # Kaiyuan's request-log database


class Fleet:
    """Every process this run starts; ``stop`` kills each one's process group, by id."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.workdir = workdir
        self.pin = pin
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: list[str], cpus: str, env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        full = (["taskset", "-c", cpus] if self.pin else []) + cmd
        fh = open(log, "wb")  # the child keeps its own copy
        p = subprocess.Popen(
            full, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT, start_new_session=True
        )
        fh.close()
        proc = Proc(name, p, cpus, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(5)
        else:  # the leader is gone; make sure nothing of its group stayed behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}:\n{tail(proc.log)}")
        try:
            if http("GET", url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout:.0f}s; see {proc.log}:\n{tail(proc.log)}")


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU time of every live process in the process group ``pgid``."""
    return sum(group_cpu_split(pgid))


def group_cpu_split(pgid: int) -> tuple[float, float]:
    """(the group leader's, every other live process's) user+system CPU time in the process group
    ``pgid``: for a supervisor, its own and its workers'."""
    tick = os.sysconf("SC_CLK_TCK")
    leader = others = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            if int(d) == pgid:
                leader += int(fields[11]) + int(fields[12])
            else:
                others += int(fields[11]) + int(fields[12])
    return leader / tick, others / tick


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# -- starting the parts -----------------------------------------------------------------------------
def start_upstream(fleet: Fleet, cpu: str) -> Target:
    port = free_port()
    proc = fleet.start("upstream", [PY, str(BENCH / "fast_upstream.py"), "--port", str(port), "--chunks", str(STREAM_CHUNKS)], cpu)
    wait_ready(proc, f"http://127.0.0.1:{port}/__stats", 30)
    return Target("direct", port, proc, family="direct")


def kaiyuan_config(up_port: int, port: int, db: Path, patch: dict[str, Any]) -> dict[str, Any]:
    base = {
        "server": {"host": "127.0.0.1", "port": port},
        "store": {"url": f"sqlite:///{db}"},
        "request_log": {"enabled": True},
        "models": [
            {
                "name": public,
                "deployments": [
                    {
                        "provider": "openai_compatible",
                        "base_url": f"http://127.0.0.1:{up_port}/v1",
                        "model": upstream,
                        "api_key": "sk-bench-upstream",
                    }
                ],
            }
            for public, upstream in MODELS.items()
        ],
    }
    return deep_merge(base, patch)


def start_redis(fleet: Fleet, cpu: str) -> str:
    """A private, non-persistent redis-server on 127.0.0.1; returns its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    proc = fleet.start("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], cpu)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"redis-server exited: {tail(proc.log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("redis-server did not answer PING within 20 s")


def start_kaiyuan(fleet: Fleet, up: Target, cpu: str, variant: Variant | None, workdir: Path,
                  redis_url: str | None = None) -> Target:
    name = variant.name if variant else "kaiyuan"
    port = free_port()
    safe = name.replace("+", "_")
    db = workdir / f"{safe}.db"
    cfg = workdir / f"{safe}.yaml"
    patch = dict(variant.config_patch) if variant else {}
    if variant and variant.redis:
        patch = deep_merge(patch, {"limits": {"redis_url": redis_url}})
    cfg.write_text(yaml.safe_dump(kaiyuan_config(up.port, port, db, patch)))
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.update(variant.env if variant else {})
    cmd = [PY, "-m", "kaiyuan", "--log-level", "warning", "serve", "--config", str(cfg), "--port", str(port)]
    if variant and variant.all_cpus:
        cpu = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    proc = fleet.start(safe, cmd, cpu, env)
    wait_ready(proc, f"http://127.0.0.1:{port}/readyz", 60)
    if variant and variant.supervisor_cpu is not None and fleet.pin:
        # every thread of the supervisor, not its worker (a process of its own, started on `cpu`)
        subprocess.run(["taskset", "-a", "-p", "-c", variant.supervisor_cpu, str(proc.popen.pid)], check=True,
                       capture_output=True)
    headers = dict(variant.headers) if variant else {}
    if variant and variant.setup:
        headers.update(variant.setup(f"http://127.0.0.1:{port}"))
    return Target(name, port, proc, headers, family="kaiyuan", db=db)


def litellm_version() -> str | None:
    py = LITELLM_VENV / "bin" / "python"
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True, text=True)
    return r.stdout.strip() or None


def start_litellm(fleet: Fleet, up: Target, cpu: str, workdir: Path) -> Target:
    exe = LITELLM_VENV / "bin" / "litellm"
    port = free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": public,
                        "litellm_params": {
                            "model": f"openai/{upstream}",
                            "api_base": f"http://127.0.0.1:{up.port}/v1",
                            "api_key": "sk-bench-upstream",
                        },
                    }
                    for public, upstream in MODELS.items()
                ],
                "litellm_settings": {"drop_params": True, "set_verbose": False},
                # No auth, like the plain Kaiyuan column (its master-key variant is --with auth).
                "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
            }
        )
    )
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch of the price map at start
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "PYTHONPATH": "",
    }
    cmd = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    proc = fleet.start("litellm", cmd, cpu, env)
    wait_ready(proc, f"http://127.0.0.1:{port}/health/liveliness", 180)
    return Target("litellm", port, proc, family="litellm")


def start_floor(fleet: Fleet, up: Target, cpu: str, name: str) -> Target:
    """A bare pass-through (bench/floors/) on the gateway's CPU: Kaiyuan's cost is reported against it."""
    module, needs = {**FLOORS, **MIXED_FLOORS}[name]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"needs {', '.join(missing)} (pip install {' '.join(missing)})")
    port = free_port()
    env = {"PYTHONPATH": str(ROOT)}
    proc = fleet.start(name, [PY, str(BENCH / "floors" / f"{module}.py"), "--port", str(port),
                              "--upstream", f"http://127.0.0.1:{up.port}"], cpu, env)
    wait_ready(proc, f"http://127.0.0.1:{port}/readyz", 30)
    return Target(name, port, proc, family="floor")


def portkey_version() -> str | None:
    try:
        pkg = json.loads((PORTKEY_DIR / "node_modules/@portkey-ai/gateway/package.json").read_text())
        node = json.loads((PORTKEY_DIR / "node_modules/@hono/node-server/package.json").read_text())
    except (OSError, ValueError):
        return None
    return f"{pkg['version']} (@hono/node-server {node['version']})"


def start_portkey(fleet: Fleet, up: Target, cpu: str) -> Target:
    """Portkey's open-source gateway (npm @portkey-ai/gateway), headless, against the same upstream."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed")
    port = free_port()
    script = PORTKEY_DIR / "node_modules/@portkey-ai/gateway/build/start-server.js"
    proc = fleet.start("portkey", [node, str(script), f"--port={port}", "--headless"], cpu, {"NODE_ENV": "production"})
    wait_ready(proc, f"http://127.0.0.1:{port}/", 60)
    headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": f"http://127.0.0.1:{up.port}/v1",
               "Authorization": "Bearer sk-bench-upstream"}
    return Target("portkey", port, proc, headers, family="portkey")


# -- measuring ----------------------------------------------------------------------------------
def run_loadgen(fleet: Fleet, spec: dict[str, Any], procs: int, cpu: str) -> dict[str, Any]:
    """Run ``procs`` load generator processes sharing the concurrency; merge their raw samples."""
    conc = spec["concurrency"]
    shares = [conc // procs + (1 if i < conc % procs else 0) for i in range(procs)]
    runs = []
    for share in shares:
        if share == 0:
            continue
        cmd = [PY, str(BENCH / "loadgen.py"), json.dumps({**spec, "concurrency": share})]
        if fleet.pin:
            cmd = ["taskset", "-c", cpu, *cmd]
        runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    limit = spec.get("warmup", 0) + spec.get("duration", 0) + spec.get("timeout", 60) + 30
    merged: dict[str, Any] = {}
    try:
        for r in runs:
            out, err = r.communicate(timeout=limit)
            if r.returncode != 0:
                raise RuntimeError(f"load generator failed ({r.returncode}): {err.decode(errors='replace')[-2000:]}")
            try:
                d = json.loads(out)
            except ValueError as e:
                dump = fleet.workdir / f"loadgen-{r.pid}.out"
                dump.write_bytes(out)
                raise RuntimeError(f"load generator output is not JSON ({e}; {len(out)} bytes, kept in {dump}): "
                                   f"{out[max(0, e.pos - 80):e.pos + 80]!r}") from None  # type: ignore[attr-defined]
            for k, v in d.items():
                if k == "elapsed":
                    merged[k] = max(merged.get(k, 0.0), v)
                elif k == "status_counts":
                    sc = merged.setdefault(k, {})
                    for code, n in v.items():
                        sc[code] = sc.get(code, 0) + n
                elif isinstance(v, list):
                    merged.setdefault(k, []).extend(v)
                else:
                    merged[k] = merged.get(k, 0) + v
    finally:
        for r in runs:
            if r.poll() is None:
                os.killpg(r.pid, signal.SIGKILL)
                r.wait()
    return merged


def measure(fleet: Fleet, target: Target, sc: Scenario, conc: int, args: argparse.Namespace, gen_cpu: str) -> Cell:
    spec = {
        "host": "127.0.0.1",
        "port": target.port,
        "path": sc.path,
        "body": json.dumps(sc.body_for(target.name)),
        "stream": sc.stream,
        "concurrency": conc,
        "duration": args.duration,
        "warmup": args.warmup,
        "headers": {**sc.headers, **target.headers},
        "expect_chunks": sc.expect_chunks,
        "done_marker": sc.done_marker,
        "timeout": 30.0,
    }
    procs = max(1, min(args.procs, conc))
    lead0, rest0 = group_cpu_split(target.proc.pid)
    raw = run_loadgen(fleet, spec, procs, gen_cpu)
    lead1, rest1 = group_cpu_split(target.proc.pid)
    cell = Cell.from_raw(sc.name, target.name, conc, raw, (lead1 - lead0) + (rest1 - rest0))
    done = raw.get("completed_all", 0)
    if rest1 > rest0 and done:  # a supervisor and its workers: the workers' share on its own
        cell.workers_cpu_us_per_req = (rest1 - rest0) / done * 1e6
    return cell


def probe(target: Target, sc: Scenario) -> str | None:
    """None when ``sc`` works on ``target``; else why it is skipped."""
    body = json.dumps({**sc.body_for(target.name), "stream": False}).encode()
    try:
        status, data = http("POST", f"http://127.0.0.1:{target.port}{sc.path}", body, {**sc.headers, **target.headers}, timeout=30)
    except OSError as e:
        return f"probe failed: {e}"
    if status == 404:
        return f"{sc.path} answers 404 on {target.name} (route not there yet)"
    if status != 200:
        return f"{sc.path} answers {status} on {target.name}: {data[:200].decode(errors='replace')}"
    return None


def run_wrk(target: Target, sc: Scenario, conc: int, seconds: float, workdir: Path, cpu: str, pin: bool) -> WrkResult:
    script = workdir / f"wrk-{sc.name}-{target.name.replace('+', '_')}.lua"
    headers = {"Content-Type": "application/json", **sc.headers, **target.headers}
    body = json.dumps(sc.body_for(target.name))
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_str(body)}"]
    lines += [f"wrk.headers[{lua_str(k)}] = {lua_str(v)}" for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    cmd = ["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "30s", "-s", str(script),
           f"http://127.0.0.1:{target.port}{sc.path}"]
    if pin:
        cmd = ["taskset", "-c", cpu, *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    return WrkResult.parse(sc.name, target.name, conc, r.stdout + r.stderr)


def lua_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def hold(fleet: Fleet, target: Target, up: Target, n: int, gen_cpu: str, procs: int) -> HoldResult:
    http("POST", f"http://127.0.0.1:{up.port}/__reset", b"{}")
    spec = {
        "host": "127.0.0.1",
        "port": target.port,
        "path": HOLD.path,
        "body": json.dumps(HOLD.body_for(target.name)),
        "stream": True,
        "concurrency": n,
        "per_conn": 1,
        "headers": {**HOLD.headers, **target.headers},
        "expect_chunks": HOLD.expect_chunks,
        "done_marker": HOLD.done_marker,
        "timeout": 120.0,
    }
    rss_before = rss_mb(target.proc.pid)
    raw = run_loadgen(fleet, spec, procs, gen_cpu)
    stats = json.loads(http("GET", f"http://127.0.0.1:{up.port}/__stats")[1])
    return HoldResult.from_raw(target.name, n, raw, stats, rss_before, rss_mb(target.proc.pid))


def request_log_rows(target: Target) -> int | None:
    db = target.db
    if db is None or not db.exists():
        return None
    import sqlite3

    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("select count(*) from request_log").fetchone()[0])
    except sqlite3.Error:
        return None


# -- the run ----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Kaiyuan benchmark: direct vs Kaiyuan (vs LiteLLM)")
    p.add_argument("--quick", action="store_true", help="short cells (about 2 minutes in all)")
    p.add_argument("--duration", type=float, help="measured seconds per cell (default 5, quick 1.5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per cell (default 1, quick 0.5)")
    p.add_argument("--concurrency", type=lambda s: tuple(int(x) for x in s.split(",")), default=CONCURRENCY)
    p.add_argument("--procs", type=int, default=1, help="load generator processes per cell")
    p.add_argument("--with", dest="flags", action="append", default=[], help="enable flagged scenarios/variants: anthropic, paced, auth, keys, keys-redis, shadow, nolog, workers, sup, keys-sup, prices")
    p.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM column")
    p.add_argument("--no-floors", action="store_true", help="skip the bare pass-through floors (bench/floors/)")
    p.add_argument("--mixed-floors", action="store_true",
                   help="also the floors with one leg swapped: aiohttp server + pyreqwest client, granian server + aiohttp client")
    p.add_argument("--no-portkey", action="store_true", help="skip the Portkey column")
    p.add_argument("--no-wrk", action="store_true", help="skip the wrk raw-throughput table")
    p.add_argument("--wrk-concurrency", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="default 1,64,256 (quick: 64)")
    p.add_argument("--hold", type=int, default=HOLD_STREAMS, help="concurrent streams to hold (0: skip)")
    p.add_argument("--hold-litellm", action="store_true", help="also hold the streams through LiteLLM (slow: minutes)")
    p.add_argument("--hold-only", action="store_true", help="only the stream-holding mode (no latency/throughput cells)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--out", default=str(BENCH / "out"))
    a = p.parse_args(argv)
    if a.duration is None:
        a.duration = 1.5 if a.quick else 5.0
    if a.warmup is None:
        a.warmup = 0.5 if a.quick else 1.0
    if a.wrk_concurrency is None:
        a.wrk_concurrency = (64,) if a.quick else (1, 64, 256)
    if a.hold_only:
        a.concurrency, a.no_wrk = (), True
        a.hold = a.hold or HOLD_STREAMS
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    ncpu = os.cpu_count() or 1
    pin = not args.no_pin and ncpu >= 2 and shutil.which("taskset") is not None
    gen_cpu, gw_cpu = ("0", "1") if pin else ("", "")
    info = machine()
    info["command"] = " ".join(["python bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    info["pinning"] = (
        f"upstream + load generators (+ wrk, + redis-server when a variant needs it) on CPU {gen_cpu}; "
        f"the gateway under test on CPU {gw_cpu}; "
        "one target measured at a time"
        if pin
        else "none (taskset missing, fewer than 2 CPUs, or --no-pin)"
    )
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="kaiyuan-bench-"))
    fleet = Fleet(workdir, pin)
    cells: list[Cell] = []
    wrks: list[WrkResult] = []
    holds: list[HoldResult] = []
    log_rows: dict[str, int | None] = {}
    try:
        up = start_upstream(fleet, gen_cpu)
        targets: list[Target] = [up, start_kaiyuan(fleet, up, gw_cpu, None, workdir)]
        redis_url: str | None = None
        for v in VARIANTS:
            if v.flag is None or v.flag in args.flags:
                try:
                    if v.redis and redis_url is None:
                        redis_url = start_redis(fleet, gen_cpu)
                    targets.append(start_kaiyuan(fleet, up, gw_cpu, v, workdir, redis_url))
                except RuntimeError as e:
                    notes.append(f"Variant {v.name} not run: {e}")
        if args.no_litellm:
            notes.append("LiteLLM column not run: --no-litellm.")
        elif not (LITELLM_VENV / "bin" / "litellm").exists():
            notes.append(
                f"LiteLLM column not run: {LITELLM_VENV.relative_to(ROOT)} does not exist "
                "(python -m venv bench/.venv-litellm && bench/.venv-litellm/bin/pip install 'litellm[proxy]')."
            )
        else:
            try:
                targets.append(start_litellm(fleet, up, gw_cpu, workdir))
                info["litellm"] = litellm_version()
            except RuntimeError as e:
                notes.append(f"LiteLLM column not run: it did not start: {e}")
        if args.no_portkey:
            notes.append("Portkey column not run: --no-portkey.")
        elif portkey_version() is None:
            notes.append("Portkey column not run: bench/.portkey is not installed (bench/install-portkey.sh).")
        else:
            try:
                targets.append(start_portkey(fleet, up, gw_cpu))
                info["portkey"] = portkey_version()
            except RuntimeError as e:
                notes.append(f"Portkey column not run: it did not start: {e}")
        floors = [] if args.no_floors else [*FLOORS, *(MIXED_FLOORS if args.mixed_floors else ())]
        for name in floors:
            try:
                targets.append(start_floor(fleet, up, gw_cpu, name))
            except RuntimeError as e:
                notes.append(f"Floor {name} not run: {e}")
        scenarios = [s for s in SCENARIOS if s.flag is None or s.flag in args.flags]
        runnable: list[tuple[Scenario, Target]] = []
        for sc in scenarios:
            for t in targets:
                if t.family not in sc.targets:
                    continue
                why = probe(t, sc) if sc.probe or t.family != "direct" else None
                if why:
                    notes.append(f"Scenario {sc.name} skipped on {t.name}: {why}")
                    continue
                runnable.append((sc, t))
        # Interleave targets within each concurrency level so drifting machine load hits all alike.
        for conc in args.concurrency:
            for sc, t in runnable:
                cell = measure(fleet, t, sc, conc, args, gen_cpu)
                cells.append(cell)
                print(cell.progress_line(), file=sys.stderr, flush=True)
        if not args.no_wrk and shutil.which("wrk"):
            for conc in args.wrk_concurrency:
                for sc, t in runnable:
                    if sc.probe:
                        continue
                    w = run_wrk(t, sc, conc, args.duration, workdir, gen_cpu, pin)
                    wrks.append(w)
                    print(w.progress_line(), file=sys.stderr, flush=True)
        elif not args.no_wrk:
            notes.append("wrk table not run: wrk is not installed (apt-get install -y wrk).")
        if args.hold:
            for t in targets:
                if t.family in ("litellm", "portkey") and not args.hold_litellm:
                    notes.append(f"{t.name} not in the stream-holding table (slow there); add --hold-litellm.")
                    continue
                h = hold(fleet, t, up, args.hold, gen_cpu, args.procs)
                holds.append(h)
                print(h.progress_line(), file=sys.stderr, flush=True)
        stats = json.loads(http("GET", f"http://127.0.0.1:{up.port}/__stats")[1])
        if stats.get("unknown_paths"):
            notes.append(f"Paths the fake upstream was asked for and does not serve: {stats['unknown_paths']}")
        time.sleep(1.5)  # one request-log flush interval
        for t in targets:
            if t.family == "kaiyuan":
                log_rows[t.name] = request_log_rows(t)
    except BaseException:
        print(f"benchmark failed; process logs are in {workdir}", file=sys.stderr)
        raise
    finally:
        fleet.stop_all()
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = round(time.time() - started, 1)
    info["request_log_rows"] = log_rows
    md = render(info, cells, wrks, holds, notes, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    (out / f"results-{stamp}.md").write_text(md)
    (out / "latest.md").write_text(md)
    raw = {"info": info, "cells": [c.summary() for c in cells], "wrk": [w.__dict__ for w in wrks],
           "hold": [h.__dict__ for h in holds], "notes": notes}
    (out / f"results-{stamp}.json").write_text(json.dumps(raw, indent=1, default=str))
    print(md)
    print(f"\n(written to {out / f'results-{stamp}.md'})", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
