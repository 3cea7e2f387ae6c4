#!/usr/bin/env python3
"""Run a simulated federation through Flower's own runtime (`flwr run`) and clean up after it.

Flower's managed local SuperLink keeps running in the background after `flwr run`, on a
machine-wide port. This command instead starts a private simulation SuperLink on free
loopback ports with a private FLWR_HOME, and with it a Ray head that the simulation connects
to (Ray's start then overlaps the SuperLink's and the submission), submits the app with
`flwr run --stream`, and returns as soon as the run's results are final (the ServerApp's last
line, confirmed by its summary.json; otherwise it checks Flower's final status, since
`flwr run --stream` exits 0 even when the run failed). It always stops every process it
started (also on Ctrl-C and SIGTERM). Under `fl-dp sweep`, or after `fl-dp runtime start`,
it submits to that shared runtime instead (and leaves it running).
Exit code 0 only when every planned round ran (see below).

    fl-dp simulate --num-clients 10 --run-config "num-server-rounds=5"
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fl_dp import outcome
from fl_dp.help import HelpFormatter
from fl_dp.run_config import RunConfigError, parse_overrides, to_flwr, validate
from fl_dp.runtime import FAST_POLL_ENV, QUIET_ENV, Runtime, attached, flwr_bin, free_port, sigterm_as_exit  # noqa: F401
from server_app.output_dir import run_files

APP_DIR = Path(__file__).resolve().parent.parent
APP_PARTS = ("pyproject.toml", "common", "client_app", "server_app")


def stage_app(staged: Path) -> Path:
    """A copy of just the app in ``staged`` (a new directory): what `flwr run` bundles.

    Flower 1.41 builds the bundle by walking every file under the app directory (the
    ~47,000 files of a local `.venv/` included) before applying `.gitignore`: ~2.5 s per
    submission. The copy holds only what the bundle would contain anyway.
    """
    staged.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in APP_PARTS:
        source = APP_DIR / part
        if source.is_dir():
            shutil.copytree(source, staged / part, ignore=skip)
        else:
            shutil.copy2(source, staged / part)
    return staged


# Flower's CLI (`flwr ...`) in a process that imports it first and then waits for its arguments (one JSON
# line on stdin): started early, its ~1-2 s of imports overlap other work (the SuperLink's start, the
# run's teardown) instead of following it.
PREPARED_FLWR = (
    "import json, sys\n"
    "from flwr.cli.app import app\n"
    "sys.argv = ['flwr', *json.loads(sys.stdin.readline() or '[]')]\n"
    "app()\n"
)


class PreparedFlwr:
    """One `flwr` command, its process started (and Flower's CLI imported) before its arguments are known."""

    def __init__(self, env: dict | None = None, merge_stderr: bool = False):
        self.env, self.merge_stderr = env, merge_stderr
        self.process: subprocess.Popen[str] | None = None

    def prepare(self, env: dict | None = None) -> "PreparedFlwr":
        if self.process is None:
            self.env = env or self.env
            self.process = subprocess.Popen(
                [sys.executable, "-c", PREPARED_FLWR], env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if self.merge_stderr else subprocess.PIPE, text=True,
            )
        return self

    def start(self, args: list[str]) -> subprocess.Popen:
        """Give the process its arguments; it runs `flwr <args>` now."""
        process = self.prepare().process
        assert process is not None and process.stdin is not None
        process.stdin.write(json.dumps(args) + "\n")
        process.stdin.close()
        process.stdin = None  # given: communicate() must not touch it again
        return process

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class StatusQuery(PreparedFlwr):
    """The final status of a run (`flwr ls sim --run-id <id> --format json`); :meth:`prepare` it when the
    ServerApp says it is done."""

    def status(self, run_id: str) -> str:
        process = self.start(["ls", "sim", "--run-id", run_id, "--format", "json"])
        try:
            out, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.close()
            return "unknown (flwr ls did not answer)"
        try:
            return json.loads(out)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            return f"unknown ({out.strip() or (err or '').strip()})"


def plan_run(run_config: str, output_dir: str, num_clients: int) -> tuple[Path, str]:
    """The results directory and the checked ``--run-config`` for `flwr run`.

    Everything is checked here, before any SuperLink or Ray starts (RunConfigError: one line,
    exit code 2). ``output-dir`` may come from ``--output-dir`` or from the run config, not
    from both with different values.
    """
    overrides = parse_overrides(run_config)
    given = overrides.get("output-dir")
    if given and output_dir and Path(given).resolve() != Path(output_dir).resolve():
        raise RunConfigError(f"--output-dir {output_dir} and output-dir={given!r} disagree; give one")
    chosen = Path(given or output_dir or APP_DIR / "outputs" / time.strftime("run-%Y%m%d-%H%M%S")).resolve()
    overrides["output-dir"] = str(chosen)
    config = validate(overrides)
    used = run_files(str(chosen))
    if used and not (config.resume or config.overwrite):
        raise RunConfigError(
            f"output-dir {chosen} already holds a run ({', '.join(used[:3])}); add resume=true to continue it, "
            "overwrite=true to move it aside, or choose another --output-dir"
        )
    if num_clients < 1:
        raise RunConfigError(f"--num-clients {num_clients}: give a whole number >= 1")
    return chosen, to_flwr(overrides)


def add_run_options(parser: argparse.ArgumentParser, clients: str, example: str) -> None:
    """The options every command that runs a simulated federation shares (simulate, audit)."""
    parser.add_argument("--num-clients", type=int, default=10, help=clients)
    parser.add_argument("--run-config", default="", help=f'overrides, e.g. "{example}"')
    parser.add_argument("--output-dir", default="", help="results directory (default: ./outputs/run-<time>)")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="CPUs Ray reserves per simulated client")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fl-dp simulate", description=__doc__, formatter_class=HelpFormatter, epilog=outcome.__doc__
    )
    add_run_options(parser, "simulated clients (SuperNodes)", "strategy='fedprox' num-server-rounds=3")
    args = parser.parse_args(argv)

    try:
        output_dir, run_config = plan_run(args.run_config, args.output_dir, args.num_clients)
    except RunConfigError as error:
        print(f"fl-dp simulate: error: {error}", file=sys.stderr)
        return outcome.USAGE

    shared = attached()  # a runtime this command was given (fl-dp sweep, fl-dp runtime start)
    with sigterm_as_exit():
        if shared is not None:
            print(f"Using the shared runtime in {shared.home} (SuperLink {shared.http_port}, Ray head "
                  f"{shared.ray_address or 'none'})", flush=True)
            return submit(shared, args, output_dir, run_config)
        # A Ray head of our own, started with the SuperLink: Ray's start overlaps the SuperLink's, the
        # submission and the simulation process's imports instead of following them. Its workers bind
        # ports the OS picks (two heads side by side once collided on Ray's default worker port,
        # failing one of two commands). The SuperLink keeps its state in memory: nothing outlives
        # the command.
        runtime = Runtime(in_memory=True)
        # `flwr run` imports Flower's CLI while the SuperLink and the Ray head start.
        submission = PreparedFlwr(merge_stderr=True).prepare(runtime.env())
        try:
            runtime.start()
        except RuntimeError as error:
            submission.close()
            print(f"fl-dp simulate: {error}", file=sys.stderr)
            return outcome.FAILED
        try:
            return submit(runtime, args, output_dir, run_config, submission, own_runtime=True)
        except KeyboardInterrupt:  # Ctrl-C: no traceback; the runtime is stopped below, its logs kept
            runtime.failed = True
            print(f"\nfl-dp simulate: interrupted; stopping the runtime (its logs stay in {runtime.home})",
                  file=sys.stderr, flush=True)
            return 130
        except BaseException:
            runtime.failed = True
            raise
        finally:
            submission.close()
            runtime.stop(now=runtime.results_final)


