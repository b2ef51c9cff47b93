"""imageworks-vllm: the executor that runs one vLLM server at a time for the proxy."""
