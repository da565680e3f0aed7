"""The Open Inference Protocol's REST bodies: JSON tensors (`data`, flat or nested, in row-major
order) and Triton's binary tensor data extension, in which a JSON header of
`Inference-Header-Content-Length` bytes is followed by the tensors' raw little-endian bytes. The
tensors themselves are decoded by `service.tensors`, as on every wire."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from service.errors import BadRequest
from service.tensors import DATATYPES, oip_tensor

HEADER_LENGTH = "inference-header-content-length"


def loads(body: bytes, what: str = "request body") -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"{what} is not valid JSON: {err}") from None
    except RecursionError:
        raise BadRequest(f"{what} nests too deeply") from None


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary tail of an inference request."""
    if header_length is None:
        head, tail = body, memoryview(b"")
    else:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise BadRequest(f"Inference-Header-Content-Length: {header_length!r}; must be a byte count within the body ({len(body)} bytes)")
        n = int(header_length)
        head, tail = body[:n], memoryview(body)[n:]
    request = loads(head, "the inference request's JSON header")
    if not isinstance(request, dict):
        raise BadRequest("the inference request must be a JSON object")
    return request, tail


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str, default: Any = None) -> Any:
    value = obj.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise BadRequest(f"{what}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def read_inputs(request: dict[str, Any], tail: memoryview) -> dict[str, tuple[str, np.ndarray]]:
    """The request's inputs by name: JSON `data`, or `binary_data_size` bytes taken in turn from the tail."""
    inputs = _field(request, "inputs", list, "request", [])
    out: dict[str, tuple[str, np.ndarray]] = {}
    offset = 0
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise BadRequest(f"inputs[{i}]: must be a JSON object")
        name = _field(spec, "name", str, f"inputs[{i}]")
        datatype = _field(spec, "datatype", str, f"inputs[{i}]")
        shape = _field(spec, "shape", list, f"inputs[{i}]")
        if name is None or datatype is None or shape is None:
            raise BadRequest(f"inputs[{i}]: needs 'name', 'datatype' and 'shape'")
        if name in out:
            raise BadRequest(f"input {name!r} given twice")
        size = (_field(spec, "parameters", dict, f"input {name!r}", {}) or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(tail):
                raise BadRequest(f"input {name!r}: binary_data_size {size!r} runs past the {len(tail)} bytes after the JSON header")
            array = oip_tensor(name, datatype, shape, raw=tail[offset : offset + size])
            offset += size
        else:
            if "data" not in spec:
                raise BadRequest(f"input {name!r}: give 'data', or binary data with 'binary_data_size'")
            array = oip_tensor(name, datatype, shape, values=spec["data"])
        out[name] = (datatype, array)
    if offset != len(tail):
        raise BadRequest(f"{len(tail) - offset} bytes after the JSON header belong to no input")
    return out


def asked_outputs(request: dict[str, Any]) -> tuple[list[str], dict[str, bool]]:
    """The outputs asked for (none: all) and, per output, whether to send it as binary data: its own
    `binary_data` parameter, else the request's `binary_data_output`."""
    default = bool((_field(request, "parameters", dict, "request", {}) or {}).get("binary_data_output", False))
    names, binary = [], {}
    for i, spec in enumerate(_field(request, "outputs", list, "request", []) or []):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest(f"outputs[{i}]: must be a JSON object with a 'name'")
        names.append(spec["name"])
        binary[spec["name"]] = bool((_field(spec, "parameters", dict, f"outputs[{i}]", {}) or {}).get("binary_data", default))
    binary[""] = default  # for outputs not named
    return names, binary


def write_response(head: dict[str, Any], outputs: list[tuple[str, str, np.ndarray]], binary: dict[str, bool]) -> tuple[bytes, int | None]:
    """The response body and, when any output travels as binary data, the JSON header's length."""
    tails, listed = [], []
    for name, datatype, array in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary.get(name, binary[""]):
            raw = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        listed.append(entry)
    header = json.dumps({**head, "outputs": listed}, separators=(",", ":")).encode()
    if not tails:
        return header, None
    return b"".join([header, *tails]), len(header)
