"""`make cluster`: a local scale-out in the foreground. REPLICAS API processes on PORT+1..PORT+REPLICAS, one RQ
worker and nginx on PORT, rendered from docker/nginx.conf (the compose front: one rule set), all against
OPPU_DATABASE_URL (PostgreSQL), OPPU_REDIS_URL and one adapter store (OPPU_ADAPTERS_DIR). Ctrl-C (or SIGTERM)
stops everything it started. A replica that dies is reported and the others keep serving (nginx sends its
users elsewhere); when nginx or every replica is gone, the rest are stopped too.

It owns process start/stop and the rendered nginx config; it knows nothing of the app beyond the `oppu`
command, the OPPU_* names it checks, and /readyz.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "docker" / "nginx.conf"
OPPU = Path(sys.executable).parent / "oppu"
NGINX_MISSING = (
    "make cluster needs nginx, which is not installed (or not on PATH).\n"
    "Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y nginx   (or set NGINX=/path/to/nginx)"
)
UPSTREAM_SERVER = re.compile(r"^(\s*)server\s+\S+:\d+(\s+[^;]*)?;\s*$", re.M)
LISTEN = re.compile(r"^(\s*)listen\s+80;\s*$", re.M)
HASH_RULE = re.compile(r"^(\s*)hash\s+\$oppu_user\s+consistent;\s*$", re.M)
# The upstream's balancing rule, for measuring policies (bench/routing_policy.py): "hash" is the template as is
# (consistent hash by user, the deployment's rule); the others replace its one `hash` line.
POLICIES = {
    "hash": None,
    "round_robin": "",  # nginx's default when the upstream names no method
    "least_conn": "least_conn;",
    "random_two": "random two least_conn;",  # power of two choices, the less busy of two random replicas
}


def find_nginx() -> str | None:
    given = os.environ.get("NGINX")
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def render_rules(template: str, port: int, upstreams: Sequence[str], policy: str = "hash") -> str:
    """docker/nginx.conf with its upstream servers and listen port replaced: nothing else may differ (but the
    balancing rule, when a policy other than the default "hash" is asked for)."""
    servers = UPSTREAM_SERVER.findall(template)
    if not servers or len(LISTEN.findall(template)) != 1:
        raise ValueError(f"{TEMPLATE}: expected upstream `server host:port ...;` lines and one `listen 80;`")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")
    rule = POLICIES[policy]
    if rule is not None:
        if len(HASH_RULE.findall(template)) != 1:
            raise ValueError(f"{TEMPLATE}: expected one `hash $oppu_user consistent;` line to replace")
        template = HASH_RULE.sub(rf"\g<1>{rule}" if rule else "", template)
    indent, options = servers[0]
    lines = "\n".join(f"{indent}server {u}{options};" for u in upstreams)
    out, seen = [], False
    for line in template.splitlines():
        if UPSTREAM_SERVER.fullmatch(line):
            if not seen:
                out.append(lines)
                seen = True
            continue
        out.append(line)
    return LISTEN.sub(rf"\g<1>listen 127.0.0.1:{port};", "\n".join(out) + "\n")


def render_main(run_dir: Path, rules: Path) -> str:
    """A whole nginx.conf for a foreground nginx whose files all live in run_dir (no root paths)."""
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "\n".join(f"    {kind}_temp_path {run_dir / 'tmp' / kind};" for kind in kinds)
    return f"""daemon off;
