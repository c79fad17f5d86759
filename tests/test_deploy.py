"""The deployment recipe is well-formed and hardened (no Docker engine here: parse the files and check them)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from service.config import Settings
from service.db.migrate import upgrade
from service.main import create_app
from service.state import AppState
from tests.conftest import ADMIN_KEY, live_server, make_settings
from tests.factories import free_port, random_lora_zip

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("api1", "api2", "worker")
# ${VAR}, ${VAR:-default}, ${VAR:?message}, ... (compose interpolation); "$${" is a literal "${".
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])[^}]*)?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(?<![A-Z])KEY$|AUTH$")


def _compose() -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def _services() -> dict[str, dict[str, Any]]:
    return cast(dict[str, dict[str, Any]], _compose()["services"])


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping, so it can be checked"
    return {str(k): str(v) for k, v in env.items()}


def _is_reference(value: str) -> bool:
    """The whole value is one ${...} interpolation (no literal secret around it)."""
    return INTERPOLATION.fullmatch(value.strip()) is not None


# --- docker-compose.yml ---------------------------------------------------------------------------------------


def test_compose_topology() -> None:
    services = _services()
    assert {"postgres", "redis", "api1", "api2", "worker", "nginx"} <= set(services)
    for name in APP_SERVICES:
        env = _env(services[name])
        assert env["OPPU_DATABASE_URL"].startswith("postgresql")
        assert env["OPPU_REDIS_URL"].startswith("redis://")
        assert "adapters:/adapters" in services[name]["volumes"]  # one shared adapter store
    assert services["worker"]["command"] == ["worker"]
    assert services["api1"]["command"] == services["api2"]["command"] == ["serve"]
    assert "healthcheck" in services["api1"] and "healthcheck" in services["postgres"]
    assert "healthcheck" in services["redis"]
    assert "adapters" in _compose()["volumes"]
    nginx = (ROOT / "docker" / "nginx.conf").read_text()
    assert "hash $oppu_user consistent" in nginx and "api1:8000" in nginx and "api2:8000" in nginx


def test_compose_has_no_hard_coded_secrets() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"POSTGRES_PASSWORD\s*[:=]\s*oppu\b", text)
    assert ":oppu@" not in text
    for name, service in _services().items():
        for key, value in _env(service).items():
            if SECRET_NAME.search(key):
                assert _is_reference(value), f"{name}.{key} must come from .env, not the compose file"
            url = re.match(r"^[a-z][a-z0-9+.-]*://(?P<userinfo>[^@/]*)@", value)
            if url and ":" in url["userinfo"]:
                password = url["userinfo"].split(":", 1)[1]
                assert _is_reference(password), f"{name}.{key} carries a literal password"
    reference = INTERPOLATION.fullmatch(_env(_services()["postgres"])["POSTGRES_PASSWORD"])
    assert reference is not None and reference[1] == "POSTGRES_PASSWORD"
    for name in APP_SERVICES:
        env = _env(_services()[name])
        db_url = r"postgresql\+psycopg://oppu:\$\{POSTGRES_PASSWORD(:\?[^}]*)?\}@postgres:5432/oppu"
        assert re.fullmatch(db_url, env["OPPU_DATABASE_URL"]), env["OPPU_DATABASE_URL"]
        assert _is_reference(env["OPPU_ADMIN_KEY"])


def test_redis_requires_a_password_and_every_client_sends_it() -> None:
    redis = _services()["redis"]
    command = redis["command"]
    # "redis-server" first, so the image's entrypoint drops root (it does not for e.g. "sh -c ...").
    assert command[0] == "redis-server"
    password = command[command.index("--requirepass") + 1]
    reference = INTERPOLATION.fullmatch(password)
    assert reference is not None and reference[1] == "REDIS_PASSWORD"
    # The healthcheck must authenticate too (redis-cli reads REDISCLI_AUTH), or redis never turns healthy.
    assert _is_reference(_env(redis).get("REDISCLI_AUTH", "")) or "-a" in redis["healthcheck"]["test"]
    for name in APP_SERVICES:
        url = _env(_services()[name])["OPPU_REDIS_URL"]
        assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD(:\?[^}]*)?\}@redis:6379/0", url), url


def test_api_trusts_only_nginx_for_forwarded_headers() -> None:
    compose = _compose()
    nginx_networks = _services()["nginx"]["networks"]
    assert isinstance(nginx_networks, dict) and len(nginx_networks) == 1
    ((network_name, attachment),) = nginx_networks.items()
    address = ipaddress.ip_address(attachment["ipv4_address"])
    (pool,) = compose["networks"][network_name]["ipam"]["config"]
    assert address in ipaddress.ip_network(pool["subnet"])
    if "ip_range" in pool:  # the fixed address is outside the dynamic range: no other container can take it
        assert address not in ipaddress.ip_network(pool["ip_range"])
    for name in APP_SERVICES:
        env = _env(_services()[name])
        assert env["OPPU_FORWARDED_ALLOW_IPS"] == str(address)
        assert env["OPPU_DOCS_ENABLED"].lower() == "false"
        assert "OPPU_METRICS_TOKEN" in env
    # Every service that talks to nginx or each other is on that network (the default one, or named).
    for name, service in _services().items():
        nets = service.get("networks")
        assert (nets is None and network_name == "default") or network_name in (nets or {}), name


def _duration_s(value: str) -> float:
    """A compose duration: "150s", "2m30s", "1h"."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?", str(value))
    assert match is not None and any(match.groups()), value
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_compose_services_stop_within_their_grace() -> None:
    """Docker's default 10 s before SIGKILL cut open streams (uvicorn waits for them, up to
    OPPU_REQUEST_TIMEOUT_S) and the app's shutdown, and a worker's job mid-step (the attempt counted)."""
    services = _services()
    default_timeout_s = Settings.model_fields["request_timeout_s"].default
    for name in ("api1", "api2"):
        timeout_s = float(_env(services[name]).get("OPPU_REQUEST_TIMEOUT_S", default_timeout_s))
        assert _duration_s(services[name]["stop_grace_period"]) >= timeout_s + 10, name
    # nginx (SIGQUIT: graceful) finishes the streams it carries too.
    assert _duration_s(services["nginx"]["stop_grace_period"]) >= timeout_s
    assert _duration_s(services["worker"]["stop_grace_period"]) >= 60  # one training step


