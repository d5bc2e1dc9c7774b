#!/usr/bin/env python3
"""An independent reader of a Tart-format image, for the tests: it shares no code with
vzk-image. It fetches the manifest and blobs over plain HTTP (the distribution API),
checks the layout `tart pull` relies on, decodes every `disk.v2` layer's Apple LZ4
framing with PyPI's `lz4` (each block with the previous block's output as dictionary),
and prints one JSON object: the sha256 and size of the decoded disk and of the NVRAM,
Tart's config, the stub config's labels, the manifest annotations and the layer count.

usage: tart_decode.py HOST:PORT REPOSITORY TAG
Exits non-zero with a message on anything Tart would refuse.
"""
import hashlib
import json
import struct
import sys
import urllib.request

import lz4.block

TART_CONFIG = "application/vnd.cirruslabs.tart.config.v1"
TART_DISK = "application/vnd.cirruslabs.tart.disk.v2"
TART_NVRAM = "application/vnd.cirruslabs.tart.nvram.v1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def fail(msg):
    print(f"tart_decode: {msg}", file=sys.stderr)
    sys.exit(1)


def get(url, accept=None):
    req = urllib.request.Request(url)
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def decode_apple_lz4(data):
    """Apple COMPRESSION_LZ4 framing: bv41 (decoded u32le, encoded u32le, LZ4 block),
    bv4- (size u32le, stored bytes), bv4$ (end)."""
    out = bytearray()
    pos = 0
    prev = b""
    blocks = 0
    while True:
        if pos + 4 > len(data):
            fail("framing ends without bv4$")
        tag = data[pos:pos + 4]
        pos += 4
        if tag == b"bv4$":
            if pos != len(data):
                fail(f"{len(data) - pos} bytes after bv4$")
            return bytes(out), blocks
        if tag == b"bv41":
            decoded, encoded = struct.unpack_from("<II", data, pos)
            pos += 8
            block = lz4.block.decompress(
                data[pos:pos + encoded], uncompressed_size=decoded, dict=prev[-65536:]
            )
            if len(block) != decoded:
                fail(f"block decoded to {len(block)} bytes, header says {decoded}")
            pos += encoded
        elif tag == b"bv4-":
            (size,) = struct.unpack_from("<I", data, pos)
            pos += 4
            block = data[pos:pos + size]
            pos += size
        else:
            fail(f"unknown block tag {tag!r} at {pos - 4}")
        out += block
        prev = block
        blocks += 1


def main():
    host, repo, tag = sys.argv[1:4]
    base = f"http://{host}/v2/{repo}"
    m = json.loads(get(f"{base}/manifests/{tag}", OCI_MANIFEST))
    if m.get("schemaVersion") != 2 or m.get("mediaType") != OCI_MANIFEST:
        fail(f"not an OCI manifest: {m.get('mediaType')}")
    if m["config"]["mediaType"] != OCI_CONFIG:
        fail(f"config media type {m['config']['mediaType']}")
    stub = json.loads(get(f"{base}/blobs/{m['config']['digest']}"))
    layers = m["layers"]
    kinds = [l["mediaType"] for l in layers]
    if kinds.count(TART_CONFIG) != 1 or kinds.count(TART_NVRAM) != 1 or TART_DISK not in kinds:
        fail(f"layers {kinds}")
    disk = hashlib.sha256()
    disk_size = 0
    blocks = 0
    config = nvram = None
    for l in layers:
        blob = get(f"{base}/blobs/{l['digest']}")
        if "sha256:" + hashlib.sha256(blob).hexdigest() != l["digest"] or len(blob) != l["size"]:
            fail(f"blob {l['digest']} does not match its descriptor")
        if l["mediaType"] == TART_CONFIG:
            config = json.loads(blob)
        elif l["mediaType"] == TART_NVRAM:
            nvram = blob
        elif l["mediaType"] == TART_DISK:
            ann = l.get("annotations", {})
            data, n = decode_apple_lz4(blob)
            blocks += n
            if int(ann["org.cirruslabs.tart.uncompressed-size"]) != len(data):
                fail("uncompressed-size annotation")
            if ann["org.cirruslabs.tart.uncompressed-content-digest"] != "sha256:" + hashlib.sha256(data).hexdigest():
                fail("uncompressed-content-digest annotation")
            disk.update(data)
            disk_size += len(data)
        else:
            fail(f"unknown layer {l['mediaType']}")
    print(json.dumps({
        "disk_sha256": disk.hexdigest(),
        "disk_size": disk_size,
        "disk_layers": kinds.count(TART_DISK),
        "blocks": blocks,
        "nvram_sha256": hashlib.sha256(nvram).hexdigest(),
        "config": config,
        "labels": stub.get("config", {}).get("Labels", {}),
        "stub": {"architecture": stub.get("architecture"), "os": stub.get("os")},
        "annotations": m.get("annotations", {}),
        "first_layer": kinds[0],
        "last_layer": kinds[-1],
    }))


if __name__ == "__main__":
    main()
