"""HTTP routes. The forwarded surfaces' pipeline: ``forward`` (its steps up to the upstream,
``Call`` and ``Exchange``), ``routing`` (resolve and route, loading progress), ``relay`` (the
entry ``forward``, ``run``, the relay and record), ``raw`` (an engine's own routes) and
``byid`` (the Responses by id). The rest: ``openai`` (the model list), ``admin`` and ``views``
(operator actions and what ``/admin/state`` shows), ``gpu`` (leases and GPU status), ``ops``
(health, metrics)."""
