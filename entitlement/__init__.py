"""entitlement: free Premium training access for French job seekers.

Layers (outer to inner): `api` (gRPC servicers, interceptors: proto <-> domain, no decisions),
`activation` / `eligibility` / `audit` (use cases), `rules` (pure eligibility rules), `programs`
(program files), `storage` (SQLAlchemy models, sessions, migrations). Generated stubs live in `v1`.
"""
