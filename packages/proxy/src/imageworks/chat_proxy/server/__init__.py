"""The running proxy. ``state.ProxyState`` is every part one proxy owns, as plain fields;
``lifespan`` opens them in order at start-up (the staging lock first, then the log, the engines
and the arbiter), starts the background loops and closes everything in numbered steps at
shutdown; ``serving`` runs the ASGI server (uvicorn or hypercorn); ``staging`` is the ``flock``
that gives one proxy its staging dir; ``heap`` tunes the serving process's own heap (big blocks
given back to the OS, the start frozen for the garbage collector).
"""
