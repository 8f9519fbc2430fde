"""Regenerate the Python stubs under gateway/protocol/pb from protos/*.proto.

    python protos/generate.py          # rewrite the stubs
    python protos/generate.py --check  # exit 1 if the committed stubs are stale

The generated modules register their descriptors in a private descriptor pool
(gateway.protocol.pb.pool) instead of protobuf's process-wide default pool.
Why: tritonclient ships its own copy of the same `inference.*` messages; with
both in the default pool, importing the two in one process fails with
"duplicate symbol". The wire format does not depend on the pool.
"""

from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "gateway/protocol/pb"
DEFAULT_POOL = "_descriptor_pool.Default()"
PRIVATE_POOL = "_pool.POOL"
POOL_IMPORT = "from gateway.protocol.pb import pool as _pool\n"


def _generate(out: Path) -> list[Path]:
    protos = sorted(PROTOS.glob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PACKAGE}={PROTOS}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(f"{PACKAGE}/{p.name}" for p in protos),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    files = sorted((out / PACKAGE).glob("*_pb2*.py*"))
    for f in files:
        if f.name.endswith("_pb2.py"):
            _use_private_pool(f)
    return files


def _use_private_pool(path: Path) -> None:
    text = path.read_text()
    if DEFAULT_POOL not in text:
        raise SystemExit(f"{path}: generated code no longer uses {DEFAULT_POOL}; update generate.py")
    text = text.replace(DEFAULT_POOL, PRIVATE_POOL)
    marker = "from google.protobuf import descriptor_pool as _descriptor_pool\n"
    text = text.replace(marker, marker + POOL_IMPORT, 1)
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = _generate(Path(tmp))
        stale = []
        for f in generated:
            target = ROOT / PACKAGE / f.name
            new = f.read_text()
            old = target.read_text() if target.exists() else ""
            if new == old:
                continue
            stale.append(target)
            if args.check:
                diff = difflib.unified_diff(old.splitlines(), new.splitlines(), str(target), "regenerated", lineterm="")
                print("\n".join(list(diff)[:40]))
            else:
                target.write_text(new)
                print(f"wrote {target.relative_to(ROOT)}")
    if args.check and stale:
        print(f"stale stubs: {', '.join(str(s.relative_to(ROOT)) for s in stale)}; run: python protos/generate.py")
        return 1
    if not stale:
        print("stubs are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
