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


def load(store: Store) -> dict[str, Subscription]:
    rows = store.query("SELECT feed, hub, topic, secret, asked_at, verified, expires FROM websub_subscriptions")
    return {r[0]: Subscription(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows}


def load_one(store: Store, feed: str) -> Subscription | None:
    rows = store.query("SELECT feed, hub, topic, secret, asked_at, verified, expires FROM websub_subscriptions "
                       "WHERE feed=?", (feed,))
    return Subscription(rows[0][0], rows[0][1], rows[0][2], rows[0][3], rows[0][4], bool(rows[0][5]),
                        rows[0][6]) if rows else None


def save(store: Store, sub: Subscription) -> None:
    with store.transaction() as conn:
        conn.execute("INSERT INTO websub_subscriptions (feed, hub, topic, secret, asked_at, verified, expires) "
                     "VALUES (?,?,?,?,?,?,?) ON CONFLICT (feed) DO UPDATE SET hub=excluded.hub, "
                     "topic=excluded.topic, secret=excluded.secret, asked_at=excluded.asked_at, "
                     "verified=excluded.verified, expires=excluded.expires",
                     (sub.feed, sub.hub, sub.topic, sub.secret, sub.asked_at, int(sub.verified), sub.expires))


def delete(store: Store, feed: str) -> None:
    with store.transaction() as conn:
        conn.execute("DELETE FROM websub_subscriptions WHERE feed=?", (feed,))
