"""The C++ kernel's build folder after a killed build: torch's ``lock`` file
(``torch.utils.file_baton.FileBaton``) outlives a build killed with ``kill -9``,
and torch waits on it forever. gape.kernels.attention_cpu must remove a lock
whose owner is gone and load, and give up on a live owner after
``GAPE_CPU_BUILD_WAIT`` seconds with a reason naming the file. Each load runs in
a subprocess under a timeout, so a hang fails the test instead of the suite.
The compiler itself is stubbed out (torch's locking around it is not), except
in the slow test, which builds for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from gape.kernels import attention_cpu

LOAD_TIMEOUT = 120  # seconds; the stubbed load takes a few (importing torch), a hang takes forever

_LOADER = "from torch.utils import cpp_extension as ext\nfrom gape.kernels import attention_cpu\n"

# stubs for the compiler and the library import; torch's FileBaton logic around them runs as is
_STUB_BUILD = textwrap.dedent(
    """
    built = []
    ext._write_ninja_file_and_build_library = lambda **kw: built.append(kw["name"])
    ext._import_module_from_library = lambda *a, **kw: None
    """
)


# what torch's load does before it builds (``FileBaton.try_acquire``): create ``lock``
# exclusively and keep it open
_TORCH_LOCK = "os.open(os.path.join(build_dir, 'lock'), os.O_CREAT | os.O_EXCL)"
# what another gape process does around its build (``gape._io.lock_folder``)
_GAPE_LOCK = (
    "import fcntl\nfd = os.open(os.path.join(build_dir, %r), os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())" % attention_cpu.BUILD_LOCK
)


def _build_dir(tmp_path) -> str:
    return os.path.join(str(tmp_path / "ext"), attention_cpu.build_name())


def _env(tmp_path, **extra) -> dict:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "GAPE_CPU_KERNEL": "1", **extra}


def _holder(tmp_path, code: str) -> subprocess.Popen:
    """A process (no torch: it starts fast) that takes a lock in the build folder, says so, and
    sleeps holding it."""
    build_dir = _build_dir(tmp_path)
    os.makedirs(build_dir, exist_ok=True)
    script = f"import os, time\nbuild_dir = {build_dir!r}\n{code}\nprint('locked', flush=True)\ntime.sleep(300)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", "the lock holder did not start"
    return proc


def _load(tmp_path, stub: bool = True, **env) -> tuple[str, str]:
    """A fresh process's load: ("built [names the stub compiled]" or "unavailable <reason>", its stderr)."""
    script = _LOADER + (_STUB_BUILD if stub else "built = None\n") + textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("ignore")
        reason = attention_cpu._load()
        print("built", built) if reason is None else print("unavailable", reason)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(tmp_path, **env),
                          timeout=LOAD_TIMEOUT if stub else 900)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1], proc.stderr


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def _stale_lock(tmp_path) -> str:
    """A build folder whose build was killed holding torch's lock; the lock's path."""
    holder = _holder(tmp_path, _TORCH_LOCK)
    lock = os.path.join(_build_dir(tmp_path), "lock")
    _kill(holder)
    assert os.path.exists(lock)  # what kill -9 leaves behind
    return lock


def test_a_killed_builds_lock_is_removed_and_the_kernel_builds(tmp_path):
    lock = _stale_lock(tmp_path)
    out, err = _load(tmp_path, GAPE_CPU_BUILD_WAIT="600")  # the wait must not be what ends it
    assert out == f"built ['{attention_cpu.build_name()}']", err  # torch took the lock and ran the build
    assert f"removed {lock}" in err
    assert not os.path.exists(lock)
    assert os.path.exists(os.path.join(_build_dir(tmp_path), attention_cpu.BUILD_LOCK))


def test_a_live_builds_lock_is_waited_for_then_named(tmp_path):
    # a process outside gape's lock (an older gape, another tool) building in the same folder
    holder = _holder(tmp_path, _TORCH_LOCK)
    lock = os.path.join(_build_dir(tmp_path), "lock")
    try:
        out, _ = _load(tmp_path, GAPE_CPU_BUILD_WAIT="1")
    finally:
        _kill(holder)
    assert out.startswith("unavailable TimeoutError: ") and f"pid {holder.pid}" in out and f"delete {lock}" in out, out
    assert "GAPE_CPU_BUILD_WAIT" in out
    assert os.path.exists(lock)  # a live owner's lock is left alone


def test_a_build_in_another_gape_process_is_waited_for_then_named(tmp_path):
    holder = _holder(tmp_path, _GAPE_LOCK)
    try:
        out, _ = _load(tmp_path, GAPE_CPU_BUILD_WAIT="1")
    finally:
        _kill(holder)
    path = os.path.join(_build_dir(tmp_path), attention_cpu.BUILD_LOCK)
    assert out.startswith(f"unavailable TimeoutError: {path}: pid {holder.pid} is still building"), out


def test_a_bad_wait_is_refused_naming_the_variable(monkeypatch):
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(attention_cpu.ENV_BUILD_WAIT, bad)
        with pytest.raises(ValueError, match=f"GAPE_CPU_BUILD_WAIT='{bad}': expected a number of seconds"):
            attention_cpu._build_wait()
    monkeypatch.setenv(attention_cpu.ENV_BUILD_WAIT, "2.5")
    assert attention_cpu._build_wait() == 2.5
    monkeypatch.delenv(attention_cpu.ENV_BUILD_WAIT)
    assert attention_cpu._build_wait() == attention_cpu.BUILD_WAIT


@pytest.mark.slow
def test_a_killed_builds_lock_then_a_real_build(tmp_path):
    # compiles the kernel into an empty extensions folder (about a minute, more on a loaded machine)
    lock = _stale_lock(tmp_path)
    out, err = _load(tmp_path, stub=False)
    assert out == "built None", err
    assert not os.path.exists(lock)
    assert os.path.exists(os.path.join(_build_dir(tmp_path), f"{attention_cpu.build_name()}.so"))
