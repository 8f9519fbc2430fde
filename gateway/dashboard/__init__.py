"""The read-only browser dashboard: releases, rollouts, evidence and the audit trail, live.

An edge beside the control API (same tokens, loopback only without them): data.py builds
JSON snapshots and a short history from the release plane, app.py serves them with two
pages whose scripts and vendored chart library (uPlot, static/vendor) ship in the package.
"""
