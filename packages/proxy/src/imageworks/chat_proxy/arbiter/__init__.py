"""GPU memory arbitration: probes (what the GPU holds), the eviction policy (what to free),
the Ollama manager (how to free Ollama), leases (lending the GPU), and the arbiter itself."""