def test_env_example_documents_every_compose_variable() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = {m[1]: m[2] for m in INTERPOLATION.finditer(text)}
    required = {name for name, op in used.items() if op and op.endswith("?")}
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "OPPU_ADMIN_KEY", "OPPU_MASTER_KEY"} <= required
    assert "OPPU_METRICS_TOKEN" in used
    lines = (ROOT / ".env.example").read_text().splitlines()
    example: dict[str, str] = {}
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        if line.startswith("#"):
            pending.append(line)
        elif "=" in line:
            key, value = line.split("=", 1)
            example[key.strip()] = value.strip()
            comments[key.strip()] = "\n".join(pending)
            pending = []
        else:
            pending = []
    assert set(used) <= set(example), f"missing from .env.example: {set(used) - set(example)}"
    generators = ("secrets.token_urlsafe", "os.urandom(32)")  # passwords / the master key (32 random bytes)
    for name in used:
        assert any(g in comments[name] for g in generators), f"{name}: say how to generate it"
        value = example[name]
        assert value == "" or "change-me" in value, f"{name}: a placeholder, never a real secret"
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in {line.strip() for line in gitignore} or "/.env" in {line.strip() for line in gitignore}


# --- docker/Dockerfile ----------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_runs_unprivileged() -> None:
    instructions = _dockerfile_instructions()
    users = [i for i, (kw, _) in enumerate(instructions) if kw == "USER"]
    assert users, "the image must switch to an unprivileged USER"
    last_user = instructions[users[-1]][1]
    assert last_user.split(":")[0] not in {"root", "0"}
    runs = [i for i, (kw, _) in enumerate(instructions) if kw == "RUN"]
    assert users[-1] > max(runs), "USER comes after every install/build step"
    created = " ".join(arg for kw, arg in instructions if kw == "RUN")
    assert re.search(rf"useradd\b.*--uid 10001\b.*\b{re.escape(last_user)}\b", created)
    chowns = [arg for kw, arg in instructions if kw == "RUN" and "chown" in arg]
    for path in ("/data", "/adapters", "/opt/oppu"):
        assert any(re.search(rf"chown\b.*\b{last_user}\b.*\s{re.escape(path)}(\s|$)", c) for c in chowns), path
    assert instructions[-2:] == [("ENTRYPOINT", '["/entrypoint.sh"]'), ("CMD", '["serve"]')]


