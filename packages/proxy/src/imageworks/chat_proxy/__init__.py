"""ImageWorks OpenAI-compatible chat proxy."""
