"""Store-and-forward: the outbox goes upstream, at least once and in order.

The gateway writes one outbox row per resolved alert and per kudos in the
same transaction as the alert's final state (:mod:`gateway.store`). The
:class:`Sender` drains those rows to one upstream, a signed HTTPS webhook
(:class:`Webhook`) or another MQTT broker (:class:`MQTTForwarder`):

* **Order and idempotency.** Rows go out by ``seq``, in batches. Each record
  carries its outbox ``key`` (``alert:<id>``, ``kudos:<id>``), and a webhook
  batch its ``Idempotency-Key``, so the receiver can drop the copies that
  at-least-once delivery allows: a batch delivered but not yet marked when
  the gateway died is sent again after the restart.
* **Retry forever**, with capped exponential backoff and full jitter
  (:class:`Backoff`). Only a permanent refusal of the data (a 4xx other
  than 408 and 429, and other than 401, 403, 404, 405 and 407, which are
  about our own secret or URL and are retried with an ERROR) parks records
  as dead letters, one record at a time: a refused batch is halved until
  the refused record is alone, so one poisoned record never takes its
  neighbours down, nor blocks the queue.
* **Never in the gateway's way.** The sender runs in its own thread with its
  own SQLite connection. In WAL mode the gateway's writes and the sender's
  reads never block each other; the sender's own writes (marking a batch,
  pruning) are short ``BEGIN IMMEDIATE`` transactions of at most
  :data:`CHUNK` rows, so the gateway waits for the write lock a millisecond,
  never a drain. They commit with ``synchronous=NORMAL``: a mark lost to a
  power cut only means a duplicate that the receiver drops, and not syncing
  keeps the lock short. Reading on the loop thread instead would put every
  batch's JSON work and every HTTP wait one ``await`` away from the alert
  path; a thread keeps them out of it entirely.
* **Bounded backlog.** After a long outage the backlog drains at
  ``max_rate`` records per second at most, so replaying a day of credit does
  not compete with live alerts for the CPU, the disk or the uplink.
* **Bounded outbox.** The outbox has a size cap and an age limit, enforced by
  pruning (:func:`enforce_outbox_limits`), never by refusing a write: alert
  writes must never fail because of the outbox.
* **Retention** of delivered rows, raw events and resolved alerts
  (:func:`apply_retention`), a bounded amount of work per run.

:meth:`Sender.status` reports depth, the oldest undelivered record's age,
the last success and error, and the delivered, dead-lettered and dropped
counts, for ``/healthz`` and metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, SecretStr, field_validator, model_validator

from rules.schema import Duration, StrictModel

log = logging.getLogger(__name__)

CHUNK = 500
"""Rows per write transaction when pruning: bounds how long the gateway may
wait for the write lock behind the sender (about a millisecond)."""

STATS_EVERY = 1.0
"""Seconds between refreshes of the depth and oldest-age figures: counting a
100,000-row backlog takes milliseconds, too much for every batch."""

LIMITS_EVERY = 60.0
"""Seconds between checks of the outbox cap and age limit. The cap is soft by
the rows written in that time (about 70 at 100,000 credits a day)."""

LOSS_KIND = "outbox.loss"
"""Kind of the record that tells upstream how many records were dropped."""

DAY = 86_400.0

RETRY_STATUS = frozenset({408, 429})
"""4xx answers that mean "not now": retried like a 5xx."""

MISCONFIGURED_STATUS = frozenset({401, 403, 404, 405, 407})
"""4xx answers about the gateway's settings (secret, URL), not the data.
Retried with an ERROR, never dead-lettered: a typo in the site file must not
park the whole queue for good."""

MIGRATION_SQL = (
    "ALTER TABLE outbox ADD COLUMN delivered_at REAL",
    "ALTER TABLE outbox ADD COLUMN dead_at REAL",
    "ALTER TABLE outbox ADD COLUMN error TEXT",
    "CREATE INDEX outbox_pending ON outbox (seq) "
    "WHERE delivered_at IS NULL AND dead_at IS NULL",
    "CREATE INDEX outbox_dead ON outbox (dead_at) WHERE dead_at IS NOT NULL",
    "CREATE INDEX outbox_kudos ON outbox (created_at) WHERE kind = 'kudos'",
    "CREATE TABLE outbox_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE INDEX alerts_resolved_at ON alerts (resolved_at)",
    "CREATE INDEX alert_history_at ON alert_history (at)",
)
"""The schema the sender needs on top of the gateway's m001-m003: delivery
state per outbox row; partial indexes so that the next pending batch, the
dead-letter count and the week's kudos cost what they find, not the whole
table (they hold only those rows, so the alert path's inserts barely notice
them); a persistent count of dropped records; and time indexes for retention
and the recognition summary. Migration m004 in :mod:`gateway.store` applies
exactly these statements."""


class UpstreamError(RuntimeError):
    """The sender cannot run: a missing schema or an unusable setting."""


# -- settings -----------------------------------------------------------------


class DeliverySettings(StrictModel):
    """How the sender paces itself; shared by every kind of upstream."""

    batch_size: int = Field(100, ge=1, le=1000)
    """Records per webhook POST, or per burst of MQTT messages."""

    max_rate: float = Field(50.0, gt=0)
    """Records per second at most, so a backlog drains without starving the
    gateway: 100,000 records of a day-long outage take about 35 minutes."""

    retry_min: Duration = 1.0
    """First retry delay ceiling; it doubles per failure up to ``retry_max``."""

    retry_max: Duration = 300.0
    """Longest wait between attempts; five minutes, as AWS Greengrass does."""

    timeout: Duration = 10.0
    """Seconds to wait for a connection, an answer or the PUBACKs of a batch."""

    poll_every: Duration = 5.0
    """Idle re-check of the outbox; a commit wakes the sender sooner."""

    @model_validator(mode="after")
    def _sane_delays(self) -> DeliverySettings:
        if self.retry_min <= 0 or self.timeout <= 0 or self.poll_every <= 0:
            raise ValueError("'retry_min', 'timeout' and 'poll_every' must be above 0s")
        if self.retry_max < self.retry_min:
            raise ValueError(
                f"'retry_max' ({self.retry_max:g}s) must be at least "
                f"'retry_min' ({self.retry_min:g}s)"
            )
        return self


class WebhookSettings(DeliverySettings):
    """An HTTPS endpoint that takes signed JSON batches."""

    kind: Literal["webhook"]
    url: str
    """``https://...``; plain ``http://`` only to a loopback address (a local
    relay, or tests)."""

    secret: SecretStr | None = None
    """Shared HMAC secret; never logged."""

    secret_file: Path | None = None
    """Read at start-up; preferred, so the site file holds no secret."""

    ca_file: Path | None = None
    """CA bundle for a private upstream; the system's CAs otherwise."""

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "https" and parts.hostname:
            return value
        if parts.scheme == "http" and _is_loopback(parts.hostname):
            return value
        raise ValueError(
            f"upstream url must be https://host/path (plain http only to "
            f"127.0.0.1 or localhost), got {value!r}"
        )

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookSettings:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of 'secret' and 'secret_file'")
        return self

    def resolved_secret(self) -> bytes:
        if self.secret is not None:
            return self.secret.get_secret_value().encode()
        assert self.secret_file is not None  # checked by _one_secret
        return self.secret_file.read_text().strip().encode()