# --- docker/nginx.conf ----------------------------------------------------------------------------------------


@dataclass
class Block:
    """One nginx block (`args` = its opening directive, e.g. ["location", "~", "^/x$"]) and its contents."""

    args: list[str]
    directives: list[list[str]] = field(default_factory=list)
    children: list[Block] = field(default_factory=list)

    def get(self, name: str) -> list[list[str]]:
        return [d[1:] for d in self.directives if d[0] == name]

    def blocks(self, name: str) -> list[Block]:
        return [b for b in self.children if b.args[0] == name]


def _parse_nginx(text: str) -> Block:
    tokens: list[str] = []
    word = ""
    quoted = False  # a quoted empty string ("") is a word too (a map's empty-value entry)
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "#" and not word and not quoted:
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        if ch in "'\"":
            end = text.index(ch, i + 1)
            word += text[i + 1 : end]
            quoted = True
            i = end + 1
            continue
        if ch.isspace() or ch in "{};":
            if word or quoted:
                tokens.append(word)
                word, quoted = "", False
            if ch in "{};":
                tokens.append(ch)
        else:
            word += ch
        i += 1
    root = Block(["main"])
    stack = [root]
    statement: list[str] = []
    for token in tokens:
        if token == ";":
            stack[-1].directives.append(statement)
            statement = []
        elif token == "{":
            child = Block(statement)
            stack[-1].children.append(child)
            stack.append(child)
            statement = []
        elif token == "}":
            assert not statement, "unterminated directive"
            stack.pop()
        else:
            statement.append(token)
    assert len(stack) == 1 and not statement, "unbalanced braces"
    return root


def _server() -> Block:
    (server,) = _parse_nginx((ROOT / "docker" / "nginx.conf").read_text()).blocks("server")
    return server


def _location_for(server: Block, uri: str) -> Block:
    """nginx's choice: `=` exact, else longest prefix (final if `^~`), else first matching regex, else prefix."""
    locations = server.blocks("location")
    prefix: Block | None = None
    for loc in locations:
        modifier, pattern = (loc.args[1], loc.args[2]) if len(loc.args) == 3 else ("", loc.args[1])
        if modifier == "=" and uri == pattern:
            return loc
        if (
            modifier in ("", "^~")
            and uri.startswith(pattern)
            and (prefix is None or len(pattern) > len(prefix.args[-1]))
        ):
            prefix = loc
    if prefix is not None and prefix.args[1] == "^~":
        return prefix
    for loc in locations:
        if loc.args[1] in ("~", "~*"):
            flags = re.IGNORECASE if loc.args[1] == "~*" else 0
            if re.search(loc.args[2], uri, flags):
                return loc
    assert prefix is not None, f"no location for {uri}"
    return prefix


