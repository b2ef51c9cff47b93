"""Images and big bodies. ``pool`` is the proxy's CPU worker pool (any body over 1 MiB is cut and
parsed there, and images are fitted there); ``lifting`` cuts big ``data:`` strings out of a body
before it is parsed; ``prepare`` fits a chat request's images to its model (count, size,
format, remote fetches only from allowed hosts, alt text for a text-only model); ``images``
decodes, resizes and encodes one image; ``history`` trims old turns.
"""
