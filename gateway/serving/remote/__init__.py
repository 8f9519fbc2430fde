"""Model runs in a separate executor process, fed by front ends through shared memory.

One executor process per device owns the onnxruntime sessions and a DynamicBatcher per
version, so requests from every front-end worker batch together. A front end writes a
request's tensors once into a slot of an arena it owns (a memfd, shared by passing its
descriptor), and sends a fixed-size record over a Unix SEQPACKET socket that both event
loops watch; the executor runs the rows where they lie and writes the outputs back into
the same slot. docs/executors.md has the design, the record layout and the failure cases.

records (the wire records and the tensor table in a slot) · arena (the shared slots) ·
channel (a non-blocking record socket on the event loop) · server (the executor's side)
· client (the front end's side: RemoteExecutor) · executor (the process's entry point).
"""
