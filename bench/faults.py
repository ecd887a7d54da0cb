"""A bounded, seeded fault campaign against the real ``slim-ray`` command.

Each fault hits a small run (a MovieLens-100K slice of configs/quick.yaml, the ``openai`` engine
against a deterministic stand-in server on 127.0.0.1, so a rerun takes seconds), then the same
command runs again. Pass means: the rerun's outputs equal an uninterrupted run of the same config
(an order-independent content hash per contract), no key is lost or duplicated, and no output was
ever published as complete (``manifest.json`` with ``status: complete``) on data that differs from
the clean run's -- checked right after the fault as well as after the rerun.

    .venv/bin/python bench/faults.py --seed 0                 # every fault, table -> docs/faults.md
    .venv/bin/python bench/faults.py --seed 0 --only ctrl_c_teach disk_full_teach --no-write

Every process it starts (the ``slim-ray`` commands and the local Ray each one starts) is stopped by
PID; the stand-in server listens on 127.0.0.1 only. The disk-full fault mounts a small tmpfs and
needs root; without it the fault is reported as not tried.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import faultlib as fl  # noqa: E402  (tests/faultlib.py: stand-in server, process tree, digests)

CONTRACTS = {  # folder under the run -> the columns that identify a row
    "prepared/items": ("item_id",),
    "prepared/sequences": ("user_id",),
    "rationales/teacher": ("user_id", "rationale_key"),
}
STAGE_DIRS = {"prepare": "prepared", "teach": "rationales/teacher"}
# meta.json keys that differ between two identical trainings in two run folders: timings, node ids,
# input paths, and the fingerprint (which covers the paths)
TRAIN_META_SKIP = ("second", "time", "node", "created", "path", "dir", "host", "checkpoint", "attempt", "inputs",
                   "fingerprint")


def _without_run_specifics(obj):
    if isinstance(obj, dict):
        return {k: _without_run_specifics(v) for k, v in obj.items()
                if not any(s in k.lower() for s in TRAIN_META_SKIP)}
    if isinstance(obj, list):
        return [_without_run_specifics(v) for v in obj]
    return obj


def base_args(run: str, url: str, users: int) -> list[str]:
    return ["--config", "configs/quick.yaml", "--set", f"run_dir={run}", f"data.max_users={users}",
            "teacher.engine=openai", "teacher.model=stand-in", f"teacher.base_url={url}", "teacher.num_users=24",
            "teacher.rows_per_file=4", "teacher.batch_size=4", "teacher.max_concurrent_requests=4",
            "teacher.request_timeout_s=5", "teacher.max_retries=1", "teacher.retry_base_s=0.1",
            "teacher.retry_max_wait_s=1"]


def train_args(run: str, url: str, users: int) -> list[str]:
    return base_args(run, url, users) + ["rec.backbone=[sasrec]", "rec.mode=[id]", "rec.seeds=[0]",
                                         "rec.epochs=4", "rec.patience=4", "rec.num_workers=1"]


@dataclass
class Row:
    fault: str
    stage: str
    survived: str = "no"
    lost: str = "-"
    duplicates: str = "-"
    identical: str = "-"
    note: str = ""
    seconds: float = 0.0


@dataclass
class Campaign:
    work: str
    seed: int
    users: int
    timeout_s: float
    rng: random.Random = field(init=False)
    clean: dict = field(default_factory=dict)  # contract -> Digest of the uninterrupted run
    clean_train: Optional[str] = None
    stage_s: dict = field(default_factory=dict)
    server: Optional[fl.StandIn] = None

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    # ---------------------------------------------------------------- plumbing

    def dir(self, name: str) -> str:
        path = os.path.join(self.work, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def log(self, run: str) -> str:
        return os.path.join(self.work, os.path.basename(run) + ".console.log")

    def digests(self, run: str) -> dict:
        return {c: fl.contract_digest(os.path.join(run, c), key) for c, key in CONTRACTS.items()}

    def train_digest(self, run: str) -> Optional[str]:
        """Hash of every recommender run's meta.json without timings, paths and node ids."""
        metas = sorted(os.path.join(r, f)
                       for r, _, fs in os.walk(os.path.join(run, "rec")) for f in fs if f == "meta.json")
        if not metas:
            return None
        keep = []
        for m in metas:
            with open(m) as f:
                d = json.load(f)
            keep.append(_without_run_specifics(d))
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()

    def published_wrong(self, run: str, stages=("prepare", "teach")) -> list[str]:
        """Stage outputs whose manifest says complete while their content differs from the clean run."""
        bad = []
        for st in stages:
            folder = os.path.join(run, STAGE_DIRS[st])
            m = fl.manifest(folder)
            if m and m.get("status") == "complete":
                for c in CONTRACTS:
                    if c.startswith(STAGE_DIRS[st]) or STAGE_DIRS[st].startswith(c):
                        if not fl.contract_digest(os.path.join(run, c), CONTRACTS[c]).compare(self.clean[c])["identical"]:
                            bad.append(c)
        return bad

    def run(self, args: list[str], run: str, env: Optional[dict] = None) -> fl.Finished:
        return fl.run_slim_ray(args, self.log(run), self.timeout_s, env)

    def start(self, args: list[str], run: str, env: Optional[dict] = None) -> subprocess.Popen:
        return fl.start_slim_ray(args, self.log(run), env)

    def wait_line(self, proc: subprocess.Popen, run: str, text: str, timeout_s: float = 300) -> bool:
        def seen():
            with open(self.log(run), errors="replace") as f:
                return text in f.read()
        return fl.wait_for(lambda: seen() or proc.poll() is not None, timeout_s) and seen()

    def finish(self, proc: subprocess.Popen, tree) -> int:
        try:
            rc = proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            fl.kill_pids(fl.process_tree(proc.pid), signal.SIGKILL)
            rc = proc.wait()
        fl.reap(proc, tree)
        return rc

    def judge(self, row: Row, run: str, stages=("prepare", "teach"), rerun_rc: int = 0, extra_ok: bool = True) -> Row:
        """Compare the run's contracts with the clean run's and fill the row."""
        got = self.digests(run)
        cmp = {c: got[c].compare(self.clean[c]) for c in CONTRACTS}
        row.lost = str(sum(x["lost"] for x in cmp.values()))
        row.duplicates = str(sum(x["duplicates"] for x in cmp.values()))
        same = all(x["identical"] for x in cmp.values())
        row.identical = "yes" if same else "no (" + ", ".join(c for c, x in cmp.items() if not x["identical"]) + ")"
        unread = [u for d in got.values() for u in d.unreadable]
        if unread:
            row.note += f" unreadable: {unread};"
        complete = all((fl.manifest(os.path.join(run, STAGE_DIRS[s])) or {}).get("status") == "complete" for s in stages)
        if not complete:
            row.note += " a stage is not complete after the rerun;"
        row.survived = "yes" if (same and rerun_rc == 0 and complete and extra_ok and row.lost == "0"
                                 and row.duplicates == "0") else "no"
        return row

    def teach_run_from_clean_prepare(self, name: str) -> str:
        """A run folder holding the clean run's prepared/ (complete): the next command starts at teach."""
        run = self.dir(name)
        shutil.copytree(os.path.join(self.work, "clean", "prepared"), os.path.join(run, "prepared"))
        return run

    # ---------------------------------------------------------------- the clean run

    def clean_run(self) -> None:
        run = self.dir("clean")
        res = self.run(["run", "--until", "teach"] + base_args(run, self.server.url, self.users), run)
        if res.rc != 0:
            raise SystemExit(f"the clean run failed (rc {res.rc}); see {self.log(run)}")
        self.clean = self.digests(run)
        for stage in ("prepare", "teach"):  # how long each stage took: the window of a random kill
            line = next(ln for ln in res.output.splitlines() if f"[slim-ray] {stage}: done in" in ln)
            self.stage_s[stage] = float(line.rsplit("done in", 1)[1].strip().rstrip("s"))
        print(f"clean run: {res.seconds:.0f}s, rows " + ", ".join(f"{c}={d.rows}" for c, d in self.clean.items()),
              flush=True)

    def clean_train_run(self) -> None:
        run = os.path.join(self.work, "clean")
        res = self.run(["train"] + train_args(run, self.server.url, self.users), run)
        self.clean_train = self.train_digest(run)
        print(f"clean train: rc {res.rc}, {res.seconds:.0f}s", flush=True)

    # ---------------------------------------------------------------- faults

    def stage_ended(self, run: str, stage: str) -> bool:
        with open(self.log(run), errors="replace") as f:
            text = f.read()
        return f"[slim-ray] {stage}: done in" in text or f"[slim-ray] {stage}: PARTIAL" in text

    def hit_stage(self, name: str, stage: str, act: Callable[[subprocess.Popen], None]):
        """Start ``slim-ray run --until teach`` in a fresh run folder and call ``act(proc)`` at a random
        point of ``stage`` (a share of the clean run's stage time). A point that came after the stage
        ended is drawn again, earlier. Returns (run folder, args, exit status, seconds into the stage)."""
        for attempt in range(4):
            run = self.dir(name) if stage == "prepare" else self.teach_run_from_clean_prepare(name)
            if os.path.exists(self.log(run)):
                os.remove(self.log(run))
            args = ["run", "--until", "teach"] + base_args(run, self.server.url, self.users)
            proc = self.start(args, run)
            self.wait_line(proc, run, f"[slim-ray] {stage}: ")
            delay = self.rng.uniform(0.1, 0.9) * self.stage_s[stage] / 2 ** attempt
            time.sleep(delay)
            tree = fl.process_tree(proc.pid)
            if proc.poll() is None and not self.stage_ended(run, stage):
                act(proc)
                return run, args, self.finish(proc, tree), delay
            self.finish(proc, tree)
        raise RuntimeError(f"{stage} ended before every drawn kill point")

    def kill_driver(self, stage: str) -> Row:
        """SIGKILL the ``slim-ray run`` process at a random point of ``stage``."""
        row = Row("SIGKILL of the driver (`slim-ray run`)", stage)
        self.server.delay_s = 0.5
        try:
            run, args, rc, delay = self.hit_stage(f"kill-driver-{stage}", stage, lambda p: p.send_signal(signal.SIGKILL))
        finally:
            self.server.delay_s = 0.0
        parts = len(fl.parquet_parts(os.path.join(run, STAGE_DIRS[stage])))
        row.note = f"killed {delay:.1f}s into the stage ({parts} parts on disk);"
        wrong = self.published_wrong(run)
        res = self.run(args, run)
        if wrong:
            row.note += f" published complete on wrong data: {wrong};"
        return self.judge(row, run, rerun_rc=res.rc, extra_ok=not wrong)

    def sigint(self) -> Row:
        row = Row("Ctrl-C (SIGINT to `slim-ray run`)", "teach")
        self.server.delay_s = 0.5
        try:
            run, args, rc, delay = self.hit_stage("ctrl-c-teach", "teach", lambda p: p.send_signal(signal.SIGINT))
        finally:
            self.server.delay_s = 0.0
        m = fl.manifest(os.path.join(run, "rationales/teacher"))
        row.note = f"SIGINT {delay:.1f}s into the stage; exit {rc}; teach manifest after it: {m.get('status') if m else 'none'};"
        ok = rc == 130 and not (m and m.get("status") == "complete" and self.published_wrong(run))
        res = self.run(args, run)
        return self.judge(row, run, rerun_rc=res.rc, extra_ok=ok)

    def kill_actor(self) -> Row:
        """SIGKILL the openai engine's Ray Data actor (its worker process) mid-teach."""
        row = Row("SIGKILL of a Ray Data actor (the openai engine's MapWorker)", "teach")
        run = self.teach_run_from_clean_prepare("kill-actor-teach")
        args = ["run", "--until", "teach"] + base_args(run, self.server.url, self.users)
        self.server.delay_s = 0.5
        proc = self.start(args, run)

        def engine_actor():
            return [p for p in fl.find_in_tree(proc.pid, "ray::") if "OpenAIEngine" in fl.cmdline(p[0])]
        found = fl.wait_for(lambda: bool(engine_actor()) or proc.poll() is not None, 300) and engine_actor()
        delay = self.rng.uniform(0.5, 6)
        time.sleep(delay)
        victims = engine_actor()
        if found and victims:
            title = fl.cmdline(victims[0][0])[:70]
            fl.kill_pids(victims[:1], signal.SIGKILL)
            row.note = f"killed `{title}` {delay:.1f}s after it started;"
        else:
            row.note = "no engine actor found to kill;"
        tree = fl.process_tree(proc.pid)
        rc = self.finish(proc, tree)
        self.server.delay_s = 0.0
        m = fl.manifest(os.path.join(run, "rationales/teacher"))
        row.note += f" first command exit {rc}, teach manifest {m.get('status') if m else 'none'};"
        wrong = self.published_wrong(run)
        res = self.run(args, run)
        return self.judge(row, run, rerun_rc=res.rc, extra_ok=bool(victims) and not wrong)

    def kill_train_worker(self) -> Row:
        """SIGKILL the Ray Train worker of the recommender's training mid-run."""
        row = Row("SIGKILL of a Ray Train worker (`slim-ray train`, SASRec)", "train")
        run = self.dir("kill-train-worker")
        shutil.copytree(os.path.join(self.work, "clean", "prepared"), os.path.join(run, "prepared"))
        args = ["train"] + train_args(run, self.server.url, self.users)
        proc = self.start(args, run)

        def workers():
            return [p for p in fl.find_in_tree(proc.pid, "ray::") if "RayTrainWorker" in fl.cmdline(p[0])]
        found = fl.wait_for(lambda: bool(workers()) or proc.poll() is not None, 400) and workers()
        delay = self.rng.uniform(1, 8)
        time.sleep(delay)
        victims = workers()
        if found and victims:
            fl.kill_pids(victims[:1], signal.SIGKILL)
            row.note = f"killed the Train worker {delay:.1f}s after it started;"
        else:
            row.note = "no Train worker found to kill;"
        rc = self.finish(proc, fl.process_tree(proc.pid))
        row.note += f" first command exit {rc};"
        res = self.run(args, run)
        got = self.train_digest(run)
        m = fl.manifest(os.path.join(run, "rec"))
        row.lost, row.duplicates = "-", "-"
        same = got is not None and got == self.clean_train
        row.identical = "yes" if same else "no (best epoch / metrics differ from the clean run)"
        row.survived = "yes" if (res.rc == 0 and same and bool(victims) and m and m.get("status") == "complete") else "no"
        return row

    def corrupt_part(self, when: str) -> Row:
        """A truncated Parquet part in the teach output: of an interrupted run, or of a complete one."""
        run = self.teach_run_from_clean_prepare(f"corrupt-{when}")
        args = ["run", "--until", "teach"] + base_args(run, self.server.url, self.users)
        teacher = os.path.join(run, "rationales/teacher")
        row = Row("", "teach")
        if when == "interrupted":
            row = Row("corrupted (truncated) Parquet part of an interrupted teach output", "teach")
            self.server.delay_s = 0.5
            proc = self.start(args, run)
            fl.wait_for(lambda: len(fl.parquet_parts(teacher)) >= 2 or proc.poll() is not None, 300)
            tree = fl.process_tree(proc.pid)
            fl.kill_pids(tree[:1], signal.SIGKILL)
            self.finish(proc, tree)
            self.server.delay_s = 0.0
        else:
            row = Row("corrupted (truncated) Parquet part of a complete teach output", "teach")
            first = self.run(args, run)  # made here, with the code of now, so the rerun may find it fresh
            row.note = f"first run exit {first.rc};"
        parts = fl.parquet_parts(teacher)
        victim = self.rng.choice(parts)
        fl.corrupt_file(victim, "truncate")
        row.note += f" truncated {os.path.basename(victim)} ({len(parts)} parts);"
        res = self.run(args, run)
        row.note += f" rerun exit {res.rc};"
        if when == "complete" and not self.digests(run)["rationales/teacher"].compare(
                self.clean["rationales/teacher"])["identical"]:
            skipped = "teach: skipped (fresh)" in res.output
            row.note += " the rerun skipped teach as fresh (its manifest is trusted);" if skipped else ""
            res2 = self.run(["teach", "--force"] + base_args(run, self.server.url, self.users), run)
            self.judge(row, run, rerun_rc=res2.rc)
            row.note += f" `slim-ray teach --force` then: exit {res2.rc}, identical {row.identical};"
            row.survived = "no (recovers with --force)" if row.survived == "yes" else "no"
            return row
        return self.judge(row, run, rerun_rc=res.rc)

    def disk_full(self) -> Row:
        row = Row("disk full (run_dir on a small tmpfs)", "teach")
        if os.geteuid() != 0:
            row.survived, row.note = "not tried", "needs root to mount a tmpfs"
            return row
        mnt = self.dir("tmpfs")
        os.makedirs(mnt)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], capture_output=True, text=True)
        if r.returncode != 0:
            row.survived, row.note = "not tried", f"mount -t tmpfs failed: {r.stderr.strip()}"
            return row
        try:
            run = os.path.join(mnt, "disk-full")
            shutil.copytree(os.path.join(self.work, "clean", "prepared"), os.path.join(run, "prepared"))
            st = os.statvfs(mnt)
            free = st.f_bavail * st.f_frsize
            room = self.rng.randint(16, 48) * 1024  # a part takes ~16 KiB here
            filler = os.path.join(mnt, "filler")
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - room))
            args = ["run", "--until", "teach"] + base_args(run, self.server.url, self.users)
            res = self.run(args, run)
            last = [ln for ln in res.output.splitlines() if ln.startswith("slim-ray:")]
            m = fl.manifest(os.path.join(run, "rationales/teacher"))
            tb = res.output.count("Traceback (most recent call last)")
            row.note = (f"{room // 1024} KiB free; exit {res.rc}; "
                        f"{last[-1][:160] if last else 'no one-line error'}{f' ({tb} tracebacks on the console)' if tb else ''}; "
                        f"teach manifest {m.get('status') if m else 'none'};")
            wrong = self.published_wrong(run)
            os.remove(filler)
            res2 = self.run(args, run)
            self.judge(row, run, rerun_rc=res2.rc, extra_ok=not wrong and res.rc != 0)
            return row
        finally:
            subprocess.run(["umount", mnt], capture_output=True)

    def unreachable(self) -> Row:
        row = Row("unreachable teacher endpoint (closed 127.0.0.1 port)", "teach")
        run = self.teach_run_from_clean_prepare("unreachable")
        port = fl.free_port()
        url = f"http://127.0.0.1:{port}/v1"
        args = ["run", "--until", "teach"] + base_args(run, url, self.users)
        res = self.run(args, run)
        last = [ln for ln in res.output.splitlines() if ln.startswith("slim-ray:")]
        row.note = f"exit {res.rc}: {last[-1][:150] if last else 'no error line'};"
        ok = res.rc == 1 and len(last) == 1 and f"127.0.0.1:{port}" in last[0]
        srv = fl.StandIn(port=port)
        try:
            res2 = self.run(args, run)
        finally:
            srv.close()
        return self.judge(row, run, rerun_rc=res2.rc, extra_ok=ok)

    def endpoint_dies(self) -> Row:
        """The endpoint answers 503 from the middle of the stage on, then comes back."""
        row = Row("teacher endpoint down mid-stage (503 on every request)", "teach")
        run = self.teach_run_from_clean_prepare("endpoint-dies")
        args = ["run", "--until", "teach"] + base_args(run, self.server.url, self.users)
        self.server.delay_s = 0.3
        proc = self.start(args, run)
        teacher = os.path.join(run, "rationales/teacher")
        fl.wait_for(lambda: len(fl.parquet_parts(teacher)) >= 1 or proc.poll() is not None, 300)
        self.server.fail = 503
        rc = self.finish(proc, fl.process_tree(proc.pid))
        self.server.fail, self.server.delay_s = None, 0.0
        m = fl.manifest(teacher) or {}
        s = m.get("summary", {})
        row.note = (f"first command exit {rc}, teach {m.get('status')} (done {s.get('done_rows')}, failed "
                    f"{s.get('failed_rows')});")
        res = self.run(args, run)
        return self.judge(row, run, rerun_rc=res.rc, extra_ok=m.get("status") != "complete" or s.get("failed_rows") == 0)

    def bad_gguf(self, how: str) -> Row:
        """A damaged copy of the packaged SmolLM2 GGUF shadows the installed package (PYTHONPATH)."""
        from slim_ray.assets import LLMS, sha256_files

        spec = LLMS["smollm2-135m-instruct"]
        row = Row(f"{'truncated GGUF' if how == 'truncate' else 'wrong sha256 (one byte flipped)'} of a packaged model",
                  "teach (hf engine)")
        real = spec.source_files()[0]
        before = os.stat(real)
        shadow = self.dir(f"gguf-{how}")
        pkg = os.path.join(shadow, "pkgs", spec.parts[0][0])
        os.makedirs(pkg)
        shutil.copy(os.path.join(os.path.dirname(real), "__init__.py"), pkg)
        copy = os.path.join(pkg, spec.parts[0][1])
        shutil.copy(real, copy)
        if how == "truncate":
            fl.corrupt_file(copy, "truncate")
        else:
            with open(copy, "r+b") as f:
                f.seek(os.path.getsize(copy) // 2)
                b = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([b[0] ^ 0xFF]))
        run = self.teach_run_from_clean_prepare(f"gguf-run-{how}")
        args = ["teach", "--config", "configs/quick.yaml", "--set", f"run_dir={run}", f"data.max_users={self.users}",
                "teacher.engine=hf", "teacher.model=smollm2-135m-instruct", f"cache_dir={shadow}/cache"]
        res = self.run(args, run, env={"PYTHONPATH": os.path.join(shadow, "pkgs")})
        last = [ln for ln in res.output.splitlines() if ln.startswith("slim-ray:")]
        after = os.stat(real)
        untouched = (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns) and \
            sha256_files([real]) == spec.sha256
        refused = res.rc == 1 and bool(last) and copy in last[-1] and "sha256 mismatch" in last[-1]
        line = last[-1] if last else "no error line"
        if "(from " in line:  # the head (stage, model, expected digest) and the tail (the file, the refusal)
            line = line[:line.index("expected")] + "... " + line[line.index("(from "):line.index("Reinstall")]
        row.note = f"exit {res.rc}: {line.strip()} installed GGUF {'untouched' if untouched else 'CHANGED'};"
        row.survived = "yes (refused)" if refused and untouched else "no"
        row.lost = row.duplicates = "-"
        row.identical = "n/a (nothing written)" if not fl.parquet_parts(os.path.join(run, "rationales/teacher")) else "no"
        return row


