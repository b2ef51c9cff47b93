"""HTTP routes, one module per surface: ``openai`` (the forwarded endpoints and the model list),
``admin`` and ``views`` (operator actions and what ``/admin/state`` shows), ``gpu`` (leases and
GPU status), ``ops`` (health, metrics)."""
