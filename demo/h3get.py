"""A tiny HTTP/3 GET for the demo (Debian's curl has no HTTP/3): ``h3get.py [--cacert CA] URL``.

Prints the status, the negotiated key exchange group and the body.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.h3client import H3Client, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--cacert", help="CA file to verify the server with (default: no verification)")
    args = parser.parse_args()
    url = urlsplit(args.url)
    host, port = url.hostname or "localhost", url.port or 443

    async def get():  # type: ignore[no-untyped-def]
        async with H3Client(port, host, args.cacert) as client:
            response = await client.get(url.path or "/")
            return response, client.chosen_group

    response, group = run(get(), timeout=20)
    print(f"HTTP/3 {response.status} (key exchange: {group})", file=sys.stderr)
    sys.stdout.write(response.body.decode("utf-8", "replace"))
    return 0 if 200 <= response.status < 400 else 1


if __name__ == "__main__":
    raise SystemExit(main())
