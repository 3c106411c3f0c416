"""The HumanEval sandbox program: one sample, a candidate process and a checker (see :mod:`.humaneval`).

This file is not imported by the evaluator: :func:`hellora_trl.recipes.eval.humaneval.run_humaneval_sample` reads
its source and runs it as ``python -I -B -c <source> <root> <verdict_fd>`` in a fresh interpreter, so it must stay
self-contained (standard library only, imported inside the functions that use it) and it does its work only when
run as ``__main__``. It is a module so that linters, coverage and tests see it as code; importing it (as the tests
do, to inspect the audit hook) defines the functions and runs nothing.
"""

import sys


def _encode(value, depth=0):
    """Plain data -> JSON-able tagged tree; anything else (including subclasses) is refused."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    kind = type(value)
    if value is None or kind is bool:
        return value
    if kind is int:
        return ["i", format(value, "x")]
    if kind is float:
        return ["f", value.hex()]
    if kind is str:
        return ["s", value]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is bytes:
        return ["b", value.hex()]
    tags = {list: "l", tuple: "t", set: "S", frozenset: "F"}
    if kind in tags:
        return [tags[kind], [_encode(item, depth + 1) for item in value]]
    if kind is dict:
        return ["d", [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"a {kind.__name__} cannot cross the HumanEval sandbox (plain data only)")


def _decode(node, depth=0):
    """The inverse of _encode, strict: anything malformed raises ValueError."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    if node is None or type(node) is bool:
        return node
    if type(node) is not list or not node or type(node[0]) is not str:
        raise ValueError("malformed value")
    tag, rest = node[0], node[1:]
    if tag in ("i", "f", "s", "b") and len(rest) == 1 and type(rest[0]) is str:
        text = rest[0]
        if tag == "i":
            return int(text, 16)
        if tag == "f":
            return float.fromhex(text)
        return text if tag == "s" else bytes.fromhex(text)
    if tag == "c" and len(rest) == 2 and all(type(x) is str for x in rest):
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag in ("l", "t", "S", "F", "d") and len(rest) == 1 and type(rest[0]) is list:
        if tag == "d":
            pairs = rest[0]
            if not all(type(p) is list and len(p) == 2 for p in pairs):
                raise ValueError("malformed dict")
            return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in pairs}
        items = [_decode(item, depth + 1) for item in rest[0]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    raise ValueError("malformed value")


_MAX_FRAME = 16 * 1024 * 1024


def _send(fd, obj):
    import json, os
    data = json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii")
    if len(data) > _MAX_FRAME:
        raise ValueError("message larger than 16 MiB")
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _recv(fd):
    """One frame, or None at end of file."""
    import json, os

    def exactly(n):
        chunks, left = [], n
        while left:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    head = exactly(4)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > _MAX_FRAME:
        raise ValueError("message larger than 16 MiB")
    body = exactly(size)
    if body is None:
        return None
    return json.loads(body.decode("ascii"))


def _norm(path, work, _type=type, _str=str, _bytes=bytes):
    """Absolute, lexically normalised text of a path argument, or None when it is refused.

    No Python-level name lookups: everything used is a local or a method of an exact str / bytes /
    list, so code running later cannot change what this function does.
    """
    kind = _type(path)
    if kind is _bytes:
        path = path.decode("utf-8", "surrogateescape")
    elif kind is not _str:
        return None
    if not path.startswith("/"):
        path = work + "/" + path
    parts = []
    for part in path.split("/"):
        if part == ".." or "\x00" in part:
            return None
        if part and part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


def _under(path, roots):
    for root in roots:
        if path == root or path.startswith(root + "/"):
            return True
    return False


def _hook(event, args, _norm=_norm, _under=_under, _type=type, _str=str, _work=None, _reads=(), _devices=(), _exit=None,
          _err=PermissionError, _import_err=ImportError, _int=int, _none=None, _wmask=0, _deny=frozenset(), _deny_prefixes=(),
          _writes=frozenset(), _lists=frozenset(), _bad_modules=frozenset(), _funcattrs=frozenset(),
          _finalize=frozenset(), _real=None, _creates=frozenset(), _answer=None, _fspath=None, _spec=None,
          _fresh_deny=frozenset(), _bytes=bytes, _tuple=tuple, _dict=dict, _getattr=getattr, _len=len, _call=None):
    """PEP 578 audit hook of the candidate process (bound with functools-free defaults, see _install)."""
    if event == "hellora.sandbox.call":
        # A guarded os / _imp function (see _guard): the policy and the real function live only here.
        if _type(args) is not _tuple or _len(args) != 3:
            raise _err("malformed sandbox call")
        name, call_args, call_kwargs = args
        real = _real.get(name) if _type(name) is _str else _none
        if real is _none or _type(call_args) is not _tuple or _type(call_kwargs) is not _dict:
            raise _err("malformed sandbox call")
        call_kwargs = _dict(call_kwargs)
        if name.startswith("_imp."):
            spec = call_args[0] if call_args else call_kwargs.get("spec")
            module = _getattr(spec, "name", _none)
            if _type(module) is not _str or module.rpartition(".")[2] in _fresh_deny:
                raise _import_err(f"a fresh instance of module {module} is disabled in the HumanEval sandbox")
            origin = _getattr(spec, "origin", _none)
            if name == "_imp.create_dynamic":
                where = _norm(origin, _work) if _type(origin) is _str else _none
                if where is _none or not _under(where, _reads):
                    raise _import_err("loading this file is disabled in the HumanEval sandbox")
            raise _answer(_call(real, (_spec(name=module, origin=origin),), {}))
        if call_kwargs.get("dir_fd") is not _none:
            raise _err(f"{name} with dir_fd is disabled in the HumanEval sandbox")
        if call_args:
            path, rest = call_args[0], call_args[1:]
        elif "path" in call_kwargs:
            path, rest = call_kwargs.pop("path"), ()
        else:
            raise _err(f"{name} needs a path in the HumanEval sandbox")
        if _type(path) is _int:
            if name in _creates:
                raise _err(f"{name} on a file descriptor is disabled in the HumanEval sandbox")
            raise _answer(_call(real, (path,) + rest, call_kwargs))
        if _type(path) is not _str and _type(path) is not _bytes:
            path = _fspath(path)  # once: the real call gets this value, not the object
        where = _norm(path, _work)
        if where is _none:
            raise _err("this path is disabled in the HumanEval sandbox")
        if name in _creates:
            if not _under(where, (_work,)):
                raise _err(f"{name} outside the work dir is disabled in the HumanEval sandbox")
        elif not (_under(where, _reads) or _under(where, (_work,)) or where in _devices):
            raise _err(f"{name} of {where} is disabled in the HumanEval sandbox (outside the work dir)")
        raise _answer(_call(real, (path,) + rest, call_kwargs))
    if event == "open":
        path, mode, flags = args
        if mode is _none:
            raise _err("os.open is disabled in the HumanEval sandbox (use open())")
        if _type(path) is _int:
            return
        where = _norm(path, _work)
        if where is _none:
            raise _err("this path is disabled in the HumanEval sandbox")
        if flags & _wmask:
            if not _under(where, (_work,)):
                raise _err(f"writing {where} is disabled in the HumanEval sandbox (only the work dir)")
        elif not (_under(where, _reads) or _under(where, (_work,)) or where in _devices):
            raise _err(f"reading {where} is disabled in the HumanEval sandbox")
        return
    if event == "import":
        name, filename = args[0], args[1]
        if _type(name) is not _str or name.rpartition(".")[2] in _bad_modules:
            raise _import_err(f"importing {name} is disabled in the HumanEval sandbox")
        if filename is not _none:
            where = _norm(filename, _work)
            if where is _none or not _under(where, _reads):
                raise _import_err("loading this file is disabled in the HumanEval sandbox")
        return
    if event in _writes:
        for arg in args:
            if arg is _none or _type(arg) is _int:
                continue
            where = _norm(arg, _work)
            if where is _none or not _under(where, (_work,)):
                raise _err(f"{event} outside the work dir is disabled in the HumanEval sandbox")
        return
    if event in _lists:
        path = args[0]
        if path is _none or _type(path) is _int:
            return
        where = _norm(path, _work)
        if where is _none or not (_under(where, _reads) or _under(where, (_work,))):
            raise _err(f"listing {where} is disabled in the HumanEval sandbox")
        return
    if event in _finalize:
        # Interpreter shutdown clears audit hooks before objects' __del__ run: never get there.
        _exit(0)
    if event in _deny or event.startswith(_deny_prefixes):
        raise _err(f"{event} is disabled in the HumanEval sandbox")
    if event in ("object.__setattr__", "object.__delattr__") and args[1] in _funcattrs:
        raise _err(f"changing {args[1]} is disabled in the HumanEval sandbox")


_DENY = (
    "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.startfile", "os.kill",
    "os.killpg", "os.chdir", "os.chown", "os.link", "os.symlink", "os.setxattr", "os.removexattr", "os.lockf",
    "signal.pthread_kill", "code.__new__", "mmap.__new__", "sys.addaudithook", "cpython.PyInterpreterState_New",
    "shutil.chown", "webbrowser.open", "builtins.breakpoint", "pdb.Pdb",
)
_DENY_PREFIXES = (
    "ctypes.", "socket.", "subprocess.", "sqlite3.", "syslog.", "fcntl.", "resource.", "gc.get_", "marshal.load",
    "cpython.run_", "ftplib.", "http.client.", "imaplib.", "nntplib.", "poplib.", "smtplib.", "telnetlib.",
    "ensurepip.", "winreg.", "msvcrt.", "_winapi.",
)
_WRITES = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.truncate", "os.utime", "os.chmod"})
_LISTS = frozenset({"os.listdir", "os.scandir"})
_BAD_MODULES = frozenset({
    "ctypes", "_ctypes", "_ctypes_test", "_testcapi", "_testinternalcapi", "_testbuffer", "_testclinic",
    "_testimportmultiple", "_testmultiphase", "_xxsubinterpreters", "_xxtestfuzz", "_posixsubprocess", "_socket",
    "socket", "subprocess", "multiprocessing", "_multiprocessing", "_posixshmem", "pty", "resource", "sqlite3",
    "_sqlite3", "mmap", "fcntl", "termios", "readline", "_tkinter", "tkinter",
})


def _call_real(function, args, kwargs):
    """Run a guarded call in a frame with the real builtins (an extension module's init looks names up there;
    the hook's own frame has none). Looks up no name itself."""
    return function(*args, **kwargs)


class _Answer(BaseException):
    """How the audit hook hands a guarded call's result back to the wrapper (see _guard)."""


def _guard(*args, _audit=None, _event=None, _answer=None, _err=None, **kwargs):
    """The stand-in for an os / _imp function that raises no audit event of its own: it raises one, and the hook
    checks the arguments and answers with the real function's result (which only the hook holds)."""
    try:
        _audit("hellora.sandbox.call", _event, args, kwargs)
    except _answer as answer:
        return answer.args[0]
    raise _err(f"{_event} is disabled in the HumanEval sandbox")


# Filesystem calls that raise no audit event: metadata reads (stat, lstat, readlink, access, statvfs, pathconf and
# everything built on them, such as os.path.exists) and creations (mkfifo, mknod). Guarded: allowed where
# reading (or, for creations, writing) is, refused elsewhere; any other os function stays as it is.
_GUARDED_READS = ("stat", "lstat", "readlink", "access", "statvfs", "pathconf", "getxattr", "listxattr")
_GUARDED_CREATES = ("mkfifo", "mknod")
# Modules a completion may not instantiate afresh (a new instance has every function the sandbox removed).
_FRESH_DENY = frozenset({"posix", "nt", "_imp", "_signal", "_io", "_thread", "sys", "builtins", "gc", "_weakref",
                         "faulthandler", "_tracemalloc", "_abc", "_operator", "_functools"})


def _install(work, reads, devices, exit_now):
    """Bind every value the hook needs as a default argument (immutable: str, tuple, frozenset, builtins),
    so nothing the completion can reach (module globals, builtins, os.path) changes what the hook does."""
    import os, types, _imp
    posix = sys.modules.get("posix") or os
    real = {}
    no_globals_guard = {"__builtins__": {}}
    guard_code = _guard.__code__

    def guarded(event):
        wrapper = type(_guard)(guard_code, no_globals_guard, _guard.__name__)
        wrapper.__kwdefaults__ = {"_audit": sys.audit, "_event": event, "_answer": _Answer, "_err": PermissionError}
        return wrapper

    for name in _GUARDED_READS + _GUARDED_CREATES:
        function = getattr(posix, name, None) or getattr(os, name, None)
        if function is None:
            continue
        real["os." + name] = function
        for module in (os, posix):
            setattr(module, name, guarded("os." + name))
    for name in ("create_builtin", "create_dynamic"):
        if hasattr(_imp, name):
            real["_imp." + name] = getattr(_imp, name)
            setattr(_imp, name, guarded("_imp." + name))
    defaults = list(_hook.__defaults__)
    names = _hook.__code__.co_varnames[2:_hook.__code__.co_argcount]
    values = dict(zip(names, defaults))
    values.update(
        _work=work, _reads=tuple(reads), _devices=tuple(devices), _exit=exit_now,
        _wmask=os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC,
        _deny=frozenset(_DENY), _deny_prefixes=_DENY_PREFIXES, _writes=_WRITES, _lists=_LISTS,
        _bad_modules=_BAD_MODULES, _funcattrs=frozenset({"__code__"}),  # the hook itself is unreachable (gc.get_* denied)
        _finalize=frozenset({"cpython.PyInterpreterState_Clear", "cpython._PySys_ClearAuditHooks"}),
        _real=real, _creates=frozenset("os." + n for n in _GUARDED_CREATES), _answer=_Answer, _fspath=os.fspath,
        _spec=types.SimpleNamespace, _fresh_deny=_FRESH_DENY | _BAD_MODULES,
        _call=type(_call_real)(_call_real.__code__, {"__builtins__": sys.modules["builtins"]}, "_call_real"),
    )
    no_globals = {"__builtins__": {}}  # a stray global or builtin name would raise, i.e. deny
    hook = type(_hook)(_hook.__code__, no_globals, "_hook", tuple(values[n] for n in names))
    norm = type(_norm)(_norm.__code__, no_globals, "_norm", _norm.__defaults__)
    under = type(_under)(_under.__code__, no_globals, "_under")
    hook.__defaults__ = (norm, under) + hook.__defaults__[2:]
    sys.addaudithook(hook)


def _limit(kind, value):
    import resource
    try:
        soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass


def _candidate(job, libc, req_r, resp_w):
    """The candidate process: isolate, hook, import the completion, then serve calls until EOF."""
    import os, resource, signal
    _exit = os._exit
    work = job["workdir"]
    os.chdir(work)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    layers = ["audit-hook", "rlimits", "new-session"]
    root = os.geteuid() == 0
    if libc is not None and job["namespaces"]:
        flags = 0x40000000 | 0x20000000  # CLONE_NEWNET | CLONE_NEWPID
        if libc.unshare(flags) == 0 or (not root and libc.unshare(0x10000000 | flags) == 0):  # + CLONE_NEWUSER
            layers += ["network-namespace", "pid-namespace"]
            inner = os.fork()  # the first child in a new PID namespace is its pid 1
            if inner:
                os.close(req_r)
                os.close(resp_w)
                libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the checker
                _, status = os.waitpid(inner, 0)
                _exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    _limit(resource.RLIMIT_CPU, job["cpu_s"])
    if job["mem_bytes"] > 0:
        _limit(resource.RLIMIT_AS, job["mem_bytes"])
        _limit(resource.RLIMIT_DATA, job["mem_bytes"])
    _limit(resource.RLIMIT_FSIZE, job["fsize_bytes"])
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, 64)
    if root and job["drop_uid"]:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            layers.append("uid-nobody")
        except OSError:
            pass
    if libc is not None:
        if root and "uid-nobody" not in layers:
            header = (libc_types[0] * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
            if libc.capset(header, (libc_types[0] * 6)()) == 0:
                layers.append("no-capabilities")
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (set after the uid change, which clears it)
        layers.append("parent-death-signal")
    _limit(resource.RLIMIT_NPROC, 0)  # no processes or threads (root ignores it)
    if "pid-namespace" not in layers and os.getppid() != job["runner_pid"]:
        _exit(70)  # the checker is already gone
    sys.dont_write_bytecode = True
    sys.pycache_prefix = "/nonexistent-hellora-pycache"  # compile from source: no marshal.loads after the hook
    reads = job["read_roots"]
    sys.path[:] = [p for p in sys.path if any(p == r or p.startswith(r + "/") for r in reads)]
    for name in list(sys.modules):
        if name.partition(".")[0] in _BAD_MODULES:
            del sys.modules[name]
    for module in (os, sys.modules.get("posix"), signal, sys.modules.get("_signal")):
        for name in ("pidfd_open", "pidfd_send_signal", "mknod", "setsid", "setpgid", "chroot"):
            if module is not None and hasattr(module, name):
                delattr(module, name)
    for table in ("supports_dir_fd", "supports_fd", "supports_follow_symlinks", "supports_effective_ids"):
        getattr(os, table, set()).clear()
    libc = None
    _send(resp_w, {"isolation": layers})
    _install(work, reads, job["devices"], _exit)
    # From here on only the audit hook and the OS stand between the completion and the machine.
    try:
        import types
        module = types.ModuleType("__humaneval__")
        exec(compile(job["source"], "<completion>", "exec"), module.__dict__)
        function = module.__dict__[job["entry_point"]]
        if not callable(function):
            raise TypeError(f"{job['entry_point']} is not callable")
    except BaseException as err:
        try:
            _send(resp_w, ["error", f"{type(err).__name__}: {err}"[:2000]])
        finally:
            _exit(1)
    job = None
    _send(resp_w, ["ok"])
    while True:
        request = _recv(req_r)
        if request is None:
            _exit(0)
        try:
            args, kwargs = _decode(request[0]), _decode(request[1])
            reply = ["ok", _encode(function(*args, **kwargs))]
        except BaseException as err:
            try:
                reply = ["raise", type(err).__name__, str(err)[:2000]]
            except BaseException:
                reply = ["raise", "Exception", "unprintable exception"]
        _send(resp_w, reply)


class _Gone(Exception):
    pass


def remove_tree(path):
    """Remove ``path`` and everything under it without recursion and with at most two open folders at a time.

    A completion may leave any tree in its work dir (a 1,500-deep folder chain made ``shutil.rmtree`` raise
    ``RecursionError``; a deeper one exceeds PATH_MAX). This walks down with ``dir_fd``-relative calls, never
    follows a symlink, makes a folder the completion locked (mode 000) searchable again, and climbs back up
    through ``..``. Returns True when ``path`` is gone; never raises for what it finds inside.
    """
    import os, stat
    flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.unlink(path)
            return True
        except OSError:
            return False
    names = []  # the folder names from path down to the current folder
    try:
        while True:
            child = None
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        try:
                            mode = os.stat(entry.name, dir_fd=fd, follow_symlinks=False).st_mode
                        except OSError:
                            continue
                        if stat.S_ISDIR(mode):
                            child = entry.name
                            break
                        try:
                            os.unlink(entry.name, dir_fd=fd)
                        except OSError:
                            pass
            except OSError:
                pass
            if child is not None:
                try:
                    inner = os.open(child, flags, dir_fd=fd)
                except PermissionError:
                    try:
                        os.chmod(child, 0o700, dir_fd=fd)
                        inner = os.open(child, flags, dir_fd=fd)
                    except OSError:
                        return False
                except OSError:
                    return False
                names.append(child)
                os.close(fd)
                fd = inner
                continue
            if not names:
                break
            parent = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = parent
            try:
                os.rmdir(names.pop(), dir_fd=fd)
            except OSError:
                return False
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def _check(root, verdict_fd, child, req_w, resp_r):
    """The checker: run the dataset's test against the remote candidate; report on the verdict pipe."""
    import builtins, json, os, resource, signal
    result = {"verdict": "failed", "error": None, "isolation": []}

    def receive():
        message = _recv(resp_r)
        if message is None:
            raise _Gone()
        return message

    try:
        with open(root + "/check.json", encoding="ascii") as f:
            spec = json.load(f)
        os.unlink(root + "/check.json")
        _limit(resource.RLIMIT_CPU, spec["cpu_s"])
        if spec["mem_bytes"] > 0:
            _limit(resource.RLIMIT_AS, spec["mem_bytes"])
        hello = receive()
        result["isolation"] = [str(x) for x in hello.get("isolation", [])][:16] if type(hello) is dict else []
        loaded = receive()
        if type(loaded) is not list or loaded[:1] != ["ok"]:
            detail = loaded[1] if type(loaded) is list and len(loaded) > 1 else "no reply"
            raise RuntimeError(f"the completion failed to load: {detail}")

        def candidate(*args, **kwargs):
            _send(req_w, [_encode(args), _encode(kwargs)])
            reply = receive()
            if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
                return _decode(reply[1])
            if type(reply) is list and len(reply) == 3 and reply[0] == "raise":
                name, message = str(reply[1]), str(reply[2])
                kind = getattr(builtins, name, None)
                if not (isinstance(kind, type) and issubclass(kind, Exception)):
                    kind, message = RuntimeError, f"{name}: {message}"
                raise kind(message)
            raise ValueError("malformed reply from the candidate process")

        entry = spec["entry_point"]
        candidate.__name__ = candidate.__qualname__ = entry
        namespace = {"__name__": "__humaneval_check__"}
        for prompt in (spec["prompt"], spec["prompt"] + "\n    pass\n", ""):
            try:
                code = compile(prompt, "<prompt>", "exec")
            except SyntaxError:
                continue
            exec(code, namespace)
            break
        namespace[entry] = candidate
        exec(compile(spec["test"], "<test>", "exec"), namespace)
        check = namespace.get("check")
        if not callable(check):
            raise RuntimeError("the test defines no check function")
        check(candidate)
        result["verdict"] = "passed"
    except _Gone:
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
        _, status = os.waitpid(child, 0)
        child = None
        code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if code == 128 + signal.SIGXCPU:
            result.update(verdict="timed out", error="CPU time limit exceeded")
        elif code > 128:
            result["error"] = f"the candidate process was killed by signal {code - 128}"
        else:
            result["error"] = f"the candidate process exited (status {code}) before answering"
    except BaseException as err:
        result["error"] = f"{type(err).__name__}: {err}".rstrip(": ")[:2000]
    finally:
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
            except OSError:
                pass
    try:  # the candidate is dead: its work dir goes now, iteratively (a deep tree cannot crash the checker)
        remove_tree(root + "/work")
    except BaseException:
        pass
    data = (json.dumps(result, ensure_ascii=True) + "\n").encode("ascii")
    os.write(verdict_fd, data)
    os._exit(0 if result["verdict"] == "passed" else 1)


def _runner():
    import json, os
    root, verdict_fd = sys.argv[1], int(sys.argv[2])
    with open(root + "/candidate.json", encoding="ascii") as f:
        job = json.load(f)
    for name in job["preload"]:
        try:
            __import__(name)
        except Exception:
            pass
    global libc_types
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc_types = (ctypes.c_uint32,)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE=0: no ptrace or /proc/<pid>/mem by same-uid processes
    except (ImportError, OSError, AttributeError):
        libc = None
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    job["runner_pid"] = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            os.close(verdict_fd)
            os.close(req_w)
            os.close(resp_r)
            _candidate(job, libc, req_r, resp_w)
        finally:
            os._exit(70)
    os.close(req_r)
    os.close(resp_w)
    del job, libc
    _check(root, verdict_fd, child, req_w, resp_r)



libc_types = None
if __name__ == "__main__":
    _runner()
