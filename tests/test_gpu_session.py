"""The GPU-run driver (bench/gpu_session.py) and the wheel checks (bench/gpu_wheels.py) on the CPU.

Stage parsing, stamps (a step done is skipped, a changed input or --force runs it again), time
limits (a step's own cap, the call's budget, deferral), the output folder's limits (files, sizes,
names), junit merging, and the invariants of the carried-wheel list. Steps here are tiny Python
commands; the real steps run in the dry run (``bash bench/gpu_session.sh all OUT --dry-run``).
"""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_session as GS  # noqa: E402
import gpu_session_core as core  # noqa: E402
import gpu_wheels as GW  # noqa: E402

PY = sys.executable


@pytest.fixture(autouse=True)
def _no_reserve(monkeypatch):
    monkeypatch.setattr(core, "PACK_RESERVE_S", 0.0)  # budgets of a few seconds in these tests
    monkeypatch.setattr(core, "KILL_GRACE_S", (2.0, 1.0))


def _step(name, code, cap=30.0, **kw):
    return core.Step(name, [[PY, "-c", code]], cap, kw.pop("min_start_s", 0.0), **kw)


def _session(tmp_path, steps, budget=60.0, **kw):
    return core.Session(steps, tmp_path / "state", tmp_path / "out", tmp_path, budget, **kw)


def _stamp(tmp_path, name):
    return json.loads((tmp_path / "state" / "stamps" / f"{name}.json").read_text())


def _count(tmp_path):
    return len((tmp_path / "ran").read_text()) if (tmp_path / "ran").exists() else 0


# -- stage parsing ------------------------------------------------------------------------------
def test_stages_expand_in_order_with_build_first(tmp_path):
    a = GS.parse_args(["all", str(tmp_path / "o")])
    assert a.names == [s.name for s in GS.make_steps(a)]
    assert a.names[:3] == ["build.env", "build.wheels", "build.package"]
    assert GS.parse_args(["test.cuda", str(tmp_path / "o")]).names == \
        ["build.env", "build.wheels", "build.package", "test.cuda"]
    assert GS.parse_args(["bench.plot,build.env", str(tmp_path / "o")]).names == ["build.env", "bench.plot"]
    bench = GS.parse_args(["bench", str(tmp_path / "o")]).names
    assert [n for n in bench if n.startswith("bench.")] == \
        ["bench.threshold", "bench.merge", "bench.pat", "bench.e2e", "bench.della", "bench.plot"]
    assert GS.parse_args(["status", str(tmp_path / "o")]).names == []


