"""What the proxy tells about itself: the JSONL request log and Prometheus metrics."""
