"""Prefill/decode disaggregation: the roles, the KV connector (NIXL behind it) and the router.

See ``docs/disaggregation.md``. The engine sees one small interface
(:mod:`deltaserve.engine.kv_hooks`); the transport and the HTTP control channel live here.
"""