def _size_bytes(value: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    match = re.fullmatch(r"(\d+)([kmg]?)", value.lower())
    assert match is not None, value
    return int(match[1]) * units[match[2]]


def test_nginx_passes_the_client_address() -> None:
    server = _server()
    headers = {h[0].lower(): h[1] for h in server.get("proxy_set_header")}
    assert headers["x-real-ip"] == "$remote_addr"
    assert headers["x-forwarded-for"] == "$remote_addr"  # not the client's own header appended to
    assert headers["x-forwarded-proto"] == "$scheme"
    assert headers["host"] == "$host"
    # proxy_set_header in a location would drop every server-level one there (nginx does not merge them).
    for loc in server.blocks("location"):
        assert not loc.get("proxy_set_header"), loc.args


def test_nginx_sends_security_headers_on_every_answer() -> None:
    server = _server()
    headers = {h[0]: h[1:] for h in server.get("add_header")}
    assert headers["X-Content-Type-Options"] == ["nosniff", "always"]
    assert headers["X-Frame-Options"] == ["DENY", "always"]
    assert headers["Referrer-Policy"] == ["no-referrer", "always"]
    # add_header in a location would drop every server-level one there (nginx does not merge them either).
    for loc in server.blocks("location"):
        assert not loc.get("add_header"), loc.args


def test_nginx_keeps_streaming_and_hashing() -> None:
    server = _server()
    (upstream,) = _parse_nginx((ROOT / "docker" / "nginx.conf").read_text()).blocks("upstream")
    assert upstream.get("hash") == [["$oppu_user", "consistent"]]
    proxied = [loc for loc in server.blocks("location") if loc.get("proxy_pass")]
    assert proxied
    for loc in server.blocks("location"):
        assert loc.get("return") == [["404"]] or loc.get("proxy_pass") == [["http://oppu_api"]], loc.args
    for loc in proxied:  # the effective value: the location's own, else the server's
        assert (loc.get("proxy_buffering") or server.get("proxy_buffering")) == [["off"]], loc.args  # SSE
        ((timeout,),) = loc.get("proxy_read_timeout") or server.get("proxy_read_timeout")
        assert re.fullmatch(r"\d+s?", timeout) and int(timeout.rstrip("s")) >= 300, loc.args  # long streams


def test_nginx_body_limits_per_path() -> None:
    server = _server()
    defaults = Settings.model_fields
    assert server.get("client_max_body_size") == [["4m"]]
    assert _size_bytes("4m") == defaults["max_body_bytes"].default
    upload = _location_for(server, "/users/u1/adapter")
    assert upload.args == ["location", "~", "^/users/[^/]+/adapter$"]
    (limit,) = upload.get("client_max_body_size")
    # The app's own cap on an upload is adapter_max_file_bytes + 1 MiB; nginx must not refuse below it.
    assert _size_bytes(limit[0]) >= defaults["adapter_max_file_bytes"].default + (1 << 20)
    assert upload.get("proxy_pass") == [["http://oppu_api"]]
    for loc in server.blocks("location"):
        if loc is not upload:
            assert not loc.get("client_max_body_size"), f"{loc.args}: only adapter uploads get a larger limit"
    for uri in ("/users/u1/adapter/versions", "/users/u1/adapter/x", "/generate", "/v1/chat/completions"):
        assert _location_for(server, uri) is not upload, uri


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)(ms|[smh]?)", value)
    assert match is not None, value
    return int(match[1]) * units[match[2]]


def test_nginx_streams_uploads_and_cuts_stalled_bodies() -> None:
    """Buffered (nginx's default), an upload body went whole onto nginx's disk before the app saw the request:
    no key check first, no per-user upload cap, no body deadline; 3 connections without a key left 119 MiB
    there, trickling 1 byte per 50 s (nginx's default client_body_timeout is 60 s)."""
    server = _server()
    upload = _location_for(server, "/users/u1/adapter")
    assert upload.get("proxy_request_buffering") == [["off"]]
    # A request body is streamed upstream only over HTTP/1.1 (chunked bodies need it).
    assert (upload.get("proxy_http_version") or server.get("proxy_http_version")) == [["1.1"]]
    for loc in server.blocks("location"):
        if loc.get("proxy_pass") and loc is not upload:
            # Buffered, so at most the app's own body limit per connection (test_nginx_body_limits_per_path).
            assert (loc.get("proxy_request_buffering") or [["on"]]) == [["on"]], loc.args
        ((timeout,),) = loc.get("client_body_timeout") or server.get("client_body_timeout")
        assert _seconds(timeout) <= 10, loc.args  # a stalled sender is cut within 10 s of silence


@pytest.mark.parametrize(
    "uri", ["/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/metrics", "/metrics/", "/docs/"]
)
def test_nginx_hides_docs_and_metrics(uri: str) -> None:
    assert _location_for(_server(), uri).get("return") == [["404"]]


