"""What the client sent: reading bodies within limits, validating payloads, tool-call conversion,
and admission (back-pressure).
"""
