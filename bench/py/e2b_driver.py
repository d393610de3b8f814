"""The SDK side of the `e2b` benchmark (bench/src/bin/e2b.rs).

Started by the benchmark with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set;
reads one JSON request per line on stdin, answers one JSON line on stdout.
Every time is taken here, with time.perf_counter, around the SDK calls only:

  {"op": "create_first"}  Sandbox.create() then commands.run("true"), timed;
                          the sandbox is then killed (untimed) -> {"ms": t}
  {"op": "open"}          a sandbox kept for run_true -> {"sandbox_id": id}
  {"op": "run_true"}      commands.run("true") in it, timed -> {"ms": t}
  {"op": "close"}         kills the kept sandbox -> {}

A failure answers {"error": "..."} and the driver goes on. The benchmark ends
it with SIGTERM (the daemon's teardown deletes any sandbox left); it also exits
at the end of its input.
"""

import importlib.metadata
import json
import sys
import time

from e2b import Sandbox

kept = None


def handle(req):
    global kept
    op = req["op"]
    if op == "create_first":
        t0 = time.perf_counter()
        s = Sandbox.create()
        s.commands.run("true")
        ms = (time.perf_counter() - t0) * 1e3
        s.kill()
        return {"ms": ms}
    if op == "open":
        kept = Sandbox.create()
        kept.commands.run("true")
        return {"sandbox_id": kept.sandbox_id}
    if op == "run_true":
        t0 = time.perf_counter()
        kept.commands.run("true")
        return {"ms": (time.perf_counter() - t0) * 1e3}
    if op == "close":
        if kept is not None:
            kept.kill()
            kept = None
        return {}
    raise ValueError(f"unknown op {op!r}")


def main():
    print(json.dumps({"ready": True, "sdk": importlib.metadata.version("e2b")}), flush=True)
    for line in sys.stdin:
        try:
            out = handle(json.loads(line))
        except Exception as e:  # reported to the benchmark, which fails the run
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
    if kept is not None:
        kept.kill()


if __name__ == "__main__":
    main()