@pytest.mark.parametrize(
    "uri", ["/generate", "/healthz", "/readyz", "/users/u1/adapter", "/v1/models", "/users/metrics", "/docsearch"]
)
def test_nginx_proxies_the_api(uri: str) -> None:
    assert _location_for(_server(), uri).get("proxy_pass") == [["http://oppu_api"]]


# --- docker/entrypoint.sh -------------------------------------------------------------------------------------


def test_entrypoint_is_valid_shell() -> None:
    subprocess.run(["sh", "-n", str(ROOT / "docker" / "entrypoint.sh")], check=True)
    text = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "oppu migrate && exec oppu serve --host 0.0.0.0 --port 8000" in text
    assert "exec oppu worker" in text


# --- routing by user (docker/nginx.conf) and `make cluster` (scripts/cluster.py renders the same file) ---------


def _maps() -> dict[str, tuple[str, list[list[str]]]]:
    """Each map's result variable -> (its source variable, [[pattern, value], ...])."""
    root = _parse_nginx((ROOT / "docker" / "nginx.conf").read_text())
    return {b.args[2]: (b.args[1], b.directives) for b in root.blocks("map")}


def _route_key(uri: str, headers: dict[str, str]) -> str:
    """What nginx hashes for a request: the maps evaluated as nginx does (exact strings first, then regexes in
    order, else default; a value may name a capture or another variable)."""
    maps = _maps()
    variables = {"$uri": uri, "$request_uri": uri}
    variables.update({f"$http_{k.lower().replace('-', '_')}": v for k, v in headers.items()})

    def value(name: str) -> str:
        if name not in maps:
            return variables.get(name, "")
        source, entries = maps[name]
        subject = value(source)
        exact = {p: v for p, v in entries if not p.startswith("~") and p != "default"}
        chosen, captures = exact.get(subject), {}
        for pattern, result in entries if chosen is None else []:
            if pattern.startswith("~"):
                match = re.search(pattern[1:].replace("(?<", "(?P<"), subject)  # PCRE named groups in Python
                if match:
                    chosen, captures = result, {f"${k}": v for k, v in match.groupdict().items()}
                    break
        if chosen is None:
            chosen = dict(entries).get("default", "")
        if chosen in captures:
            return captures[chosen]
        return value(chosen) if chosen.startswith("$") else chosen

    (upstream,) = _parse_nginx((ROOT / "docker" / "nginx.conf").read_text()).blocks("upstream")
    ((variable, _consistent),) = upstream.get("hash")
    return value(variable)


@pytest.mark.parametrize(
    ("uri", "headers", "key"),
    [
        ("/users/alice/generate", {"Authorization": "Bearer k1"}, "alice"),
        ("/users/alice/adapter", {"Authorization": "Bearer k1", "X-User-ID": "bob"}, "alice"),  # the path wins
        ("/admin/users/alice/retrain", {"Authorization": "Bearer admin"}, "alice"),
        ("/v1/completions", {"Authorization": "Bearer k1"}, "Bearer k1"),  # no gateway: the key
        ("/v1/chat/completions", {"Authorization": "Bearer k1", "X-User-ID": "alice"}, "alice"),  # gateway: the id
        ("/v1/models", {}, ""),
        ("/healthz", {}, "/healthz"),
    ],
)
def test_nginx_routes_every_route_by_user(uri: str, headers: dict[str, str], key: str) -> None:
    assert _route_key(uri, headers) == key


def test_nginx_rings_are_balanced_and_skip_dead_replicas() -> None:
    (upstream,) = _parse_nginx((ROOT / "docker" / "nginx.conf").read_text()).blocks("upstream")
    servers = upstream.get("server")
    assert len(servers) >= 2
    for server in servers:
        options = dict(o.split("=", 1) for o in server[1:])
        assert int(options["weight"]) >= 10, server  # >= 1,600 ring points per replica
        assert int(options["max_fails"]) >= 1 and options["fail_timeout"], server
    assert len({tuple(s[1:]) for s in servers}) == 1  # equal weights: equal shares


