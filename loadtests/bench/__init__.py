"""`gateway bench`: the gateway against its baselines, side by side, in one run.

Targets (see the team's performance notes):
  ort              session.run in a loop, in-process: the compute limit
  bare             grpc.aio answering a fixed response: the Python gRPC limit
  naive            grpc.aio + protobuf + session.run per request (loadtests/naive_server.py):
                   the server a user would write first
  gateway-nobatch  the gateway, one model run per request
  gateway          the gateway as configured (dynamic batching)
  gateway-shadow   the gateway with a shadow version mirrored at 100%
  gateway-rest-json, gateway-rest-binary
                   the gateway over its REST binding (KServe v2 JSON tensors; Triton's
                   binary tensor extension), beside gRPC's `gateway`

Every repeat runs every target in turn (interleaved), so the machine's noise
hits all of them alike; the report is the median per point with the min/max
spread, and the ratios between targets from this one run. Every server point
also reports the server's CPU time per 1,000 requests (server_cpu_ms_per_1k).

By job: cli (the command and its options), config (what a run does), cpus
(pinning and /proc accounting), targets (the servers), sweep (the run),
summary (medians and ratios), report (tables, JSON, PNG), environment (the
machine and versions), routing (the cost of a routing decision).

It runs as its own program, `python -m loadtests.bench`, which `gateway bench`
starts: the gateway package never imports the load tests.
"""
