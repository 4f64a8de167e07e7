# Run once while building `code-runner-beta`, before its snapshot: starts the `wrenn` kernel and
# drives it the way the official SDK's code runner does (GET /api/kernels, the kernel's
# WebSocket, execute requests), so every capsule restored from the snapshot finds a running
# kernel with the data stack imported and Jupyter's request, WebSocket and execute paths
# already loaded. Cells run with store_history off: a user's first cell is still In[1].
import json
import sys
import time
import urllib.request as u
import uuid

from tornado.ioloop import IOLoop
from tornado.websocket import websocket_connect

BASE = "127.0.0.1:8888"

for _ in range(300):
    try:
        u.urlopen(f"http://{BASE}/api/status")
        break
    except Exception:
        time.sleep(1)

req = u.Request(f"http://{BASE}/api/kernels", data=json.dumps({"name": "wrenn"}).encode(),
                headers={"Content-Type": "application/json"}, method="POST")
kernel = json.load(u.urlopen(req))["id"]


def request(code):
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "wrenn",
                   "session": uuid.uuid4().hex, "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                   "version": "5.3"},
        "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        "buffers": [], "channel": "shell",
    }


async def run(code):
    # Under emulation the first cells (imports) take minutes.
    ws = await websocket_connect(f"ws://{BASE}/api/kernels/{kernel}/channels")
    msg = request(code)
    await ws.write_message(json.dumps(msg))
    # The reply (shell channel) and the idle status (iopub) come in either order.
    status, idle = None, False
    while status is None or not idle:
        raw = await ws.read_message()
        if raw is None:
            sys.exit("the kernel's WebSocket closed")
        m = json.loads(raw)
        if m.get("parent_header", {}).get("msg_id") != msg["header"]["msg_id"]:
            continue
        if m["msg_type"] == "execute_reply":
            status = m["content"]["status"]
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            idle = True
    ws.close()
    return status


CELLS = [
    ("import numpy, pandas, matplotlib.pyplot, seaborn, requests", "ok"),
    ("1 + 1", "ok"),
    ("print('warm')", "ok"),
    ("import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.show()", "ok"),
    ("1 / 0", "error"),
    ("1 + 1", "ok"),
]
for code, want in CELLS:
    u.urlopen(f"http://{BASE}/api/kernels").read()
    got = IOLoop.current().run_sync(lambda: run(code), timeout=900)
    if got != want:
        sys.exit(f"warming cell {code!r}: {got}, expected {want}")
# Nothing of the warm-up is left in the user's namespace.
CLEAN = "del numpy, pandas, matplotlib, seaborn, requests, plt; import gc; gc.collect(); del gc"
if IOLoop.current().run_sync(lambda: run(CLEAN), timeout=900) != "ok":
    sys.exit("cleaning the namespace failed")
