"""Container health check: exit 0 when the server's /ready answers 200.

Reads VLM_PORT (or its alias VLM_SERVICE_PORT) and VLM_API_KEYS like the server
(the first key authorises the call). Standard library only, so it runs in the slim
image without curl. Proxy variables are ignored: the call never leaves the container.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def first_api_key(raw: str) -> str | None:
    raw = raw.strip()
    keys = json.loads(raw) if raw.startswith("[") else raw.split(",")
    keys = [str(key).strip() for key in keys if str(key).strip()]
    return keys[0] if keys else None


def main() -> int:
    port = (
        os.environ.get("VLM_PORT", "").strip()
        or os.environ.get("VLM_SERVICE_PORT", "").strip()
        or "8000"
    )
    request = urllib.request.Request(f"http://127.0.0.1:{port}/ready")
    key = first_api_key(os.environ.get("VLM_API_KEYS", ""))
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
