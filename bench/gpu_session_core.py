"""The machinery of bench/gpu_session.py: steps with stamps, deadlines and one output folder.

A step is a list of commands with its own time cap. A run executes the selected steps in order
within a wall-clock budget; each finished step leaves a stamp (status, return code, time, and a
fingerprint of its commands and input files) in the state folder, so that a later run on the same
machine skips it while nothing it depends on changed. A step that the budget cut short is run again
by the next run (once); a step that would start with less than its minimum time left is deferred,
with everything after it. Whatever happens, the output folder receives the combined log, a JSON
summary and the result files, within the limits on what can be carried back.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

OUT_MAX_FILES = 8
OUT_MAX_BYTES = 16 << 20
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
FINAL = ("ok", "failed", "timeout")  # a stamp with one of these is not run again
PACK_RESERVE_S = 35.0  # kept back from the budget: a timed-out step's grace periods, then packing
KILL_GRACE_S = (20.0, 5.0)  # after SIGINT (pytest writes its report), after SIGTERM


@dataclass
class Step:
    name: str  # "stage.step"
    cmds: list  # argv lists, run in order in the repository root
    cap_s: float  # the step's own time limit
    min_start_s: float = 30.0  # deferred when less than this is left of the budget
    inputs: tuple = ()  # globs (relative to the repository, or absolute) that key the stamp
    env: dict = field(default_factory=dict)
    keep_going: bool = False  # run the later commands after a failing one
    ok_rcs: tuple = (0,)
    after: Optional[Callable[[], None]] = None  # post-processing of the step's results

    @property
    def stage(self) -> str:
        return self.name.split(".")[0]


def fingerprint(step: Step, repo: Path) -> str:
    """Hash of the step's commands, environment and input files (paths and contents)."""
    h = hashlib.sha256(json.dumps([step.cmds, sorted(step.env.items())], default=str).encode())
    for pattern in step.inputs:
        full = pattern if os.path.isabs(pattern) else str(repo / pattern)
        for path in sorted(glob.glob(full, recursive=True)):
            if os.path.isfile(path) and "__pycache__" not in path:
                h.update(path.encode())
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def run_command(cmd: list, timeout: float, log, env: dict, cwd: Path) -> tuple[int, bool]:
    """Run cmd, teeing its output to log and stdout; on timeout interrupt its process group.

    Returns (return code, timed out). SIGINT first: pytest then still writes its summary and junit.
    """
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    try:
        p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
    except OSError as exc:
        log.write(f"cannot start: {exc}\n")
        return 127, False

    def pump():
        for raw in iter(p.stdout.readline, b""):
            line = raw.decode(errors="replace")
            log.write(line)
            sys.stdout.write(line)
        log.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    timed_out = False
    try:
        p.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        log.write(f"\n[time limit of {timeout:.0f} s reached: interrupting]\n")
        _stop(p)
    except BaseException:  # the driver itself is interrupted: take the step's processes with it
        _stop(p)
        raise
    t.join(timeout=10)
    sys.stdout.flush()
    return p.returncode if p.returncode is not None else -9, timed_out


