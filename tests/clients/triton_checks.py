"""NVIDIA's tritonclient against a running xrayops server: an independent KServe v2 client.

Run in its own process (tritonclient's protobuf descriptors clash with kserve's in one process):
    python tests/clients/triton_checks.py HTTP_HOST:PORT GRPC_HOST:PORT MODEL FILE...
Prints one JSON object of observations; the test asserts on it.
"""
from __future__ import annotations

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def attempt(call):
    try:
        return {"ok": True, "value": call()}
    except InferenceServerException as exc:
        return {"ok": False, "status": str(exc.status()), "message": exc.message()}


def main() -> None:
    http_url, grpc_url, name, *files = sys.argv[1:]
    blobs = np.array([open(f, "rb").read() for f in files], dtype=np.object_)
    texts = np.array([base64.b64encode(b) for b in blobs], dtype=np.object_)
    http, grpc = th.InferenceServerClient(http_url), tg.InferenceServerClient(grpc_url)
    out: dict = {}
    out["http_server"] = http.get_server_metadata()
    out["grpc_server"] = grpc.get_server_metadata(as_json=True)
    meta = http.get_model_metadata(name)
    version = (meta.get("versions") or [""])[0]
    out["http_model"] = meta
    out["grpc_model"] = grpc.get_model_metadata(name, as_json=True)
    out["http_model_version"] = attempt(lambda: http.get_model_metadata(name, model_version=version)["name"])
    out["http_model_bad_version"] = attempt(lambda: http.get_model_metadata(name, model_version="no-such"))
    out["grpc_model_bad_version"] = attempt(lambda: grpc.get_model_metadata(name, model_version="no-such", as_json=True))
    out["http_ready_version"] = http.is_model_ready(name, model_version=version)
    out["http_ready_bad_version"] = http.is_model_ready(name, model_version="no-such")
    out["grpc_ready_version"] = grpc.is_model_ready(name, model_version=version)

    def http_infer(data, binary: bool, outputs=None, model_version: str = ""):
        tensor = th.InferInput("dicom", [len(data)], "BYTES")
        tensor.set_data_from_numpy(data, binary_data=binary)
        requested = [th.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
        result = http.infer(name, [tensor], outputs=requested, model_version=model_version)
        response = result.get_response()
        return {"outputs": [o["name"] for o in response["outputs"]],
                "region": [text(r) for r in result.as_numpy("region")],
                "probabilities": result.as_numpy("probabilities").tolist() if not outputs else None}

    def grpc_infer(outputs=None, model_version: str = ""):
        tensor = tg.InferInput("dicom", [len(blobs)], "BYTES")
        tensor.set_data_from_numpy(blobs)
        requested = [tg.InferRequestedOutput(o) for o in outputs] if outputs else None
        result = grpc.infer(name, [tensor], outputs=requested, model_version=model_version)
        return {"outputs": [o.name for o in result.get_response().outputs],
                "region": [text(r) for r in result.as_numpy("region")],
                "probabilities": result.as_numpy("probabilities").tolist() if not outputs else None}

    out["http_binary"] = attempt(lambda: http_infer(blobs, True))
    out["http_json"] = attempt(lambda: http_infer(texts, False))  # tritonclient sends no Content-Type
    out["http_requested"] = attempt(lambda: http_infer(blobs, True, ["region", "confidence"]))
    out["http_json_requested"] = attempt(lambda: http_infer(texts, False, ["region"]))
    out["http_unknown_output"] = attempt(lambda: http_infer(blobs, True, ["region", "no_such_output"]))
    out["http_version"] = attempt(lambda: http_infer(blobs, True, model_version=version))
    out["http_bad_version"] = attempt(lambda: http_infer(blobs, True, model_version="no-such"))
    out["grpc"] = attempt(grpc_infer)
    out["grpc_requested"] = attempt(lambda: grpc_infer(["region", "confidence"]))
    out["grpc_unknown_output"] = attempt(lambda: grpc_infer(["no_such_output"]))
    out["grpc_version"] = attempt(lambda: grpc_infer(model_version=version))
    out["grpc_bad_version"] = attempt(lambda: grpc_infer(model_version="no-such"))
    out["version"] = version
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