FAULTS: dict[str, Callable[[Campaign], Row]] = {
    "kill_driver_prepare": lambda c: c.kill_driver("prepare"),
    "kill_driver_teach": lambda c: c.kill_driver("teach"),
    "ctrl_c_teach": lambda c: c.sigint(),
    "kill_data_actor": lambda c: c.kill_actor(),
    "kill_train_worker": lambda c: c.kill_train_worker(),
    "corrupt_part_interrupted": lambda c: c.corrupt_part("interrupted"),
    "corrupt_part_complete": lambda c: c.corrupt_part("complete"),
    "disk_full_teach": lambda c: c.disk_full(),
    "unreachable_endpoint": lambda c: c.unreachable(),
    "endpoint_dies": lambda c: c.endpoint_dies(),
    "truncated_gguf": lambda c: c.bad_gguf("truncate"),
    "wrong_sha256": lambda c: c.bad_gguf("flip"),
}


def table(rows: list[Row]) -> str:
    out = ["| fault | stage | survived | rows lost | duplicates | identical to the clean run | time | notes |",
           "|---|---|---|---:|---:|---|---:|---|"]
    for r in rows:
        out.append(f"| {r.fault} | {r.stage} | {r.survived} | {r.lost} | {r.duplicates} | {r.identical} | "
                   f"{r.seconds:.0f}s | {r.note.strip().replace('|', '/')} |")
    return "\n".join(out)


