"""The running proxy: what it owns (state), start-up and shutdown (lifespan), the ASGI server
(serving) and the staged autostart folder.
"""
