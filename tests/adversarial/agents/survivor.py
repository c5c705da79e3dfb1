"""Hostile agent: leaves a double-forked, setsid'd process behind, then waits to be killed."""

import os
import sys
import time

marker = sys.argv[1]
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/usr/bin/python3", ["/usr/bin/python3", "-c", "import time; time.sleep(600)",
                                      marker])
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(0.3)
print("ready", flush=True)
os.execv("/usr/bin/python3", ["/usr/bin/python3", "-c", "import time; time.sleep(600)",
                              marker + "-main"])
