"""The store's statements on PostgreSQL as the store runs them (parameters bound by the server; a
statement run five times prepared, its plan left to the server, but for the look-ups of known
images, planned each run) against every statement planned each run (``plan_cache_mode =
force_custom_plan``) and against values written into the SQL text on the client (psycopg's
ClientCursor, what it did first), in turns on one throwaway cluster.

    python3 bench/postgres_binding.py [--batches 60] [--posts 64] [--analysed ROWS]

Per batch, what the scaled-out intake, fetch workers and recorder ask for that many posts:
the feed items' work rows, the workers' look-ups of the images they know (4 URLs at a time),
then one transaction that holds the rows, stores each image's fingerprint and closes the
rows. Printed per store: our process's CPU, the PostgreSQL cluster's CPU (bench/scaleout.py's
reading of it) and the wall time, per post. ``--analysed ROWS`` first gives the work and
images tables that many rows and analyses them.

On the 2-core EPYC, the cluster's CPU a post: new tables 0.130 ms (0.114 with the look-ups
prepared too), all planned each run 0.172; ``--analysed 200000`` (a deployment long at
work) 0.130 against 0.178. ``--analysed 0`` (a database-wide ANALYZE before the first post):
1.13 ms against 0.18, as the generic plans made for the empty tables (closing a work row by
its id among them) stay sequential scans as the tables grow, until autovacuum's next
ANALYZE, a minute or so. That first minute does not pay for every minute after it, so only
the look-ups, whose plans froze in bench/scaleout.py's turns without any ANALYZE, are
planned each run. Needs initdb/pg_ctl (Debian's postgresql package).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--posts", type=int, default=64)
    ap.add_argument("--analysed", type=int, default=None, metavar="ROWS",
                    help="fill the work and images tables with ROWS rows and ANALYZE them first")
    args = ap.parse_args()
    import psycopg
    from scaleout import services_cpu  # bench/scaleout.py, beside this file

    from feeds.base import FeedItem
    from monitor.fingerprints import Fingerprint
    from monitor.records import shard_answers
    from monitor.records import work as work_rows
    from monitor.records.postgres import PostgresStore
    from monitor.tools.services import throwaway

    class AllPlannedEachRun(PostgresStore):
        def _connect(self) -> None:
            super()._connect()
            self._raw.execute("SET plan_cache_mode = force_custom_plan")

    class ClientBound(PostgresStore):
        def _connect(self) -> None:
            self._raw = psycopg.connect(self.url, autocommit=True, cursor_factory=psycopg.ClientCursor,
                                        connect_timeout=10, client_encoding="UTF8")

    fp = Fingerprint(2**63 - 5, 12345, 678, 91011, 320, 213, fine=os.urandom(64), fine_mirror=os.urandom(64))
    warm = args.batches // 6
    with throwaway(postgres=True, redis=False) as (pg, _):
        url = pg.create_database("binding")
        stores = {"ours": PostgresStore(url), "all planned each run": AllPlannedEachRun(url),
                  "client-bound (first)": ClientBound(url)}
        if args.analysed is not None:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("INSERT INTO work (feed, item_id, image_url, discovered_at, state) SELECT 'old', "
                             "g::text, 'http://example.org/old/' || g, 0, 'done' FROM generate_series(1, %s) g",
                             (args.analysed,))
                conn.execute("INSERT INTO images (url, state, fetched_at) SELECT 'http://example.org/old/' || g, "
                             "'ok', 0 FROM generate_series(1, %s) g", (args.analysed,))
                conn.execute("VACUUM ANALYZE")
        spent = {name: [0.0, 0.0, 0.0] for name in stores}
        for batch in range(args.batches):
            for name, store in stores.items():  # in turns
                items = [FeedItem("feed", f"{name}-{batch}-{i}", (f"http://example.org/{name}/{batch}/{i}.jpg",),
                                  "http://example.org/post", "someone", datetime.now(UTC))
                         for i in range(args.posts)]
                ours, wall, server = time.process_time(), time.perf_counter(), services_cpu(pg)["postgresql"]
                work, _ = work_rows.record_items(store, "feed", items, time.time())
                for start in range(0, len(work), 4):
                    work_rows.cached_images(store, [w.image_url for w in work[start:start + 4]])
                with store.transaction() as conn:
                    shard_answers.hold_works(conn, [w.id for w in work])
                    work_rows.images_ok(conn, [(w.image_url, fp) for w in work], time.time())
                    work_rows.close_many(conn, [w.id for w in work], time.time())
                if batch >= warm:  # past the first batches: statements prepared, caches warm
                    s = spent[name]
                    s[0] += time.process_time() - ours
                    s[1] += services_cpu(pg)["postgresql"] - server
                    s[2] += time.perf_counter() - wall
        for store in stores.values():
            store.close()
    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    posts = (args.batches - warm) * args.posts
    print(f"CPU: {cpu}; {posts:,} posts in batches of {args.posts}, per post:")
    for name, (ours, server, wall) in spent.items():
        print(f"  {name:22s} our CPU {ours / posts * 1e3:.3f} ms, PostgreSQL CPU {server / posts * 1e3:.3f} ms, "
              f"wall {wall / posts * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