@pytest.mark.parametrize("argv,message", [
    (["bogus"], "unknown stage 'bogus'"),
    (["all", "--budget", "30"], "--budget must be above 60"),
    (["all", "--nope"], "unrecognized arguments"),
])
def test_bad_arguments_one_error_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        GS.parse_args([argv[0], str(tmp_path / "o"), *argv[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_output_folder_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        GS.parse_args(["all", str(tmp_path / "f")])
    assert "is not a folder" in capsys.readouterr().err


def test_dry_run_skips_cuda_and_only_collects(tmp_path):
    a = GS.parse_args(["all", str(tmp_path / "o"), "--dry-run", "--python312", PY, "--state", str(tmp_path / "s")])
    steps = {s.name: s for s in GS.make_steps(a)}
    assert "DPPA_FORCE_CUDA" not in steps["build.package"].env
    assert steps["build.package"].cmds[-1][-1] == "cpu"
    assert all("--collect-only" in c for c in steps["test.cuda"].cmds + steps["test.rest"].cmds)
    assert steps["test.cuda"].env["TRITON_INTERPRET"] == "1"
    real = {s.name: s for s in GS.make_steps(GS.parse_args(["all", str(tmp_path / "o")]))}
    assert real["build.package"].env["DPPA_FORCE_CUDA"] == "1" and real["build.package"].env["DPPA_CUDA_ARCHS"] == "90"
    assert real["test.cuda"].env == {"TRITON_INTERPRET": "0", "DPPA_REQUIRE_BACKENDS": "cpu,triton,cuda"}
    assert not any("--collect-only" in c for c in real["test.cuda"].cmds)


def test_wrapper_writes_the_log_when_the_driver_stops_early(tmp_path):
    out = tmp_path / "o"
    r = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), "bogus", str(out)], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": PY}, timeout=60)
    assert r.returncode == 2
    assert "unknown stage 'bogus'" in (out / "session.log").read_text()


# -- stamps, time limits ------------------------------------------------------------------------
def test_done_steps_are_skipped_until_an_input_changes_or_forced(tmp_path):
    (tmp_path / "in.txt").write_text("a")
    mark = f"open({str(tmp_path / 'ran')!r}, 'a').write('x'); print('hello from the step')"
    steps = [_step("build.one", mark, inputs=("in.txt",))]
    assert _session(tmp_path, steps).run() == 0 and _count(tmp_path) == 1
    assert _session(tmp_path, steps).run() == 0 and _count(tmp_path) == 1  # stamped: skipped
    assert _stamp(tmp_path, "build.one")["call"] == 1
    (tmp_path / "in.txt").write_text("b")
    _session(tmp_path, steps).run()
    assert _count(tmp_path) == 2 and _stamp(tmp_path, "build.one")["call"] == 3
    _session(tmp_path, steps, force=("build.one",)).run()
    assert _count(tmp_path) == 3
    log = (tmp_path / "out" / "session.log").read_text()
    assert "===== build.one =====" in log and "hello from the step" in log and "skipped" in log


def test_failures_are_recorded_and_later_steps_still_run(tmp_path):
    steps = [_step("test.bad", "import sys; print('boom'); sys.exit(3)"),
             _step("test.good", "print('fine')")]
    assert _session(tmp_path, steps).run() == 1
    assert _stamp(tmp_path, "test.bad")["status"] == "failed" and _stamp(tmp_path, "test.bad")["rc"] == 3
    assert _stamp(tmp_path, "test.good")["status"] == "ok"
    assert _session(tmp_path, steps).run() == 1  # a failure is final for the same inputs
    assert _stamp(tmp_path, "test.bad")["call"] == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"]["test.bad"]["status"] == "failed" and summary["left"] == []


def test_own_time_cap_interrupts_and_is_final(tmp_path):
    code = ("import time\ntry:\n    time.sleep(60)\n"
            "except KeyboardInterrupt:\n    print('interrupted, writing report')\n    raise")
    steps = [_step("bench.slow", code, cap=1.0)]
    assert _session(tmp_path, steps).run() == 1
    st = _stamp(tmp_path, "bench.slow")
    assert st["status"] == "timeout" and st["wall_s"] < 10
    assert "interrupted, writing report" in (tmp_path / "state" / "logs" / "bench.slow.log").read_text()


def test_budget_cut_is_retried_once_then_final(tmp_path):
    steps = [_step("bench.long", "import time; time.sleep(60)", cap=30.0)]
    assert _session(tmp_path, steps, budget=1.0).run() == 75
    assert _stamp(tmp_path, "bench.long")["status"] == "cut"
    assert _session(tmp_path, steps, budget=1.0).run() == 1
    assert _stamp(tmp_path, "bench.long") | {"attempts": 2} == _stamp(tmp_path, "bench.long")
    assert _stamp(tmp_path, "bench.long")["status"] == "timeout"


def test_steps_that_cannot_start_in_time_are_deferred_with_the_rest(tmp_path):
    steps = [_step("build.quick", "pass"), _step("test.big", "pass", min_start_s=1000), _step("bench.x", "pass")]
    assert _session(tmp_path, steps).run() == 75
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [summary["steps"][n]["status"] for n in ("build.quick", "test.big", "bench.x")] == \
        ["ok", "deferred", "deferred"]
    assert summary["left"] == ["test.big", "bench.x"]


def test_a_driver_error_still_writes_the_output_folder(tmp_path, monkeypatch):
    def broken(step, repo):
        raise RuntimeError("fingerprint exploded")

    monkeypatch.setattr(core, "fingerprint", broken)
    _session(tmp_path, [_step("build.x", "pass")]).run()
    assert "fingerprint exploded" in (tmp_path / "out" / "session.log").read_text()
    assert (tmp_path / "out" / "summary.json").exists()


def test_results_are_copied_and_commit_filled(tmp_path):
    res = tmp_path / "state" / "results"
    res.mkdir(parents=True)
    (res / "gpu.csv").write_text("date,commit,x\n1,unknown,2\n3,abc,4\n")
    GS.fill_commit(res / "gpu.csv", "1234567")
    assert (res / "gpu.csv").read_text().splitlines()[1:] == ["1,1234567,2", "3,abc,4"]
    _session(tmp_path, [], result_files=("gpu.csv", "missing.png")).run()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu.csv", "session.log", "summary.json"]


# -- the output folder --------------------------------------------------------------------------
def test_output_limits_files_sizes_names(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "session.log").write_bytes(b"h" * 600 + b"m" * 2000 + b"t" * 600)
    (out / "summary.json").write_text("{}")
    (out / "big.png").write_bytes(b"\x89PNG" + b"0" * 3000)
    (out / "bad name!.csv").write_text("a,b\n")
    for i in range(8):
        (out / f"r{i}.csv").write_text("x\n")
    changes = core.enforce_limits(out, max_files=8, max_bytes=1000)
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    assert len(files) == 8 and "session.log" in files and "summary.json" in files
    assert "big.png" not in files and all(s <= 1000 for s in files.values())
    assert all(core.OUT_NAME.match(n) for n in files)
    log = (out / "session.log").read_bytes()
    assert log.startswith(b"h") and log.endswith(b"t" * 600) and b"bytes cut here" in log
    assert any("big.png" in c for c in changes) and any("renamed" in c for c in changes)


def test_truncate_middle_is_exact():
    data = bytes(range(256)) * 100
    cut = core.truncate_middle(data, 5000)
    assert len(cut) == 5000 and cut[:100] == data[:100] and cut[-100:] == data[-100:]
    assert core.truncate_middle(b"short", 5000) == b"short"


def test_junit_files_merge_and_count(tmp_path):
    (tmp_path / "junit-a.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="2" failures="1" errors="0" skipped="0" time="1.5">'
        '<testcase classname="tests.test_x" name="test_ok"/>'
        '<testcase classname="tests.test_x" name="test_bad"><failure message="no"/></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "junit-b.xml").write_text('<testsuite name="pytest" tests="3" failures="0" errors="1" '
                                          'skipped="1" time="2"><testcase classname="t" name="e"><error/>'
                                          '</testcase></testsuite>')
    (tmp_path / "junit-c.xml").write_text("<testsuite")  # an interrupted run
    paths = sorted(tmp_path.glob("junit-*.xml"))
    core.merge_junit(paths, tmp_path / "junit.xml")
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert [s.get("name") for s in root] == ["junit-a", "junit-b"]
    counts = core.junit_counts(paths)
    assert counts["junit-a"]["failed"] == ["tests.test_x::test_bad"] and counts["junit-b"]["errors"] == 1
    assert counts["junit-c"] == {"unreadable": True}


def test_status_reports_every_step(tmp_path):
    out = tmp_path / "o"
    assert GS.main(["status", str(out), "--state", str(tmp_path / "s")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["steps"]) == [s.name for s in GS.make_steps(GS.parse_args(["all", str(out)]))]
    assert all(st["status"] == "pending" for st in summary["steps"].values())


# -- the carried wheels -------------------------------------------------------------------------
def test_pinned_wheels_are_what_the_image_lacks():
    image = GW.image_packages()
    assert "torch" in image and "pydantic" not in image and "mergekit" not in image
    assert GW.WHEELS["mergekit"] == "0.1.5"
    assert not set(GW.WHEELS) & set(image)
    assert set(GW.FALLBACK) <= set(image)
    assert all(GW.norm(n) == n for n in {**GW.WHEELS, **GW.FALLBACK, **GW.WAIVED})


def _fake_wheel(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.dist-info/METADATA", "Name: x\n")


def test_wheel_folder_check_finds_extra_duplicate_missing_and_foreign_wheels(tmp_path):
    for name, ver in GW.WHEELS.items():
        _fake_wheel(tmp_path / f"{name.replace('-', '_')}-{ver}-py3-none-any.whl")
    for name, ver in GW.FALLBACK.items():
        _fake_wheel(tmp_path / "fallback" / f"{name.replace('-', '_')}-{ver}-py3-none-any.whl")
    assert GW.check_folder(tmp_path) == []
    _fake_wheel(tmp_path / "pydantic-2.0.0-py3-none-any.whl")
    _fake_wheel(tmp_path / "torch-2.11.0-cp311-cp311-win_amd64.whl")
    (tmp_path / "immutables-0.21-py3-none-any.whl").unlink()
    problems = "\n".join(GW.check_folder(tmp_path))
    assert "pydantic: 2 versions" in problems and "pydantic-2.0.0" in problems
    assert "torch-2.11.0-cp311-cp311-win_amd64.whl: no tag installable" in problems
    assert "immutables==0.21: wheel missing" in problems


def test_every_third_party_import_comes_from_the_image_or_a_carried_wheel():
    imports = GW.third_party_imports()
    assert {"torch", "pydantic", "mergekit", "triton"} <= set(imports)
    assert GW.check_distributions(imports) == []
    assert "mergekit.scripts.run_yaml" in GW.used_modules("mergekit")


def test_collect_appends_rows_once_and_keeps_the_summary(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "summary.json").write_text(json.dumps({
        "meta": {"commit": "abc1234"}, "environment": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
        "tests": {}, "steps": {"build.env": {"status": "ok", "rc": 0, "wall_s": 3.0, "call": 1}}}))
    (src / "e2e_gpu.csv").write_text("date,device,wall_s\n2026,cuda,1.5\n")
    (dest / "e2e_gpu.csv").write_text("date,device,wall_s\n2025,cpu,9.0\n")
    assert GS.collect(src, dest) == 0
    assert (dest / "e2e_gpu.csv").read_text().splitlines() == ["date,device,wall_s", "2025,cpu,9.0", "2026,cuda,1.5"]
    kept = json.loads((dest / "gpu_run.json").read_text())
    assert kept["commit"] == "abc1234" and kept["environment"]["device"].startswith("NVIDIA H100")
    (dest / "e2e_gpu.csv").write_text("date,other\n")
    assert GS.collect(src, dest) == 1  # columns differ: nothing appended
    assert GS.collect(tmp_path / "nothing", dest) == 2
