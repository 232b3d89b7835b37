"""QUIC pieces for the HTTP/3 front end, on top of ``qh3`` (aioquic's API with X25519MLKEM768).

Sans-IO helpers only: Retry tokens (:mod:`.tokens`), the per-SNI certificate choice
and the server connection that applies it (:mod:`.tls`), the connection's single timer
(:mod:`.timer`). The Twisted edge lives in :mod:`rpxy.front.h3`.
"""