def test_cluster_renders_the_compose_rules() -> None:
    from scripts.cluster import render_rules

    template = (ROOT / "docker" / "nginx.conf").read_text()
    rendered = render_rules(template, 9100, ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"])
    (upstream,) = _parse_nginx(rendered).blocks("upstream")
    assert [s[0] for s in upstream.get("server")] == ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"]
    ((_compose_server, *options), *_) = _parse_nginx(template).blocks("upstream")[0].get("server")
    assert all(s[1:] == options for s in upstream.get("server"))
    (server,) = _parse_nginx(rendered).blocks("server")
    assert server.get("listen") == [["127.0.0.1:9100"]]
    # Nothing else differs: the same maps, locations and limits as compose's front.
    def strip(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if not re.match(r"\s*(server \S+:\d+|listen )", ln)]

    assert strip(rendered) == strip(template)


def _nginx() -> str:
    from scripts.cluster import find_nginx

    nginx = find_nginx()
    if nginx is None:
        pytest.fail("nginx is not installed: apt-get update && apt-get install -y nginx (make cluster needs it)")
    return nginx


def test_the_rendered_config_passes_nginx_t(tmp_path: Path) -> None:
    from scripts.cluster import write_config

    config = write_config(tmp_path / "run", 9100, [9101, 9102])
    r = subprocess.run([_nginx(), "-t", "-c", str(config), "-p", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "nginx.conf").write_text(config.read_text().replace("events {", "events {{"))
    bad = subprocess.run([_nginx(), "-t", "-c", str(broken / "nginx.conf"), "-p", str(broken)], capture_output=True)
    assert bad.returncode != 0  # the check can fail


def test_make_cluster_says_what_is_missing(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "NGINX": str(tmp_path / "no-nginx")}
    script = [sys.executable, str(ROOT / "scripts" / "cluster.py"), "--run-dir", str(tmp_path / "run")]
    r = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "apt-get install -y nginx" in r.stderr, r.stderr
    env = {"PATH": "/usr/bin:/bin", "NGINX": _nginx(), "OPPU_DATABASE_URL": "sqlite:///x.db"}
    r = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    for name in ("OPPU_DATABASE_URL must name PostgreSQL", "OPPU_REDIS_URL", "OPPU_ADMIN_KEY"):
        assert name in r.stderr, r.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^cluster: setup\n(\t.*\n)*\t.*apt-get install -y nginx", makefile, re.M)
    run = r"^\t\$\(BIN\)/python scripts/cluster.py --port \$\(CLUSTER_PORT\) --replicas \$\(REPLICAS\)"
    assert re.search(run, makefile, re.M)


# A stand-in for `oppu worker` with a job running: it forks a "work horse" that moves to its own process group
# (RQ's setpgrp), writes the horse's pid to argv[1], and then either waits on (ignores SIGTERM: a step that
# does not end) or exits at once (the worker died, the horse orphaned).
FAKE_WORKER = """
import os, signal, sys, time
horse = os.fork()
if horse == 0:
    os.setpgrp()
    while True:
        time.sleep(1)
open(sys.argv[1], "w").write(str(horse))
if sys.argv[2] == "exit":
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(1)
"""
STOP_CLUSTER = """
import os, sys, time
from pathlib import Path
from scripts.cluster import Cluster, become_subreaper
run = Path(sys.argv[1])
become_subreaper()
cluster = Cluster(run, dict(os.environ))
stuck = cluster.start("worker", [sys.executable, "-c", sys.argv[2], str(run / "stuck"), "wait"])
cluster.start("worker2", [sys.executable, "-c", sys.argv[2], str(run / "orphan"), "exit"])
while not ((run / "stuck").exists() and (run / "orphan").exists()):
    time.sleep(0.05)
time.sleep(0.2)
stuck.stop(grace=1)  # what stop_all does, with a shorter grace
cluster.stop_all()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cluster_stop_leaves_no_work_horse(tmp_path: Path) -> None:
    """RQ's work horse leaves its worker's process group: killing the group left it running (ppid 1) after
    "cluster stopped", free to publish a version later."""
    run = tmp_path / "run"
    run.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", STOP_CLUSTER, str(run), FAKE_WORKER], cwd=ROOT, capture_output=True, timeout=60
    )
    horses = {name: int((run / name).read_text()) for name in ("stuck", "orphan")}
    try:
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        assert not {name for name, pid in horses.items() if _alive(pid)}, horses
    finally:
        for pid in horses.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- the real nginx in front of the real app ----------------------------------------------------------------


@dataclass
class Front:
    url: str
    run_dir: Path
    state: AppState
    nginx_pid: int

    def stored_bodies(self) -> list[str]:
        """Request bodies on nginx's disk: its temp files (scripts/cluster.py puts them under run_dir/tmp), which
        nginx unlinks at once and keeps open, so they are found among its workers' open files, and the warning
        it logs for each."""
        workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == self.nginx_pid]
        temp = str(self.run_dir / "tmp")
        open_files = []
        for pid in workers:
            for fd in Path(f"/proc/{pid}/fd").glob("*"):
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue  # closed meanwhile
                if target.startswith(temp):
                    open_files.append(target)
        log = (self.run_dir / "nginx-error.log").read_text(errors="replace")
        return open_files + re.findall(r".*buffered to a temporary file.*", log)


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None  # exited meanwhile


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def front(tmp_path: Path, tiny_model_path: Path) -> Iterator[Front]:
    """nginx rendered from docker/nginx.conf (as `make cluster` does) in front of one app on SQLite."""
    db = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(db)
    app = create_app(make_settings(tmp_path, db, str(tiny_model_path)))
    # Not under tmp_path: pytest's base dir is 0700, and nginx's workers (nobody, when run as root) must be able
    # to write their temp files, or a buffered body would fail instead of being stored.
    run_dir = Path(tempfile.mkdtemp(prefix="oppu-nginx-"))
    from scripts.cluster import write_config

    with live_server(app) as upstream:
        port = free_port()
        config = write_config(run_dir, port, [int(urlsplit(upstream).port or 0)])
        with open(run_dir / "nginx.out", "wb") as log:
            nginx = subprocess.Popen(
                [_nginx(), "-c", str(config), "-p", str(run_dir)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 10
            while not _accepts(port):
                assert nginx.poll() is None, (run_dir / "nginx-error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
            yield Front(f"http://127.0.0.1:{port}", run_dir, app.state.oppu, nginx.pid)
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
            shutil.rmtree(run_dir, ignore_errors=True)


def test_nginx_passes_an_unauthenticated_upload_to_the_app_before_its_body(front: Front) -> None:
    """No key, 200 MiB announced, 256 KiB sent: the app's 401 comes back at once (it checks the key before it
    reads a body) and nginx stored nothing. Buffered, nginx waited for all 200 MiB, on its disk."""
    url = urlsplit(front.url)
    head = (
        b"PUT /users/u1/adapter HTTP/1.1\r\nHost: oppu\r\nContent-Type: application/zip\r\n"
        + b"Content-Length: %d\r\n\r\n" % (200 << 20)
    )
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=5) as sock:
        sock.sendall(head + bytes(256 << 10))
        time.sleep(0.3)  # nginx has read what was sent
        assert not front.stored_bodies()
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no answer before the body was sent: {answer!r}") from None
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert not front.stored_bodies()


def test_nginx_streams_an_upload_through(front: Front) -> None:
    """A real upload still arrives whole, announced or chunked (HTTP/1.1 upstream), and nothing is stored."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(f"{front.url}/admin/users", json={"user_id": "u1"}, headers=admin, timeout=30)
    assert r.status_code == 201, r.text
    headers = {"Authorization": f"Bearer {r.json()['api_key']}", "Content-Type": "application/zip"}
    shapes = front.state.adapters.spec.linear_shapes
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    archive = random_lora_zip(shapes, None, seed=1, rank=64, targets=targets)
    assert len(archive) > 64 << 10  # above nginx's in-memory body buffer: buffered, it would go to disk
    r = httpx.put(f"{front.url}/users/u1/adapter", content=archive, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    archive = random_lora_zip(shapes, None, seed=2, rank=64, targets=targets)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(archive), 16 << 10):
            yield archive[i : i + (16 << 10)]

    r = httpx.put(f"{front.url}/users/u1/adapter", content=chunks(), headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2, r.json()
    assert not front.stored_bodies()
