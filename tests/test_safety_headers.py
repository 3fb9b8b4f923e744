"""safetensors headers are checked as strictly as the safetensors library (and stricter where
merging needs it): every malformed field is an error naming the file and the tensor, and a file
that is not safetensors at all is refused without echoing any of its bytes."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dppa_kernels.engine import MergeError
from dppa_kernels.engine.st_format import read_header
from engine_util import cli, family, leftovers, write_config


def _f32(name, shape, offs):
    return f'"{name}":{{"dtype":"F32","shape":{json.dumps(shape)},"data_offsets":{json.dumps(offs)}}}'


# name: (header JSON text, data bytes, text the error must contain, tensor the error must name)
CASES = {
    "overlapping offsets": ("{" + _f32("a", [4], [0, 16]) + "," + _f32("b", [4], [8, 24]) + "}", 24,
                            "overlaps tensor 'a'", "b"),
    "gap between tensors": ("{" + _f32("a", [4], [0, 16]) + "," + _f32("b", [4], [20, 36]) + "}", 36,
                            "starts 4 bytes after", "b"),
    "float shape": ("{" + _f32("a", [4.0], [0, 16]) + "}", 16, "not a list of non-negative integers", "a"),
    "negative shape": ("{" + _f32("a", [-2, -2], [0, 16]) + "}", 16, "not a list of non-negative integers", "a"),
    "boolean shape": ("{" + _f32("a", [True], [0, 4]) + "}", 4, "not a list of non-negative integers", "a"),
    "negative offsets": ("{" + _f32("a", [4], [-16, 0]) + "}", 16, "data_offsets [-16, 0]", "a"),
    "reversed offsets": ("{" + _f32("a", [0], [16, 0]) + "}", 16, "data_offsets [16, 0]", "a"),
    "unknown dtype": ('{"a":{"dtype":"Q8","shape":[4],"data_offsets":[0,16]}}', 16, "unknown or unsupported dtype 'Q8'",
                      "a"),
    "size does not match shape": ("{" + _f32("a", [5], [0, 16]) + "}", 16, "needs 20", "a"),
    "bytes after the last tensor": ("{" + _f32("a", [4], [0, 16]) + "}", 20, "4 bytes after the last tensor", None),
    "data past the end": ("{" + _f32("a", [4], [0, 16]) + "," + _f32("b", [4], [16, 32]) + "}", 20, "truncated",
                          "b"),
    "metadata not strings": ('{"__metadata__":{"x":1},' + _f32("a", [4], [0, 16])[0:] + "}", 16, "__metadata__",
                             None),
    "missing field": ('{"a":{"dtype":"F32","shape":[4]}}', 16, "needs dtype, shape and data_offsets", "a"),
    "not an object": ("[1, 2]", 0, "not a JSON object", None),
}


def _write(path, header: str, data: int) -> str:
    raw = header.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(data))
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_header_is_refused_like_safetensors(tmp_path, case):
    header, data, needle, tensor = CASES[case]
    p = _write(tmp_path / "model.safetensors", header, data)
    with pytest.raises(SafetensorError):  # the library refuses it too
        with safe_open(p, "pt") as f:
            list(f.keys())
    with pytest.raises(MergeError) as exc:
        read_header(p)
    msg = str(exc.value)
    assert p in msg and needle in msg, msg
    if tensor is not None:
        assert f"tensor {tensor!r}" in msg, msg


def test_duplicate_keys_are_refused(tmp_path):
    """Stricter than the library, which keeps one of two same-named tensors silently."""
    p = _write(tmp_path / "model.safetensors", "{" + _f32("a", [4], [0, 16]) + "," + _f32("a", [4], [0, 16]) + "}", 16)
    with safe_open(p, "pt") as f:
        assert list(f.keys()) == ["a"]
    with pytest.raises(MergeError, match="key 'a' appears twice"):
        read_header(p)


def test_valid_headers_still_read(tmp_path):
    """Zero-size tensors, any tensor order in the header, extra fields and padding are valid."""
    t = {"z": torch.zeros(0, 3), "b": torch.ones(3, 2, dtype=torch.bfloat16), "a": torch.arange(5.0)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    infos = read_header(str(tmp_path / "x.safetensors"))
    assert {k: (i.dtype, i.shape) for k, i in infos.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}
    hand = "{" + _f32("b", [2], [8, 16]) + "," + '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}' + "}  "
    infos = read_header(_write(tmp_path / "y.safetensors", hand, 16))
    assert infos["a"].begin < infos["b"].begin


SECRET = b"root:$6$Zq8sEcReT.hash.value:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n" * 4


@pytest.mark.parametrize("prefix", [b"", struct.pack("<Q", 20) + b"{not json at all..."])
def test_non_safetensors_file_is_never_echoed(tmp_path, prefix):
    p = tmp_path / "model.safetensors"
    content = prefix + SECRET
    p.write_bytes(content)
    with pytest.raises(MergeError) as exc:
        read_header(str(p))
    msg = str(exc.value)
    assert str(p) in msg and "not a safetensors file" in msg, msg
    (n,) = struct.unpack("<Q", content[:8])
    assert str(n) not in msg, "the header length field (the file's first 8 bytes) was echoed"
    for i in range(len(SECRET) - 6):
        assert SECRET[i:i + 6].decode(errors="ignore") not in msg, msg


def test_negative_shape_in_every_model_is_one_error_line(tmp_path):
    """The same negative shape in every model (so no shape mismatch hides it): an error naming
    the tensor, not a crash where the tensor is allocated."""
    base, fts = family(tmp_path / "fam", shard_bytes=1 << 40)
    for d in [base] + fts:
        p = os.path.join(d, "model.safetensors")
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            data = f.read()
        header["model.norm.weight"]["shape"] = [-4, -8]  # 32 elements: the byte count still matches
        _write(p, json.dumps(header), 0)
        with open(p, "ab") as f:
            f.write(data)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    r = cli("merge", cfg, "--out", tmp_path / "out", "--no-progress")
    assert r.exit_code != 0 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
    assert "model.norm.weight" in r.output and "non-negative integers" in r.output
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")
