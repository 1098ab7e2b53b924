#!/usr/bin/env python3
"""Writes the seed corpus of GKM's fuzz targets into fuzz/corpus/<target>/.

Deterministic: rerunning it rewrites the same bytes. Seeds are small, real-looking inputs
(docs/fuzzing.md): tar layers as image builders write them, a Triton group file and kernel
metadata from the H200 fixture (tests/fixtures/h200), image references, labels, CSI
requests and AdmissionReviews as kubelet and the API server send them.

Usage: fuzz/make-seeds.py   (needs python3 and the zstd command)
"""

import gzip
import io
import json
import os
import subprocess
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "corpus")
SEP = b"GKMLAYER"
D = "sha256:" + "ab" * 32


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- extract -------------------------------------------------------------------------


def tar(entries, fmt=tarfile.USTAR_FORMAT):
    """A tar stream of (name, kind, arg) entries, without tar's end-of-archive padding
    (tar-rs reads end of input as the end)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, kind, arg in entries:
            i = tarfile.TarInfo(name)
            i.mtime = 1700000000
            i.uname = i.gname = ""
            if kind == "dir":
                i.type, i.mode = tarfile.DIRTYPE, arg or 0o755
                t.addfile(i)
            elif kind == "file":
                i.mode, i.size = 0o644, len(arg)
                t.addfile(i, io.BytesIO(arg))
            elif kind == "symlink":
                i.type, i.linkname = tarfile.SYMTYPE, arg
                t.addfile(i)
            elif kind == "hardlink":
                i.type, i.linkname = tarfile.LNKTYPE, arg
                t.addfile(i)
    data = buf.getvalue().rstrip(b"\0")
    return data + b"\0" * (-len(data) % 512)


def gz(data):
    return gzip.compress(data, mtime=0)


def zst(data):
    return subprocess.run(["zstd", "-q", "-c", "-3"], input=data, capture_output=True, check=True).stdout


def extract_seeds():
    grp = json.dumps({"child_paths": {"k.json": "/root/.triton/cache/AB/k.json"}}).encode()
    cache = [
        ("io.triton.cache", "dir", 0o755),
        ("io.triton.cache/AB", "dir", 0o755),
        ("io.triton.cache/AB/k.json", "file", b'{"target":{"backend":"cuda","arch":90,"warp_size":32}}'),
        ("io.triton.cache/AB/__grp__k.json", "file", grp),
        ("io.triton.cache/AB/k.cubin", "hardlink", "io.triton.cache/AB/k.json"),
        ("io.triton.cache/latest", "symlink", "AB"),
    ]
    # byte 0: 0 plain tar, 1 gzipped by the harness, 3 a gzip stream, 7 a zstd stream
    write("extract", "plain-layer", b"\x00" + tar(cache))
    write("extract", "gzip-layer", b"\x03" + gz(tar(cache)))
    write("extract", "zstd-layer", b"\x07" + zst(tar(cache)))
    lower = tar([
        ("a", "dir", 0o755),
        ("a/x", "file", b"x"),
        ("a/y", "file", b"y"),
        ("b", "dir", 0o700),
        ("b/z", "file", b"z"),
        ("c", "symlink", "a/x"),
    ])
    upper = tar([
        ("a/.wh.x", "file", b""),
        ("b/.wh..wh..opq", "file", b""),
        ("b/new", "file", b"n"),
        ("a", "symlink", "b"),
        ("b", "dir", 0o755),
    ])
    write("extract", "whiteouts-two-layers", b"\x00" + lower + SEP + upper)
    long = "d" * 60 + "/" + "e" * 70 + "/kernel.json"
    pax = tar([(long, "file", b"{}"), ("l", "symlink", long)], fmt=tarfile.PAX_FORMAT)
    gnu = tar([(long + ".gnu", "file", b"{}")], fmt=tarfile.GNU_FORMAT)
    write("extract", "pax-and-gnu-long-names", b"\x01" + pax + SEP + gnu)


# --- reference -----------------------------------------------------------------------


def reference_seeds():
    for i, r in enumerate([
        "quay.io/gkm/kernels:llama-h200",
        "localhost:5000/a/b/c:v1@" + D,
        "registry.example.com/team/app@" + D,
        "busybox",
        "docker.io/library/ubuntu:24.04",
        "127.0.0.1:5000/x__y/z-1.2:tag_1.0-rc",
    ]):
        write("reference", f"ref-{i}", r)


# --- labels --------------------------------------------------------------------------


def labels_seeds():
    summary = {"targets": [{"backend": "cuda", "arch": "90", "warp_size": 32},
                           {"backend": "hip", "arch": "gfx942", "warp_size": 64}]}
    write("labels", "summary", json.dumps(summary))
    write("labels", "summary-mcv-number-arch",
          json.dumps({"targets": [{"backend": "CUDA", "arch": 90, "warp_size": 32}], "ptx_version": 8.4}))
    write("labels", "labels-json", json.dumps({
        "cache.triton.image/summary": json.dumps(summary),
        "cache.triton.image/entry-count": "12",
        "cache.triton.image/cache-size-bytes": "4096",
        "cache.triton.image/triton-versions": "3.6.0, 3.5.1",
        "cache.triton.image/python-abis": "cpython-312-x86_64-linux-gnu",
        "cache.triton.image/capture-path": "/root/.triton/cache",
    }))
    write("labels", "labels-lines",
          "cache.vllm.image/entry-count=3\ncache.vllm.image/capture-path=/cache\n")


# --- triton and view -----------------------------------------------------------------


def h200_files():
    """A real group file and kernel metadata from the H200 fixture."""
    path = os.path.join(ROOT, "tests/fixtures/h200/h200-triton-inductor-caches.tgz")
    with tarfile.open(path) as t:
        d = "tc/JGCK3M7BBZZGB5GMADQVSNIDLRV7X6YXL3J5COTYQFJ6ZAPRXOIA/"
        grp = t.extractfile(d + "__grp__add_kernel.json").read()
        meta = t.extractfile(d + "add_kernel.json").read()
    return d.rstrip("/").split("/", 1)[1], grp, meta


def triton_seeds():
    rel, grp, meta = h200_files()
    write("triton", "h200-add-kernel-metadata", meta)
    write("triton", "h200-add-kernel-group", grp)
    write("triton", "hip-metadata",
          json.dumps({"target": {"backend": "hip", "arch": "gfx942:sramecc+:xnack-", "warp_size": 64},
                      "triton_version": "3.6.0", "name": "k"}))
    write("triton", "names",
          f"{rel}\n/tmp/tc/{rel}/add_kernel.cubin\n__triton_launcher.cpython-312-x86_64-linux-gnu.so\n")


def view_seeds():
    rel, grp, _ = h200_files()
    write("view", "h200-group-at-cache", f"{rel}\n/cache\n\n".encode() + grp)
    write("view", "h200-group-sub-path", f"{rel}\n/models/kernels/\n{rel}\n".encode() + grp)
    inductor = json.dumps({"child_paths": {
        "k.json": "/root/.inductor/triton/0/AB/k.json",
        "k.cubin": "/elsewhere/k.cubin"}})
    write("view", "inductor-group", f"triton/0/AB\n/\ntriton\n{inductor}")


# --- csi -----------------------------------------------------------------------------


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(tag, wire, payload):
    key = varint(tag << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + varint(payload)


def pb_str(tag, s):
    return field(tag, 2, s.encode())


def pb_map(tag, m):
    return b"".join(field(tag, 2, pb_str(1, k) + pb_str(2, v)) for k, v in m.items())


def publish(target, ctx, readonly=False, block=False):
    # VolumeCapability: mount (1) or block (2), access_mode (3) {mode: SINGLE_NODE_WRITER}
    access = field(2, 2, b"") if block else field(1, 2, pb_str(1, "ext4"))
    cap = access + field(3, 2, field(1, 0, 1))
    return (pb_str(1, "csi-0a1b2c") + pb_str(4, target) + field(5, 2, cap)
            + (field(6, 0, 1) if readonly else b"") + pb_map(8, ctx))


def csi_seeds():
    uid = "6d6a3c1e-2b44-4a8e-9a43-1c2f0e8d7b11"
    target = f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/kernels/mount"
    ctx = {
        "csi.gkm.io/GKMCache": "llama-kernels",
        "csi.gkm.io/namespace": "ml-team",
        "csi.storage.k8s.io/pod.name": "vllm",
        "csi.storage.k8s.io/pod.namespace": "ml-team",
        "csi.storage.k8s.io/pod.uid": uid,
        "csi.storage.k8s.io/ephemeral": "true",
    }
    write("csi", "publish", b"\x00" + publish(target, ctx))
    ctx2 = {k: v for k, v in ctx.items() if k not in ("csi.gkm.io/GKMCache", "csi.gkm.io/namespace")}
    ctx2["csi.gkm.io/ClusterGKMCache"] = "shared"
    ctx2["csi.gkm.io/writable"] = "false"
    write("csi", "publish-cluster-read-only", b"\x00" + publish(target, ctx2, readonly=True))
    write("csi", "target", f"\x01{target}\n{uid}")
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "vllm", "namespace": "ml-team", "uid": uid},
           "spec": {
               "initContainers": [{"name": "warm", "image": "busybox",
                                   "volumeMounts": [{"name": "kernels", "mountPath": "/cache"}]}],
               "containers": [
                   {"name": "server", "image": "vllm/vllm-openai",
                    "volumeMounts": [{"name": "kernels", "mountPath": "/cache"}]},
                   {"name": "side", "image": "busybox",
                    "volumeMounts": [{"name": "kernels", "mountPath": "/k", "subPath": "triton"},
                                     {"name": "kernels", "mountPath": "/e", "subPathExpr": "$(POD)"}]}],
               "volumes": [{"name": "kernels", "csi": {"driver": "csi.gkm.io",
                                                      "volumeAttributes": {"csi.gkm.io/GKMCache": "llama"}}},
                           {"name": "data", "emptyDir": {}}]}}
    write("csi", "pod-decide", "\x02kernels\n" + json.dumps(pod))
    write("csi", "attributes", "\x03" + json.dumps(ctx))


# --- admission -----------------------------------------------------------------------


def review(kind, resource, op, obj, old=None, user="alice", ns="ml-team", group="gkm.io", version="v1alpha1"):
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": (obj or old)["metadata"]["name"], "namespace": ns, "operation": op,
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "object": obj, "oldObject": old, "dryRun": False,
        }})


def cache(image, digest=None):
    meta = {"name": "llama", "namespace": "ml-team"}
    if digest:
        meta["annotations"] = {"gkm.io/resolvedDigest": digest}
    return {"apiVersion": "gkm.io/v1alpha1", "kind": "GKMCache", "metadata": meta,
            "spec": {"image": image}}


def admission_seeds():
    img = "quay.io/gkm/kernels:llama-h200"
    # byte 0: bits 0-1 endpoint (0 /mutate, 1 /validate, 2 /mutate-pods, 3 /validate-pods),
    # bit 2 verify signatures, bit 3 cache kinds available
    write("admission", "mutate-create", "\x00" + review("GKMCache", "gkmcaches", "CREATE", cache(img)))
    write("admission", "validate-update-tamper", "\x01" + review(
        "GKMCache", "gkmcaches", "UPDATE", cache(img, "sha256:" + "00" * 32), cache(img, D)))
    write("admission", "validate-create-trusted", "\x01" + review(
        "ClusterGKMCache", "clustergkmcaches", "CREATE", cache(img, D),
        user="system:serviceaccount:gkm-system:gkm-promoter", ns=""))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "vllm", "namespace": "ml-team"},
           "spec": {"containers": [
               {"name": "server", "image": "trusted.example.com/vllm@" + D,
                "env": [{"name": "HF_HOME", "value": "/hf"}],
                "volumeMounts": [{"name": "kernels", "mountPath": "/cache"},
                                 {"name": "inductor", "mountPath": "/ind", "readOnly": True}]}],
               "initContainers": [{"name": "warm", "image": "docker.io/busybox:1.36",
                                   "volumeMounts": [{"name": "kernels", "mountPath": "/cache"}]}],
               "volumes": [
                   {"name": "kernels", "csi": {"driver": "csi.gkm.io", "volumeAttributes": {
                       "csi.gkm.io/GKMCache": "triton-llama", "csi.gkm.io/namespace": "ml-team"}}},
                   {"name": "inductor", "csi": {"driver": "csi.gkm.io", "readOnly": True, "volumeAttributes": {
                       "csi.gkm.io/ClusterGKMCache": "inductor-shared"}}}]}}
    write("admission", "mutate-pods-create", "\x0a" + review("Pod", "pods", "CREATE", pod, group="", version="v1"))
    write("admission", "validate-pods-create-denied", "\x07" + review("Pod", "pods", "CREATE", pod, group="", version="v1"))
    pinned = json.loads(json.dumps(pod))
    pinned["spec"]["initContainers"][0]["image"] = "trusted.example.com/tools/busybox@" + D
    write("admission", "validate-pods-create", "\x03" + review("Pod", "pods", "CREATE", pinned, group="", version="v1"))


if __name__ == "__main__":
    extract_seeds()
    reference_seeds()
    labels_seeds()
    triton_seeds()
    view_seeds()
    csi_seeds()
    admission_seeds()
