"""WSGI entry of the dl2ls ML backend, as Label Studio's ML backends have one:

    gunicorn --bind :9090 --workers $WORKERS --threads $THREADS --worker-class dl2ls.web.Worker _wsgi:app

The service (DATALOOP_API_KEY, state under MODEL_DIR), or an export served offline when DL2LS_SOURCE
is set; see `dl2ls serve --help`. The worker class
matters: gunicorn's own gthread worker gives a thread to a connection at its first byte, so a few
clients that never finish their headers stall every route (dl2ls.web says how its worker avoids it).
"""

import logging
import os

from dl2ls import web
from dl2ls.server import create_app

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(name)s %(message)s")
if not web.ACTIVE:  # imported by another worker class (or preloaded in the arbiter: then it is fine)
    logging.getLogger("dl2ls.server").warning(
        "not run by the dl2ls.web.Worker worker class: slow or idle clients can stall this backend; "
        "add --worker-class dl2ls.web.Worker to the gunicorn command line")
app = create_app()
