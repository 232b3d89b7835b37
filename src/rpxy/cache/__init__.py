"""The response cache (``[experimental.cache]``): RFC 9111 rules, storage, and the pipeline hook.

``policy`` is pure (no I/O, no clock), ``store`` holds entries in memory and files,
``relay`` connects both to the request pipeline. See docs/cache.md.
"""