class UpstreamTLS(StrictModel):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class MQTTUpstreamSettings(DeliverySettings):
    """Another broker: one QoS 1 message per record on ``<prefix>/<site>/<kind>``."""

    kind: Literal["mqtt"]
    host: str
    port: int = Field(8883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: UpstreamTLS | None = None
    """TLS to the upstream broker; strongly advised off the site's network."""

    topic_prefix: str = Field("facility-upstream", pattern=r"^[^#+]+$")
    client_id: str | None = None
    """Default ``upstream-<site>-<gateway>``."""

    keepalive: int = Field(30, ge=5, le=3600)

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return None


UpstreamSettings = Annotated[
    WebhookSettings | MQTTUpstreamSettings, Field(discriminator="kind")
]


class RetentionSettings(StrictModel):
    """How much the gateway keeps, and the outbox's cap and age limit."""

    outbox_max_records: int = Field(200_000, ge=1000)
    """Two days of a very busy site, or months of a ward."""

    outbox_max_mb: float = Field(200.0, gt=0)
    """Bodies only; SQLite adds about a tenth on top."""

    outbox_max_age_days: float = Field(30.0, gt=0)
    """An undelivered record older than this is dropped, counted and logged."""

    delivered_days: float = Field(14.0, ge=8)
    """Delivered and dead-lettered rows are kept this long: kudos for the
    week's recognition page are read from them, hence at least eight days."""

    events_days: float = Field(30.0, ge=8)
    """Raw events; badge sightings for a week's credit need at least eight."""

    alerts_days: float = Field(400.0, ge=8)
    """Resolved alerts and their history: a year and a month for reports."""

    every: Duration = 600.0
    """Seconds between retention runs."""

    rows_per_run: int = Field(5000, ge=CHUNK)
    """At most this many rows per table per run: bounded work."""


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


# -- records, results and the upstream interface ------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One outbox row on its way upstream."""

    seq: int
    """Position in the outbox; increases, and never restarts (see pruning)."""

    key: str
    """Idempotency key: the receiver keeps the first record with a key."""

    kind: str
    created_at: float
    body: Any

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "seq": self.seq,
            "kind": self.kind,
            "created_at": self.created_at,
            "body": self.body,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    """What an upstream made of one batch."""

    delivered: int = 0
    """Records confirmed, counted from the head of the batch."""

    rejected: bool = False
    """The upstream refused the batch for good (its data, not our settings)."""

    error: str | None = None
    """Why the rest of the batch must be tried again (or was refused)."""

    retry_after: float | None = None
    """Seconds the upstream asked us to wait (HTTP ``Retry-After``)."""

    misconfigured: bool = False
    """The upstream refused our credentials or address: an operator must act."""


class Upstream(Protocol):
    """Where records go. ``send`` blocks, but never longer than its timeout."""

    def describe(self) -> str:
        """Where it sends, without secrets, for logs and status."""
        ...

    def send(self, records: Sequence[Record]) -> Delivery:
        """Deliver a batch in order; never raise for a network problem."""
        ...

    def close(self) -> None: ...


# -- HTTPS webhook ------------------------------------------------------------


def encode_batch(records: Sequence[Record], site: str, gateway: str) -> bytes:
    """The exact bytes of one webhook POST; the signature covers these."""
    payload = {
        "gateway": gateway,
        "site": site,
        "records": [record.as_dict() for record in records],
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: bytes, body: bytes) -> str:
    """``X-Signature`` value: ``sha256=`` and the hex HMAC of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def batch_key(records: Sequence[Record], site: str, gateway: str) -> str:
    """Same records, same key: a retried batch is recognisably the same batch."""
    digest = hashlib.sha256(f"{site}/{gateway}".encode())
    for record in records:
        digest.update(b"\n" + record.key.encode())
    return digest.hexdigest()[:32]


class Webhook:
    """Signed JSON batches POSTed to an HTTPS endpoint (httpx, blocking)."""

    def __init__(self, settings: WebhookSettings, site: str, gateway: str) -> None:
        self._url = settings.url
        self._site = site
        self._gateway = gateway
        self._secret = settings.resolved_secret()
        self._timeout = settings.timeout
        verify: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.ca_file))
        self._client = httpx.Client(
            timeout=settings.timeout,
            verify=verify,
            follow_redirects=False,
            headers={"User-Agent": f"facility-gateway/{gateway}"},
        )

    def describe(self) -> str:
        parts = urlsplit(self._url)
        return f"webhook {parts.scheme}://{parts.netloc}{parts.path}"

    def send(self, records: Sequence[Record]) -> Delivery:
        body = encode_batch(records, self._site, self._gateway)
        headers = {
            "Content-Type": "application/json",
            "X-Signature": sign(self._secret, body),
            "Idempotency-Key": batch_key(records, self._site, self._gateway),
        }
        try:
            response = self._client.post(self._url, content=body, headers=headers)
        except httpx.TimeoutException:
            return Delivery(error=f"no answer within {self._timeout:g}s")
        except httpx.HTTPError as exc:
            return Delivery(error=f"cannot reach {self.describe()}: {exc!r}")
        return _judge(response, len(records))

    def close(self) -> None:
        self._client.close()


def _judge(response: httpx.Response, count: int) -> Delivery:
    """Turn an HTTP answer into a delivery, in this one place."""
    status = response.status_code
    if 200 <= status < 300:
        return Delivery(delivered=count)
    said = f"HTTP {status}: {response.text[:200]!r}"
    if status in RETRY_STATUS or status >= 500:
        return Delivery(error=said, retry_after=_retry_after(response))
    if status in MISCONFIGURED_STATUS:
        return Delivery(
            error=f"{said}; check the upstream url and secret", misconfigured=True
        )
    if 400 <= status < 500:
        return Delivery(rejected=True, error=said)
    return Delivery(error=f"{said}; expected 2xx (redirects are not followed)")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date, or nothing: our own backoff decides


# -- MQTT to another broker ---------------------------------------------------


class MQTTForwarder:
    """One QoS 1 message per record; delivered when its PUBACK arrives.

    The connection lives as long as it works. After any failure it is torn
    down and the next attempt starts a fresh one, so paho never holds stale
    messages of an old attempt to replay in the middle of a newer batch.

    A PUBACK means the upstream *broker* has the message. A broker without
    persistence loses what it acknowledged if it dies before its subscribers
    read it; end to end, the upstream broker needs persistence and its
    consumer a persistent session.
    """

    def __init__(self, settings: MQTTUpstreamSettings, site: str, gateway: str) -> None:
        self._settings = settings
        self._site = site
        self._gateway = gateway
        self._client: paho.Client | None = None
        self._state = threading.Condition()
        self._connected = False
        self._refused: str | None = None
        self._acked: set[int] = set()

    def describe(self) -> str:
        settings = self._settings
        scheme = "mqtts" if settings.tls is not None else "mqtt"
        return f"{scheme}://{settings.host}:{settings.port}/{settings.topic_prefix}"

    def topic(self, kind: str) -> str:
        return f"{self._settings.topic_prefix}/{self._site}/{kind}"

    def send(self, records: Sequence[Record]) -> Delivery:
        deadline = time.monotonic() + self._settings.timeout
        client = self._connect(deadline)
        if client is None:
            reason = self._refused or "no connection"
            self._drop()
            return Delivery(error=f"cannot connect to {self.describe()}: {reason}")

        mids = []
        for record in records:
            payload = record.as_dict() | {"site": self._site, "gateway": self._gateway}
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
            mids.append(client.publish(self.topic(record.kind), body, qos=1).mid)

        acked = self._wait_for_acks(mids, deadline)
        if acked < len(records):
            self._drop()
            return Delivery(
                delivered=acked,
                error=f"{len(records) - acked} of {len(records)} messages "
                f"not acknowledged within {self._settings.timeout:g}s",
            )
        return Delivery(delivered=acked)

    def close(self) -> None:
        self._drop()

    def _connect(self, deadline: float) -> paho.Client | None:
        with self._state:
            if self._client is not None and self._connected:
                return self._client
        self._drop()
        with self._state:
            # Before the new client's thread starts: it may fail at once.
            self._refused = None
        self._client = self._new_client()
        with self._state:
            self._state.wait_for(
                lambda: self._connected or self._refused is not None,
                max(0.0, deadline - time.monotonic()),
            )
            return self._client if self._connected else None

    def _new_client(self) -> paho.Client:
        settings = self._settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id or f"upstream-{self._site}-{self._gateway}",
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.max_inflight_messages_set(1000)  # a whole batch in flight
        client.max_queued_messages_set(0)
        if settings.username:
            client.username_pw_set(settings.username, settings.resolved_password())
        if settings.tls is not None:
            client.tls_set(
                ca_certs=_path(settings.tls.ca_file),
                certfile=_path(settings.tls.cert_file),
                keyfile=_path(settings.tls.key_file),
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.connect_async(settings.host, settings.port, settings.keepalive)
        client.loop_start()
        return client

    def _wait_for_acks(self, mids: Sequence[int], deadline: float) -> int:
        """Wait for every PUBACK; return how many arrived, from the first on."""
        wanted = set(mids)
        with self._state:
            self._state.wait_for(
                lambda: wanted <= self._acked or not self._connected,
                max(0.0, deadline - time.monotonic()),
            )
            acked = 0
            for mid in mids:
                if mid not in self._acked:
                    break
                acked += 1
            self._acked -= wanted
        return acked

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # The paho thread may log the socket it is losing; that is us.
            client.disable_logger()
            client.disconnect()
            client.loop_stop()
        with self._state:
            self._connected = False
            self._acked.clear()

    # paho's thread -----------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        with self._state:
            if reason.is_failure:
                self._refused = str(reason)
            else:
                self._connected = True
            self._state.notify_all()

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        with self._state:
            self._refused = "connection refused or unreachable"
            self._state.notify_all()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        with self._state:
            self._connected = False
            self._state.notify_all()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        with self._state:
            self._acked.add(mid)
            self._state.notify_all()


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def build_upstream(settings: UpstreamSettings, site: str, gateway: str) -> Upstream:
    """The upstream a site file asks for."""
    if isinstance(settings, WebhookSettings):
        return Webhook(settings, site, gateway)
    return MQTTForwarder(settings, site, gateway)


# -- retrying and pacing ------------------------------------------------------


class Backoff:
    """Capped exponential backoff with full jitter.

    After the n-th failure in a row, wait a random time between 0 and
    ``min(cap, base * 2**n)``. Full jitter spreads the retries of many
    gateways that lost the same upstream at the same moment, so they do not
    come back in step (AWS Architecture Blog, "Exponential Backoff And
    Jitter", 2015). No attempt limit: credit is retried forever.
    """

    def __init__(
        self,
        base: float,
        cap: float,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._jitter = jitter

    @property
    def ceiling(self) -> float:
        """The longest the next wait may be."""
        return min(self.cap, self.base * 2 ** min(self.failures, 62))

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait."""
        delay = self._jitter(0.0, self.ceiling)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class Pace:
    """At most ``rate`` records per second, without bursting after a pause."""

    def __init__(self, rate: float, monotonic: Callable[[], float]) -> None:
        self.rate = rate
        self._monotonic = monotonic
        self._next = monotonic()

    def wait(self) -> float:
        """Seconds until the next batch may go."""
        return max(0.0, self._next - self._monotonic())

    def spent(self, records: int) -> None:
        self._next = max(self._next, self._monotonic()) + records / self.rate


# -- the outbox in SQLite -----------------------------------------------------

_PENDING = (
    "SELECT seq, key, kind, created_at, body FROM outbox "
    "WHERE delivered_at IS NULL AND dead_at IS NULL ORDER BY seq LIMIT ?"
)
_DEPTH = "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL AND dead_at IS NULL"
_OLDEST = (
    "SELECT created_at FROM outbox WHERE delivered_at IS NULL AND dead_at IS NULL "
    "ORDER BY seq LIMIT 1"
)
_DEAD = "SELECT COUNT(*) FROM outbox WHERE dead_at IS NOT NULL"
_COUNTER = "SELECT value FROM outbox_counters WHERE name = ?"
_ADD_COUNTER = (
    "INSERT INTO outbox_counters (name, value) VALUES (?, ?) "
    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)
_INSERT = (
    "INSERT OR IGNORE INTO outbox (key, kind, created_at, body) VALUES (?, ?, ?, ?)"
)


def connect(path: str | Path) -> sqlite3.Connection:
    """The sender's own connection: autocommit, WAL, NORMAL sync, patient.

    Opened by the caller, then used by the sender's thread alone (hence
    ``check_same_thread=False``): one thread at a time, never two.
    """
    conn = sqlite3.connect(
        path, timeout=5.0, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def missing_schema(conn: sqlite3.Connection) -> list[str]:
    """What of :data:`MIGRATION_SQL` this database lacks, by name."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    missing = [f"outbox.{c}" for c in ("delivered_at", "dead_at", "error")]
    missing = [name for name in missing if name.split(".")[1] not in columns]
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    for name in ("outbox_counters", "outbox_pending", "outbox_dead", "outbox_kudos"):
        if name not in tables:
            missing.append(name)
    return missing


@contextlib.contextmanager
def _writing(conn: sqlite3.Connection) -> Iterator[None]:
    """A short write transaction that takes the lock up front.

    IMMEDIATE, because a deferred transaction that read first cannot wait
    for the lock (busy_timeout does not apply to the upgrade); it fails.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _marks(seqs: Sequence[int]) -> str:
    return ", ".join("?" for _ in seqs)


def _delete(
    conn: sqlite3.Connection, table: str, column: str, ids: Sequence[Any]
) -> None:
    """Delete rows by id, one short transaction per chunk."""
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        # Table and column names are constants of this module, never input.
        sql = f"DELETE FROM {table} WHERE {column} IN ({_marks(chunk)})"  # noqa: S608
        with _writing(conn):
            conn.execute(sql, chunk)


def _newest_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0])


@dataclass(frozen=True, slots=True)
class Pruned:
    """What :func:`enforce_outbox_limits` removed."""

    delivered: int = 0
    dead: int = 0
    lost: int = 0
    """Undelivered records dropped: they never reached upstream."""


def enforce_outbox_limits(
    conn: sqlite3.Connection,
    limits: RetentionSettings,
    now: float,
    *,
    upstream: bool = True,
) -> Pruned:
    """Keep the outbox under its cap and age limit, by pruning.

    The declared policy when full: drop the oldest **delivered** rows first
    (upstream has them; they only serve the local recognition page), then the
    oldest **dead letters** (they would never go out by themselves), and only
    then the oldest **undelivered** rows, each such loss counted in
    ``outbox_counters`` (``dropped``), logged at ERROR and announced upstream
    by an ``outbox.loss`` record naming the ``seq`` range.

    Why not refuse new records instead: a refusal would have to happen in
    the alert's own transaction, and alert writes must never fail or slow
    down because of the outbox. Why the oldest: the newest credit is what the
    recognition page and upstream care about now, and the oldest is what the
    age limit would drop next anyway. Nothing is lost locally: the alerts and
    their history stay in their own tables, under their own retention, and
    can be exported again.

    Without an upstream (``upstream=False``) records wait for one to be
    configured, up to the same limits; dropping them is then routine and
    logged at INFO, not ERROR.

    The row with the highest ``seq`` is never deleted, so SQLite never hands
    out a lower ``seq`` again (it numbers new rows from the current maximum).
    """
    newest = _newest_seq(conn)
    level = logging.ERROR if upstream else logging.INFO
    cutoff = now - limits.outbox_max_age_days * DAY
    lost = 0
    aged = _pending_older_than(conn, cutoff, newest)
    if aged:
        lost += _drop_undelivered(conn, aged, "age", now, level)

    rows_over, bytes_over = _excess(conn, limits)
    if rows_over <= 0 and bytes_over <= 0:
        return Pruned(lost=lost)

    picked: dict[str, list[int]] = {}
    for state, where in (
        ("delivered", "delivered_at IS NOT NULL"),
        ("dead", "dead_at IS NOT NULL"),
        ("pending", "delivered_at IS NULL AND dead_at IS NULL"),
    ):
        seqs, rows_over, bytes_over = _oldest(
            conn, where, newest, rows_over, bytes_over
        )
        picked[state] = seqs
    _delete(conn, "outbox", "seq", picked["delivered"] + picked["dead"])
    if picked["pending"]:
        lost += _drop_undelivered(conn, picked["pending"], "cap", now, level)
    return Pruned(len(picked["delivered"]), len(picked["dead"]), lost)


def _pending_older_than(
    conn: sqlite3.Connection, cutoff: float, newest: int
) -> list[int]:
    """Undelivered rows created before ``cutoff``: a prefix in ``seq`` order.

    Rows are created in ``seq`` order, so the walk stops at the first young
    one instead of reading the whole backlog every minute.
    """
    seqs = []
    with contextlib.closing(
        conn.execute(
            "SELECT seq, created_at FROM outbox WHERE delivered_at IS NULL "
            "AND dead_at IS NULL AND seq < ? ORDER BY seq",
            (newest,),
        )
    ) as rows:
        for seq, created_at in rows:
            if created_at >= cutoff:
                break
            seqs.append(seq)
    return seqs


def _excess(conn: sqlite3.Connection, limits: RetentionSettings) -> tuple[int, float]:
    """Rows and bytes over the cap (zero or less: under it).

    Summing every body reads the whole table, hundreds of MB on an SD card,
    so the size is estimated from the newest thousand rows first and only
    measured exactly when the estimate comes near the cap.
    """
    count = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    cap = limits.outbox_max_mb * 1e6
    average = conn.execute(
        "SELECT AVG(LENGTH(CAST(body AS BLOB))) FROM "
        "(SELECT body FROM outbox ORDER BY seq DESC LIMIT 1000)"
    ).fetchone()[0]
    size = count * (average or 0.0)
    if size > 0.8 * cap:
        size = conn.execute(
            "SELECT TOTAL(LENGTH(CAST(body AS BLOB))) FROM outbox"
        ).fetchone()[0]
    return count - limits.outbox_max_records, size - cap


def _oldest(
    conn: sqlite3.Connection,
    where: str,
    newest: int,
    rows_over: float,
    bytes_over: float,
) -> tuple[list[int], float, float]:
    """Oldest rows matching ``where`` until the excess is covered."""
    seqs: list[int] = []
    if rows_over <= 0 and bytes_over <= 0:
        return seqs, rows_over, bytes_over
    with contextlib.closing(
        conn.execute(
            "SELECT seq, LENGTH(CAST(body AS BLOB)) FROM outbox "  # noqa: S608
            f"WHERE {where} AND seq < ? ORDER BY seq",
            (newest,),
        )
    ) as rows:
        for seq, length in rows:
            if rows_over <= 0 and bytes_over <= 0:
                break
            seqs.append(seq)
            rows_over -= 1
            bytes_over -= length
    return seqs, rows_over, bytes_over


def _drop_undelivered(
    conn: sqlite3.Connection,
    seqs: Sequence[int],
    reason: str,
    now: float,
    level: int,
) -> int:
    """Delete undelivered rows, counting the loss and telling upstream."""
    for start in range(0, len(seqs), CHUNK):
        chunk = seqs[start : start + CHUNK]
        marks = _marks(chunk)
        rows = conn.execute(
            "SELECT kind, COUNT(*), MIN(created_at), MAX(created_at) "  # noqa: S608
            f"FROM outbox WHERE seq IN ({marks}) GROUP BY kind",
            chunk,
        ).fetchall()
        kinds = {kind: count for kind, count, _, _ in rows}
        oldest = min((row[2] for row in rows), default=None)
        newest = max((row[3] for row in rows), default=None)
        body = {
            "dropped": len(chunk),
            "reason": reason,
            "first_seq": chunk[0],
            "last_seq": chunk[-1],
            "oldest_created_at": oldest,
            "newest_created_at": newest,
            "kinds": kinds,
        }
        key = f"loss:{chunk[0]}-{chunk[-1]}"
        with _writing(conn):
            conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)  # noqa: S608
            conn.execute(_ADD_COUNTER, ("dropped", len(chunk)))
            conn.execute(_INSERT, (key, LOSS_KIND, now, json.dumps(body)))
        log.log(
            level,
            "Dropped %d undelivered outbox records (seq %d-%d, created %s to %s) "
            "over the outbox %s limit; they never reached upstream. Fix the "
            "upstream, or raise retention.outbox_max_records / outbox_max_mb / "
            "outbox_max_age_days",
            len(chunk),
            chunk[0],
            chunk[-1],
            _when(oldest),
            _when(newest),
            reason,
        )
    return len(seqs)


