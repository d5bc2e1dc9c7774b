"""Runs a command (kubectl exec -it ...) on a real PTY, drives a resize, prints what it saw.

The pod-side script prints READY, then `stty size` after each input line. We start at
30x100, send a line, resize the PTY to 40x120 (the kernel sends SIGWINCH to kubectl),
send another line, and wait for the new size to be reported.
"""
import fcntl, os, pty, select, signal, struct, sys, termios, time

signal.alarm(90)
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    os.execvp(sys.argv[1], sys.argv[1:])

seen = b""

def read_until(token, limit=60):
    global seen
    end = time.time() + limit
    while token not in seen and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return False
            if not data:
                return False
            seen += data
    return token in seen

ok = read_until(b"READY")
if ok:
    time.sleep(0.5)
    os.write(fd, b"a\n")
    ok = read_until(b"30 100")
if ok:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    time.sleep(1.5)
    os.write(fd, b"b\n")
    ok = read_until(b"40 120")
read_until(b"\x00never", limit=5)
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode("utf-8", "replace"))
sys.exit(0 if ok and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else 1)
