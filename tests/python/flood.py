"""Opens many connections to sealgated's socket and holds them: some send nothing, some
announce a frame of the largest size and never send its body. Prints what the daemon did with
them, then holds them until its standard input closes.

Usage: flood.py SOCKET COUNT FRAME_BYTES
"""
import os
import resource
import select
import socket
import sys
import time

path, count, frame = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
# As many as this process may hold, if that is fewer.
count = min(count, hard - 16)

conns = []
for i in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    if i % 2 == 1:
        # A frame header promising FRAME_BYTES, and nothing after it. The daemon may have
        # answered and closed the connection already (a stranger gets one answer): then the
        # header finds no reader, and the connection counts as answered below.
        try:
            s.sendall(frame.to_bytes(4, "big"))
        except (BrokenPipeError, ConnectionResetError):
            pass
    conns.append(s)
print(f"opened {len(conns)}", flush=True)

# Whatever the daemon says within a second: a BUSY reply and a close, or nothing (held).
time.sleep(1.0)
answered = 0
poller = select.poll()
for s in conns:
    poller.register(s, select.POLLIN)
answered = len(poller.poll(0))
print(f"answered {answered} held {len(conns) - answered}", flush=True)
sys.stdin.read()
