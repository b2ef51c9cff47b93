"""Model lifecycle: one slot per model (its state machine), the lifecycle that owns the slots, idle
unloads, and the backends (one module per engine kind).
"""
