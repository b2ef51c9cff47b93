"""What the client sent, checked before anything is started: ``bodies`` reads the bytes within
the size and idle limits; ``payloads`` validates the JSON, checks the entry's capabilities,
engine fields and chat template (a request is refused here, 400/404/422), and builds the body
the engine gets; ``toolcalls`` converts legacy ``function_call`` answers; ``admission`` queues a
request for a turn under the model's ``max_concurrency`` (429 when the queue is full).
"""
