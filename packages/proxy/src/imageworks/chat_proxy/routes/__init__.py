"""HTTP routes, one module per surface: the OpenAI API, operations (health, metrics), admin."""
