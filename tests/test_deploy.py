"""The deployment recipe is well-formed (no Docker engine here: parse it and check the topology)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_topology() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "api1", "api2", "worker", "nginx"} <= set(services)
    for name in ("api1", "api2", "worker"):
        env = services[name]["environment"]
        assert env["OPPU_DATABASE_URL"].startswith("postgresql")
        assert env["OPPU_REDIS_URL"].startswith("redis://")
        assert "adapters:/adapters" in services[name]["volumes"]  # one shared adapter store
    assert services["worker"]["command"] == ["worker"]
    assert "healthcheck" in services["api1"] and "healthcheck" in services["postgres"]
    nginx = (ROOT / "docker" / "nginx.conf").read_text()
    assert "hash $oppu_user consistent" in nginx and "api1:8000" in nginx and "api2:8000" in nginx


def test_entrypoint_is_valid_shell() -> None:
    subprocess.run(["sh", "-n", str(ROOT / "docker" / "entrypoint.sh")], check=True)
