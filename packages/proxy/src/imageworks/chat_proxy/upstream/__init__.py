"""Where a request goes once it is admitted: ``egress`` is the one HTTP client (and its TLS
contexts) for backends and peers; ``forwarding`` relays the answer byte for byte, streaming or
not, and watches for a client that leaves; ``failures`` says what a backend failure means for
the client; ``peers`` polls other ImageWorks boxes and says which serve what.
"""