def _when(at: float | None) -> str:
    if at is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def apply_retention(
    conn: sqlite3.Connection, settings: RetentionSettings, now: float
) -> dict[str, int]:
    """Delete what has been kept long enough; at most ``rows_per_run`` per table.

    Delivered and dead-lettered outbox rows after ``delivered_days``, raw
    events after ``events_days``, resolved alerts with their history after
    ``alerts_days``. Unresolved alerts and undelivered records are never
    touched here. Each table is read first, then deleted by id in chunks,
    so no transaction holds the write lock for a scan.
    """
    budget = settings.rows_per_run
    outbox = _settled_prefix(conn, now - settings.delivered_days * DAY, budget)
    _delete(conn, "outbox", "seq", outbox)

    events = [
        event_id
        for (event_id,) in conn.execute(
            "SELECT id FROM events WHERE received_at < ? ORDER BY received_at LIMIT ?",
            (now - settings.events_days * DAY, budget),
        )
    ]
    _delete(conn, "events", "id", events)

    # "+state": not by the state index, which would sort every resolved
    # alert of the year; by resolved_at, which stops at the budget.
    alerts = [
        alert_id
        for (alert_id,) in conn.execute(
            "SELECT id FROM alerts WHERE resolved_at < ? AND +state = 'resolved' "
            "ORDER BY resolved_at LIMIT ?",
            (now - settings.alerts_days * DAY, budget),
        )
    ]
    _delete(conn, "alert_history", "alert_id", alerts)
    _delete(conn, "alerts", "id", alerts)
    return {"outbox": len(outbox), "events": len(events), "alerts": len(alerts)}


