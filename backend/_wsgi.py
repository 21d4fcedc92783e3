"""WSGI entry of the dl2ls ML backend, as Label Studio's ML backends have one:

    gunicorn --bind :9090 --workers $WORKERS --threads $THREADS _wsgi:app

The Dataloop export to serve comes from DL2LS_SOURCE; see `dl2ls serve --help`.
"""

import logging
import os

from dl2ls.server import create_app

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(name)s %(message)s")
app = create_app()
