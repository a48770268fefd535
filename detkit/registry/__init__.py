"""The registry layer: what kinds of part there are (:mod:`~detkit.registry.kinds`, one table), the typed
contexts their builders receive (:mod:`~detkit.registry.contexts`), and binding a config to the parts it
chooses (:mod:`~detkit.registry.binding`). Plugin discovery itself is :mod:`detkit.plugins`; the hooks a
plugin implements are :mod:`detkit.hookspecs`, made from the table."""