def _settled_prefix(conn: sqlite3.Connection, cutoff: float, budget: int) -> list[int]:
    """The oldest outbox rows, delivered or dead-lettered before ``cutoff``.

    Delivery goes in ``seq`` order, so these rows form a prefix of the
    table: the walk stops at the first row still pending or settled too
    recently, and reads at most ``budget`` rows, not the table.
    """
    newest = _newest_seq(conn)
    seqs = []
    with contextlib.closing(
        conn.execute(
            "SELECT seq, delivered_at, dead_at FROM outbox WHERE seq < ? "
            "ORDER BY seq LIMIT ?",
            (newest, budget),
        )
    ) as rows:
        for seq, delivered_at, dead_at in rows:
            settled = delivered_at if delivered_at is not None else dead_at
            if settled is None or settled >= cutoff:
                break
            seqs.append(seq)
    return seqs


def requeue_dead_letters(conn: sqlite3.Connection) -> int:
    """Send the dead letters again (after upstream was fixed); return how many."""
    with _writing(conn):
        cursor = conn.execute(
            "UPDATE outbox SET dead_at = NULL, error = NULL WHERE dead_at IS NOT NULL"
        )
    return cursor.rowcount


# -- the sender ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """What one :meth:`Sender.step` did, and how long to wait before the next."""

    delay: float
    wakeable: bool = True
    """A :meth:`Sender.wake` may cut the wait short (idle), or not (backoff,
    pacing)."""

    sent: int = 0
    delivered: int = 0
    dead: int = 0
    error: str | None = None