worker_processes 2;
pid {run_dir / "nginx.pid"};
error_log {run_dir / "nginx-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    # Which replica served each request (never a header: no key is logged).
    log_format oppu '$remote_addr [$time_local] "$request" $status upstream=$upstream_addr $request_time';
    access_log {run_dir / "nginx-access.log"} oppu;
{temp}
    include {rules};
}}
"""


def write_config(run_dir: Path, port: int, replica_ports: Sequence[int], policy: str = "hash") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o755)  # nginx's workers (nobody, when started as root) create their temp dirs below it
    (run_dir / "tmp").mkdir(exist_ok=True)
    (run_dir / "tmp").chmod(0o755)
    rules = run_dir / "oppu-rules.conf"
    rules.write_text(render_rules(TEMPLATE.read_text(), port, [f"127.0.0.1:{p}" for p in replica_ports], policy))
    main = run_dir / "nginx.conf"
    main.write_text(render_main(run_dir, rules))
    return main


def check_env(env: dict[str, str]) -> list[str]:
    problems = []
    if not env.get("OPPU_DATABASE_URL", "").startswith("postgresql"):
        problems.append("OPPU_DATABASE_URL must name PostgreSQL (replicas share it), e.g. postgresql+psycopg://...")
    if not env.get("OPPU_REDIS_URL", "").startswith(("redis://", "rediss://", "unix://")):
        problems.append("OPPU_REDIS_URL must be set (the job queue and the replicas' notices), e.g. redis://...")
    if not env.get("OPPU_ADMIN_KEY"):
        problems.append("OPPU_ADMIN_KEY must be set (replicas must share one admin key)")
    return problems


def _die_with_parent() -> None:
    """Children get SIGTERM if this process dies without cleaning up (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def become_subreaper() -> None:
    """Orphans below this process (a work horse whose worker died) are re-parented to it, not to init, so the
    stop still finds them among its descendants (Linux prctl PR_SET_CHILD_SUBREAPER)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1)
    except OSError:
        pass


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every process below `pid`, whatever its process group (pid -> start time)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child, started in children.get(todo.pop(), []):
            if child not in found:
                found[child] = started
                todo.append(child)
    return found


def kill_all(processes: dict[int, int]) -> None:
    for pid, started in processes.items():
        stat = _proc_stat(pid)
        if stat is not None and stat[1] == started:  # that process still, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]

    def stop(self, grace: float) -> None:
        if self.popen.poll() is not None:
            return
        # The process alone: it stops its own children (nginx its workers; `oppu worker` asks its work horse to
        # stop the job at its next step, then exits: RQ's warm shutdown).
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            # Below it first: RQ's work horse runs in a process group of its own (setpgrp), so killing the
            # worker's group left the horse running (ppid 1), free to publish a version after the stop.
            kill_all(descendants(self.popen.pid))
            self.popen.kill()
            self.popen.wait(timeout=10)


class Cluster:
    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir, self.env = run_dir, env
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str]) -> Child:
        log = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps writing to it
        popen = subprocess.Popen(
            list(argv),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this script only: it stops the children in order
            preexec_fn=_die_with_parent,
        )
        log.close()
        child = Child(name, popen)
        self.children.append(child)
        print(f"  {name:<8} pid {popen.pid:<8} log {self.run_dir / (name + '.log')}", flush=True)
        return child

    def dead(self) -> Child | None:
        return next((c for c in self.children if c.popen.poll() is not None), None)

    def stop_all(self) -> None:
        for child in reversed(self.children):  # nginx first, then the worker, then the replicas
            child.stop(grace=20 if child.name == "worker" else 10)
        # What is left was orphaned below a child (a horse whose worker died first): re-parented to this
        # process (become_subreaper), killed and reaped here.
        left = descendants(os.getpid())
        kill_all(left)
        for pid in left:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # not this process's child: its own parent reaps it


def wait_ready(cluster: Cluster, urls: Sequence[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            dead = cluster.dead()
            if dead is not None:
                raise RuntimeError(f"{dead.name} exited with {dead.popen.returncode}: see {cluster.run_dir}")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready after {timeout:.0f} s: see {cluster.run_dir}")
            time.sleep(0.3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8100")))
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "2")))
    parser.add_argument("--run-dir", type=Path, default=None, help="logs, pids, nginx config (default: a temp dir)")
    parser.add_argument("--no-worker", action="store_true", help="API replicas and nginx only")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument(
        "--policy", choices=list(POLICIES), default="hash", help="nginx balancing rule (default: the template's hash)"
    )
    args = parser.parse_args(argv)
    nginx = find_nginx()
    if nginx is None:
        print(NGINX_MISSING, file=sys.stderr)
        return 2
    env = dict(os.environ)
    problems = check_env(env)
    if args.replicas < 1:
        problems.append("REPLICAS must be >= 1")
    if problems:
        print("make cluster:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    env.setdefault("OPPU_FORWARDED_ALLOW_IPS", "127.0.0.1")  # nginx (local) sets X-Forwarded-For
    run_dir = (args.run_dir or Path(tempfile.mkdtemp(prefix="oppu-cluster-"))).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not env.get("OPPU_MASTER_KEY") and not env.get("OPPU_MASTER_KEY_FILE"):
        # Every process must seal under the same master key: one for this local cluster, in its run dir.
        key_file = run_dir / "master_key"
        if not key_file.exists():
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        env["OPPU_MASTER_KEY_FILE"] = str(key_file)
        print(f"master key for this cluster: {key_file} (set OPPU_MASTER_KEY_FILE to keep your own)", flush=True)
    ports = [args.port + i for i in range(1, args.replicas + 1)]
    config = write_config(run_dir, args.port, ports, args.policy)
    test = subprocess.run([nginx, "-t", "-q", "-c", str(config), "-p", str(run_dir)], capture_output=True, text=True)
    if test.returncode != 0:
        print(f"nginx rejected {config}:\n{test.stderr}", file=sys.stderr)
        return 2
    subprocess.run([str(OPPU), "migrate"], env=env, check=True)

    become_subreaper()
    cluster = Cluster(run_dir, env)
    stopping = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"oppu cluster in {run_dir}:", flush=True)
    try:
        for i, port in enumerate(ports, start=1):
            cluster.start(f"api{i}", [str(OPPU), "serve", "--host", "127.0.0.1", "--port", str(port)])
        if not args.no_worker:
            cluster.start("worker", [str(OPPU), "worker"])
        cluster.start("nginx", [nginx, "-c", str(config), "-p", str(run_dir)])
        front = f"http://127.0.0.1:{args.port}"
        replicas = {c.name: {"pid": c.popen.pid, "port": p} for c, p in zip(cluster.children, ports, strict=False)}
        state = {"front": front, "replicas": replicas, "pids": {c.name: c.popen.pid for c in cluster.children}}
        (run_dir / "cluster.json").write_text(json.dumps(state, indent=2))
        wait_ready(cluster, [f"http://127.0.0.1:{p}" for p in ports], args.ready_timeout)
        wait_ready(cluster, [front], 30)
        print(f"ready: {front} -> {', '.join(f'127.0.0.1:{p}' for p in ports)} (Ctrl-C stops all)", flush=True)
        (run_dir / "ready").touch()
        reported: set[str] = set()
        while not stopping:
            for child in cluster.children:
                if child.popen.poll() is not None and child.name not in reported:
                    reported.add(child.name)
                    print(f"{child.name} exited with {child.popen.returncode}", file=sys.stderr, flush=True)
            if "nginx" in reported or all(f"api{i}" in reported for i in range(1, len(ports) + 1)):
                print("no front or no replica left; stopping the cluster", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except RuntimeError as exc:
        print(f"make cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        cluster.stop_all()
        print("cluster stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
