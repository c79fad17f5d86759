#!/bin/sh
# wait for the database -> migrate (api only) -> serve | work
set -e
python - <<'PY'
import time
from sqlalchemy import text
from service.config import get_settings
from service.db.session import make_engine
engine = make_engine(get_settings().resolved_database_url)
for attempt in range(60):
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        break
    except Exception as exc:
        print(f"waiting for the database ({exc.__class__.__name__})", flush=True)
        time.sleep(1)
else:
    raise SystemExit("database not reachable")
PY
case "$1" in
  serve) oppu migrate && exec oppu serve --host 0.0.0.0 --port 8000 ;;
  worker) exec oppu worker ;;
  *) exec "$@" ;;
esac
