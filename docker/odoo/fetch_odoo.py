"""Downloads Odoo's source tarball and checks its SHA-256 (build stage).

python3 fetch_odoo.py URL SHA256 OUT: exit 1, naming both digests, when the
download does not match; an empty SHA256 skips the check with a warning.
"""

import hashlib
import sys
import urllib.request


def main() -> int:
    url, want, out = sys.argv[1:4]
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as response, open(out, "wb") as f:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    got = digest.hexdigest()
    if not want:
        print(f"fetch_odoo: WARNING: ODOO_SHA256 is not set; {url} has sha256 {got}", flush=True)
        return 0
    if got != want.lower():
        print(
            f"fetch_odoo: error: {url} has sha256 {got}, but ODOO_SHA256 is {want}: "
            "the download is not the release it names; check ODOO_RELEASE and ODOO_SHA256",
            file=sys.stderr,
        )
        return 1
    print(f"fetch_odoo: {url}: sha256 {got} matches", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
