"""Engine processes: spawning, watching, adopting and stopping them. Used by engines, the arbiter
and the vLLM executor.
"""