def write_doc(path: str, command: str, rows: list[Row], seconds: float) -> None:
    """Replace the generated table in docs/faults.md (between its markers), keeping the prose."""
    begin, end = "<!-- campaign table: begin -->", "<!-- campaign table: end -->"
    block = (f"{begin}\n\nProduced by `{command}` in {seconds / 60:.1f} min "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}):\n\n{table(rows)}\n\n{end}")
    text = open(path).read() if os.path.exists(path) else f"# Fault campaign\n\n{begin}\n{end}\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="seeds every random kill point and choice")
    ap.add_argument("--only", nargs="+", choices=list(FAULTS), help="run these faults only")
    ap.add_argument("--users", type=int, default=36, help="data.max_users of the MovieLens slice")
    ap.add_argument("--work", default="/tmp/slim-ray-faults", help="scratch folder (run folders, logs)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds one command may take")
    ap.add_argument("--doc", default=os.path.join(REPO, "docs", "faults.md"))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.work, exist_ok=True)
    c = Campaign(args.work, args.seed, args.users, args.timeout)
    c.server = fl.StandIn()
    rows = []
    try:
        c.clean_run()
        names = args.only or list(FAULTS)
        if "kill_train_worker" in names:
            c.clean_train_run()
        for name in names:
            t = time.time()
            try:
                row = FAULTS[name](c)
            except Exception as e:  # a fault the campaign itself could not carry out
                row = Row(name, "?", survived="error", note=f"{type(e).__name__}: {e}")
            row.seconds = time.time() - t
            rows.append(row)
            print(f"{name}: survived={row.survived} lost={row.lost} dup={row.duplicates} identical={row.identical} "
                  f"({row.seconds:.0f}s) {row.note}", flush=True)
    finally:
        c.server.close()
    print(table(rows))
    if not args.no_write:
        cmd = "python bench/faults.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        write_doc(args.doc, cmd.strip(), rows, time.time() - t0)
    return 0 if all(r.survived.startswith("yes") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
