"""Where a request goes: the one egress client, the relay to a backend, and other boxes (peers)."""