def _stop(p: subprocess.Popen) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group, each after a grace period."""
    for sig, grace in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), (*KILL_GRACE_S, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class Session:
    """One run of selected steps against a state folder, packed into an output folder."""

    def __init__(self, steps: list[Step], state: Path, out: Path, repo: Path, budget_s: float,
                 selected: Optional[list] = None, force: tuple = (), env: Optional[dict] = None,
                 meta: Optional[dict] = None, result_files: tuple = ()):
        self.steps, self.state, self.out, self.repo = steps, Path(state), Path(out), Path(repo)
        # all steps are reported; the selected ones are run
        self.selected = [s for s in steps if selected is None or s.name in selected]
        self.budget_s, self.force = budget_s, set(force)  # step names whose stamps are ignored
        self.env = dict(os.environ if env is None else env)
        self.meta = meta or {}
        self.result_files = result_files  # names under state/results copied to the output folder
        self.t0 = time.monotonic()
        for sub in ("stamps", "logs", "results"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        calls = self._load("calls.json", [])
        self.call = len(calls) + 1
        calls.append({"call": self.call, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "steps": [s.name for s in self.selected], "budget_s": budget_s, **self.meta})
        self._save("calls.json", calls)
        self.deferred: list[str] = []

    # -- state ------------------------------------------------------------------------------
    def _load(self, rel: str, default):
        try:
            return json.loads((self.state / rel).read_text())
        except (OSError, ValueError):
            return default

    def _save(self, rel: str, obj) -> None:
        tmp = self.state / (rel + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        tmp.replace(self.state / rel)

    def note(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} call {self.call}] {text}"
        print(line, flush=True)
        with open(self.state / "session.log", "a") as f:
            f.write(line + "\n")

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0) - PACK_RESERVE_S

    # -- running ----------------------------------------------------------------------------
    def run(self) -> int:
        """Run the steps, pack the output folder (always), return the exit code.

        0: every selected step ended ok; 1: one failed or hit its own time cap; 75: steps remain.
        """
        try:
            self._run_steps()
        except BaseException as exc:  # the output folder must still say what happened
            import traceback

            self.note(f"session error: {exc!r}\n{traceback.format_exc()}")
            if not isinstance(exc, Exception):
                raise
        finally:
            self.pack()
        stamps = [self._load(f"stamps/{s.name}.json", {}) for s in self.selected]
        if any(st.get("status") in ("failed", "timeout") for st in stamps):
            return 1
        return 0 if all(st.get("status") == "ok" for st in stamps) else 75

    def _run_steps(self) -> None:
        for i, step in enumerate(self.selected):
            fp = fingerprint(step, self.repo)
            stamp = self._load(f"stamps/{step.name}.json", {})
            same = stamp.get("fingerprint") == fp and step.name not in self.force
            if same and stamp.get("status") in FINAL:
                self.note(f"{step.name}: done in call {stamp.get('call')} ({stamp['status']}); skipped")
                continue
            attempts = stamp.get("attempts", 0) if same else 0
            left = self.left()
            if left < step.min_start_s:
                self.deferred = [s.name for s in self.selected[i:]]
                self.note(f"{left:.0f} s left, {step.name} needs {step.min_start_s:.0f} s to start: deferred to "
                          f"the next call with {', '.join(self.deferred)}")
                return
            timeout = min(step.cap_s, left)
            again = f", attempt {attempts + 1}" if attempts else ""
            self.note(f"{step.name}: starting (time limit {timeout:.0f} s{again})")
            status, rc, wall = self._run_step(step, timeout)
            if status == "cut" and attempts >= 1:
                status = "timeout"  # cut short twice: it does not fit one call
            self._save(f"stamps/{step.name}.json", {
                "status": status, "rc": rc, "wall_s": round(wall, 1), "call": self.call, "fingerprint": fp,
                "attempts": attempts + 1, "time_limit_s": round(timeout),
                "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
            self.note(f"{step.name}: {status} (rc {rc}, {wall:.1f} s)")
            if step.after is not None:
                try:
                    step.after()
                except Exception as exc:
                    self.note(f"{step.name}: post-processing failed: {exc!r}")

    def _run_step(self, step: Step, timeout: float) -> tuple[str, int, float]:
        env = {**self.env, **{k: str(v) for k, v in step.env.items()}}
        t0 = time.monotonic()
        rc, failed, timed_out = 0, False, False
        with open(self.state / "logs" / f"{step.name}.log", "w", errors="replace") as log:
            if step.env:
                log.write("env: " + " ".join(f"{k}={v}" for k, v in step.env.items()) + "\n")
            for cmd in step.cmds:
                left = timeout - (time.monotonic() - t0)
                if left <= 0:
                    timed_out = True
                    break
                rc, timed_out = run_command(cmd, left, log, env, self.repo)
                if timed_out:
                    break
                if rc not in step.ok_rcs:
                    failed = True
                    if not step.keep_going:
                        break
        wall = time.monotonic() - t0
        if timed_out:
            return ("cut" if timeout < step.cap_s else "timeout"), rc, wall
        return ("failed" if failed else "ok"), rc, wall

    # -- output -----------------------------------------------------------------------------
    def summary(self) -> dict:
        steps = {}
        for s in self.steps:
            st = self._load(f"stamps/{s.name}.json", {})
            steps[s.name] = st or {"status": "deferred" if s.name in self.deferred else "pending"}
        return {"meta": self.meta, "calls": self._load("calls.json", []),
                "environment": self._load("results/env.json", {}), "steps": steps,
                "tests": junit_counts(sorted((self.state / "results").glob("junit-*.xml"))),
                "left": [s.name for s in self.selected if steps[s.name].get("status") not in FINAL],
                "not_done": [n for n, st in steps.items() if st.get("status") not in FINAL]}

    def pack(self) -> None:
        """Write the output folder: session.log, summary.json, junit.xml and the result files."""
        try:
            summary = self.summary()
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            parts = [("session", self.state / "session.log")]
            parts += [(s.name, self.state / "logs" / f"{s.name}.log") for s in self.steps]
            combine_logs(parts, self.out / "session.log")
            junits = sorted((self.state / "results").glob("junit-*.xml"))
            if junits:
                merge_junit(junits, self.out / "junit.xml")
            for name in self.result_files:
                src = self.state / "results" / name
                if src.is_file():
                    (self.out / name).write_bytes(src.read_bytes())
            print_table(summary)
        except Exception as exc:  # never lose the log over a packing problem
            with open(self.out / "session.log", "a") as f:
                f.write(f"\n[packing the output folder failed: {exc!r}]\n")
        for problem in enforce_limits(self.out):
            print(f"output folder: {problem}", flush=True)


def combine_logs(parts: list, dest: Path, max_bytes: int = OUT_MAX_BYTES) -> None:
    """Concatenate the existing logs with headers; the middle is cut if over max_bytes."""
    chunks = []
    for title, path in parts:
        if Path(path).is_file():
            chunks.append(f"\n===== {title} =====\n".encode() + Path(path).read_bytes())
    dest.write_bytes(truncate_middle(b"".join(chunks), max_bytes))


def truncate_middle(data: bytes, max_bytes: int) -> bytes:
    if len(data) <= max_bytes:
        return data
    mark = f"\n[... {len(data) - max_bytes} bytes cut here ...]\n".encode()
    head = (max_bytes - len(mark)) // 8
    return data[:head] + mark + data[len(data) - (max_bytes - len(mark) - head):]


def merge_junit(paths: list, dest: Path) -> None:
    """One <testsuites> holding the <testsuite> elements of several junit files."""
    root = ET.Element("testsuites")
    for p in paths:
        try:
            tree = ET.parse(p).getroot()
        except (ET.ParseError, OSError):
            continue
        suites = [tree] if tree.tag == "testsuite" else list(tree)
        for s in suites:
            s.set("name", f"{Path(p).stem}")
            root.append(s)
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)


def junit_counts(paths: list) -> dict:
    """{junit stem: {tests, failures, errors, skipped, time, failed: [ids]}}."""
    out = {}
    for p in paths:
        try:
            root = ET.parse(p).getroot()
        except (ET.ParseError, OSError):
            out[Path(p).stem] = {"unreadable": True}
            continue
        c = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0, "failed": []}
        for s in ([root] if root.tag == "testsuite" else list(root)):
            for k in ("tests", "failures", "errors", "skipped"):
                c[k] += int(s.get(k, 0))
            c["time"] = round(c["time"] + float(s.get("time", 0)), 1)
            for case in s.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    c["failed"].append(f"{case.get('classname')}::{case.get('name')}")
        c["failed"] = c["failed"][:200]
        out[Path(p).stem] = c
    return out


def enforce_limits(out: Path, max_files: int = OUT_MAX_FILES, max_bytes: int = OUT_MAX_BYTES) -> list[str]:
    """Keep the output folder within what comes back: files, sizes, names. Returns what was changed."""
    problems = []
    files = sorted((p for p in out.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
    for p in [p for p in out.iterdir() if not p.is_file()]:
        problems.append(f"{p.name}: not a plain file; it will not come back")
    for p in files:
        if not OUT_NAME.match(p.name):
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", p.name)
            p.rename(out / safe)
            problems.append(f"{p.name}: renamed to {safe}")
    files = sorted((p for p in out.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
    for p in files:
        size = p.stat().st_size
        if size > max_bytes:
            if p.suffix in (".log", ".txt", ".csv", ".json", ".xml"):
                p.write_bytes(truncate_middle(p.read_bytes(), max_bytes))
                problems.append(f"{p.name}: {size} bytes, cut to {max_bytes}")
            else:
                p.unlink()
                problems.append(f"{p.name}: {size} bytes, over {max_bytes}: removed")
    files = [p for p in out.iterdir() if p.is_file()]
    if len(files) > max_files:
        keep = {"session.log", "summary.json"}
        extra = sorted((p for p in files if p.name not in keep), key=lambda p: p.stat().st_mtime)
        for p in extra[:len(files) - max_files]:
            p.unlink()
            problems.append(f"{p.name}: removed (more than {max_files} files)")
    return problems


def print_table(summary: dict) -> None:
    """The last lines of a run: one line per step, test counts, what is left."""
    print("\nstep              status     rc   wall_s  call")
    for name, st in summary["steps"].items():
        print(f"{name:17s} {st.get('status', ''):9s} {str(st.get('rc', '')):>4s} {str(st.get('wall_s', '')):>8s}"
              f"  {st.get('call', '')}")
    for name, c in summary["tests"].items():
        if "tests" in c:
            print(f"{name}: {c['tests']} tests, {c['failures']} failures, {c['errors']} errors, "
                  f"{c['skipped']} skipped ({c['time']} s)")
    left, rest = summary["left"], [n for n in summary["not_done"] if n not in summary["left"]]
    bad = [n for n, st in summary["steps"].items() if st.get("status") in ("failed", "timeout")]
    print((f"left for the next call: {', '.join(left)}" if left else "all selected steps done")
          + (f"; failed or timed out: {', '.join(bad)}" if bad else "")
          + (f"; not done, not selected: {', '.join(rest)}" if rest else ""), flush=True)