class Sender:
    """Drains the outbox upstream from its own thread, forever.

    The gateway calls :meth:`start` once, :meth:`wake` after committing
    outbox rows, :meth:`status` whenever it likes (from any thread) and
    :meth:`stop` on the way out. With no upstream configured it still
    enforces the outbox cap and the retention, so the file cannot grow
    without end.

    Tests drive :meth:`step` directly, with an injected clock, instead of
    the thread.
    """

    def __init__(
        self,
        path: str | Path,
        upstream: Upstream | None,
        delivery: DeliverySettings | None = None,
        retention: RetentionSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.path = Path(path)
        self._upstream = upstream
        self._delivery = delivery or DeliverySettings()
        self._retention = retention or RetentionSettings()
        self._clock = clock
        self._monotonic = monotonic

        self._conn = connect(self.path)
        missing = missing_schema(self._conn)
        if missing:
            self._conn.close()
            raise UpstreamError(
                f"{self.path} lacks {', '.join(missing)}: the outbox delivery "
                "migration (m004_outbox_delivery) has not run. Open the file "
                "with gateway.store.Store first; it applies pending migrations"
            )

        self._backoff = Backoff(
            self._delivery.retry_min, self._delivery.retry_max, jitter
        )
        self._pace = Pace(self._delivery.max_rate, monotonic)
        self._limit = self._delivery.batch_size
        self._next_limits = 0.0
        self._next_retention = 0.0
        self._next_stats = 0.0
        self._failing_since: float | None = None

        self._lock = threading.Lock()
        self._status: dict[str, Any] = {
            "upstream": upstream.describe() if upstream is not None else None,
            "running": False,
            "depth": 0,
            "oldest_created_at": None,
            "last_success_at": None,
            "last_error": None,
            "last_error_at": None,
            "consecutive_failures": 0,
            "attempts": 0,
            "delivered": 0,
            "dead_lettered": 0,
            "dropped": 0,
        }
        self._refresh_counts()

        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the gateway's side (any thread) ------------------------------------

    def start(self) -> None:
        """Run in a background thread until :meth:`stop`."""
        if self._thread is not None:
            raise UpstreamError("the sender is already running")
        self._thread = threading.Thread(target=self._run, name="upstream", daemon=True)
        self._set(running=True)
        self._thread.start()
        log.info("Sending the outbox of %s to %s", self.path, self._describe())

    def wake(self) -> None:
        """New outbox rows are committed: look now, not at the next poll."""
        self._wakeup.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the batch in flight, then close. Blocks up to ``timeout``.

        The default waits for the upstream's own timeout plus a margin: call
        it through ``asyncio.to_thread`` from the event loop.
        """
        self._stopping.set()
        self._wakeup.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout if timeout is not None else self._delivery.timeout + 5)
            if thread.is_alive():
                log.warning("The upstream sender did not stop in time; leaving it")
                return
        self.close()

    def close(self) -> None:
        """Release the connection and the upstream (the thread must be done)."""
        if self._upstream is not None:
            self._upstream.close()
        self._conn.close()
        self._set(running=False)

    def status(self) -> dict[str, Any]:
        """Depth, oldest age, last success and error, counts: for metrics."""
        with self._lock:
            status = dict(self._status)
        oldest = status.pop("oldest_created_at")
        status["oldest_undelivered_age"] = (
            None if oldest is None else round(max(0.0, self._clock() - oldest), 3)
        )
        return status

    # -- the work -----------------------------------------------------------

    def step(self) -> Step:
        """Housekeeping if due, then at most one batch; what to do next."""
        self._housekeep_if_due()
        self._refresh_if_due()
        if self._upstream is None:
            return Step(self._delivery.poll_every)

        wait = self._pace.wait()
        if wait > 0:
            return Step(wait, wakeable=False)
        records, broken = self._read_batch(self._limit)
        if broken:
            # Parking a broken row delivers nothing, so order still holds.
            self._dead_letter(broken, "body is not valid JSON")
            return Step(0.0, wakeable=False, dead=len(broken))
        if not records:
            self._set(depth=0, oldest_created_at=None)
            return Step(self._delivery.poll_every)
        return self._deliver(records)

    def housekeep(self) -> dict[str, int]:
        """Enforce the outbox limits and apply retention now."""
        now = self._clock()
        pruned = self._enforce_limits(now)
        removed = apply_retention(self._conn, self._retention, now)
        removed["outbox"] += pruned.delivered + pruned.dead
        removed["lost"] = pruned.lost
        self._refresh_counts()
        return removed

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._pause(self._safe_step())
        finally:
            self._set(running=False)

    def _safe_step(self) -> Step:
        try:
            return self.step()
        except sqlite3.Error as exc:
            log.error("Outbox database error, retrying with backoff: %s", exc)
            return Step(self._backoff.next_delay(), wakeable=False, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - credit must outlive one bad batch
            log.exception("Upstream sender failed; retrying with backoff")
            return Step(self._backoff.next_delay(), wakeable=False, error=repr(exc))

    def _pause(self, step: Step) -> None:
        if step.delay <= 0:
            return
        if step.wakeable:
            self._wakeup.wait(step.delay)
            self._wakeup.clear()
        else:
            self._stopping.wait(step.delay)

    def _describe(self) -> str:
        if self._upstream is None:
            return "nowhere (no upstream configured; pruning only)"
        return self._upstream.describe()

    # -- one batch -----------------------------------------------------------

    def _read_batch(self, limit: int) -> tuple[list[Record], list[int]]:
        """The next pending records, and the seqs of rows that are not JSON."""
        records: list[Record] = []
        broken: list[int] = []
        for seq, key, kind, created_at, body in self._conn.execute(_PENDING, (limit,)):
            try:
                records.append(Record(seq, key, kind, created_at, json.loads(body)))
            except (TypeError, ValueError):
                broken.append(seq)
        return records, broken

    def _deliver(self, records: list[Record]) -> Step:
        with self._lock:
            self._status["attempts"] += 1
        assert self._upstream is not None
        delivery = self._upstream.send(records)
        self._pace.spent(len(records))

        done = records[: delivery.delivered]
        if done:
            self._mark_delivered(done)
        if delivery.rejected:
            return self._rejected(records, delivery.error or "refused")
        if delivery.error is not None:
            return self._failed(delivery, len(done))
        self._succeeded()
        return Step(0.0, wakeable=False, sent=len(records), delivered=len(done))

    def _mark_delivered(self, records: Sequence[Record]) -> None:
        now = self._clock()
        with _writing(self._conn):
            self._conn.executemany(
                "UPDATE outbox SET delivered_at = ? WHERE seq = ?",
                [(now, record.seq) for record in records],
            )
        with self._lock:
            self._status["delivered"] += len(records)
            self._status["last_success_at"] = now
            self._status["depth"] = max(0, self._status["depth"] - len(records))

    def _rejected(self, records: list[Record], reason: str) -> Step:
        """Halve a refused batch until the refused record stands alone."""
        if len(records) > 1:
            self._limit = max(1, len(records) // 2)
            log.warning(
                "%s refused a batch of %d records (%s); retrying in batches of %d "
                "to find the refused records",
                self._describe(),
                len(records),
                reason,
                self._limit,
            )
            return Step(0.0, wakeable=False, sent=len(records), error=reason)
        self._dead_letter([records[0].seq], reason)
        self._succeeded()
        return Step(0.0, wakeable=False, sent=1, dead=1, error=reason)

    def _dead_letter(self, seqs: Sequence[int], reason: str) -> None:
        now = self._clock()
        with _writing(self._conn):
            self._conn.executemany(
                "UPDATE outbox SET dead_at = ?, error = ? WHERE seq = ?",
                [(now, reason, seq) for seq in seqs],
            )
        keys = [
            key
            for (key,) in self._conn.execute(
                f"SELECT key FROM outbox WHERE seq IN ({_marks(seqs)})",  # noqa: S608
                list(seqs),
            )
        ]
        log.error(
            "Upstream will never take outbox record(s) %s: %s. Parked as dead "
            "letters (outbox.dead_at); fix and requeue them with "
            "gateway.upstream.requeue_dead_letters",
            ", ".join(keys),
            reason,
        )
        with self._lock:
            self._status["dead_lettered"] += len(seqs)
            self._status["depth"] = max(0, self._status["depth"] - len(seqs))
            self._status["last_error"] = reason
            self._status["last_error_at"] = now

    def _failed(self, delivery: Delivery, delivered: int) -> Step:
        now = self._clock()
        first = self._failing_since is None
        if first:
            self._failing_since = now
        delay = self._backoff.next_delay()
        if delivery.retry_after is not None:
            delay = min(max(delay, delivery.retry_after), self._backoff.cap)
        with self._lock:
            self._status["last_error"] = delivery.error
            self._status["last_error_at"] = now
            self._status["consecutive_failures"] = self._backoff.failures

        # Once when it goes away, then quiet; an operator's problem (ERROR)
        # is repeated every tenth attempt until someone fixes it.
        nagging = delivery.misconfigured and self._backoff.failures % 10 == 1
        if first or nagging:
            self._refresh_counts()
            level = logging.ERROR if delivery.misconfigured else logging.WARNING
            log.log(
                level,
                "Upstream %s failed (%s); keeping %d records, retrying for ever "
                "with backoff up to %gs",
                self._describe(),
                delivery.error,
                self._depth(),
                self._backoff.cap,
            )
        else:
            log.debug(
                "Upstream still failing: %s; next in %.1fs", delivery.error, delay
            )
        return Step(delay, wakeable=False, delivered=delivered, error=delivery.error)

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            self._refresh_counts()
            log.info(
                "Upstream %s answers again after %d failed attempts over %.0fs; "
                "delivering a backlog of %d records",
                self._describe(),
                self._backoff.failures,
                self._clock() - self._failing_since,
                self._depth(),
            )
            self._failing_since = None
        self._backoff.reset()
        self._limit = min(self._delivery.batch_size, self._limit * 2)
        with self._lock:
            self._status["consecutive_failures"] = 0

    # -- housekeeping and figures ---------------------------------------------

    def _housekeep_if_due(self) -> None:
        now = self._monotonic()
        if now >= self._next_limits:
            self._next_limits = now + LIMITS_EVERY
            pruned = self._enforce_limits(self._clock())
            if pruned != Pruned():
                self._refresh_counts()
        if now >= self._next_retention:
            self._next_retention = now + self._retention.every
            removed = apply_retention(self._conn, self._retention, self._clock())
            if any(removed.values()):
                log.info("Retention removed %s", removed)
                if max(removed.values()) >= self._retention.rows_per_run:
                    # More is due: come back soon rather than a full period later.
                    self._next_retention = now + min(60.0, self._retention.every)
                self._refresh_counts()

    def _enforce_limits(self, now: float) -> Pruned:
        return enforce_outbox_limits(
            self._conn, self._retention, now, upstream=self._upstream is not None
        )

    def _refresh_if_due(self) -> None:
        if self._monotonic() >= self._next_stats:
            self._refresh_counts()

    def _refresh_counts(self) -> None:
        conn = self._conn
        depth = conn.execute(_DEPTH).fetchone()[0]
        oldest = conn.execute(_OLDEST).fetchone()
        dead = conn.execute(_DEAD).fetchone()[0]
        dropped = conn.execute(_COUNTER, ("dropped",)).fetchone()
        self._next_stats = self._monotonic() + STATS_EVERY
        self._set(
            depth=depth,
            oldest_created_at=oldest[0] if oldest else None,
            dead_lettered=dead,
            dropped=dropped[0] if dropped else 0,
        )

    def _set(self, **values: Any) -> None:
        with self._lock:
            self._status.update(values)

    def _depth(self) -> int:
        with self._lock:
            return int(self._status["depth"])


def build_sender(
    path: str | Path,
    upstream: UpstreamSettings | None,
    retention: RetentionSettings,
    site: str,
    gateway: str,
) -> Sender:
    """The sender a site file asks for (pruning only, without an upstream)."""
    target = build_upstream(upstream, site, gateway) if upstream is not None else None
    return Sender(path, target, upstream, retention)
