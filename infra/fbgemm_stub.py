"""Build a metadata-only ``fbgemm-gpu`` wheel that stands in for the CUDA build.

TorchRec's metadata requires ``fbgemm-gpu`` (CUDA). On a CPU-only machine pip
would install it beside ``fbgemm-gpu-cpu``; both write ``fbgemm_gpu/`` and the
import then fails on ``libtorch_cuda.so``. This wheel satisfies the requirement
by name, holds no files and pulls in the CPU build instead.
"""

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

NAME, VERSION, CPU_PIN = "fbgemm_gpu", "1.8.0+cpustub", "fbgemm-gpu-cpu==1.8.0"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build(out_dir: Path) -> Path:
    dist_info = f"{NAME}-{VERSION}.dist-info"
    files = {
        f"{dist_info}/METADATA": (
            "Metadata-Version: 2.1\nName: fbgemm-gpu\nVersion: 1.8.0+cpustub\n"
            f"Summary: placeholder that installs {CPU_PIN}\nRequires-Dist: {CPU_PIN}\n"
        ).encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: recsys\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(p, d) for p, d in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "build/wheels")))
