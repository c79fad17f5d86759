"""The vLLM venv's cache key: a hash of what goes into it (the requirement lists of pyproject.toml and the
build script), so unrelated edits of pyproject.toml do not rebuild a 4 GB venv.

Usage: python scripts/vllm-venv-key.py EXTRA"""

import hashlib
import sys
import tomllib
from pathlib import Path

root = Path(__file__).resolve().parent.parent
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
spec = "\n".join(project["dependencies"] + extras["dev"] + extras[sys.argv[1]])
script = (root / "scripts" / "setup-vllm-venv.sh").read_text()
print(hashlib.sha256((spec + script).encode()).hexdigest()[:12])
