"""Runs moto's S3 server on 0.0.0.0:5000 and creates the bucket S3_BUCKET once it answers."""
import os
import subprocess
import sys
import time
import urllib.request

server = subprocess.Popen(["/opt/moto/bin/moto_server", "-H", "0.0.0.0", "-p", "5000"])
bucket = os.environ.get("S3_BUCKET", "caddy-builds")
deadline = time.monotonic() + 60
while True:
    try:
        req = urllib.request.Request(f"http://127.0.0.1:5000/{bucket}", method="PUT")
        urllib.request.urlopen(req, timeout=2)
        break
    except Exception as e:  # not up yet
        if time.monotonic() > deadline or server.poll() is not None:
            print(f"cannot create bucket {bucket}: {e}", file=sys.stderr)
            server.kill()
            sys.exit(1)
        time.sleep(0.2)
print(f"bucket {bucket} ready", file=sys.stderr, flush=True)
sys.exit(server.wait())
