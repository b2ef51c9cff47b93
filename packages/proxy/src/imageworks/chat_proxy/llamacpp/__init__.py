"""The llama.cpp engine: a server process per model, run by ``python -m ...llamacpp.server``."""
