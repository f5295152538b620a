"""A WhatsApp bot backend on pywa (https://github.com/david-lev/pywa), as a restaurant would
write one for Meta's webhooks: pywa's own Starlette routes, signature validation on
(X-Hub-Signature-256 with the app secret), a handler for every update type pywa knows.

Each handler call is appended to RECORD as one JSON line: {"handler": ..., "id": ...}.
Started by tests/pywa.rs; prints the port it listens on, then serves until killed.

    backend.py APP_SECRET VERIFY_TOKEN RECORD
"""

import inspect
import json
import socket
import sys

import uvicorn
from starlette.applications import Starlette

from pywa import WhatsApp, handlers

app_secret, verify_token, record = sys.argv[1], sys.argv[2], sys.argv[3]
app = Starlette()
wa = WhatsApp(
    server=app,
    webhook_endpoint="/",
    verify_token=verify_token,
    app_secret=app_secret,
    validate_updates=True,
)


def recorder(name):
    def handle(_client, update):
        with open(record, "a", encoding="utf-8") as out:
            out.write(json.dumps({"handler": name, "id": str(getattr(update, "id", ""))}) + "\n")

    return handle


# Every handler type pywa dispatches to (not the raw one, which sees everything).
for name, cls in inspect.getmembers(handlers, inspect.isclass):
    if (
        issubclass(cls, handlers.Handler)
        and cls is not handlers.Handler
        and cls is not handlers.RawUpdateHandler
        and not name.startswith("_")
        and getattr(cls, "_update", None) is not None
    ):
        wa.add_handlers(cls(recorder(name)))

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
