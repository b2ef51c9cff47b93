"""Model lifecycle. ``lifecycle.Lifecycle`` owns the slots, the restart accounting and the
``StatusBook`` with every model's state (``modelstate``: the states and the one table of moves
between them); ``slot.Slot`` is where one managed model runs: start, swap, drain, evict, crash,
reap, one start in flight (it asks its owner only what ``owner.SlotOwner`` lists); ``upkeep``
runs the idle-unload and reconcile loops; ``backends/`` is one module per engine kind behind
``backends/base.py``, chosen by the entry's ``backend`` through the name table in
``backends/__init__.py``.
"""
