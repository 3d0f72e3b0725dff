"""WebSub subscriptions: the hub, topic and secret of each feed a hub pushes, and the lease."""

from __future__ import annotations

from dataclasses import dataclass

from monitor.records.store import Store


@dataclass
class Subscription:
    feed: str
    hub: str
    topic: str
    secret: str
    asked_at: float
    verified: bool = False
    expires: float = 0.0
    requested_at: float = 0.0  # our last subscribe request (a renewal too), 0 once verified


_COLUMNS = "feed, hub, topic, secret, asked_at, verified, expires, requested_at"


def _subscription(row) -> Subscription:
    return Subscription(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7])


def load(store: Store) -> dict[str, Subscription]:
    return {r[0]: _subscription(r) for r in store.query(f"SELECT {_COLUMNS} FROM websub_subscriptions")}


def load_one(store: Store, feed: str) -> Subscription | None:
    rows = store.query(f"SELECT {_COLUMNS} FROM websub_subscriptions WHERE feed=?", (feed,))
    return _subscription(rows[0]) if rows else None


def save(store: Store, sub: Subscription) -> None:
    with store.transaction() as conn:
        conn.execute(f"INSERT INTO websub_subscriptions ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (feed) "
                     "DO UPDATE SET hub=excluded.hub, topic=excluded.topic, secret=excluded.secret, "
                     "asked_at=excluded.asked_at, verified=excluded.verified, expires=excluded.expires, "
                     "requested_at=excluded.requested_at",
                     (sub.feed, sub.hub, sub.topic, sub.secret, sub.asked_at, int(sub.verified), sub.expires,
                      sub.requested_at))


def delete(store: Store, feed: str) -> None:
    with store.transaction() as conn:
        conn.execute("DELETE FROM websub_subscriptions WHERE feed=?", (feed,))
