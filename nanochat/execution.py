"""
Contained execution of untrusted Python, such as model-written programs: `run_python(code)` runs a program,
`run_tests(program, tests)` runs a program and then counts which of a list of test snippets pass. Library code:
bad arguments raise ValueError, a sandbox that cannot start raises RuntimeError, the program's fate is reported.

Each run gets a fresh temp working directory (removed afterwards) and a child interpreter, `python -I -B` (no
user site-packages, no PYTHON* variables, no bytecode writes), with stdin from /dev/null, its own session, and an
environment of only PATH, LANG, and HOME and TMPDIR inside the temp dir: nothing of the parent's environment
(API keys) is passed. The child is this file run as a script; before running a line of the program it sets up:

- limits, with setrlimit in the child only (the caller's own limits never change): address space per process
  (`memory_mb`: MemoryError), CPU seconds per process (SIGXCPU, SIGKILL a second later), file size
  (`max_file_mb`: writes past it fail with EFBIG), processes and threads (`max_processes`), no core dumps. The
  parent enforces the wall-clock `timeout` and keeps only the first `max_output_bytes` of stdout and of stderr.
- a network namespace of its own: no interface but a loopback that is down, so every connection, even to
  127.0.0.1, fails with "Network is unreachable".
- a PID namespace of its own, whose process 1 is a small init: when the program ends or times out the init
  exits and the kernel kills everything the program started, even what left its process group with setsid.
- as root, an unprivileged uid of its own (UID_BASE + the bootstrap's pid, unique among live runs).
  RLIMIT_NPROC counts the processes of a real uid and never binds root, so this is what makes the process limit
  hold. It also means the program cannot write where it lacks permission (anywhere root owns, the repo and
  checkpoints included; world-writable places such as /tmp and /dev/shm remain), signal the caller, or read
  another process's /proc/<pid>/environ. It keeps no capabilities and no_new_privs disarms setuid binaries, with
  one exception: when the Python installation is not readable by other users (under a 0700 /root, as on our
  machine), it keeps CAP_DAC_READ_SEARCH so that it can still import modules, which also lets it READ any file.

Namespaces need root or unprivileged user namespaces (then the program keeps the caller's uid, and
max_processes counts only the run's processes, the two that contain it included). Where the kernel refuses,
the run goes on without and its ExecutionResult says so (`network_isolated`, `processes_contained`, `uid`): with
no namespaces, processes that leave the process group can outlive the run and the network is open; as a non-root
caller without them, RLIMIT_NPROC counts all of the caller's processes and threads (a program may be unable to
start any) and the caller's files, processes and /proc/<pid>/environ are as open to the program as to the caller;
where the run uid does not exist (some user-namespaced containers), the program runs as uid 0 (the owner of
root's files) without capabilities, and no process limit binds it.

On top of that, by default (`guard=True`), a Python audit hook refuses, with PermissionError: opening for
writing, creating, renaming or removing paths outside the temp dir, opening a directory outside it, reading
other processes' /proc entries, starting processes, signalling other processes, sockets that connect, bind or
send, name look-ups, and all of ctypes. It is a guard rail against accidents and casual misbehaviour, NOT a
security boundary: it runs in the program's own interpreter, which can get around it (e.g. by replacing the
functions it calls, or with _posixsubprocess). The boundary is what the kernel enforces above.

Per-test results travel over a pipe of their own, so no output of the program is mistaken for them. The test
harness shares the program's interpreter, though, so a program written to forge results can: the counts are
for honest (if wrong) programs. An early exit is no forgery: tests that never reported count as failed.
"""

# The child runs this file as a script and needs only these; it stops before the parent's imports below, which
# would add tens of milliseconds to every run.
import ctypes
import json
import os
import resource
import signal
import stat
import sys
import traceback
import types

UID_BASE = 1_000_000_000  # run uids: far above real users, below 2**31, plus a pid (at most 2**22)
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 1, 8, 38
CAP_DAC_READ_SEARCH = 2
CAPABILITY_VERSION_3 = 0x20080522


