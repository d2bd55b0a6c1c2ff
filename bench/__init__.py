"""Benchmark harness (`make bench`, i.e. `python -m bench`): the real handlers served by the sync
thread-pool gRPC server and by a grpc.aio variant, against an echo floor of each, on SQLite and
(when reachable) PostgreSQL. Figures are printed and written to BENCHMARKS.md.

Layout: config (settings from BENCH_* variables, the specs handed to child processes), prepare
(databases, secrets, registry; no gRPC), servers (server processes; the event-loop server
is entitlement/aio_server.py), load (the load-generator process: seeding, parity probes, pools of one-use requests,
closed- and open-loop timed runs), procs (the orchestrator's handles on those processes, machine
facts), report (table, BENCHMARKS.md), __main__ (orchestration). The orchestrating process never
creates a gRPC object: every server and client lives in a process started with the `spawn` method.

`python -m bench.rpcs` uses the same pieces for the five hot RPCs against the echo floor (issue #8
targets, 1 vs 2 server processes); bench.registry, bench.audit and bench.activations are separate
benchmarks sharing bench/common.py.
"""
