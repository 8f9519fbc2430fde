from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model", "versions", "workers_applied", "workers", "notes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    workers_applied: int
    workers: int
    notes: str
    def __init__(self, model: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., workers_applied: _Optional[int] = ..., workers: _Optional[int] = ..., notes: _Optional[str] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("model", "candidate", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    candidate: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., candidate: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelActionRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetAuditLogRequest(_message.Message):
    __slots__ = ("model", "since", "until", "limit", "offset")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    model: str
    since: float
    until: float
    limit: int
    offset: int
    def __init__(self, model: _Optional[str] = ..., since: _Optional[float] = ..., until: _Optional[float] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("id", "at", "actor", "action", "model", "outcome", "before_json", "after_json", "reason", "evidence_json", "revision")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    BEFORE_JSON_FIELD_NUMBER: _ClassVar[int]
    AFTER_JSON_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    id: int
    at: float
    actor: str
    action: str
    model: str
    outcome: str
    before_json: str
    after_json: str
    reason: str
    evidence_json: str
    revision: int
    def __init__(self, id: _Optional[int] = ..., at: _Optional[float] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., model: _Optional[str] = ..., outcome: _Optional[str] = ..., before_json: _Optional[str] = ..., after_json: _Optional[str] = ..., reason: _Optional[str] = ..., evidence_json: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class AuditLog(_message.Message):
    __slots__ = ("records", "next_offset")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    next_offset: int
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("model", "stable", "canary", "canary_weight_bp", "shadows", "canary_compare_fraction", "revision", "phase", "step", "awaiting_approval", "rollout_started_at", "candidate", "routes")
    class ShadowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STABLE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    CANARY_WEIGHT_BP_FIELD_NUMBER: _ClassVar[int]
    SHADOWS_FIELD_NUMBER: _ClassVar[int]
    CANARY_COMPARE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    AWAITING_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    stable: str
    canary: str
    canary_weight_bp: int
    shadows: _containers.ScalarMap[str, float]
    canary_compare_fraction: float
    revision: int
    phase: str
    step: int
    awaiting_approval: str
    rollout_started_at: float
    candidate: str
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, model: _Optional[str] = ..., stable: _Optional[str] = ..., canary: _Optional[str] = ..., canary_weight_bp: _Optional[int] = ..., shadows: _Optional[_Mapping[str, float]] = ..., canary_compare_fraction: _Optional[float] = ..., revision: _Optional[int] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., awaiting_approval: _Optional[str] = ..., rollout_started_at: _Optional[float] = ..., candidate: _Optional[str] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class ListReleasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListReleasesResponse(_message.Message):
    __slots__ = ("releases", "deployment")
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[Release]
    deployment: Deployment
    def __init__(self, releases: _Optional[_Iterable[_Union[Release, _Mapping]]] = ..., deployment: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("store", "leader", "replicas", "processes", "store_reachable")
    STORE_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    STORE_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    store: str
    leader: str
    replicas: int
    processes: int
    store_reachable: bool
    def __init__(self, store: _Optional[str] = ..., leader: _Optional[str] = ..., replicas: _Optional[int] = ..., processes: _Optional[int] = ..., store_reachable: _Optional[bool] = ...) -> None: ...

class GetReleaseRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class SetTrafficRequest(_message.Message):
    __slots__ = ("model", "canary", "weight_bp", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    canary: str
    weight_bp: int
    reason: str
    def __init__(self, model: _Optional[str] = ..., canary: _Optional[str] = ..., weight_bp: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AddShadowRequest(_message.Message):
    __slots__ = ("model", "version", "fraction", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    fraction: float
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., fraction: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class RemoveShadowRequest(_message.Message):
    __slots__ = ("model", "version", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("request_id", "labels")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    labels: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request_id: _Optional[str] = ..., labels: _Optional[_Iterable[float]] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("model", "items")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[Feedback]
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Feedback, _Mapping]]] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("joined", "unknown", "already_labelled", "rejected", "pending", "errors")
    JOINED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LABELLED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    joined: int
    unknown: int
    already_labelled: int
    rejected: int
    pending: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, joined: _Optional[int] = ..., unknown: _Optional[int] = ..., already_labelled: _Optional[int] = ..., rejected: _Optional[int] = ..., pending: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class VersionReport(_message.Message):
    __slots__ = ("version", "role", "requests", "errors", "error_rate", "p50_ms", "p99_ms", "labelled", "accuracy", "accuracy_low", "accuracy_high", "mean_abs_error", "compared_rows", "agreement", "within_tolerance", "max_abs_diff", "mean_abs_diff", "relative_l2", "latency_diff_ms", "rows")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_LOW_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_HIGH_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPARED_ROWS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    WITHIN_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_L2_FIELD_NUMBER: _ClassVar[int]
    LATENCY_DIFF_MS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    version: str
    role: str
    requests: int
    errors: int
    error_rate: float
    p50_ms: float
    p99_ms: float
    labelled: int
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    mean_abs_error: float
    compared_rows: int
    agreement: float
    within_tolerance: float
    max_abs_diff: float
    mean_abs_diff: float
    relative_l2: float
    latency_diff_ms: float
    rows: int
    def __init__(self, version: _Optional[str] = ..., role: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., labelled: _Optional[int] = ..., accuracy: _Optional[float] = ..., accuracy_low: _Optional[float] = ..., accuracy_high: _Optional[float] = ..., mean_abs_error: _Optional[float] = ..., compared_rows: _Optional[int] = ..., agreement: _Optional[float] = ..., within_tolerance: _Optional[float] = ..., max_abs_diff: _Optional[float] = ..., mean_abs_diff: _Optional[float] = ..., relative_l2: _Optional[float] = ..., latency_diff_ms: _Optional[float] = ..., rows: _Optional[int] = ...) -> None: ...

class ShadowCounters(_message.Message):
    __slots__ = ("mirrored", "dropped", "failed", "timed_out", "completed", "pending", "circuit_open", "circuit_opened")
    MIRRORED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_OPEN_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_OPENED_FIELD_NUMBER: _ClassVar[int]
    mirrored: int
    dropped: int
    failed: int
    timed_out: int
    completed: int
    pending: int
    circuit_open: bool
    circuit_opened: int
    def __init__(self, mirrored: _Optional[int] = ..., dropped: _Optional[int] = ..., failed: _Optional[int] = ..., timed_out: _Optional[int] = ..., completed: _Optional[int] = ..., pending: _Optional[int] = ..., circuit_open: _Optional[bool] = ..., circuit_opened: _Optional[int] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("release", "versions", "window_s", "feedback_joined", "feedback_unknown", "predictions_logged", "shadows", "deployment", "routed")
    class ShadowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ShadowCounters
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ShadowCounters, _Mapping]] = ...) -> None: ...
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_JOINED_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_LOGGED_FIELD_NUMBER: _ClassVar[int]
    SHADOWS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    release: Release
    versions: _containers.RepeatedCompositeFieldContainer[VersionReport]
    window_s: float
    feedback_joined: int
    feedback_unknown: int
    predictions_logged: int
    shadows: _containers.MessageMap[str, ShadowCounters]
    deployment: Deployment
    routed: _containers.RepeatedCompositeFieldContainer[VersionReport]
    def __init__(self, release: _Optional[_Union[Release, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[VersionReport, _Mapping]]] = ..., window_s: _Optional[float] = ..., feedback_joined: _Optional[int] = ..., feedback_unknown: _Optional[int] = ..., predictions_logged: _Optional[int] = ..., shadows: _Optional[_Mapping[str, ShadowCounters]] = ..., deployment: _Optional[_Union[Deployment, _Mapping]] = ..., routed: _Optional[_Iterable[_Union[VersionReport, _Mapping]]] = ...) -> None: ...

class GetDriftRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("name", "psi", "p_value", "rejected", "drifting", "reference", "live", "edges")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DRIFTING_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    psi: float
    p_value: float
    rejected: bool
    drifting: bool
    reference: _containers.RepeatedScalarFieldContainer[int]
    live: _containers.RepeatedScalarFieldContainer[int]
    edges: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., psi: _Optional[float] = ..., p_value: _Optional[float] = ..., rejected: _Optional[bool] = ..., drifting: _Optional[bool] = ..., reference: _Optional[_Iterable[int]] = ..., live: _Optional[_Iterable[int]] = ..., edges: _Optional[_Iterable[float]] = ...) -> None: ...

class VersionDrift(_message.Message):
    __slots__ = ("version", "reference", "judged", "rows", "open_rows", "windows_closed", "score", "over_threshold", "alarm", "prediction", "requests_checked", "nonfinite", "rejected", "out_of_range", "max_drift", "alpha", "features")
    class NonfiniteEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class OutOfRangeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    JUDGED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROWS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OVER_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ALARM_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_RANGE_FIELD_NUMBER: _ClassVar[int]
    MAX_DRIFT_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    version: str
    reference: str
    judged: str
    rows: int
    open_rows: int
    windows_closed: int
    score: float
    over_threshold: int
    alarm: bool
    prediction: FeatureDrift
    requests_checked: int
    nonfinite: _containers.ScalarMap[str, int]
    rejected: int
    out_of_range: _containers.ScalarMap[str, int]
    max_drift: float
    alpha: float
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    def __init__(self, version: _Optional[str] = ..., reference: _Optional[str] = ..., judged: _Optional[str] = ..., rows: _Optional[int] = ..., open_rows: _Optional[int] = ..., windows_closed: _Optional[int] = ..., score: _Optional[float] = ..., over_threshold: _Optional[int] = ..., alarm: _Optional[bool] = ..., prediction: _Optional[_Union[FeatureDrift, _Mapping]] = ..., requests_checked: _Optional[int] = ..., nonfinite: _Optional[_Mapping[str, int]] = ..., rejected: _Optional[int] = ..., out_of_range: _Optional[_Mapping[str, int]] = ..., max_drift: _Optional[float] = ..., alpha: _Optional[float] = ..., features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ...) -> None: ...

class DriftReport(_message.Message):
    __slots__ = ("model", "versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionDrift]
    def __init__(self, model: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionDrift, _Mapping]]] = ...) -> None: ...

class RouteMatch(_message.Message):
    __slots__ = ("source", "key", "op", "values")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    source: str
    key: str
    op: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source: _Optional[str] = ..., key: _Optional[str] = ..., op: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("name", "match", "to", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    match: _containers.RepeatedCompositeFieldContainer[RouteMatch]
    to: str
    version: str
    def __init__(self, name: _Optional[str] = ..., match: _Optional[_Iterable[_Union[RouteMatch, _Mapping]]] = ..., to: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class AddRouteRequest(_message.Message):
    __slots__ = ("model", "route", "position", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    route: Route
    position: int
    reason: str
    def __init__(self, model: _Optional[str] = ..., route: _Optional[_Union[Route, _Mapping]] = ..., position: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListRoutesResponse(_message.Message):
    __slots__ = ("model", "routes", "revision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    revision: int
    def __init__(self, model: _Optional[str] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class RemoveRouteRequest(_message.Message):
    __slots__ = ("model", "name", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    name: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