# -----------------------------------------------------------------------------
# the child: this file run as a script in the run's temp dir

def _contain(config):
    """Three processes. This bootstrap (the caller's uid, outside the new namespaces) forks an init, process 1 of
    the new PID namespace, which forks the process that limits and unprivileges itself and returns from here to
    run the program (as process 1 it would ignore every signal it has no handler for, SIGXCPU included). The
    init reaps it and hands its exit status to the bootstrap over a pipe the program does not hold; the bootstrap
    reports it once the init, and so the whole namespace, is gone: nothing of the run can write after it.
    SIGTERM to the bootstrap (the parent's timeout) kills the init, which takes the namespace down with it."""
    if os.getcwd() != config["cwd"]:  # never hand anything but a run's own directory to a run uid
        raise RuntimeError(f"the child must start in {config['cwd']}, not {os.getcwd()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # if the trainer dies, so does the run
    uid, gid = os.getuid(), os.getgid()
    root = uid == 0
    # without root, a user namespace is what lets us create the others; in it we keep our own ids
    network_isolated = libc.unshare(CLONE_NEWNET | (0 if root else CLONE_NEWUSER)) == 0
    if network_isolated and not root:
        for name, text in [("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")]:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    processes_contained = libc.unshare(CLONE_NEWPID) == 0
    run_uid, keep = _choose_uid(root, [config["cwd"]] + [os.path.join(config["cwd"], f) for f in config["files"]])
    status_read, status_write = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # held until the bootstrap knows whom to kill
    init = os.fork()
    if init:
        os.close(status_write)
        signal.signal(signal.SIGTERM, lambda *_: _kill(init))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.waitpid(init, 0)
        status = os.read(status_read, 64)  # empty if the init was killed
        if status:
            _report(config, {"exit": int(status)})
        os._exit(0)

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.close(status_read)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    pid = os.fork()
    if pid:
        while True:  # reap whatever the namespace orphans until the program itself ends
            reaped, status = os.wait()
            if reaped == pid:
                break
        os.write(status_write, str(status).encode())
        os._exit(0)  # the kernel kills what is left of the namespace

    os.close(status_write)
    mb = 1 << 20
    _limit(resource.RLIMIT_AS, config["memory_mb"] * mb)
    _limit(resource.RLIMIT_CPU, config["cpu_seconds"], config["cpu_seconds"] + 1)
    _limit(resource.RLIMIT_FSIZE, config["max_file_mb"] * mb)
    _limit(resource.RLIMIT_NPROC, config["max_processes"])
    _limit(resource.RLIMIT_CORE, 0)
    if run_uid is not None:
        os.setgroups([])
        os.setresgid(run_uid, run_uid, run_uid)
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)  # so that `keep` survives the uid change
        os.setresuid(run_uid, run_uid, run_uid)
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)  # effective, permitted, inheritable (x2 words)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a uid change clears it
    _report(config, {"setup": {"network_isolated": network_isolated, "processes_contained": processes_contained,
                               "uid": os.getuid()}})


def _run_program(config):
    """Run program.py (then the tests of tests.json), as `python program.py` would; returns the exit status."""
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), os.path.abspath("program.py"), "exec")
    tests = None
    if config["tests"]:
        with open("tests.json", encoding="utf-8") as f:
            tests = json.load(f)
    # the program gets a __main__ of its own (pickle and dataclasses look classes up there)
    main = types.ModuleType("__main__")
    main.__file__ = code.co_filename
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    if config["guard"]:
        sys.addaudithook(_guard(os.getcwd()))
    try:
        exec(code, main.__dict__)
    except SystemExit:
        if tests is None:
            raise
        print("the program exited before its tests ran", file=sys.stderr)
        return 1
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's own frames on
        return 1
    failed = 0
    for i, test in enumerate(tests or []):
        try:
            exec(compile(test, f"<test {i}>", "exec"), main.__dict__)
            passed = True
        except BaseException as e:  # SystemExit too: a test must not end the run
            print(f"test {i} failed: {type(e).__name__}: {e}", file=sys.stderr)
            passed = False
        failed += not passed
        _report(config, {"test": i, "passed": passed})
    return 1 if failed else 0


