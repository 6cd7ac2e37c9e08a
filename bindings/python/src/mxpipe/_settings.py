"""The engine's settings as a TypedDict, so that a type checker (mypy, pyright) catches a
misspelt key or a value of the wrong type in ``Dispatcher(**settings)``. The keys are the C
API's configuration keys (``mxp_config_set``); the library checks every value again at run time
and names key and value when it refuses one."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Literal, Sequence, TypedDict, Union

Duration = Union[int, float, timedelta, str]
"""Seconds (int or float), a timedelta, or text such as "250ms", "10s", "5m"."""

OneOrMore = Union[str, Sequence[str]]
"""A key that may be given several times: one value, or a list of them."""


class Settings(TypedDict, total=False):
    """Every key is optional; see the README of the C API for what each one does."""

    ehlo_name: str
    connect_timeout: Duration
    greeting_timeout: Duration
    command_timeout: Duration
    data_end_timeout: Duration
    tls_handshake_timeout: Duration
    idle_timeout: Duration
    chunking: bool
    bdat_window: int
    bdat_window_bytes: int
    max_connections_per_destination: int
    max_connections: int
    max_messages_per_connection: int
    max_recipients_per_transaction: int
    queue_capacity: int
    max_queued_recipients: int
    retry_initial: Duration
    retry_max_interval: Duration
    retry_multiplier: float
    retry_jitter: float
    retry_max_age: Duration
    loops: int
    record_events: bool
    starttls: Literal["disabled", "opportunistic", "required"]
    tls_verify: bool
    tls_ca_file: Union[str, "os.PathLike[str]"]
    auth_user: str
    auth_password: str
    auth_oauth2_token: str
    allow_plaintext_auth: bool
    source_address: OneOrMore
    messages_per_second: float
    messages_per_minute: float
    messages_per_hour: float
    connections_per_minute: float
    limit_override: OneOrMore
    adaptive_initial_concurrency: int
    adaptive_pause: Duration
    adaptive_max_pause: Duration
    adaptive_dead_after: int
    adaptive_dead_for: Duration
    adaptive_throttle_memory: Duration
    classify_rule: OneOrMore
    direct_mx: bool
    mx_nameservers: OneOrMore
    mx_smtp_port: int
    mx_ipv4: bool
    mx_ipv6: bool
    mx_max_hosts: int
    mx_max_addresses: int
    mx_timeout: Duration
    mx_cache_capacity: int
    mta_sts: bool
    mta_sts_port: int
    spool_dir: Union[str, "os.PathLike[str]"]