def results_final(line: str, output_dir: Path) -> str | None:
    """The run's stop kind if ``line`` is the ServerApp's last line and the summary it wrote says the same
    (every result file is written before that line), for a run that ended as planned (not ``failed``); else None."""
    said = outcome.stop_kind_in_log(line)
    if said is None or said == "failed" or said not in outcome.EXIT_CODES:
        return None
    return said if outcome.stop_kind_in_summary(output_dir) == said else None


def submit(runtime, args: argparse.Namespace, output_dir: Path, run_config: str,
           submission: PreparedFlwr | None = None, own_runtime: bool = False) -> int:
    """Submit the run to ``runtime``'s SuperLink with `flwr run --stream`, echo its log, and return the exit code.

    The command returns as soon as the run's results are final: the ServerApp's last line
    (``fl-dp stop-kind: <kind>``) has come and ``summary.json`` says the same kind. What follows in
    Flower (its simulation process ending its Ray job, the run's status, `flwr run` ending) changes no
    result: on a runtime of its own (``own_runtime``) the caller then stops the whole runtime at once; on
    a shared one (a sweep's, a warm runtime) that wrap-up finishes there while the next command starts
    (each run has its own simulation process and Ray job). A failed run, or one whose summary does not
    say the same, is waited for and its Flower status checked as before. A run that does not complete
    marks the runtime failed, so its logs are kept."""
    env = runtime.env()
    code, run_id, query = outcome.FAILED, None, StatusQuery(env)
    final_kind: str | None = None
    try:
        federation = f"num-supernodes={args.num_clients} client-resources-num-cpus={args.cpus_per_client}"
        command = [
            flwr_bin("flwr"), "run", str(stage_app(runtime.stage_dir())), "sim", "--stream",
            "--run-config", run_config, "--federation-config", federation,
        ]
        print("$ " + " ".join(command), flush=True)
        streamed = (submission or PreparedFlwr(env, merge_stderr=True)).start(command[1:])
        assert streamed.stdout is not None  # started with stdout=PIPE
        for line in streamed.stdout:
            print(line, end="", flush=True)
            match = re.search(r"Successfully started run (\d+)", line)
            run_id = run_id or (match.group(1) if match else None)
            if outcome.STOP_KIND_LINE in line:  # the ServerApp's last line: the run is ending
                final_kind = results_final(line, output_dir) if run_id else None
                if final_kind is not None:
                    break
                query.prepare(env)
        if final_kind is not None:
            streamed.kill()  # only Flower's wrap-up is left; the runtime is stopped next
            streamed.wait()
            code = outcome.EXIT_CODES[final_kind]
            runtime.results_final = own_runtime  # a shared runtime lets the run's wrap-up finish there
            print(f"Run {run_id}: results final (summary.json: {final_kind}), {outcome.describe(code)}", flush=True)
            print(f"Results: {output_dir}")
            return code
        streamed.wait()
        if run_id is None:
            print("flwr run did not start a run" + (f": {runtime.check()}" if runtime.check() else ""), file=sys.stderr)
            return code
        status = query.status(run_id)
        code = outcome.exit_code(status, outcome.stop_kind_in_summary(output_dir))
        print(f"Run {run_id}: {status}, {outcome.describe(code)}", flush=True)
        if code != outcome.COMPLETED:
            problem = runtime.check()
            print(f"The run did not complete all rounds (exit code {code}). SuperLink log, kept: {runtime.log_file}"
                  + (f"; {problem}" if problem else ""), file=sys.stderr)
        print(f"Results: {output_dir}")
        return code
    except BaseException:  # Ctrl-C or SIGTERM: a shared runtime outlives this command, so stop the run on it
        if run_id is not None:
            subprocess.run([flwr_bin("flwr"), "stop", run_id, "sim"], env=env, capture_output=True, check=False)
        raise
    finally:
        query.close()
        if code != outcome.COMPLETED:
            runtime.failed = True
