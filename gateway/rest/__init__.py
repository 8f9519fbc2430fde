"""The Open Inference Protocol's REST binding (KServe v2 HTTP/JSON): the second edge, beside gateway.protocol.

Requests decoded here reach the same `DataPlane.infer` as gRPC's; errors map from
the same table (gateway.errors.CODE_BY_ERROR) to HTTP statuses (rest/status.py).
"""
