"""adapters/repository on the embedded default (SQLite), where FOR UPDATE takes no lock."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from service.adapters import repository as repo
from service.db.migrate import upgrade
from service.db.session import make_engine, make_session_factory

OWNER = "abcd1234"


def test_a_version_allocation_that_lost_its_compare_and_set_rereads_the_counter(tmp_path: Path) -> None:
    # Two publishes of one owner at once: B reads last_version=1, waits for A's write lock, then loses the CAS.
    # Its retry must see A's committed counter; a row served from the session's identity map spun forever
    # while holding SQLite's write lock (every other writer then failed after its busy timeout).
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    factory = make_session_factory(make_engine(url))
    with factory() as s:
        assert repo.allocate_version(s, OWNER, None) == 1
        s.commit()
    a = factory()
    assert repo.allocate_version(a, OWNER, None) == 2  # publish A holds the write lock until its commit
    got: dict[str, int] = {}

    def publish_b() -> None:
        with factory() as b:
            got["b"] = repo.allocate_version(b, OWNER, None)
            b.commit()

    thread = threading.Thread(target=publish_b, daemon=True)
    thread.start()
    time.sleep(0.5)
    a.commit()
    a.close()
    thread.join(10)
    assert not thread.is_alive(), "publish B is still spinning on a stale counter"
    assert got["b"] == 3
