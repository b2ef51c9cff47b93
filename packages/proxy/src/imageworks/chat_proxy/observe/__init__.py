"""What the proxy tells about itself: ``records`` builds each request's JSONL line and its
metrics from one field list (``RequestInfo``, ``Outcome``); ``requestlog`` writes the JSONL log
from its own thread (rotation, a recent-requests ring); ``metrics`` is the Prometheus registry.
"""
