"""Header rules, one small module per rule, composed by :mod:`.request` and :mod:`.response`.

Rules: :mod:`.hop_by_hop`, :mod:`.te`, :mod:`.cookies`, :mod:`.httpoxy`,
:mod:`.forwarding` (X-Forwarded-*, X-Real-IP, trusted chain), :mod:`.forwarded`
(RFC 7239), :mod:`.upstream_host`, :mod:`.upgrade_insecure`, :mod:`.server`,
:mod:`.alt_svc`. The composers apply them in one pass over the fields.
"""