def _choose_uid(root, paths):
    """(the uid to run the program as, or None to keep ours; the capability mask to keep). `paths`, the run's
    directory and files, are given to that uid."""
    if not root:
        return None, 0
    # an unprivileged uid can import only from an installation every user can reach, else it needs
    # CAP_DAC_READ_SEARCH; without that capability we cannot drop root at all
    private = not all(_reachable_by_all(path) for path in {sys.prefix, sys.base_prefix})
    if private and not _has_capability(CAP_DAC_READ_SEARCH):
        return None, 0
    uid = UID_BASE + os.getpid()  # our pid is unique while we live, and we outlive the program
    try:
        for path in paths:
            os.chown(path, uid, uid)
    except OSError:  # EINVAL: the uid does not exist in this user namespace
        return None, 0
    return uid, (1 << CAP_DAC_READ_SEARCH) if private else 0


def _reachable_by_all(path):
    """True if every directory from / down to path lets all users through."""
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        if path == os.path.dirname(path):
            return True
        path = os.path.dirname(path)


def _has_capability(cap):
    with open("/proc/self/status") as f:
        permitted = next(line for line in f if line.startswith("CapPrm:"))
    return int(permitted.split()[1], 16) >> cap & 1 == 1


def _limit(which, soft, hard=None):
    """Set a limit, never above the hard limit we were given (raising it would fail)."""
    hard = soft if hard is None else hard
    given = resource.getrlimit(which)[1]
    if given != resource.RLIM_INFINITY:
        soft, hard = min(soft, given), min(hard, given)
    resource.setrlimit(which, (soft, hard))


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it ended by itself


def _report(config, record):
    os.write(config["report_fd"], (json.dumps(record) + "\n").encode())


# audit events that change a path -> (argument index of the path, of its dir_fd or None) for each path changed;
# "open" counts only when it opens for writing
PATH_EVENTS = {
    "open": [(0, None)], "os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.mkdir": [(0, 2)], "os.chmod": [(0, 2)],
    "os.chown": [(0, 3)], "os.utime": [(0, 3)], "os.truncate": [(0, None)], "shutil.rmtree": [(0, 1)],
    "os.symlink": [(1, 2)], "os.link": [(0, 2), (1, 3)], "os.rename": [(0, 2), (1, 3)],
}
REFUSED_EVENTS = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "subprocess.Popen",
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _guard(cwd):
    """The audit hook of the guard rail (see the module docstring). What it calls is bound here, so that a
    program replacing e.g. os.path.realpath does not change it."""
    realpath, isdir, join, readlink, fsdecode = (os.path.realpath, os.path.isdir, os.path.join, os.readlink,
                                                 os.fsdecode)
    own_proc, own_pid = realpath("/proc/self") + "/", os.getpid()
    inside = cwd + "/"

    def resolve(path, dir_fd):
        path = fsdecode(path)
        if dir_fd is not None and dir_fd >= 0:  # relative to an open directory, as shutil.rmtree does
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(path)

    def hook(event, args):
        if event in REFUSED_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"refused in the sandbox: {event}")
        if event in ("os.kill", "os.killpg") and args[0] != own_pid:
            raise PermissionError(f"refused in the sandbox: {event} of another process")
        if event not in PATH_EVENTS:
            return
        for path_index, fd_index in PATH_EVENTS[event]:
            if not isinstance(args[path_index], (str, bytes)):
                continue  # a file descriptor: what it refers to was checked when it was opened
            path = resolve(args[path_index], None if fd_index is None else args[fd_index])
            if path == cwd or path.startswith(inside):
                continue
            if event == "open" and not args[2] & WRITE_FLAGS:  # reading is allowed, with two exceptions:
                if isdir(path):  # a directory fd would let relative opens (which we cannot see) escape
                    raise PermissionError(f"refused in the sandbox: opening a directory outside {cwd}: {path}")
                if path.startswith("/proc/") and path[6:7].isdigit() and not (path + "/").startswith(own_proc):
                    raise PermissionError(f"refused in the sandbox: reading another process's {path}")
                continue
            if event == "open" and path == "/dev/null":
                continue
            raise PermissionError(f"refused in the sandbox: {event} outside {cwd}: {path}")
    return hook


