"""Where a request goes once it is admitted: ``egress`` is the one HTTP client (and its TLS
contexts) for backends and peers; ``forwarding`` opens the upstream, reads a whole answer
within its cap (``reading``) and watches for a client that leaves; ``sse`` relays a stream
chunk by chunk; ``failures`` says what a backend failure means for the client; ``responses``
keeps where each Responses id lives; ``peers`` polls other ImageWorks boxes and says which
serve what.
"""
