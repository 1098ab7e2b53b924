"""Real Triton for GKM's cache tests: capture a cache, check lookups, recompile.

Runs with PyPI's Triton on a CPU-only machine: `triton.compile` builds kernels for a named
GPU target (cuda:90 with the wheel's ptxas, gfx942 with its bundled LLVM), and Triton's own
`FileCacheManager` decides hit or miss, as it would in a pod. Every command prints one JSON
line on stdout.

  capture DIR TARGET...      compile the test kernels for each TARGET (cuda:90:32,
                             hip:gfx942:64) into the Triton cache DIR
  lookup DIR                 for every group file under DIR (a Triton cache, or the
                             triton/<device> folder of an Inductor cache): does Triton's
                             FileCacheManager, with DIR as its cache dir, resolve every child
                             to a file under DIR (where a pod that mounts DIR sees it)?
  compile DIR TARGET... [--new]
                             compile the test kernels (or, with --new, a kernel the capture
                             did not hold) with DIR as the cache dir; report what Triton wrote
                             into DIR and whether it raised
"""
import json
import os
import sys
import time
import traceback

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def add_kernel(x, y, out, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out + offs, tl.load(x + offs, mask=m) + tl.load(y + offs, mask=m), mask=m)


@triton.jit
def softmax_kernel(out, inp, stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    x = tl.load(inp + row * stride + cols, mask=m, other=-float("inf"))
    x = x - tl.max(x, axis=0)
    e = tl.exp(x)
    tl.store(out + row * stride + cols, e / tl.sum(e, axis=0), mask=m)


@triton.jit
def scale_kernel(x, out, n, s, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out + offs, tl.load(x + offs, mask=m) * s, mask=m)


def sources(new):
    if new:
        return [ASTSource(fn=scale_kernel, signature={"x": "*fp32", "out": "*fp32", "n": "i32", "s": "fp32"},
                          constexprs={"BLOCK": 128})]
    return [
        ASTSource(fn=add_kernel, signature={"x": "*fp32", "y": "*fp32", "out": "*fp32", "n": "i32"},
                  constexprs={"BLOCK": 256}),
        ASTSource(fn=add_kernel, signature={"x": "*fp32", "y": "*fp32", "out": "*fp32", "n": "i32"},
                  constexprs={"BLOCK": 1024}),
        ASTSource(fn=softmax_kernel, signature={"out": "*fp32", "inp": "*fp32", "stride": "i32", "n_cols": "i32"},
                  constexprs={"BLOCK": 1024}),
    ]


def target(spec):
    backend, arch, warp = spec.split(":")
    return GPUTarget(backend, int(arch) if arch.isdigit() else arch, int(warp))


def snapshot(d):
    out = {}
    for root, dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            try:
                st = os.stat(p)
                out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                pass
    return out


def compile_all(d, targets, new):
    os.environ["TRITON_CACHE_DIR"] = d
    triton.knobs.cache.dir = d
    before = snapshot(d)
    t0 = time.perf_counter()
    error = None
    names = []
    try:
        for t in targets:
            for src in sources(new):
                k = triton.compile(src, target=target(t))
                names.append(k.metadata.name)
    except Exception as e:  # the error is the finding (EROFS on a read-only cache)
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    seconds = time.perf_counter() - t0
    after = snapshot(d)
    written = sorted(p for p in after if before.get(p) != after[p])
    return {"kernels": len(names), "written": written, "error": error, "seconds": round(seconds, 3)}


def lookup(d):
    from triton.runtime.cache import FileCacheManager
    os.environ["TRITON_CACHE_DIR"] = d
    triton.knobs.cache.dir = d
    groups, resolved, missing = 0, 0, []
    for root, _, files in os.walk(d):
        for f in files:
            if not (f.startswith("__grp__") and f.endswith(".json")):
                continue
            key = os.path.relpath(root, d)
            if os.sep in key:
                continue  # not a cache entry of this cache dir
            groups += 1
            with open(os.path.join(root, f)) as fh:
                recorded = json.load(fh)["child_paths"]
            found = FileCacheManager(key).get_group(f[len("__grp__"):]) or {}
            # What a pod sees lies under its mount: a child found elsewhere (the capture
            # directory, still present on this machine) would not exist in the pod.
            found = {c: p for c, p in found.items() if p.startswith(d.rstrip("/") + "/")}
            if set(found) == set(recorded) and f[len("__grp__"):] in found:
                resolved += 1
            else:
                missing.append({"group": os.path.join(key, f),
                                "missing": sorted(set(recorded) - set(found)),
                                "recorded": recorded})
    return {"groups": groups, "resolved": resolved, "missing": missing[:5],
            "triton": triton.__version__}


def main():
    cmd, d, *rest = sys.argv[1:]
    new = "--new" in rest
    targets = [r for r in rest if r != "--new"]
    if cmd == "capture":
        os.makedirs(d, exist_ok=True)
        res = compile_all(d, targets, False)
    elif cmd == "compile":
        res = compile_all(d, targets, new)
    elif cmd == "lookup":
        res = lookup(d)
    else:
        sys.exit(f"unknown command {cmd!r}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