if __name__ == "__main__":
    child_config = json.loads(sys.argv[1])
    _contain(child_config)
    sys.exit(_run_program(child_config))

# the parent's own imports, which the child never reaches (see the top)
import math
import selectors
import subprocess
import tempfile
import time
from dataclasses import dataclass

REPORT_LIMIT = 1 << 20  # bytes kept from the report pipe


@dataclass
class ExecutionResult:
    """What a run did. status: "ok" (exit 0, and with tests every test passed), "failed" (a nonzero exit, e.g. an
    exception, MemoryError past memory_mb, OSError past max_file_mb, or a failed test), "timeout" (past the
    wall-clock limit; returncode None), "killed" (by a signal: SIGXCPU past cpu_seconds, SIGKILL a second after
    it or from the OOM killer, a crash; returncode is minus the signal)."""
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    truncated: bool            # stdout or stderr was longer than max_output_bytes
    wall_time: float           # seconds, start-up and clean-up included
    passed: int                # tests that reported passing (run_tests; 0 for run_python)
    total: int                 # tests given
    network_isolated: bool     # the program had a network namespace of its own
    processes_contained: bool  # ... and a PID namespace: nothing it started outlived it
    uid: int                   # the uid it ran as (-1: it timed out before it got that far)


def run_python(code, timeout=5.0, memory_mb=1024, cpu_seconds=None, max_processes=32, max_file_mb=16,
               max_output_bytes=65536, guard=True):
    """Run a Python program in a contained child (see the module docstring), as `python program.py` would.

    timeout: wall-clock seconds, start-up included. memory_mb: address space of each process. cpu_seconds: CPU
    time of each process (default: the timeout, rounded up). max_processes: processes and threads the run may
    have at once. max_file_mb: the largest file it may write. max_output_bytes: kept of stdout and of stderr
    each. guard: install the audit-hook guard rail.
    """
    return _run(code, None, timeout, memory_mb, cpu_seconds, max_processes, max_file_mb, max_output_bytes, guard)


def run_tests(program, tests, timeout=5.0, memory_mb=1024, cpu_seconds=None, max_processes=32, max_file_mb=16,
              max_output_bytes=65536, guard=True):
    """Run a program, then each test snippet (e.g. "assert f(2) == 4") in its namespace, in order, in one child.

    A test passes if it runs without raising. If the program itself raises or exits, no test runs; a test that
    hangs leaves the later ones unreported, and unreported tests count as failed. Status "ok" iff all passed.
    """
    return _run(program, list(tests), timeout, memory_mb, cpu_seconds, max_processes, max_file_mb,
                max_output_bytes, guard)


# -----------------------------------------------------------------------------
# the parent: start the child, collect its output and report, clean up

def _run(program, tests, timeout, memory_mb, cpu_seconds, max_processes, max_file_mb, max_output_bytes, guard):
    if cpu_seconds is None:
        cpu_seconds = math.ceil(timeout)
    for name, value in [("timeout", timeout), ("memory_mb", memory_mb), ("cpu_seconds", cpu_seconds),
                        ("max_processes", max_processes), ("max_file_mb", max_file_mb),
                        ("max_output_bytes", max_output_bytes)]:
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    start = time.monotonic()
    deadline = start + timeout
    with tempfile.TemporaryDirectory(prefix="nanochat-exec-") as cwd:
        cwd = os.path.realpath(cwd)  # as the child's os.getcwd() will see it
        files = {"program.py": program}
        if tests is not None:
            files["tests.json"] = json.dumps(tests)
        for name, text in files.items():
            with open(os.path.join(cwd, name), "w", encoding="utf-8") as f:
                f.write(text)
        report_read, report_write = os.pipe()
        config = {"cwd": cwd, "files": list(files), "report_fd": report_write, "memory_mb": memory_mb,
                  "cpu_seconds": math.ceil(cpu_seconds), "max_processes": max_processes,
                  "max_file_mb": max_file_mb, "guard": guard, "tests": tests is not None}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": cwd, "TMPDIR": cwd}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(config)], cwd=cwd, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(report_write,), start_new_session=True,
            )
        except BaseException:
            os.close(report_read)
            raise
        finally:
            os.close(report_write)  # the child holds the write end; we see EOF when it and its processes are gone
        with proc, open(report_read, "rb") as report:
            try:
                streams = {"stdout": proc.stdout, "stderr": proc.stderr, "report": report}
                limits = {"stdout": max_output_bytes, "stderr": max_output_bytes, "report": REPORT_LIMIT}
                kept, dropped, closed = _collect(streams, limits, deadline)
                timed_out = not closed
                if closed:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _stop(proc)
    return _result(kept, dropped, timed_out, proc.returncode, tests, time.monotonic() - start)


def _stop(proc):
    """Make sure nothing of the run is left: SIGTERM asks the bootstrap to kill the run's PID namespace and reap
    it; SIGKILL to the process group is the fallback (and, without a PID namespace, takes its stragglers)."""
    if proc.returncode is None:
        proc.terminate()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the usual case: the group is empty
    proc.wait()


def _collect(streams, limits, deadline):
    """Read the pipes until all are closed or the deadline passes, keeping the first limits[name] bytes of each
    and counting the rest, so a program that floods its output costs us bounded memory.
    Returns ({name: kept bytes}, {name: dropped byte count}, whether all closed in time)."""
    kept = {name: bytearray() for name in streams}
    dropped = dict.fromkeys(streams, 0)
    with selectors.DefaultSelector() as selector:
        for name, stream in streams.items():
            selector.register(stream, selectors.EVENT_READ, name)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return kept, dropped, False
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                room = max(0, limits[key.data] - len(kept[key.data]))
                kept[key.data] += chunk[:room]
                dropped[key.data] += max(0, len(chunk) - room)
    return kept, dropped, True


def _result(kept, dropped, timed_out, bootstrap_returncode, tests, wall_time):
    setup, exit_status, test_passed = None, None, {}
    for line in bytes(kept["report"]).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the program may write to the pipe too; only well-formed records count
        if not isinstance(record, dict):
            continue
        if "setup" in record and setup is None:
            setup = record["setup"]
        if "exit" in record:
            exit_status = record["exit"]
        if "test" in record:
            test_passed[record["test"]] = record.get("passed") is True
    stderr = bytes(kept["stderr"]).decode("utf-8", errors="replace")
    if setup is None and not timed_out:
        raise RuntimeError(f"the execution sandbox failed to start (exit {bootstrap_returncode}):\n{stderr}")
    total = 0 if tests is None else len(tests)
    passed = sum(test_passed.get(i, False) for i in range(total))
    if timed_out:
        status, returncode = "timeout", None
    elif exit_status is None:  # the bootstrap itself died (e.g. the OOM killer): the program with it
        status, returncode = "killed", bootstrap_returncode
    else:
        returncode = os.waitstatus_to_exitcode(exit_status)
        status = "ok" if returncode == 0 else "failed" if returncode > 0 else "killed"
    if status == "ok" and passed < total:  # e.g. os._exit(0) before the tests ran
        status = "failed"
    setup = setup or {}
    return ExecutionResult(
        status=status, returncode=returncode,
        stdout=bytes(kept["stdout"]).decode("utf-8", errors="replace"), stderr=stderr,
        truncated=dropped["stdout"] + dropped["stderr"] > 0, wall_time=wall_time, passed=passed, total=total,
        network_isolated=setup.get("network_isolated") is True,
        processes_contained=setup.get("processes_contained") is True, uid=setup.get("uid", -1),
    )
